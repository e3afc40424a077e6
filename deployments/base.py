"""The SDXL base deployment: text -> base images (or latents for ensemble-of-experts)."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.cancel import run_cancellable
from deployments.progress import Reporter
from hiresfix.schemas import GenerateRequest
from hiresfix.sdxl import BaseStage, SDXLSettings, load_base_pipeline
from hiresfix.stages import ImageBatch


@serve.deployment(name="SDXLBase")
class SDXLBase:
    def __init__(self, *, settings: dict, progress: DeploymentHandle, report_interval_s: float):
        self.settings = SDXLSettings.model_validate(settings)
        self.progress = Reporter(progress, report_interval_s)
        # Loading fails here, at start-up, with the file named: never at the first request.
        self.pipe = load_base_pipeline(self.settings)
        self.stage = BaseStage(self.pipe)

    async def generate(self, req: GenerateRequest, request_id: str | None = None) -> ImageBatch:
        batch = await run_cancellable(
            lambda on_step: self.stage.run(req, on_step=on_step),
            "generate",
            self.progress.stepper(request_id, "base"),
        )
        batch.request_id = request_id  # travels with the pictures: later stages report under it
        return batch

    def info(self) -> dict:
        return {
            "source": self.settings.source,
            "device": str(self.pipe.device),
            "dtype": str(self.pipe.unet.dtype).replace("torch.", ""),
        }
