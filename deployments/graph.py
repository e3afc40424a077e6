"""The deployment graph: the only place where stages are bound together.

serve_config*.yaml point at `deployments.graph:build_app` and pass `args` (validated by AppArgs);
replica counts, GPUs, autoscaling and queue bounds are set per deployment in the same YAML. An
app with `args.stages_from` is a front door: only its Ingress and Jobs, calling the named app's
stages (deployments/elsewhere.py).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from deployments.base import SDXLBase
from deployments.elsewhere import Elsewhere
from deployments.guard import HttpSettings
from deployments.ingress import DEPLOYMENTS, HealthSettings, Ingress
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


class Offer(BaseModel):
    """What a front door (`stages_from`) lets its clients name: a subset of the other app's."""

    model_config = ConfigDict(extra="forbid")
    upscalers: list[str] = Field(
        default_factory=list,
        description="Upscaler names requests may ask for (none: the stage's default only).",
    )
    face_models: list[str] = Field(
        default_factory=list,
        description="Face models requests may ask for (none: the stage's default only).",
    )


# The stages a front door takes from the app it names (and the board they report to), by the
# Ingress's argument names, and the settings of theirs it cannot have (its Ingress's side of
# progress and openai it keeps).
SHARED = {**DEPLOYMENTS, "progress": "Progress"}
BOARD_SIDE = {"keep_s", "max_entries", "report_interval_s"}
RESULTS_SIDE = {"results_ttl_s", "results_max_images", "results_max_bytes"}


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages_from: str | None = Field(
        None,
        description="Another application of this config whose SDXLBase, Upscaler, RefineFace"
        " and Progress this one calls instead of starting its own: one set of models in GPU"
        " memory behind several route prefixes, each with its own limits, http (API keys),"
        " jobs and openai settings. Its sdxl, upscaler and face settings are that app's (leave"
        " them out here), and so are the progress board's (keep_s, max_entries,"
        " report_interval_s) and the openai url results' limits (results_*).",
    )
    offer: Offer | None = Field(None, description="With stages_from: the models it offers.")
    sdxl: SDXLSettings = Field(default_factory=SDXLSettings)
    upscaler: UpscalerSettings = Field(default_factory=UpscalerSettings)
    face: FaceSettings = Field(default_factory=FaceSettings)
    limits: Limits = Field(default_factory=Limits)
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)

    @model_validator(mode="after")
    def _front_door(self) -> AppArgs:
        if self.stages_from is None:
            if self.offer is not None:
                raise ValueError(
                    "offer is for an app with stages_from; an app with its own stages offers"
                    " every model in its upscaler.models and face.models"
                )
            return self
        # What the other app's stages and board hold.
        own = sorted({"sdxl", "upscaler", "face"} & self.model_fields_set)
        own += [f"progress.{k}" for k in sorted(BOARD_SIDE & self.progress.model_fields_set)]
        own += [f"openai.{k}" for k in sorted(RESULTS_SIDE & self.openai.model_fields_set)]
        if own:
            raise ValueError(
                f"stages_from {self.stages_from!r} runs that app's stages: leave out {own} here"
                " and list the models this app offers under `offer`"
            )
        return self


def build_app(args: dict) -> Application:
    cfg = AppArgs.model_validate(args or {})
    if cfg.stages_from is None:
        stages = own_stages(cfg)
        upscalers = [m.name for m in cfg.upscaler.models]
        faces = [m.name for m in cfg.face.models]
    else:  # a front door: no model loaded here, that app's replicas are called
        stages = {arg: Elsewhere(cfg.stages_from, name) for arg, name in SHARED.items()}
        offer = cfg.offer or Offer()
        upscalers, faces = offer.upscalers, offer.face_models
    return Ingress.bind(
        **stages,
        limits=cfg.limits,
        progress_settings=cfg.progress,
        health=cfg.health,
        http=cfg.http,
        upscaler_names=upscalers,
        face_names=faces,
        openai=cfg.openai,
        jobs=Jobs.bind(settings=cfg.jobs),  # the queue behind /jobs; it calls the Ingress back
    )


def own_stages(cfg: AppArgs) -> dict:
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
    return dict(base=base, upscaler=upscaler, refine=refine, progress=progress)
