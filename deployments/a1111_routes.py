"""AUTOMATIC1111's API on the ingress: txt2img, img2img, extra-single-image, png-info, progress,
interrupt, skip and the read-only lists A1111 clients fetch at start-up. The mapping is
hiresfix/a1111.py; these routes only call the Ingress's helpers (`_generate`, `_img2img`,
`_upscale`, `_encode`, `_stage_infos`, `tracker`), and `Ingress` inherits them (Ray Serve's
@serve.ingress finds routes on base classes through the class's MRO).
"""

# No `from __future__ import annotations`: FastAPI must see real types on the route methods.
import json
import time

from fastapi import Query, Request
from fastapi.responses import Response

from deployments.http import api, error_docs, json_answer, request_id
from hiresfix.a1111 import (
    IMG2IMG_FIELD,
    ExtrasRequest,
    ExtrasResponse,
    FaceRestorerItem,
    Img2ImgA1111Request,
    OptionsUpdate,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    SignalResponse,
    TaskProgressRequest,
    TaskProgressResponse,
    Txt2ImgRequest,
    Txt2ImgResponse,
    UpscalerItem,
    caller_tag,
    checkpoint,
    face_restorers,
    img2img_info,
    info_json,
    options,
    png_info,
    progress_response,
    samplers,
    schedulers,
    task_progress,
    update_options,
    upscalers,
)
from hiresfix.schemas import RequestError

TXT2IMG_ERRORS = error_docs(400, 401, 408, 409, 413, 422, 429, 500, 503)
EXTRAS_ERRORS = error_docs(400, 401, 408, 413, 422, 429, 500, 503)
LIST_ERRORS = error_docs(401, 500)
PNGINFO_ERRORS = error_docs(400, 401, 408, 413, 422, 429, 500, 503)
STATE_ERRORS = error_docs(401, 422, 429, 500, 503)  # 503: the progress board does not answer
SIGNAL_ERRORS = error_docs(401, 408, 413, 429, 500, 503)
TASK_ERRORS = error_docs(401, 408, 413, 422, 429, 500, 503)


