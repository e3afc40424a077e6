"""The SDXL base deployment: text -> base images (or latents for ensemble-of-experts).

Compatible /generate requests that arrive together share one diffusers call (@serve.batch, sized
by user_config in YAML; hiresfix.sdxl.batching says which requests are compatible).
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.cancel import run_batched, run_cancellable
from deployments.progress import Reporter
from hiresfix.images import Picture
from hiresfix.schedule import hires_steps_run
from hiresfix.schemas import GenerateRequest, Img2ImgRequest
from hiresfix.sdxl import SDXLSettings
from hiresfix.sdxl.batching import run_groups
from hiresfix.sdxl.preview import preview_steps, render_preview
from hiresfix.stages import ImageBatch


@serve.deployment(name="SDXLBase")
class SDXLBase:
    def __init__(self, *, settings: dict, progress: DeploymentHandle, report_interval_s: float):
        # The model code is imported here, in the replica: `serve run` and the controller's build
        # import this module (deployments/graph.py) and need only the class.
        from hiresfix.sdxl import BaseStage, load_base_pipeline
        from hiresfix.sdxl.img2img import Img2ImgStage
        from hiresfix.sdxl.warmup import warm_up_base

        self.settings = SDXLSettings.model_validate(settings)
        self.progress = Reporter(progress, report_interval_s)
        metrics.use_serve_logging()
        # Loading fails here, at start-up, with the file named: never at the first request.
        with metrics.timed_load("base", self.settings.path or self.settings.source):
            self.pipe = load_base_pipeline(self.settings)
        self.stage = BaseStage(self.pipe)
        self.img2img_stage = Img2ImgStage(self.pipe)  # POST /img2img: the same modules
        metrics.record_warmup("base", warm_up_base(self.stage, self.settings.warmup))

    def reconfigure(self, config: dict) -> None:
        # user_config in YAML: the batching knobs change without restarting the replica.
        self._generate.set_max_batch_size(int(config.get("max_batch_size", 1)))
        self._generate.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))

    async def generate(self, req: GenerateRequest, request_id: str | None = None) -> ImageBatch:
        batch = await run_batched(
            lambda on_step: self._generate((req, on_step)),
            "generate",
            self.progress.stepper(
                request_id,
                "base",
                preview_steps(req.previews, req.num_inference_steps),
                render_preview,
            ),
        )
        if isinstance(batch, Exception):  # this request's own step callback ended it
            raise batch
        batch.request_id = request_id  # travels with the pictures: later stages report under it
        metrics.record_gpu_memory("base")
        return batch

    # Two calls overlap, as two requests always could (one encodes or decodes while the other
    # denoises); max_ongoing_requests bounds both together.
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
    async def _generate(self, jobs: list) -> list:
        # Log lines name the batch's requests (deployments/metrics.py).
        run = metrics.with_request_ids(metrics.batch_request_ids(), self.stage.run_batch)
        return await run_groups(jobs, self.stage.batch_key, run)

    async def img2img(
        self, batch: ImageBatch, req: Img2ImgRequest, size: tuple[int, int], mask: Picture | None
    ) -> ImageBatch:
        """POST /img2img (inpainting with `mask`) on the base model: a separate refiner, when one
        is configured, is trained for the last denoising steps only."""
        runs = hires_steps_run(req.num_inference_steps, 0, req.strength)  # of the schedule
        return await run_cancellable(
            lambda on_step: self.img2img_stage.run(batch, req, size, mask, on_step=on_step),
            "img2img",
            self.progress.stepper(
                batch.request_id,
                "img2img",
                preview_steps(req.previews, runs),
                render_preview,
            ),
        )

    def info(self) -> dict:
        return {
            "source": self.settings.source,
            "device": str(self.pipe.device),
            "dtype": str(self.pipe.unet.dtype).replace("torch.", ""),
        }
