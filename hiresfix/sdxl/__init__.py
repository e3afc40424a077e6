"""SDXL base + refine model code (no Ray): settings, loading, the two stages, a tiny test model."""

from importlib import import_module

from hiresfix.sdxl.settings import SDXLSettings

# The model code (torch, diffusers: ~15 s to import on 2 cores) loads on first use: the deployment
# graph imports this package for SDXLSettings in `serve run` and in each app's build on the
# controller, which never run a model.
_LAZY = {
    "BaseStage": "generate",
    "RefineStage": "generate",
    "hires_schedule_length": "generate",
    "request_seeds": "generate",
    "ModelLoadError": "loading",
    "load_base_pipeline": "loading",
    "load_refine_pipeline": "loading",
    "make_scheduler": "schedulers",
    "build_tiny_sdxl": "tiny",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)


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