class A1111Routes:
    """Mixed into the Ingress (deployments/ingress.py)."""

    @api.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse, responses=TXT2IMG_ERRORS)
    async def a1111_txt2img(self, body: Txt2ImgRequest, request: Request) -> Response:
        """AUTOMATIC1111's txt2img API (hiresfix/a1111.py): A1111 clients work unchanged."""
        req, notes = body.to_generate(self.upscaler_names)
        rid, t0 = request_id(request, body.force_task_id, "force_task_id"), time.perf_counter()
        caller = caller_tag(request.headers.get("authorization"))
        ours = await self._encode(await self._generate(req, rid, caller), "png", t0, rid)
        meta = ours.model_dump(mode="json", exclude={"image", "images"})
        return json_answer(
            Txt2ImgResponse(
                images=ours.images,
                parameters=body.model_dump(),
                info=info_json(req, ours.seeds, meta, notes),
            )
        )

    @api.post("/sdapi/v1/img2img", response_model=Txt2ImgResponse, responses=TXT2IMG_ERRORS)
    async def a1111_img2img(self, body: Img2ImgA1111Request, request: Request) -> Response:
        """AUTOMATIC1111's img2img API (inpainting with `mask`), run as POST /img2img."""
        req, notes = body.to_img2img(self.upscaler_names)
        rid, t0 = request_id(request, body.force_task_id, "force_task_id"), time.perf_counter()
        caller = caller_tag(request.headers.get("authorization"))
        try:
            batch = await self._img2img(req, rid, t0, caller)
        except RequestError as exc:  # name the field the A1111 client sent
            exc.field = IMG2IMG_FIELD.get(exc.field, exc.field)
            raise
        ours = await self._encode(batch, "png", t0, rid)
        meta = ours.model_dump(mode="json", exclude={"image", "images"})
        return json_answer(
            Txt2ImgResponse(
                images=ours.images,
                parameters=body.parameters(),
                info=img2img_info(req, meta, notes),
            )
        )

    @api.post("/sdapi/v1/png-info", response_model=PNGInfoResponse, responses=PNGINFO_ERRORS)
    async def a1111_png_info(self, body: PNGInfoRequest) -> PNGInfoResponse:
        """The generation parameters a PNG carries (hiresfix's PNG answers carry them too)."""
        return png_info(body.image, self.limits.max_input_bytes)

    @api.get("/sdapi/v1/progress", response_model=ProgressResponse, responses=STATE_ERRORS)
    async def a1111_progress(
        self,
        request: Request,
        skip_current_image: bool = Query(False, description="Leave current_image out."),
    ) -> ProgressResponse:
        """The caller's running A1111 job (its latest), in A1111's shape; idle: progress 0."""
        tag = caller_tag(request.headers.get("authorization"))
        return progress_response(await self.tracker.current(tag, not skip_current_image))

    @api.post("/internal/progress", response_model=TaskProgressResponse, responses=TASK_ERRORS)
    async def a1111_task_progress(self, body: TaskProgressRequest) -> TaskProgressResponse:
        """A1111's per-task progress (its web UI's call): the request sent with force_task_id
        (or X-Request-ID) `id_task`, with its latest live preview when newer than
        `id_live_preview`."""
        try:
            info = await self.tracker.read(body.id_task, body.live_preview)
        except RequestError as exc:
            if exc.status != 404:
                raise
            info = None
        return task_progress(info, body)

    @api.post("/sdapi/v1/interrupt", response_model=SignalResponse, responses=SIGNAL_ERRORS)
    async def a1111_interrupt(self, request: Request) -> SignalResponse:
        """Stop the caller's running A1111 jobs early: the running pass ends at its next step,
        later passes after their first, and each job answers with the pictures as they are."""
        tag = caller_tag(request.headers.get("authorization"))
        return SignalResponse(requests=await self.tracker.signal(tag, "interrupt"))

    @api.post("/sdapi/v1/skip", response_model=SignalResponse, responses=SIGNAL_ERRORS)
    async def a1111_skip(self, request: Request) -> SignalResponse:
        """End the running pass of the caller's A1111 jobs early; the passes after it still run
        (A1111's skip moves on to what comes next)."""
        tag = caller_tag(request.headers.get("authorization"))
        return SignalResponse(requests=await self.tracker.signal(tag, "skip"))

    @api.post(
        "/sdapi/v1/extra-single-image", response_model=ExtrasResponse, responses=EXTRAS_ERRORS
    )
    async def a1111_extras(self, body: ExtrasRequest) -> Response:
        """AUTOMATIC1111's upscale API (hiresfix/a1111.py)."""
        req, notes = body.to_upscale(self.upscaler_names)
        t0 = time.perf_counter()
        try:
            batch = await self._upscale(req, t0)
        except RequestError as exc:  # name the field the A1111 client sent
            exc.field = {"scale": "upscaling_resize", "upscaler": "upscaler_1"}.get(
                exc.field, exc.field
            )
            raise
        ours = await self._encode(batch, "png", t0, None)
        meta = {**ours.model_dump(mode="json", exclude={"image", "images"}), "ignored": notes}
        fallback = f" (fallback: {ours.fallback_reason.value})" if ours.fallback_reason else ""
        return json_answer(
            ExtrasResponse(
                image=ours.image,
                html_info=f"<p>upscaler: {ours.upscaler_used}{fallback}</p>",
                info=json.dumps(meta),
            )
        )

    # --- read-only lists ---
    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem], responses=LIST_ERRORS)
    async def a1111_samplers(self) -> list[SamplerItem]:
        """The samplers `sampler_name` takes (our names are aliases)."""
        return samplers()

    @api.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], responses=LIST_ERRORS)
    async def a1111_schedulers(self) -> list[SchedulerItem]:
        return schedulers()

    @api.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], responses=LIST_ERRORS)
    async def a1111_upscalers(self) -> list[UpscalerItem]:
        """Exactly the `hr_upscaler` / `upscaler_1` names that select an upscaler here."""
        infos = await self._stage_infos()
        scales = {m["name"]: m.get("scale") for m in infos["Upscaler"].get("models", [])}
        return upscalers(self.upscaler_names, scales)

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], responses=LIST_ERRORS)
    async def a1111_sd_models(self) -> list[SDModelItem]:
        """The one SDXL model this deployment serves."""
        return [checkpoint(await self._sdxl_source())]

    @api.get(
        "/sdapi/v1/face-restorers", response_model=list[FaceRestorerItem], responses=LIST_ERRORS
    )
    async def a1111_face_restorers(self) -> list[FaceRestorerItem]:
        return face_restorers(self.face_names)

    @api.get("/sdapi/v1/options", response_model=dict, responses=LIST_ERRORS)
    async def a1111_options(self) -> dict:
        """A subset of A1111's settings, as this deployment has them."""
        return options(await self._sdxl_source(), self.face_names)

    @api.post(
        "/sdapi/v1/options",
        response_model=OptionsUpdate,
        responses=error_docs(400, 401, 408, 413, 422, 429, 500, 503),
    )
    async def a1111_set_options(self, body: dict) -> OptionsUpdate:
        """Changes nothing (the options are the deployment's, shared by every client): answers
        which keys sent differ and stay as they are; another checkpoint is a 422."""
        return update_options(body, await self._sdxl_source(), self.face_names)
