"""The upscaler deployment: owns the UpscalerBank (RealESRGAN & co, LANCZOS fallback).

It gets its own fractional GPU and autoscaling in serve_config.yaml. Concurrent requests are
grouped with @serve.batch so their tiles share forward passes.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.progress import Reporter
from hiresfix.stages import ImageBatch
from hiresfix.upscale import UpscaleJob, UpscalerBank, UpscalerSettings


@serve.deployment(name="Upscaler")
class Upscaler:
    def __init__(self, *, settings: dict, progress: DeploymentHandle, report_interval_s: float):
        self.progress = Reporter(progress, report_interval_s)
        metrics.use_serve_logging()
        with metrics.timed_load("upscale", "all"):  # the bank loads every configured model
            self.bank = UpscalerBank.from_settings(UpscalerSettings.model_validate(settings))
        metrics.record_model_infos("upscale", self.bank.models_info())
        metrics.record_warmup("upscale", self.bank.warm_up())

    def reconfigure(self, config: dict) -> None:
        # user_config in YAML: batching knobs can change without restarting replicas.
        self._run.set_max_batch_size(int(config.get("max_batch_size", 4)))
        self._run.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

    async def upscale(
        self, batch: ImageBatch, size: tuple[int, int], model: str | None, use_neural: bool
    ) -> ImageBatch:
        """Resize every picture of `batch` to `size` (w, h), computed by the ingress."""
        t0 = time.perf_counter()
        self.progress.mark(batch.request_id, "upscale")
        jobs = [UpscaleJob(pic, tuple(size), model, use_neural) for pic in batch.pictures]
        if any(self.bank.needs_model(j) for j in jobs):
            outcomes = await self._run(jobs)
        else:  # LANCZOS or nothing: no forward pass to share, so no batch window to wait out
            outcomes = await asyncio.to_thread(self.bank.upscale_jobs, jobs)
        batch.record_upscale(outcomes)
        metrics.record_upscaled(outcomes)
        metrics.record_gpu_memory("upscale")
        batch.add_time("upscale", time.perf_counter() - t0)
        return batch

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _run(self, job_lists: list[list[UpscaleJob]]) -> list[list]:
        flat = [job for jobs in job_lists for job in jobs]
        # The bank blocks (torch); keep the replica's event loop free to accept more requests.
        # Its log lines name the batch's requests (deployments/metrics.py).
        work = metrics.with_request_ids(metrics.batch_request_ids(), self.bank.upscale_jobs)
        outcomes = await asyncio.to_thread(work, flat)
        out, i = [], 0
        for jobs in job_lists:
            out.append(outcomes[i : i + len(jobs)])
            i += len(jobs)
        return out

    def info(self) -> dict:
        return {
            "neural_available": self.bank.neural_available(),
            "models": [m.model_dump() for m in self.bank.models_info()],
        }
