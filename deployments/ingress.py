"""The HTTP ingress: routes. Each route checks the request (hiresfix/limits.py), runs its stage plan
(hiresfix/plan.py) and encodes the answer; HTTP plumbing lives in deployments/http.py.

Stages are chained by passing each DeploymentResponse straight into the next call, so pictures go
replica -> replica and only the final result comes back here.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the route methods,
# or it reads the request body as a query parameter.
import asyncio
import logging
import os
import time

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.a1111_routes import A1111Routes
from deployments.guard import GUARD_ENV, GuardSettings, HttpSettings
from deployments.http import (
    RETRYABLE,
    STAGE_GONE,
    api,
    binary_format,
    error_docs,
    image_answer,
    json_answer,
    request_id,
    unavailable,
)
from deployments.openai_routes import OpenAIRoutes
from deployments.progress import Tracker
from hiresfix.images import decode_image, encode_b64, encode_image
from hiresfix.limits import Limits, check_models
from hiresfix.plan import StageCall, generate_plan, steps_of, upscale_plan
from hiresfix.progress import ProgressSettings
from hiresfix.schemas import (
    GenerateRequest,
    HealthResponse,
    ImageResponse,
    ModelInfo,
    ModelsResponse,
    ProgressInfo,
    RequestError,
    UpscaleRequest,
)
from hiresfix.stages import ImageBatch

log = logging.getLogger("hiresfix.ingress")

# What each route can answer besides 200 (deployments/http.py says when): the OpenAPI document.
GENERATE_ERRORS = error_docs(400, 401, 406, 408, 409, 413, 422, 429, 500, 503, binary=True)
UPSCALE_ERRORS = error_docs(400, 401, 408, 413, 422, 429, 500, 503, binary=True)
PROGRESS_ERRORS = error_docs(401, 404, 422, 500, 503)


class HealthSettings(BaseModel):
    """serve_config `args.health`: /health and /models answer fast while the stages are busy."""

    model_config = ConfigDict(extra="forbid")
    model_info_ttl_s: float = Field(
        30.0, ge=0, description="How long the stages' model reports are reused."
    )
    model_info_timeout_s: float = Field(
        10.0, gt=0, description="How long to wait for one stage's report."
    )


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(OpenAIRoutes, A1111Routes):  # /v1/* and /sdapi/v1/* routes live there
    def __init__(
        self,
        *,
        base: DeploymentHandle,
        upscaler: DeploymentHandle,
        refine: DeploymentHandle,
        progress: DeploymentHandle,
        limits: Limits,
        progress_settings: ProgressSettings,
        health: HealthSettings,
        http: HttpSettings,
        upscaler_names: list[str],
        face_names: list[str],
    ):
        self.stages = {
            "base": base,
            "upscaler": upscaler,
            "refine": refine,
        }  # names used by hiresfix/plan.py
        self.tracker = Tracker(progress, progress_settings)
        self.limits, self.health_settings = limits, health
        self.upscaler_names, self.face_names = upscaler_names, face_names
        guard = GuardSettings(**http.model_dump(), max_body_bytes=limits.max_body_bytes())
        os.environ[GUARD_ENV] = guard.model_dump_json()  # read by deployments/guard.py
        self._infos: dict[str, dict] | None = None
        self._infos_at = 0.0

    # --- routes ---
    @api.post("/generate", response_model=ImageResponse, responses=GENERATE_ERRORS)
    async def generate(self, req: GenerateRequest, request: Request) -> Response:
        binary = binary_format(request, req.output_format)
        if binary and req.num_images > 1:
            raise RequestError(
                "num_images",
                "an image/* answer holds one image: ask for application/json to"
                f" get {req.num_images}, or set num_images to 1",
                406,
            )
        rid, t0 = request_id(request), time.perf_counter()
        batch = await self._generate(req, rid)
        return await self._answer(batch, binary or req.output_format, t0, rid, binary is not None)

    @api.post("/upscale", response_model=ImageResponse, responses=UPSCALE_ERRORS)
    async def upscale(self, req: UpscaleRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        batch = await self._upscale(req, t0)
        binary = binary_format(request, req.output_format)
        return await self._answer(batch, binary or req.output_format, t0, None, binary is not None)

    @api.get("/progress/{request_id}", response_model=ProgressInfo, responses=PROGRESS_ERRORS)
    async def progress_of(self, request_id: str) -> ProgressInfo:
        return await self.tracker.read(request_id)

    # --- the stage chain ---
    async def _generate(self, req: GenerateRequest, rid: str) -> ImageBatch:
        check_models(req, self.upscaler_names, self.face_names)
        self.limits.check_generate(req)
        plan = generate_plan(req, rid)
        async with self.tracker.track(rid, steps_of(plan)):
            return await self._run(plan)

    async def _upscale(self, req: UpscaleRequest, t0: float) -> ImageBatch:
        check_models(req, self.upscaler_names, self.face_names)
        pic = await asyncio.to_thread(
            decode_image,
            req.image,
            max_pixels=self.limits.max_input_pixels,
            max_bytes=self.limits.max_input_bytes,
        )
        size = self.limits.upscale_size(req, pic.width, pic.height)
        batch = ImageBatch([pic], [None], {"decode": round(time.perf_counter() - t0, 4)})
        return await self._run(upscale_plan(req, size), batch)

    async def _run(self, plan: list[StageCall], batch: ImageBatch | None = None) -> ImageBatch:
        try:
            return await self._chain(plan, batch)
        except RETRYABLE as exc:
            log.warning("stage unavailable or full: %s", exc)
            raise unavailable(exc) from exc

    async def _chain(self, plan: list[StageCall], batch: ImageBatch | None) -> ImageBatch:
        """Each call gets the previous call's DeploymentResponse: the batch travels replica to
        replica, never through here."""
        responses, result = [], batch
        for call in plan:
            method = getattr(self.stages[call.deployment], call.method)
            result = (
                method.remote(*call.args) if result is None else method.remote(result, *call.args)
            )
            responses.append(result)
        if not responses:
            return batch
        try:
            return await result
        except STAGE_GONE:
            return await self._recover(plan, responses, batch)

    async def _recover(
        self, plan: list[StageCall], responses: list, batch: ImageBatch | None
    ) -> ImageBatch:
        """A stage's replica or node died under this request. Find which: an optional stage falls
        back (hiresfix/plan.py) and the rest of the plan runs again from its output; any other stage
        re-raises, which answers a retryable 503."""
        prev = batch
        for i, (call, response) in enumerate(zip(plan, responses)):
            try:
                prev = await response
            except STAGE_GONE:
                if call.fallback is None or prev is None:
                    raise
                log.warning(
                    "stage %s.%s unavailable; using its fallback", call.deployment, call.method
                )
                out = await asyncio.to_thread(call.fallback, prev, *call.args)
                return await self._chain(plan[i + 1 :], out)
        return prev

    # --- answers ---
    async def _encode(
        self, batch: ImageBatch, fmt: str, t0: float, rid: str | None
    ) -> ImageResponse:
        images = await self._timed_encode(
            batch, t0, lambda: [encode_b64(p, fmt) for p in batch.pictures]
        )
        return batch.response(images, fmt, rid)

    async def _answer(
        self, batch: ImageBatch, fmt: str, t0: float, rid: str | None, binary: bool
    ) -> Response:
        """JSON with base64 images, or (Accept: image/*) the file with the rest in headers."""
        if not binary:
            return json_answer(await self._encode(batch, fmt, t0, rid))
        data = await self._timed_encode(batch, t0, lambda: encode_image(batch.pictures[0], fmt))
        return image_answer(batch.response([""], fmt, rid), data)

    @staticmethod
    async def _timed_encode(batch: ImageBatch, t0: float, encode):
        """Run `encode` off the event loop; record its time and the request's total so far."""
        t_enc = time.perf_counter()
        out = await asyncio.to_thread(encode)
        batch.add_time("encode", time.perf_counter() - t_enc)
        batch.timings["total"] = round(time.perf_counter() - t0, 4)
        return out

    # --- health and models ---
    async def _stage_infos(self) -> dict[str, dict]:
        """Each stage's model report, reused for model_info_ttl_s: /health stays fast when the
        stages are busy (info() queues behind real work), and still sees a stage replica that
        restarted or scaled out with a different outcome (a weights file fixed or gone)."""
        ttl = self.health_settings.model_info_ttl_s
        if self._infos is not None and time.monotonic() - self._infos_at < ttl:
            return self._infos
        names = {"base": "SDXLBase", "upscaler": "Upscaler", "refine": "RefineFace"}
        timeout = self.health_settings.model_info_timeout_s
        answers = await asyncio.gather(
            *(asyncio.wait_for(self.stages[k].info.remote(), timeout) for k in names),
            return_exceptions=True,
        )
        infos = {
            names[k]: (
                {"info_error": "no answer from this stage"} if isinstance(a, BaseException) else a
            )
            for k, a in zip(names, answers)
        }
        if not any(isinstance(a, BaseException) for a in answers):
            self._infos, self._infos_at = infos, time.monotonic()
        return infos

    async def _sdxl_source(self) -> str | None:
        """The configured SDXL weights (`sdxl.source`), from the base stage's cached report."""
        return (await self._stage_infos())["SDXLBase"].get("source")

    async def _deployment_states(self) -> dict[str, str]:
        """Replica health as the Serve controller sees it: no request to the (busy) replicas."""
        app = serve.get_replica_context().replica_id.deployment_id.app_name
        status = await asyncio.to_thread(serve.status)
        return {name: d.status.value for name, d in status.applications[app].deployments.items()}

    @api.get("/health", response_model=HealthResponse, responses=error_docs(500))
    async def health(self) -> HealthResponse:
        infos, states = await asyncio.gather(self._stage_infos(), self._deployment_states())
        deployments = {
            name: {**info, "state": states.get(name, "UNKNOWN")} for name, info in infos.items()
        }
        deployments["Progress"] = {
            "state": states.get("Progress", "UNKNOWN")
        }  # GET /progress behind it
        up, rf = infos["Upscaler"], infos["RefineFace"]
        models = [ModelInfo(**m) for m in up.get("models", []) + rf.get("face_models", [])]
        healthy = (
            all(d["state"] == "HEALTHY" for d in deployments.values())
            and states.get("Ingress") == "HEALTHY"
        )
        return HealthResponse(
            status="ok" if healthy else "degraded",
            realesrgan_available=bool(up.get("neural_available")),
            face_restoration_available=bool(rf.get("face_available")),
            models=models,
            deployments=deployments,
        )

    @api.get("/models", response_model=ModelsResponse, responses=error_docs(401, 500))
    async def models(self) -> ModelsResponse:
        infos = await self._stage_infos()
        return ModelsResponse(
            upscalers=[ModelInfo(**m) for m in infos["Upscaler"].get("models", [])],
            face_models=[ModelInfo(**m) for m in infos["RefineFace"].get("face_models", [])],
        )
