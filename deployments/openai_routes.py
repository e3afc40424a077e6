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
import time

from fastapi import Request
from fastapi.responses import Response

from deployments.http import api, json_answer, request_id
from hiresfix.images import encode_b64, encode_image
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
    to_openai,
    too_big_for_links,
)
from hiresfix.schemas import RequestError
from hiresfix.stages import ImageBatch

GENERATIONS_ERRORS = openai_error_docs(400, 401, 404, 408, 409, 413, 429, 500, 503)
IMAGE_FORM_ERRORS = GENERATIONS_ERRORS
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


class OpenAIRoutes:
    """Mixed into the Ingress (deployments/ingress.py)."""

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=GENERATIONS_ERRORS)
    async def openai_generations(self, body: ImageGenerationRequest, request: Request) -> Response:
        """OpenAI's `images.generate`. hiresfix's /generate fields are accepted beside OpenAI's
        (the SDK's `extra_body`)."""
        if model_needs_lookup(body.model):
            check_model(body.model, await self._sdxl_source())
        mapped = body.to_generate(self.limits.max_side)
        rid, t0 = request_id(request), time.perf_counter()
        req = mapped.request
        try:
            batch = await self._generate(req, rid)
        except RequestError as exc:  # a limit on a field the client spelled size or n
            if exc.field in ("width", "height", "hires_width", "hires_height", "hires_scale"):
                exc.message = f"{mapped.size[0]}x{mapped.size[1]}: {exc.message}"
                exc.field = "size"
            raise
        return await self._openai_answer(batch, mapped, t0, rid, request)

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
        try:
            batch = await self._img2img(mapped.request, rid, t0)
        except RequestError as exc:  # our size fields, which the client spelled size
            if exc.field in ("width", "height"):
                exc.field = "size"
            raise
        return await self._openai_answer(batch, mapped, t0, rid, request)

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
