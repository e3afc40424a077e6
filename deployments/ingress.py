"""The HTTP ingress: validates, routes one request through the stages, encodes the answer.

Stages are chained by passing each DeploymentResponse straight into the next call, so pictures go
replica -> replica and only the final result comes back here.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the route methods,
# or it reads the request body as a query parameter.
import asyncio
import json
import logging
import os
import time

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.http import BINARY_DOC, MAX_BODY_ENV, BadRequest, api, binary_format, request_id
from hiresfix.a1111 import A1111Error, ExtrasRequest, ExtrasResponse, Txt2ImgRequest, Txt2ImgResponse, info_json
from hiresfix.images import ImageInputError, decode_image, encode_b64, encode_image
from hiresfix.progress import generate_plan
from hiresfix.schemas import (
    GenerateRequest,
    HealthResponse,
    ImageResponse,
    ModelInfo,
    ModelsResponse,
    ProgressInfo,
    UpscaleRequest,
)
from hiresfix.stages import ImageBatch

log = logging.getLogger("hiresfix.ingress")


class Limits(BaseModel):
    """Per-profile request limits, stricter than the schema's hard bounds (serve_config args.limits)."""

    model_config = ConfigDict(extra="forbid")
    max_side: int | None = Field(None, description="Largest base width/height this profile accepts.")
    max_steps: int | None = None
    max_output_side: int = 8192  # hires fix and /upscale results
    max_input_pixels: int = 4096 * 4096  # /upscale decompression-bomb guard, checked on the header
    max_input_bytes: int = 32 * 1024 * 1024


INFO_TTL_S = 30.0  # how long /health and /models reuse the stages' model reports

