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

from fastapi import Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.a1111_routes import A1111Routes
from deployments.elsewhere import Elsewhere, apps_of, resolve
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
from deployments.jobs_routes import JobsRoutes
from deployments.openai_routes import OpenAIRoutes
from deployments.progress import Tracker
from deployments.watch import ReplicaWatch
from hiresfix.a1111 import tag_pictures
from hiresfix.images import decode_image, encode_b64, encode_image
from hiresfix.limits import Limits, check_models
from hiresfix.openai_api import OpenAISettings
from hiresfix.plan import StageCall, generate_plan, img2img_plan, steps_of, upscale_plan
from hiresfix.progress import ProgressSettings
from hiresfix.schemas import (
    GenerateRequest,
    HealthResponse,
    ImageResponse,
    Img2ImgRequest,
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
IMG2IMG_ERRORS = GENERATE_ERRORS


class StageLost(RuntimeError):
    """Stage `index` of a plan has no running replica left (deployments/watch.py)."""

    def __init__(self, index: int):
        super().__init__(f"stage {index} has no running replica")
        self.index = index


# The stage handles (hiresfix/plan.py's StageCall.deployment) and their Serve deployments.
DEPLOYMENTS = {"base": "SDXLBase", "upscaler": "Upscaler", "refine": "RefineFace"}
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
    replica_watch_s: float = Field(
        1.0,
        gt=0,
        description="How long the controller's count of running replicas is reused: an optional"
        " stage with none (its node lost) falls back at once, and /health says so.",
    )


def one_image_format(request: Request, req: GenerateRequest | Img2ImgRequest) -> str | None:
    """binary_format, refusing an image/* answer for more than one image (406)."""
    binary = binary_format(request, req.output_format)
    if binary and req.num_images > 1:
        raise RequestError(
            "num_images",
            "an image/* answer holds one image: ask for application/json to"
            f" get {req.num_images}, or set num_images to 1",
            406,
        )
    return binary


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(OpenAIRoutes, A1111Routes, JobsRoutes):  # /v1/*, /sdapi/v1/*, /jobs routes there
    def __init__(
        self,
        *,
        base: DeploymentHandle | Elsewhere,  # Elsewhere: a front door's (deployments/graph.py)
        upscaler: DeploymentHandle | Elsewhere,
        refine: DeploymentHandle | Elsewhere,
        progress: DeploymentHandle | Elsewhere,
        limits: Limits,
        progress_settings: ProgressSettings,
        health: HealthSettings,
        http: HttpSettings,
        upscaler_names: list[str],
        face_names: list[str],
        jobs: DeploymentHandle | None = None,
        openai: OpenAISettings | None = None,
    ):
        self.stages = {
            "base": resolve(base),
            "upscaler": resolve(upscaler),
            "refine": resolve(refine),
        }  # names used by hiresfix/plan.py
        self.tracker = Tracker(resolve(progress), progress_settings)
        self.jobs = jobs  # the job queue (deployments/jobs.py) behind /jobs
        self.openai_settings = openai or OpenAISettings()  # /v1 url answers (openai_routes.py)
        self.replicas = ReplicaWatch(  # deployments/watch.py
            health.replica_watch_s, apps_of(base, upscaler, refine, progress)
        )
        self.limits, self.health_settings = limits, health
        self.png_level = http.png_compress_level  # hiresfix/images.py: PNG_COMPRESS_LEVEL
        self.upscaler_names, self.face_names = upscaler_names, face_names
        guard = GuardSettings(**http.model_dump(), max_body_bytes=limits.max_body_bytes())
        os.environ[GUARD_ENV] = guard.model_dump_json()  # read by deployments/guard.py
        self._infos: dict[str, dict] | None = None
        self._infos_at = 0.0
        metrics.use_serve_logging()  # our log lines carry the request id

    # --- routes ---
    @api.post("/generate", response_model=ImageResponse, responses=GENERATE_ERRORS)
    async def generate(self, req: GenerateRequest, request: Request) -> Response:
        binary = one_image_format(request, req)
        rid, t0 = request_id(request), time.perf_counter()
        batch = await self._generate(req, rid)
        return await self._answer(batch, binary or req.output_format, t0, rid, binary is not None)

    @api.post("/upscale", response_model=ImageResponse, responses=UPSCALE_ERRORS)
    async def upscale(self, req: UpscaleRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        batch = await self._upscale(req, t0)
        binary = binary_format(request, req.output_format)
        return await self._answer(batch, binary or req.output_format, t0, None, binary is not None)

    @api.post("/img2img", response_model=ImageResponse, responses=IMG2IMG_ERRORS)
    async def img2img(self, req: Img2ImgRequest, request: Request) -> Response:
        """Your image redrawn at `strength` (inpainted where `mask` is white), then the hires fix
        and face pass as in /generate."""
        binary = one_image_format(request, req)
        rid, t0 = request_id(request), time.perf_counter()
        batch = await self._img2img(req, rid, t0)
        return await self._answer(batch, binary or req.output_format, t0, rid, binary is not None)

    @api.get("/progress/{request_id}", response_model=ProgressInfo, responses=PROGRESS_ERRORS)
    async def progress_of(
        self,
        request_id: str,
        preview: bool = Query(
            False, description="With the latest preview of the running pass (send `previews`)."
        ),
    ) -> ProgressInfo:
        return await self.tracker.read(request_id, preview)

    # --- the stage chain ---
    async def _generate(
        self, req: GenerateRequest, rid: str, caller: str | None = None
    ) -> ImageBatch:
        """`caller`: the A1111 routes' tag, for /sdapi/v1/progress and interrupt."""
        check_models(req, self.upscaler_names, self.face_names)
        self.limits.check_generate(req)
        plan = generate_plan(req, rid)
        async with self.tracker.track(rid, steps_of(plan), caller):
            batch = await self._run(plan)
        tag_pictures(batch, req, req.width, req.height)  # PNGs carry A1111's `parameters` text
        return batch

    async def _img2img(
        self, req: Img2ImgRequest, rid: str, t0: float, caller: str | None = None
    ) -> ImageBatch:
        check_models(req, self.upscaler_names, self.face_names)
        pic, mask = await asyncio.gather(
            asyncio.to_thread(self._decode_field, req.image, "image"),
            asyncio.to_thread(self._decode_field, req.mask, "mask"),
        )
        size = req.output_size(pic.width, pic.height)
        gen = req.as_generate(*size)  # the hires fix, face pass and limits read it
        try:
            self.limits.check_generate(gen)
        except RequestError as exc:  # a size the client did not send came from the image
            if exc.field in ("width", "height") and not getattr(req, exc.field):
                exc.field = "image"
            raise
        # The stages get the pictures, not the base64 text again.
        plan = img2img_plan(req.model_copy(update={"image": "", "mask": None}), gen, size, mask)
        batch = ImageBatch([pic], [None], {"decode": round(time.perf_counter() - t0, 4)})
        batch.request_id = rid
        async with self.tracker.track(rid, steps_of(plan), caller):
            batch = await self._run(plan, batch)
        tag_pictures(batch, req, *size)
        return batch

    def _decode_field(self, data: str | None, field: str):
        if data is None:
            return None
        try:
            return decode_image(
                data, max_pixels=self.limits.max_input_pixels, max_bytes=self.limits.max_input_bytes
            )
        except RequestError as exc:
            exc.field = field
            raise

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
        plan = upscale_plan(req, size)
        if not req.use_realesrgan and plan[0].stage == "upscale":
            # LANCZOS needs no model: resample here (the answer the stage itself would give,
            # disabled_by_request) rather than ship the float picture to its replica and back.
            t_up = time.perf_counter()
            batch = await asyncio.to_thread(plan[0].fallback, batch, *plan[0].args)
            batch.add_time("upscale", time.perf_counter() - t_up)
            plan = plan[1:]
        return await self._run(plan, batch)

    async def _run(self, plan: list[StageCall], batch: ImageBatch | None = None) -> ImageBatch:
        other = await self.replicas.missing_app() if plan else None
        if other is not None:  # a front door to an app that is not deployed (a config mistake)
            raise RequestError(
                "service",
                f"this app's stages belong to app {other!r} (stages_from), which is not"
                " deployed: deploy it, or correct stages_from",
                503,
            )
        try:
            return await self._chain(plan, batch)
        except (*RETRYABLE, StageLost) as exc:
            log.warning("stage unavailable or full: %s", exc)
            raise unavailable(exc) from exc
        except asyncio.CancelledError:
            metrics.record_cancelled()
            raise

    async def _chain(self, plan: list[StageCall], batch: ImageBatch | None) -> ImageBatch:
        """Each call gets the previous call's DeploymentResponse: the batch travels replica to
        replica, never through here. An optional stage with no running replica anywhere (its node
        is gone) is not called, since the call would wait for a replica that may never start: the
        batch comes here and its fallback runs instead."""
        for i, call in enumerate(plan):
            gone = call.fallback is not None and not await self.replicas.has_replica(
                DEPLOYMENTS[call.deployment]
            )
            if gone:
                prev = await self._chain(plan[:i], batch)
                if prev is None:
                    break
                log.warning("%s has no running replica; using its fallback", call.stage)
                out = await asyncio.to_thread(call.fallback, prev, *call.args)
                return await self._chain(plan[i + 1 :], out)
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
            return await self._watched(plan, responses)
        except STAGE_GONE:
            return await self._recover(plan, responses, batch)
        except StageLost as lost:
            return await self._recover(plan, responses, batch, lost.index)

    async def _watched(self, plan: list[StageCall], responses: list) -> ImageBatch:
        """The last response. While it runs, an optional stage of the plan whose deployment lost
        every replica (its node died, and no other node can host one) ends the wait: Serve's
        router would retry the dead replica, then wait for one that may never start."""
        optional = {i: DEPLOYMENTS[c.deployment] for i, c in enumerate(plan) if c.fallback}
        if not optional:
            return await responses[-1]
        final = asyncio.ensure_future(responses[-1])
        try:
            while not (await asyncio.wait({final}, timeout=self.replicas.ttl_s))[0]:
                seen = await self.replicas.snapshot()
                lost = [i for i, name in optional.items() if not seen.serves(name)]
                if lost:
                    for response in responses[lost[0] :]:
                        response.cancel()
                    final.cancel()
                    raise StageLost(lost[0])
        except asyncio.CancelledError:
            final.cancel()  # the client went away: cancel the chain, as a plain await would
            raise
        return final.result()

    async def _recover(
        self,
        plan: list[StageCall],
        responses: list,
        batch: ImageBatch | None,
        lost: int | None = None,
    ) -> ImageBatch:
        """A stage's replica or node died under this request (or stage `lost` has no replica left).
        Find which: an optional stage falls back (hiresfix/plan.py) and the rest of the plan runs
        again from its output; any other stage re-raises, which answers a retryable 503."""
        prev = batch
        for i, (call, response) in enumerate(zip(plan, responses)):
            try:
                if i == lost:
                    raise StageLost(i)
                prev = await response
            except (*STAGE_GONE, StageLost) as exc:
                if call.fallback is None or prev is None:
                    raise
                log.warning(  # which Serve error: a lost replica, a lost node, no replica left
                    "stage %s.%s unavailable (%s); using its fallback",
                    call.deployment,
                    call.method,
                    type(exc).__name__,
                )
                out = await asyncio.to_thread(call.fallback, prev, *call.args)
                return await self._chain(plan[i + 1 :], out)
        return prev

    # --- answers ---
    async def _encode(
        self, batch: ImageBatch, fmt: str, t0: float, rid: str | None
    ) -> ImageResponse:
        images = await self._timed_encode(
            batch,
            t0,
            lambda: [encode_b64(p, fmt, png_level=self.png_level) for p in batch.pictures],
        )
        return batch.response(images, fmt, rid)

    async def _answer(
        self, batch: ImageBatch, fmt: str, t0: float, rid: str | None, binary: bool
    ) -> Response:
        """JSON with base64 images, or (Accept: image/*) the file with the rest in headers."""
        if not binary:
            return json_answer(await self._encode(batch, fmt, t0, rid))
        data = await self._timed_encode(
            batch, t0, lambda: encode_image(batch.pictures[0], fmt, png_level=self.png_level)
        )
        return image_answer(batch.response([""], fmt, rid), data)

    @staticmethod
    async def _timed_encode(batch: ImageBatch, t0: float, encode):
        """Run `encode` off the event loop; record its time and the request's total so far."""
        t_enc = time.perf_counter()
        out = await asyncio.to_thread(encode)
        batch.add_time("encode", time.perf_counter() - t_enc)
        batch.timings["total"] = round(time.perf_counter() - t0, 4)
        metrics.record_answer(batch)
        return out

    # --- health and models ---
    async def _stage_infos(self) -> dict[str, dict]:
        """Each stage's model report, reused for model_info_ttl_s: /health stays fast when the
        stages are busy (info() queues behind real work), and still sees a stage replica that
        restarted or scaled out with a different outcome (a weights file fixed or gone)."""
        ttl = self.health_settings.model_info_ttl_s
        if self._infos is not None and time.monotonic() - self._infos_at < ttl:
            return self._infos
        names = DEPLOYMENTS
        timeout = self.health_settings.model_info_timeout_s
        seen = await self.replicas.snapshot()

        async def ask(k: str):  # a stage with no replica anywhere would hold /health `timeout` s
            if not seen.serves(names[k]):
                raise LookupError("no running replica")
            return await asyncio.wait_for(self.stages[k].info.remote(), timeout)

        answers = await asyncio.gather(*(ask(k) for k in names), return_exceptions=True)
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

    # 503: draining before a stop (deployments/guard.py answers it, so probes look elsewhere).
    @api.get("/health", response_model=HealthResponse, responses=error_docs(500, 503))
    async def health(self) -> HealthResponse:
        # Replica health as the Serve controller sees it: no request to the (busy) replicas.
        infos, seen, jobs = await asyncio.gather(
            self._stage_infos(), self.replicas.fresh(), self._jobs_health()
        )
        deployments = {
            name: {
                **info,
                "state": seen.states.get(name, "UNKNOWN"),
                "running_replicas": seen.running.get(name, 0),
            }
            for name, info in infos.items()
        }
        deployments["Progress"] = {  # GET /progress behind it
            "state": seen.states.get("Progress", "UNKNOWN"),
            "running_replicas": seen.running.get("Progress", 0),
        }
        deployments["Jobs"] = {  # /jobs behind it
            "state": seen.states.get("Jobs", "UNKNOWN"),
            "running_replicas": seen.running.get("Jobs", 0),
        }
        up, rf = infos["Upscaler"], infos["RefineFace"]
        models = self._offered(up.get("models", []) + rf.get("face_models", []))
        healthy = (
            all(d["state"] == "HEALTHY" for d in deployments.values())
            and seen.states.get("Ingress") == "HEALTHY"
        )
        # A stage's report may be model_info_ttl_s old: no running replica means not available.
        return HealthResponse(
            status="ok" if healthy else "degraded",
            realesrgan_available=bool(up.get("neural_available")) and seen.serves("Upscaler"),
            face_restoration_available=bool(rf.get("face_available")) and seen.serves("RefineFace"),
            models=models,
            deployments=deployments,
            jobs=jobs,
        )

    @api.get("/models", response_model=ModelsResponse, responses=error_docs(401, 500))
    async def models(self) -> ModelsResponse:
        infos = await self._stage_infos()
        return ModelsResponse(
            upscalers=self._offered(infos["Upscaler"].get("models", [])),
            face_models=self._offered(infos["RefineFace"].get("face_models", [])),
        )

    def _offered(self, reports: list[dict]) -> list[ModelInfo]:
        """The stages' model reports this app lets clients name (a front door offers a subset
        of its stages' models; an app with its own stages, all of them)."""
        names = {"upscaler": self.upscaler_names, "face": self.face_names}
        return [ModelInfo(**m) for m in reports if m["name"] in names[m["kind"]]]
