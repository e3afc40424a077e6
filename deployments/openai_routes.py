"""The OpenAI Images API on the ingress: `POST /v1/images/generations`, `/v1/images/edits`,
`/v1/images/variations`, `GET /v1/images/results/{id}` (the `response_format: url` links) and
`GET /v1/models`.

The mapping is hiresfix/openai_api.py; these routes only call the Ingress's helpers (`_generate`,
`_img2img`, `_encode`, `_sdxl_source`), and `Ingress` inherits them (Ray Serve's @serve.ingress
finds routes on base classes through the class's MRO). Errors under /v1/ take OpenAI's shape in
deployments/http.py (error_shape_for) and deployments/guard.py.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the route methods.
import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from deployments.http import api, json_answer, request_id
from hiresfix.images import decode_image, encode_b64, encode_image
from hiresfix.openai_api import (
    MEDIA_TYPES,
    RESULT_ID,
    EditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    Mapped,
    ModelList,
    OpenAIError,
    VariationRequest,
    check_model,
    form_fields,
    form_files,
    mask_from_alpha,
    model_list,
    model_needs_lookup,
    multipart_schema,
    openai_error_docs,
    parse_form,
    result_missing,
    stream_error,
    stream_event,
    to_openai,
    too_big_for_links,
)
from hiresfix.schemas import RequestError
from hiresfix.stages import ImageBatch
from hiresfix.upscale.resample import resize_picture

GENERATIONS_ERRORS = openai_error_docs(400, 401, 404, 408, 409, 413, 429, 500, 503)
IMAGE_FORM_ERRORS = GENERATIONS_ERRORS
GENERATIONS_DOC = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON (ImagesResponse); with `stream: true`, server-sent events:"
        " image_generation.partial_image, image_generation.completed, or error (a failure after"
        " the stream began, in OpenAI's error shape).",
    },
    **GENERATIONS_ERRORS,
}
MODELS_ERRORS = openai_error_docs(401, 500)
RESULT_ERRORS = {
    200: {
        "content": {
            t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()
        },
        "description": "The image file.",
    },
    **openai_error_docs(
        404,
        500,
        503,
        notes={
            404: "No such image: the link expired (openai.results_ttl_s), was pushed out of the"
            " bounded store, or never existed.",
            503: "The link store (the Progress replica) is restarting: retry shortly.",
        },
    ),
}
_IMAGE_DOC = "The picture to edit (PNG, JPEG or WebP). Several (`image[]`): the first is used."
_MASK_DOC = (
    "Optional PNG with an alpha channel: its fully transparent pixels are the area to edit"
    " (resized like the image)."
)
STORE_TIMEOUT_S = 30.0  # a put or get of a few MB on the Progress replica
STREAM_POLL_S = 0.1  # how often a stream looks for new previews (a board read each time)
log = logging.getLogger("hiresfix.openai")


class OpenAIRoutes:
    """Mixed into the Ingress (deployments/ingress.py)."""

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=GENERATIONS_DOC)
    async def openai_generations(self, body: ImageGenerationRequest, request: Request) -> Response:
        """OpenAI's `images.generate`. hiresfix's /generate fields are accepted beside OpenAI's
        (the SDK's `extra_body`)."""
        if model_needs_lookup(body.model):
            check_model(body.model, await self._sdxl_source())
        mapped = body.to_generate(self.limits.max_side)
        rid, t0 = request_id(request), time.perf_counter()
        if mapped.stream:
            run = asyncio.ensure_future(self._openai_generate(mapped, rid))
            return await self._openai_stream(run, mapped, rid, t0)
        batch = await self._openai_generate(mapped, rid)
        return await self._openai_answer(batch, mapped, t0, rid, request)

    async def _openai_generate(self, mapped: Mapped, rid: str) -> ImageBatch:
        try:
            return await self._generate(mapped.request, rid)
        except RequestError as exc:  # a limit on a field the client spelled size or n
            if exc.field in ("width", "height", "hires_width", "hires_height", "hires_scale"):
                exc.message = f"{mapped.size[0]}x{mapped.size[1]}: {exc.message}"
                exc.field = "size"
            raise

    async def _openai_stream(
        self, run: asyncio.Future, mapped: Mapped, rid: str, t0: float
    ) -> Response:
        """`stream: true`. The 200 and its event stream begin once the request runs on a replica:
        until then a refusal (a 4xx, a 503 with Retry-After) is answered as without stream."""
        try:
            while not run.done() and not await self._running(rid):
                await asyncio.wait({run}, timeout=STREAM_POLL_S)
            if run.done():
                run.result()  # raises the refusal
        except BaseException:
            run.cancel()
            raise
        headers = {"x-request-id": rid, "cache-control": "no-cache"}
        events = self._stream_events(run, mapped, rid, t0)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _running(self, rid: str) -> bool:
        """Has a stage reported a step of this request? (The board unavailable: go ahead.)"""
        try:
            return (await self.tracker.read(rid)).stage is not None
        except RequestError as exc:
            return exc.status != 404  # 404: not begun yet

    async def _stream_events(
        self, run: asyncio.Future, mapped: Mapped, rid: str, t0: float
    ) -> AsyncIterator[bytes]:
        """partial_image events as the board receives previews, then one completed event per
        image. A client that goes away cancels the request, as without stream."""
        req, sent = mapped.request, 0
        fmt = req.output_format
        try:
            while True:
                await asyncio.wait({run}, timeout=STREAM_POLL_S)
                if sent < req.previews:
                    for png in await self._previews(rid, sent):
                        if sent == req.previews:
                            break
                        b64, size = await asyncio.to_thread(self._partial, png, mapped.size, fmt)
                        yield stream_event(
                            "partial_image", b64, mapped, fmt, size, partial_image_index=sent
                        )
                        sent += 1
                if run.done():
                    break
            batch = run.result()
            answer = await self._encode(batch, fmt, t0, rid)
            for b64 in answer.images or [answer.image]:
                yield stream_event("completed", b64, mapped, fmt, f"{answer.width}x{answer.height}")
        except asyncio.CancelledError:
            run.cancel()
            raise
        except RequestError as exc:  # after the 200: an error event, in OpenAI's shape
            yield stream_error(exc.status, exc.field, exc.message, getattr(exc, "code", None))
        except Exception:  # noqa: BLE001 - the detail goes to the log, never to the client
            log.error("request %s failed while streaming", rid, exc_info=True)
            yield stream_error(
                500,
                "body",
                "the service failed on this request; its log holds the detail under request id"
                f" {rid}",
            )

    async def _previews(self, rid: str, start: int) -> list[bytes]:
        try:
            call = self.tracker.handle.previews.remote(rid, start)
            return await asyncio.wait_for(call, timeout=STORE_TIMEOUT_S) or []
        except Exception:  # noqa: BLE001 - a lost board costs previews, never the image
            return []

    def _partial(self, png: bytes, size: tuple[int, int], fmt: str) -> tuple[str, str]:
        """A preview (latent size: 1/8) at the requested size (0, 0: 8x), in the requested
        format; and that size as WxH."""
        pic = decode_image(png)  # our own PNG: bytes, no base64 round trip
        size = size if all(size) else (pic.width * 8, pic.height * 8)
        pic = resize_picture(pic, size)
        return encode_b64(pic, fmt, png_level=self.png_level), f"{size[0]}x{size[1]}"

    @api.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        responses=IMAGE_FORM_ERRORS,
        openapi_extra=multipart_schema(EditRequest, {"image": _IMAGE_DOC, "mask": _MASK_DOC}),
    )
    async def openai_edits(self, request: Request) -> Response:
        """OpenAI's `images.edit` (multipart): our /img2img, inpainting where `mask` is
        transparent. /img2img's fields (strength, seed, hires_fix, ...) ride along as extra
        form fields (the SDK's `extra_body`)."""
        rid, t0 = request_id(request), time.perf_counter()
        async with self._form(request) as form:
            body = parse_form(EditRequest, form_fields(form))
            image = form_files(form, "image", required=True)[0]
            masks = form_files(form, "mask", required=False)
            image_raw = await image.read()
            mask_raw = await masks[0].read() if masks else None
        if model_needs_lookup(body.model):
            check_model(body.model, await self._sdxl_source())
        mask = None
        if mask_raw is not None:
            mask = await asyncio.to_thread(self._openai_mask, mask_raw)
        mapped = body.to_img2img(_b64(image_raw), mask)
        return await self._openai_img2img(mapped, rid, t0, request)

    @api.post(
        "/v1/images/variations",
        response_model=ImagesResponse,
        responses=IMAGE_FORM_ERRORS,
        openapi_extra=multipart_schema(VariationRequest, {"image": _IMAGE_DOC}),
    )
    async def openai_variations(self, request: Request) -> Response:
        """OpenAI's `images.create_variation` (multipart): our /img2img of the image with a
        neutral prompt at strength 0.6 (both can be set as extra form fields)."""
        rid, t0 = request_id(request), time.perf_counter()
        async with self._form(request) as form:
            body = parse_form(VariationRequest, form_fields(form))
            image_raw = await form_files(form, "image", required=True)[0].read()
        if model_needs_lookup(body.model):
            check_model(body.model, await self._sdxl_source())
        mapped = body.to_img2img(_b64(image_raw))
        return await self._openai_img2img(mapped, rid, t0, request)

    @api.get("/v1/images/results/{result_id}", response_class=Response, responses=RESULT_ERRORS)
    async def openai_result(self, result_id: str) -> Response:
        """The file behind a `response_format: url` link, until it expires. No API key: the
        unguessable id is the permission, as with OpenAI's links."""
        ttl = self.openai_settings.results_ttl_s
        if not RESULT_ID.match(result_id):
            raise result_missing(result_id, ttl)
        item = await self._store("get_result", result_id)
        if item is None:
            raise result_missing(result_id, ttl)
        data, media_type, left = item
        headers = {"cache-control": f"private, max-age={max(0, int(left))}"}
        return Response(data, media_type=media_type, headers=headers)

    @api.get("/v1/models", response_model=ModelList, responses=MODELS_ERRORS)
    async def openai_models(self) -> ModelList:
        """What `model` takes: the served SDXL model (OpenAI's image model names mean it too)."""
        return model_list(await self._sdxl_source())

    # --- helpers ---
    @staticmethod
    def _form(request: Request):
        """The multipart form (async with: its files are closed after). A body that is not one is
        a 400 naming `body`."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise OpenAIError(
                "body",
                "send multipart/form-data (the image as a file part), as the SDK does; got"
                f" {kind or 'no Content-Type'}",
            )
        return _FormReader(request)

    def _openai_mask(self, raw: bytes) -> str:
        """OpenAI's alpha mask -> /img2img's white-means-repaint mask, base64 PNG."""
        return encode_b64(mask_from_alpha(self._decode_field(raw, "mask")), "png", png_level=1)

    async def _openai_img2img(
        self, mapped: Mapped, rid: str, t0: float, request: Request
    ) -> Response:
        if mapped.stream:
            run = asyncio.ensure_future(self._openai_img2img_batch(mapped, rid, t0))
            return await self._openai_stream(run, mapped, rid, t0)
        batch = await self._openai_img2img_batch(mapped, rid, t0)
        return await self._openai_answer(batch, mapped, t0, rid, request)

    async def _openai_img2img_batch(self, mapped: Mapped, rid: str, t0: float) -> ImageBatch:
        try:
            return await self._img2img(mapped.request, rid, t0)
        except RequestError as exc:  # our size fields, which the client spelled size
            if exc.field in ("width", "height"):
                exc.field = "size"
            raise

    async def _openai_answer(
        self, batch: ImageBatch, mapped: Mapped, t0: float, rid: str, request: Request
    ) -> Response:
        fmt = mapped.request.output_format
        if mapped.url:
            files = await self._timed_encode(
                batch,
                t0,
                lambda: [encode_image(p, fmt, png_level=self.png_level) for p in batch.pictures],
            )
            urls = await self._links(files, fmt, request)
            body = to_openai(batch.response([""] * len(files), fmt, rid), mapped, urls=urls)
        else:
            body = to_openai(await self._encode(batch, fmt, t0, rid), mapped)
        answer = json_answer(body)
        answer.headers["x-request-id"] = rid
        return answer

    async def _links(self, files: list[bytes], fmt: str, request: Request) -> list[str]:
        """Keep the files in the result store; their links."""
        ids = await self._store("put_results", [(f, fmt) for f in files])
        if ids is None:
            raise too_big_for_links(sum(len(f) for f in files), self.openai_settings)
        base = self.openai_settings.public_url
        if base:
            return [f"{base.rstrip('/')}/v1/images/results/{i}" for i in ids]
        return [str(request.url_for("openai_result", result_id=i)) for i in ids]

    async def _store(self, method: str, *args):
        """A call to the result store in the Progress replica; 503 when it does not answer."""
        try:
            call = getattr(self.tracker.handle, method).remote(*args)
            return await asyncio.wait_for(call, timeout=STORE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a lost store is a retryable refusal, not a 500
            raise RequestError(
                "body", "the image link store is unavailable right now: retry shortly", 503
            ) from None


class _FormReader:
    """`async with`: Starlette's form parse (python-multipart), its refusals in our terms."""

    # The SDK sends up to 16 images plus a mask; a handful of text fields.
    MAX_FILES, MAX_FIELDS = 20, 200

    def __init__(self, request: Request):
        self.request, self.form = request, None

    async def __aenter__(self):
        try:
            self.form = await self.request.form(
                max_files=self.MAX_FILES, max_fields=self.MAX_FIELDS
            )
        except Exception:  # noqa: BLE001 - Starlette's parse errors: a bad body, not a bug
            raise OpenAIError(
                "body",
                "the multipart body could not be read: send multipart/form-data with at most"
                f" {self.MAX_FILES} files and {self.MAX_FIELDS} fields",
            ) from None
        return self.form

    async def __aexit__(self, *exc):
        if self.form is not None:
            await self.form.close()


def _b64(raw: bytes) -> str:
    if not raw:
        raise OpenAIError("image", "the image file is empty: send PNG, JPEG or WebP bytes")
    return base64.b64encode(raw).decode("ascii")