@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        base: DeploymentHandle,
        upscaler: DeploymentHandle,
        refine: DeploymentHandle,
        progress: DeploymentHandle,
        limits: Limits,
        upscaler_names: list[str],
        face_names: list[str],
    ):
        self.base, self.upscaler, self.refine, self.progress = base, upscaler, refine, progress
        self.limits = limits
        os.environ[MAX_BODY_ENV] = str(limits.max_input_bytes * 4 // 3 + 1024 * 1024)  # base64 + other fields
        self.upscaler_names, self.face_names = upscaler_names, face_names
        self._infos: dict[str, dict] | None = None
        self._infos_at = 0.0

    # --- validation that depends on the configuration, not only on the schema ---
    def _check_models(self, upscaler: str | None, face_model: str | None) -> None:
        if upscaler is not None and upscaler not in self.upscaler_names:
            raise BadRequest("upscaler", f"unknown upscaler {upscaler!r}; configured: {', '.join(self.upscaler_names) or 'none'}")
        if face_model is not None and face_model not in self.face_names:
            raise BadRequest("face_model", f"unknown face model {face_model!r}; configured: {', '.join(self.face_names) or 'none'}")

    def _check_generate_limits(self, req: GenerateRequest) -> None:
        lim = self.limits
        for name in ("width", "height"):
            if lim.max_side and getattr(req, name) > lim.max_side:
                raise BadRequest(name, f"{getattr(req, name)} exceeds this deployment's limit of {lim.max_side}")
        if req.hires_fix and max(req.output_size()) > lim.max_output_side:
            knob = ("hires_height" if req.hires_height and not req.hires_width
                    else "hires_width" if req.hires_width else "hires_scale")
            raise BadRequest(knob, f"hires output would be {max(req.output_size())} px on its long side; this deployment's limit is {lim.max_output_side}: lower {knob} or the base size")
        if lim.max_steps and req.num_inference_steps > lim.max_steps:
            raise BadRequest("num_inference_steps", f"{req.num_inference_steps} exceeds this deployment's limit of {lim.max_steps}")
        if lim.max_steps and req.hires_fix and req.hires_steps > lim.max_steps:
            raise BadRequest("hires_steps", f"{req.hires_steps} exceeds this deployment's limit of {lim.max_steps}")

    # --- routes ---
    @api.post("/generate", response_model=ImageResponse, responses=BINARY_DOC)
    async def generate(self, req: GenerateRequest, request: Request) -> Response:
        self._check_models(req.upscaler, req.face_model)
        self._check_generate_limits(req)
        binary = binary_format(request, req.output_format)
        if binary and req.num_images > 1:
            raise BadRequest("num_images", "an image/* answer holds one image: ask for application/json to get"
                             f" {req.num_images}, or set num_images to 1", 406)
        rid, t0 = request_id(request), time.perf_counter()
        return await self._generate(
            req, rid, lambda batch: self._respond(batch, binary or req.output_format, t0, rid, binary is not None))

    @api.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse)
    async def a1111_txt2img(self, body: Txt2ImgRequest, request: Request) -> Response:
        """AUTOMATIC1111's txt2img API (hiresfix/a1111.py): A1111 clients work unchanged."""
        try:
            req, notes = body.to_generate(self.upscaler_names)
        except A1111Error as exc:
            raise BadRequest(exc.field, exc.message)
        self._check_models(req.upscaler, req.face_model)
        self._check_generate_limits(req)
        rid, t0 = request_id(request), time.perf_counter()

        async def respond(batch: ImageBatch) -> Response:
            ours, _ = await self._encode(batch, "png", t0, rid, binary=False)
            meta = ours.model_dump(mode="json", exclude={"image", "images"})
            out = Txt2ImgResponse(images=ours.images, parameters=body.model_dump(),
                                  info=info_json(req, ours.seeds, meta, notes))
            return Response(out.model_dump_json(), media_type="application/json")

        return await self._generate(req, rid, respond)

    async def _generate(self, req: GenerateRequest, rid: str, respond) -> Response:
        """The stages of one generate request, chained replica to replica, with its progress."""
        await self._progress_begin(rid, generate_plan(req))
        try:
            batch = self.base.generate.remote(req, rid)
            if req.refiner_switch_at is not None:
                batch = self.refine.finish.remote(batch, req)
            if req.hires_fix:
                batch = self.upscaler.upscale.remote(batch, req.output_size(), req.upscaler, req.use_realesrgan)
                batch = self.refine.hires.remote(batch, req)
            if req.use_face_restoration:
                batch = self.refine.restore_faces.remote(batch, req.face_restoration_weight, req.face_model)
            result = await respond(await batch)
        except asyncio.CancelledError:
            self._progress_end(rid, "cancelled", "the client went away or request_timeout_s passed")
            raise
        except Exception as exc:
            self._progress_end(rid, "failed", f"{exc.__class__.__name__}: {exc}"[:300])
            raise
        self._progress_end(rid, "done")
        return result

    @api.get("/progress/{request_id}", response_model=ProgressInfo)
    async def progress_of(self, request_id: str) -> ProgressInfo:
        try:
            info = await asyncio.wait_for(self.progress.get.remote(request_id), timeout=5)
        except Exception as exc:  # noqa: BLE001
            raise BadRequest("request_id", f"progress is unavailable right now ({exc.__class__.__name__});"
                             " requests themselves are unaffected", 503)
        if info is None:
            raise BadRequest("request_id", f"no /generate request {request_id!r} is running or ended in the last"
                             " 10 minutes; send your own X-Request-ID header with /generate to follow it", 404)
        return info

    async def _progress_begin(self, rid: str, plan: dict[str, int]) -> None:
        try:
            # Short: a stuck Progress replica must not slow every request down.
            fresh = await asyncio.wait_for(self.progress.begin.remote(rid, plan), timeout=2)
        except Exception:  # noqa: BLE001 - no progress bar is no reason to refuse the work
            log.warning("progress unavailable for %s", rid, exc_info=True)
            return
        if not fresh:
            raise BadRequest("x-request-id", f"{rid!r} belongs to a request that is still running: send a new id", 409)

    def _progress_end(self, rid: str, state: str, detail: str | None = None) -> None:
        try:
            self.progress.end.remote(rid, state, detail)  # fire and forget
        except Exception:  # noqa: BLE001
            log.warning("progress end not recorded for %s", rid, exc_info=True)

    @api.post("/upscale", response_model=ImageResponse, responses=BINARY_DOC)
    async def upscale(self, req: UpscaleRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        batch = await self._upscale(req, t0)
        binary = binary_format(request, req.output_format)
        return await self._respond(batch, binary or req.output_format, t0, binary=binary is not None)

    @api.post("/sdapi/v1/extra-single-image", response_model=ExtrasResponse)
    async def a1111_extras(self, body: ExtrasRequest) -> Response:
        """AUTOMATIC1111's upscale API (hiresfix/a1111.py)."""
        try:
            req, notes = body.to_upscale(self.upscaler_names)
        except A1111Error as exc:
            raise BadRequest(exc.field, exc.message)
        t0 = time.perf_counter()
        try:
            batch = await self._upscale(req, t0)
        except BadRequest as exc:
            exc.field = {"scale": "upscaling_resize", "upscaler": "upscaler_1"}.get(exc.field, exc.field)
            raise
        ours, _ = await self._encode(batch, "png", t0, None, binary=False)
        meta = {**ours.model_dump(mode="json", exclude={"image", "images"}), "ignored": notes}
        summary = f"upscaler: {ours.upscaler_used}" + (f" (fallback: {ours.fallback_reason.value})" if ours.fallback_reason else "")
        out = ExtrasResponse(image=ours.image, html_info=f"<p>{summary}</p>", info=json.dumps(meta))
        return Response(out.model_dump_json(), media_type="application/json")

    async def _upscale(self, req: UpscaleRequest, t0: float) -> ImageBatch:
        """Decode, check, then the upscale (and face) stages of one upscale request."""
        self._check_models(req.upscaler, req.face_model)
        try:
            pic = await asyncio.to_thread(
                decode_image,
                req.image,
                max_pixels=self.limits.max_input_pixels,
                max_bytes=self.limits.max_input_bytes,
            )
        except ImageInputError as exc:
            raise BadRequest("image", str(exc), exc.status)
        size = (max(1, round(pic.width * req.scale)), max(1, round(pic.height * req.scale)))
        if max(size) > self.limits.max_output_side:
            raise BadRequest("scale", f"output would be {max(size)} px on its long side; the limit is {self.limits.max_output_side}: lower scale")
        batch = ImageBatch([pic], [None], {"decode": round(time.perf_counter() - t0, 4)})
        batch = self.upscaler.upscale.remote(batch, size, req.upscaler, req.use_realesrgan)
        if req.use_face_restoration:
            batch = self.refine.restore_faces.remote(batch, req.face_restoration_weight, req.face_model)
        return await batch

    async def _encode(self, batch: ImageBatch, fmt: str, t0: float, request_id: str | None,
                      binary: bool) -> tuple[ImageResponse, bytes | None]:
        """The answer's body, and for an image/* answer the file itself (its `images` stay empty)."""
        t_enc = time.perf_counter()
        data = None
        if binary:
            data = await asyncio.to_thread(encode_image, batch.pictures[0], fmt)
            images = [""]
        else:
            images = await asyncio.to_thread(lambda: [encode_b64(p, fmt) for p in batch.pictures])
        batch.add_time("encode", time.perf_counter() - t_enc)
        batch.timings["total"] = round(time.perf_counter() - t0, 4)
        first = batch.pictures[0]
        seeds = [s for s in batch.seeds if s is not None]
        body = ImageResponse(
            image=images[0],
            images=images,
            width=first.width,
            height=first.height,
            seed=seeds[0] if seeds else None,
            seeds=seeds,
            upscaler_used=batch.upscaler_used,
            fallback_reason=batch.fallback_reason,
            fallback_detail=batch.fallback_detail,
            face_restoration=batch.face_restoration,
            output_format=fmt,
            timings=batch.timings,
            request_id=request_id,
        )
        return body, data

    async def _respond(self, batch: ImageBatch, fmt: str, t0: float, request_id: str | None = None,
                       binary: bool = False) -> Response:
        body, data = await self._encode(batch, fmt, t0, request_id, binary)
        if binary:
            # Header values must be latin-1: ensure_ascii escapes everything else (paths in details).
            meta = json.dumps(body.model_dump(mode="json", exclude={"image", "images"}), separators=(",", ":"))
            headers = {"x-hiresfix-meta": meta}
            headers.update({k: str(v).encode("ascii", "replace").decode() for k, v in (
                            ("x-upscaler-used", body.upscaler_used), ("x-seed", body.seed),
                            ("x-fallback-reason", body.fallback_reason and body.fallback_reason.value)) if v is not None})
            return Response(data, media_type=f"image/{fmt}", headers=headers)
        # Serialised once by pydantic's Rust encoder: FastAPI's generic path would re-validate and
        # walk megabytes of base64 again (~20-40 ms per large image).
        return Response(body.model_dump_json(), media_type="application/json")

    # --- health and models ---
    async def _stage_infos(self) -> dict[str, dict]:
        """Each stage's model report, kept for INFO_TTL_S: /health stays fast when the stages are busy
        (info() queues behind real work), and still sees a stage replica that restarted or scaled out
        with a different outcome (a weights file fixed or gone)."""
        if self._infos is not None and time.monotonic() - self._infos_at < INFO_TTL_S:
            return self._infos
        handles = {"SDXLBase": self.base, "Upscaler": self.upscaler, "RefineFace": self.refine}

        async def ask(h):
            return await asyncio.wait_for(h.info.remote(), timeout=10)

        answers = await asyncio.gather(*(ask(h) for h in handles.values()), return_exceptions=True)
        infos = {}
        for name, a in zip(handles, answers):
            if isinstance(a, BaseException):
                infos[name] = {"info_error": f"{a.__class__.__name__}: {a}"[:300]}
            else:
                infos[name] = a
        if all(not isinstance(a, BaseException) for a in answers):
            self._infos, self._infos_at = infos, time.monotonic()
        return infos

    async def _deployment_states(self) -> dict[str, str]:
        """Replica health as the Serve controller sees it: no request to the (maybe busy) replicas."""
        app = serve.get_replica_context().replica_id.deployment_id.app_name
        status = await asyncio.to_thread(serve.status)
        return {name: d.status.value for name, d in status.applications[app].deployments.items()}

    @api.get("/health", response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        infos, states = await asyncio.gather(self._stage_infos(), self._deployment_states())
        deployments = {name: {**info, "state": states.get(name, "UNKNOWN")} for name, info in infos.items()}
        deployments["Progress"] = {"state": states.get("Progress", "UNKNOWN")}  # GET /progress behind it
        up, rf = infos["Upscaler"], infos["RefineFace"]
        models = [ModelInfo(**m) for m in up.get("models", []) + rf.get("face_models", [])]
        healthy = all(d["state"] == "HEALTHY" for d in deployments.values()) and states.get("Ingress") == "HEALTHY"
        return HealthResponse(
            status="ok" if healthy else "degraded",
            realesrgan_available=bool(up.get("neural_available")),
            face_restoration_available=bool(rf.get("face_available")),
            models=models,
            deployments=deployments,
        )

    @api.get("/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        infos = await self._stage_infos()
        return ModelsResponse(
            upscalers=[ModelInfo(**m) for m in infos["Upscaler"].get("models", [])],
            face_models=[ModelInfo(**m) for m in infos["RefineFace"].get("face_models", [])],
        )
