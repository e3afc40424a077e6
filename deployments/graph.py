"""The deployment graph: the only place where stages are bound together.

serve_config*.yaml point at `deployments.graph:build_app` and pass `args` (validated by AppArgs);
replica counts, GPUs, autoscaling and queue bounds are set per deployment in the same YAML.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.base import SDXLBase
from deployments.ingress import Ingress, Limits
from deployments.progress import Progress
from deployments.refine import RefineFace
from deployments.upscaler import Upscaler
from hiresfix.face import FaceSettings
from hiresfix.sdxl import SDXLSettings
from hiresfix.upscale import UpscalerSettings


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sdxl: SDXLSettings = Field(default_factory=SDXLSettings)
    upscaler: UpscalerSettings = Field(default_factory=UpscalerSettings)
    face: FaceSettings = Field(default_factory=FaceSettings)
    limits: Limits = Field(default_factory=Limits)


def build_app(args: dict) -> Application:
    cfg = AppArgs.model_validate(args or {})
    sdxl = cfg.sdxl.model_dump()
    progress = Progress.bind()  # GET /progress: every stage reports its steps here
    base = SDXLBase.bind(sdxl, progress)
    upscaler = Upscaler.bind(cfg.upscaler.model_dump(), progress)
    refine = RefineFace.bind(sdxl, cfg.face.model_dump(), progress)
    return Ingress.bind(
        base,
        upscaler,
        refine,
        progress,
        cfg.limits,
        [m.name for m in cfg.upscaler.models],
        [m.name for m in cfg.face.models],
    )
