"""The refine/face deployment: hires-fix img2img, the ensemble-of-experts finish, and face
restoration. Compatible hires passes that arrive together share one diffusers call (@serve.batch,
sized by user_config in YAML, as in deployments/base.py)."""

from __future__ import annotations

import asyncio
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.cancel import run_batched, run_cancellable
from deployments.progress import Reporter
from hiresfix.face import FaceRestorer, FaceSettings
from hiresfix.schemas import GenerateRequest
from hiresfix.sdxl import SDXLSettings
from hiresfix.sdxl.batching import run_groups
from hiresfix.stages import ImageBatch


@serve.deployment(name="RefineFace")
class RefineFace:
    def __init__(
        self, *, sdxl: dict, face: dict, progress: DeploymentHandle, report_interval_s: float
    ):
        from hiresfix.sdxl import RefineStage, load_refine_pipeline  # in the replica: see base.py
        from hiresfix.sdxl.warmup import warm_up_hires

        self.settings = SDXLSettings.model_validate(sdxl)
        self.progress = Reporter(progress, report_interval_s)
        metrics.use_serve_logging()
        s = self.settings
        with metrics.timed_load("refine", s.refiner_path or s.path or s.source):
            self.pipe = load_refine_pipeline(self.settings)
        self.stage = RefineStage(self.pipe)
        metrics.record_warmup("refine", warm_up_hires(self.stage, s.warmup))
        with metrics.timed_load("face", "all"):  # every configured face model
            self.faces = FaceRestorer.from_settings(FaceSettings.model_validate(face))
        metrics.record_model_infos("face", self.faces.models_info())

    async def finish(self, batch: ImageBatch, req: GenerateRequest) -> ImageBatch:
        return await run_cancellable(
            lambda on_step: self.stage.finish(batch, req, on_step=on_step),
            "finish",
            self.progress.stepper(batch.request_id, "finish"),
        )

    def reconfigure(self, config: dict) -> None:
        # user_config in YAML: the batching knobs change without restarting the replica.
        self._hires.set_max_batch_size(int(config.get("max_batch_size", 1)))
        self._hires.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))

    async def hires(self, batch: ImageBatch, req: GenerateRequest) -> ImageBatch:
        result = await run_batched(
            lambda on_step: self._hires((batch, req, on_step)),
            "hires",
            self.progress.stepper(batch.request_id, "hires"),
        )
        if isinstance(result, Exception):  # this request's own step callback ended it
            raise result
        return result

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
    async def _hires(self, jobs: list) -> list:
        # As SDXLBase._generate: two calls may overlap, log lines name the batch's requests.
        run = metrics.with_request_ids(metrics.batch_request_ids(), self.stage.hires_batch)
        return await run_groups(jobs, self.stage.batch_key, run)

    async def restore_faces(
        self, batch: ImageBatch, weight: float, model: str | None
    ) -> ImageBatch:
        self.progress.mark(batch.request_id, "face")
        # Off the event loop, so info() and other requests are answered while faces are restored.
        return await asyncio.to_thread(self._restore_faces, batch, weight, model)

    def _restore_faces(self, batch: ImageBatch, weight: float, model: str | None) -> ImageBatch:
        t0 = time.perf_counter()
        batch.pictures, batch.face_restoration = self.faces.restore_all(
            batch.pictures, weight, model
        )
        batch.add_time("face", time.perf_counter() - t0)
        return batch

    def info(self) -> dict:
        metrics.record_gpu_memory("refine")  # /health asks every model_info_ttl_s: a fresh value
        return {
            "device": str(self.pipe.device),
            "face_available": self.faces.available(),
            "face_models": [m.model_dump() for m in self.faces.models_info()],
        }
