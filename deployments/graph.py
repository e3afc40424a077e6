"""The deployment graph: the only place where stages are bound together.

serve_config*.yaml point at `deployments.graph:build_app` and pass `args` (validated by AppArgs);
replica counts, GPUs, autoscaling and queue bounds are set per deployment in the same YAML.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.base import SDXLBase
from deployments.guard import HttpSettings
from deployments.ingress import HealthSettings, Ingress
from deployments.jobs import Jobs
from deployments.progress import Progress
from deployments.refine import RefineFace
from deployments.upscaler import Upscaler
from hiresfix.face import FaceSettings
from hiresfix.jobs import JobSettings
from hiresfix.limits import Limits
from hiresfix.openai_api import OpenAISettings
from hiresfix.progress import ProgressSettings
from hiresfix.sdxl import SDXLSettings
from hiresfix.upscale import UpscalerSettings


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sdxl: SDXLSettings = Field(default_factory=SDXLSettings)
    upscaler: UpscalerSettings = Field(default_factory=UpscalerSettings)
    face: FaceSettings = Field(default_factory=FaceSettings)
    limits: Limits = Field(default_factory=Limits)
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)


def build_app(args: dict) -> Application:
    cfg = AppArgs.model_validate(args or {})
    sdxl = cfg.sdxl.model_dump()
    every = cfg.progress.report_interval_s
    # Every stage reports its steps to one progress board (GET /progress).
    progress = Progress.bind(settings=cfg.progress, results=cfg.openai)  # and the url results
    base = SDXLBase.bind(settings=sdxl, progress=progress, report_interval_s=every)
    upscaler = Upscaler.bind(
        settings=cfg.upscaler.model_dump(), progress=progress, report_interval_s=every
    )
    refine = RefineFace.bind(
        sdxl=sdxl, face=cfg.face.model_dump(), progress=progress, report_interval_s=every
    )
    return Ingress.bind(
        base=base,
        upscaler=upscaler,
        refine=refine,
        progress=progress,
        limits=cfg.limits,
        progress_settings=cfg.progress,
        health=cfg.health,
        http=cfg.http,
        upscaler_names=[m.name for m in cfg.upscaler.models],
        face_names=[m.name for m in cfg.face.models],
        openai=cfg.openai,
        jobs=Jobs.bind(settings=cfg.jobs),  # the queue behind /jobs; it calls the Ingress back
    )
