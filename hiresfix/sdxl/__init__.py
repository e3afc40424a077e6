"""SDXL base + refine model code (no Ray): settings, loading, the two stages, a tiny test model."""

from hiresfix.sdxl.generate import BaseStage, RefineStage, hires_schedule_length, request_seeds
from hiresfix.sdxl.loading import ModelLoadError, load_base_pipeline, load_refine_pipeline
from hiresfix.sdxl.schedulers import make_scheduler
from hiresfix.sdxl.settings import SDXLSettings
from hiresfix.sdxl.tiny import build_tiny_sdxl

__all__ = [
    "SDXLSettings",
    "ModelLoadError",
    "load_base_pipeline",
    "load_refine_pipeline",
    "BaseStage",
    "RefineStage",
    "make_scheduler",
    "build_tiny_sdxl",
    "hires_schedule_length",
    "request_seeds",
]
