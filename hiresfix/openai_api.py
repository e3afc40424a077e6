"""OpenAI Images API compatibility: `POST /v1/images/generations` mapped onto our request.

Code written against the official `openai` SDK (`client.images.generate(...)`) works against a
hiresfix cluster with `base_url=http://HOST:7860/v1`. Like hiresfix/a1111.py this module is the
mapping only (their request -> our GenerateRequest, our ImageResponse -> their answer, errors in
their shape); the routes are deployments/openai_routes.py. Ray-free.

The size rule. `size` is the size delivered, exactly (`auto` = 1024x1024; OpenAI's named sizes
and any `WxH` in multiples of 8). SDXL draws best at about one megapixel, so:
- the base pass runs at the requested size when that is at most 1024x1024 in area and within the
  deployment's `max_side`, and no hires fix is asked for;
- otherwise the base pass runs at the same aspect ratio scaled down (to at most one megapixel,
  within `max_side`, or by the quality preset's hires scale) and the hires fix (RealESRGAN, then
  img2img) brings it to the requested size. 1792x1024 on a profile with max_side 1024, for
  example, draws 1024x584 and refines at 1792x1024.

The quality presets (`quality`; any of them can be overridden by the hiresfix fields below):

| quality | steps | hires fix |
|---|---|---|
| low | 15 | only when the size needs it |
| medium, standard, auto (default) | 25 | only when the size needs it |
| high, hd, xhigh, max | 30 | always: base at size / 1.5, denoising 0.4 |

hiresfix's own fields (`seed`, `num_inference_steps`, `hires_fix`, `upscaler`,
`use_face_restoration`, ...) are accepted beside OpenAI's, named as in /generate (the SDK sends
them with `extra_body=`); `width`, `height`, `hires_width`, `hires_height` and `num_images` are
spelled `size` and `n` here. `background: transparent`, `stream: true` and gif/svg output are
refused with a 400 saying so; `output_compression`, `style`, `moderation`, `user` and
`safety_identifier` are accepted and ignored (JPEG and WebP are encoded at quality 95).

`response_format: url` answers links to a bounded, expiring result store (ResultStore below, held
by the Progress deployment's one replica, so every ingress replica serves every link):
`GET /v1/images/results/{id}` answers the file until `openai.results_ttl_s` has passed, then a 404.

`POST /v1/images/edits` and `/v1/images/variations` (multipart, as the SDK sends them) are our
/img2img: see EditRequest and VariationRequest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from hiresfix.images import Picture
from hiresfix.schemas import (
    GenerateRequest,
    ImageResponse,
    Img2ImgRequest,
    RequestError,
    build_request,
)

# --- errors -----------------------------------------------------------------------------------

# Status -> OpenAI's error `type` and a default `code`. A field error is 400 here, as OpenAI
# answers it (the SDK's BadRequestError); /generate answers the same error 422.
_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
}
# Our error "fields" that are not request parameters: OpenAI's `param` is null for them.
_NOT_PARAMS = {"body", "path", "method", "authorization", "x-request-id", "service"}
# Our field -> the parameter an OpenAI client sent (errors from GenerateRequest name it).
OPENAI_PARAM = {
    "width": "size",
    "height": "size",
    "hires_width": "size",
    "hires_height": "size",
    "num_images": "n",
    "previews": "partial_images",
}
# What each status means on /v1/*, for the OpenAPI document.
OPENAI_ERRORS: dict[int | str, str] = {
    400: "A parameter is missing, malformed, unsupported (`stream`, transparent backgrounds) or"
    " outside this deployment's limits, or an image or mask is not a readable picture: `param`"
    " names it.",
    401: "API keys are on and no valid `Authorization: Bearer` key was sent.",
    404: "Unknown `model` (GET /v1/models lists them), or no such route.",
    408: "The request body did not arrive whole in time.",
    409: "The X-Request-ID belongs to a request that is still running.",
    413: "The body is larger than this deployment accepts.",
    429: "This API key already runs its maximum of concurrent requests; see Retry-After.",
    500: "A bug: the log holds the detail under the x-request-id header's id (x-should-retry:"
    " false).",
    503: "At capacity, or a stage is restarting: retry after Retry-After seconds (the SDK does).",
    "4XX": "Any other client error (a wrong method: 405), in the same shape.",
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every error on /v1/*: OpenAI's shape, which the SDK turns into its exception classes."""

    error: OpenAIErrorDetail


class OpenAIError(RequestError):
    """A refusal with OpenAI's `code` (the HTTP layer answers it in OpenAI's shape on /v1/*)."""

    def __init__(self, param: str, message: str, status: int = 400, code: str | None = None):
        super().__init__(param, message, status)
        self.code = code


def is_openai_path(path: str, root_path: str = "") -> bool:
    """Is this request under /v1/ (relative to the app's route prefix)? Its errors take OpenAI's
    shape."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return path == "/v1" or path.startswith("/v1/")


def openai_error(
    status: int, field: str, message: str, code: str | None = None
) -> tuple[int, dict]:
    """(status, body) of an error in OpenAI's shape; a 422 becomes OpenAI's 400."""
    if status == 422:
        status = 400
    kind, default_code = _KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    param = None if field in _NOT_PARAMS else field
    if code is None and message.startswith("Extra inputs are not permitted"):
        code = "unknown_parameter"
    text = message if field == "body" or message.startswith(field) else f"{field}: {message}"
    body = OpenAIErrorDetail(message=text, type=kind, param=param, code=code or default_code)
    return status, OpenAIErrorResponse(error=body).model_dump()


def openai_error_docs(*codes: int, notes: dict[int, str] | None = None) -> dict:
    """`responses=` for a /v1 route: its error statuses, all in OpenAIErrorResponse. "4XX" stands
    for any other client error (a wrong method's 405), and keeps FastAPI from listing a 422: a
    field error is a 400 here. `notes`: a route's own description of a status."""
    text = {**OPENAI_ERRORS, **(notes or {})}
    docs = {c: {"model": OpenAIErrorResponse, "description": text[c]} for c in codes}
    return {**docs, "4XX": {"model": OpenAIErrorResponse, "description": OPENAI_ERRORS["4XX"]}}


# --- models -----------------------------------------------------------------------------------

SERVED_ID = "hiresfix-sdxl"  # always names the served model, whatever its weights are
# OpenAI's own image model names are accepted as aliases of the served model: clients hard-code
# them.
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hiresfix"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


def served_models(source: str | None) -> list[str]:
    """The ids GET /v1/models lists: our stable id, and the configured SDXL source when known."""
    return [SERVED_ID] + ([source] if source and source != SERVED_ID else [])


def model_list(source: str | None) -> ModelList:
    return ModelList(data=[ModelObject(id=m) for m in served_models(source)])


def model_needs_lookup(name: str | None) -> bool:
    """False when `name` is accepted without knowing the configured source (None, our id, an
    OpenAI image model name)."""
    return not (name is None or name == SERVED_ID or name.lower().startswith(OPENAI_MODEL_PREFIXES))


def check_model(name: str | None, source: str | None) -> None:
    if model_needs_lookup(name) and name not in served_models(source):
        raise OpenAIError(
            "model",
            f"the model {name!r} is not served here; use one of"
            f" {', '.join(served_models(source))} (or an OpenAI image model name, which means the"
            " same)",
            404,
            "model_not_found",
        )


# --- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str  # what the answer's `quality` says
    steps: int
    hires_fix: bool  # always, not only when the size needs it
    hires_scale: float = 1.5
    denoising_strength: float = 0.4


PRESETS = {
    "low": Preset("low", 15, False),
    "medium": Preset("medium", 25, False),
    "high": Preset("high", 30, True),
}
QUALITY = {
    "low": "low",
    "medium": "medium",
    "standard": "medium",
    "auto": "medium",
    "high": "high",
    "hd": "high",
    "xhigh": "high",
    "max": "high",
}
QualityName = Literal["low", "medium", "high", "standard", "hd", "auto", "xhigh", "max"]

NAMED_SIZES = (
    "256x256",
    "512x512",
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "1792x1024",
    "1024x1792",
)
AUTO_SIZE = (1024, 1024)
NATIVE_PIXELS = 1024 * 1024  # SDXL's training resolution: the largest base pass the rule picks
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# /generate fields spelled differently here.
RENAMED = {
    "width": "size",
    "height": "size",
    "hires_width": "size",
    "hires_height": "size",
    "num_images": "n",
    "previews": "partial_images",
}
_NOT_KNOBS = {"prompt", "output_format", "quality", *RENAMED}  # OpenAI names its own quality


def _optional(annotation: Any, constraints: list) -> Any:
    """`annotation | None`, keeping GenerateRequest's bounds (ge/le) on the value."""
    return Annotated[annotation | None, *constraints] if constraints else annotation | None


# hiresfix's knobs, optional here (null = the preset's or /generate's default), typed, bounded
# and described as in GenerateRequest so /docs shows them.
_Knobs = create_model(
    "HiresfixKnobs",
    __config__=ConfigDict(extra="allow"),
    **{
        name: (_optional(f.annotation, f.metadata), Field(None, description=f.description))
        for name, f in GenerateRequest.model_fields.items()
        if name not in _NOT_KNOBS
    },
)


class ImageGenerationRequest(_Knobs):  # type: ignore[misc,valid-type]  # built above
    """OpenAI's `images.generate` body, plus hiresfix's fields under their /generate names."""

    prompt: str = Field(..., description="What to draw.")
    model: str | None = Field(
        None, description="GET /v1/models; OpenAI's image model names mean the served model."
    )
    n: int | None = Field(None, description="Images, 1-4 here (seeds seed, seed+1, ...).")
    size: str | None = Field(
        None,
        description="WxH delivered exactly (multiples of 8), or auto (1024x1024): see the size"
        " rule in the README.",
    )
    quality: QualityName | None = Field(None, description="Steps and hires-fix preset.")
    response_format: str | None = Field(
        None, description="b64_json (default) or url (a link that expires: openai.results_ttl_s)."
    )
    output_format: str | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, description="Accepted, ignored.")
    background: str | None = Field(None, description="opaque or auto; transparent is refused.")
    stream: bool | None = Field(
        None,
        description="Server-sent events: `partial_images` image_generation.partial_image events"
        " (previews of the denoising, drawn from its latents), then one"
        " image_generation.completed per image.",
    )
    partial_images: int | None = Field(
        None, description="0-3 previews while streaming (default 0); ignored without stream."
    )
    style: str | None = Field(None, description="DALL-E 3's vivid/natural; ignored.")
    moderation: str | None = Field(None, description="Ignored.")
    user: str | None = Field(None, description="Ignored.")
    safety_identifier: str | None = Field(None, description="Ignored.")

    def to_generate(self, max_side: int | None = None) -> Mapped:
        """Our request, the size and the preset the answer reports. Raises OpenAIError naming
        OpenAI's parameter."""
        _refuse_unsupported(self)
        knobs = {
            k: v
            for k, v in self.model_dump(include=set(_Knobs.model_fields)).items()
            if v is not None
        }
        width, height = parse_size(self.size)
        preset = PRESETS[QUALITY[self.quality or "auto"]]
        hires = knobs.get("hires_fix")
        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "num_inference_steps": preset.steps,
            "num_images": 1 if self.n is None else self.n,
            "output_format": self.output_format or "png",
            **size_fields(width, height, preset, hires, knobs.get("hires_scale"), max_side),
        }
        if fields["hires_fix"] and hires is None:  # the preset's strength, unless given
            fields["denoising_strength"] = preset.denoising_strength
        fields.update({k: v for k, v in knobs.items() if k != "hires_fix"})  # validated below
        if self.stream:
            fields["previews"] = self.partial_images or 0
        if fields["num_images"] > 4:
            raise OpenAIError("n", f"at most 4 images per request here (got {self.n})")
        req = build_request(GenerateRequest, fields, OPENAI_PARAM, OpenAIError)
        return Mapped(
            req, (width, height), preset.name, self.response_format == "url", bool(self.stream)
        )


@dataclass(frozen=True)
class Mapped:
    request: GenerateRequest | Img2ImgRequest
    size: tuple[int, int]  # (0, 0): the input image's own size (edits and variations)
    quality: str
    url: bool = False  # response_format url: links to the result store, not base64
    stream: bool = False  # server-sent events
    family: str = "image_generation"  # the events' type prefix (edits: image_edit)


def _refuse_unsupported(body: ImageGenerationRequest) -> None:
    for ours, theirs in RENAMED.items():
        if ours in (body.model_extra or {}):
            raise OpenAIError(ours, f"use {theirs!r} here (OpenAI's name for it)")
    unknown = sorted(body.model_extra or {})
    if unknown:
        raise OpenAIError(
            unknown[0],
            "unknown parameter: OpenAI's image parameters and /generate's field names are accepted",
            code="unknown_parameter",
        )
    _check_answer_fields(body)
    _check_stream(body)
    if body.background not in (None, "auto", "opaque"):
        raise OpenAIError(
            "background",
            f"{body.background!r} is not supported: SDXL draws opaque pictures; use opaque or auto",
            code="unsupported_value",
        )


# --- streaming (stream: true): OpenAI's server-sent events ---------------------------------------
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound


def stream_event(kind: str, b64: str, mapped: Mapped, fmt: str, size: str, **extra) -> bytes:
    """One server-sent event: `partial_image` (with partial_image_index) or `completed`, the
    fields of the SDK's ImageGen*Event / ImageEdit*Event. No usage: there are no tokens to count
    here."""
    data = {
        "type": f"{mapped.family}.{kind}",
        "b64_json": b64,
        "created_at": int(time.time()),
        "size": size,
        "quality": mapped.quality,
        "background": "opaque",
        "output_format": fmt,
        **extra,
    }
    return _sse(data)


def stream_error(status: int, field: str, message: str, code: str | None = None) -> bytes:
    """A failure after the stream began (its 200 is sent): the SDK raises APIError on it."""
    _, body = openai_error(status, field, message, code)
    return _sse({"type": "error", **body})


def _sse(data: dict) -> bytes:
    """One server-sent event named after its `type`, as the SDK's stream parser expects."""
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def _check_stream(body: ImageGenerationRequest | EditRequest) -> None:
    if body.partial_images is not None and not 0 <= body.partial_images <= MAX_PARTIAL_IMAGES:
        raise OpenAIError(
            "partial_images",
            f"must be between 0 and {MAX_PARTIAL_IMAGES} (got {body.partial_images})",
        )
    if body.stream and body.response_format == "url":
        raise OpenAIError(
            "response_format",
            "a stream carries the images themselves: leave response_format out (or b64_json)",
            code="unsupported_value",
        )


def _check_answer_fields(body: BaseModel) -> None:
    """response_format, output_format and output_compression, where the body has them."""
    fmt = getattr(body, "response_format", None)
    if fmt not in (None, "b64_json", "url"):
        raise OpenAIError(
            "response_format",
            f"{fmt!r} is not served: use b64_json (the image in the answer) or url (a link that"
            " expires)",
            code="unsupported_value",
        )
    out = getattr(body, "output_format", None)
    if out not in (None, "png", "jpeg", "webp"):
        raise OpenAIError(
            "output_format",
            f"{out!r} is not served: use png, jpeg or webp",
            code="unsupported_value",
        )
    level = getattr(body, "output_compression", None)
    if level is not None and not 0 <= level <= 100:
        raise OpenAIError("output_compression", "must be between 0 and 100")


def parse_size(size: str | None) -> tuple[int, int]:
    if size is None or size.strip().lower() == "auto":
        return AUTO_SIZE
    m = _SIZE.match(size)
    if not m:
        raise OpenAIError(
            "size",
            f"{size!r} is not a size: use WIDTHxHEIGHT (e.g. {', '.join(NAMED_SIZES[:3])}) or auto",
        )
    w, h = int(m[1]), int(m[2])
    if w % 8 or h % 8 or min(w, h) < 64:
        raise OpenAIError(
            "size", f"{size}: both sides must be multiples of 8 and at least 64 (e.g. 1024x1024)"
        )
    return w, h


def size_fields(
    width: int,
    height: int,
    preset: Preset,
    hires_fix: bool | None = None,
    hires_scale: float | None = None,
    max_side: int | None = None,
) -> dict[str, Any]:
    """GenerateRequest's size fields delivering exactly width x height (the size rule above).
    `hires_fix`/`hires_scale`: the client's own choice, when it made one."""
    if hires_fix is False:  # asked for: the base pass at the requested size, whatever it costs
        return {"width": width, "height": height, "hires_fix": False}
    scale = 1.0
    if hires_fix or preset.hires_fix:
        scale = 1.0 / max(1.0, hires_scale or preset.hires_scale)  # below 1: GenerateRequest says
    scale = min(scale, math.sqrt(NATIVE_PIXELS / (width * height)))
    if max_side:
        scale = min(scale, max_side / width, max_side / height)
    if scale >= 1.0 and not hires_fix:
        return {"width": width, "height": height, "hires_fix": False}
    bw, bh = _base_size(width, height, min(scale, 1.0), max_side)
    return {
        "width": bw,
        "height": bh,
        "hires_fix": True,
        "hires_width": width,
        "hires_height": height,
    }


def _round8(v: float) -> int:
    return max(8, int(round(v / 8.0)) * 8)


def _base_size(width: int, height: int, scale: float, max_side: int | None) -> tuple[int, int]:
    """The largest base at `scale` or below whose aspect ratio the hires fix accepts for exactly
    width x height (GenerateRequest lets the two sides disagree by at most 8 px)."""
    first = max(64, int(width * scale) // 8 * 8)
    for bw in range(first, 63, -8):
        bh = max(64, _round8(bw * height / width))
        if (max_side and max(bw, bh) > max_side) or bw * bh > NATIVE_PIXELS:
            continue
        if abs(_round8(width * bh / bw) - height) <= 8:
            return bw, bh
    raise OpenAIError(
        "size",
        f"{width}x{height}: no base pass within this deployment's limits keeps that aspect ratio"
        " (sides of at least 64 px): ask for a size nearer to square",
    )


# --- the answer -------------------------------------------------------------------------------


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="The file, base64 (response_format b64_json).")
    url: str | None = Field(
        None, description="A link to the file that expires (response_format url)."
    )
    revised_prompt: str | None = Field(None, description="Always null: prompts are not revised.")


class ImagesResponse(BaseModel):
    """OpenAI's answer, plus `hiresfix`: our metadata (seeds, upscaler used, fallbacks,
    timings)."""

    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: str
    quality: str
    size: str
    usage: None = Field(None, description="Always null: no tokens are counted.")
    hiresfix: dict = Field(
        default_factory=dict, description="/generate's answer without the images."
    )


def to_openai(
    ours: ImageResponse,
    mapped: Mapped,
    created: int | None = None,
    urls: list[str] | None = None,
) -> ImagesResponse:
    """`urls`: the links of response_format url, in place of `ours`' base64 images."""
    data = (
        [OpenAIImage(url=u) for u in urls]
        if urls is not None
        else [OpenAIImage(b64_json=b) for b in ours.images or [ours.image]]
    )
    return ImagesResponse(
        created=int(time.time()) if created is None else created,
        data=data,
        output_format=ours.output_format,
        quality=mapped.quality,
        size=f"{ours.width}x{ours.height}",
        hiresfix=ours.model_dump(mode="json", exclude={"image", "images"}),
    )


# --- edits and variations (multipart) ---------------------------------------------------------
#
# Both are our /img2img (Img2ImgRequest): the first `image` file is the picture (the SDK sends a
# list as `image[]`; only the first is used, there is no multi-image composition), `size` is the
# size delivered (auto or absent: the image's own, rounded down to 8 px), `quality` sets the steps
# as for generations (no hires fix unless asked for with `hires_fix`), and /img2img's own fields
# (strength, seed, hires_fix, use_face_restoration, ...) ride along as extra form fields.

# /img2img fields spelled differently here, or sent as files.
IMG2IMG_RENAMED = {"width": "size", "height": "size", "num_images": "n"}
_FILES = {"image", "mask"}

# Variations have no prompt: a neutral one, at a strength that keeps the composition and redraws
# the detail. Both can be overridden (`prompt`, `strength` as extra fields).
VARIATION_PROMPT = "a detailed, high quality picture"
VARIATION_STRENGTH = 0.6


def _img2img_knobs(name: str, exclude: set[str]) -> type[BaseModel]:
    """Img2ImgRequest's fields, optional (null = /img2img's default), bounds and descriptions
    kept, for /docs and validation of the form's strings (pydantic converts "30" and "true")."""
    return create_model(
        name,
        __config__=ConfigDict(extra="allow"),
        **{
            n: (_optional(f.annotation, f.metadata), Field(None, description=f.description))
            for n, f in Img2ImgRequest.model_fields.items()
            if n not in exclude
        },
    )


_EditKnobs = _img2img_knobs("EditKnobs", {"prompt", "output_format", *_FILES, *IMG2IMG_RENAMED})
_VariationKnobs = _img2img_knobs(
    "VariationKnobs", {"output_format", *_FILES, "mask_blur", "mask_invert", *IMG2IMG_RENAMED}
)


class _ImageForm(BaseModel):
    """What edits and variations share with generations."""

    model: str | None = Field(
        None, description="GET /v1/models; OpenAI's image model names mean the served model."
    )
    n: int | None = Field(None, description="Images, 1-4 here (seeds seed, seed+1, ...).")
    size: str | None = Field(
        None, description="WxH delivered exactly (multiples of 8); auto or absent: the image's."
    )
    response_format: str | None = Field(None, description="b64_json (default) or url.")
    output_format: str | None = Field(None, description="png (default), jpeg or webp.")
    user: str | None = Field(None, description="Ignored.")

    def _mapped(self, fields: dict[str, Any], knobs: set[str], quality: str = "medium") -> Mapped:
        extra = self.model_extra or {}
        for ours, theirs in IMG2IMG_RENAMED.items():
            if ours in extra:
                raise OpenAIError(ours, f"use {theirs!r} here (OpenAI's name for it)")
        if extra:
            raise OpenAIError(
                sorted(extra)[0],
                "unknown parameter: OpenAI's image parameters and /img2img's field names are"
                " accepted",
                code="unknown_parameter",
            )
        _check_answer_fields(self)
        width, height = (0, 0) if self.size in (None, "auto") else parse_size(self.size)
        fields = {
            **fields,
            "width": width,
            "height": height,
            "num_images": 1 if self.n is None else self.n,
            "output_format": self.output_format or "png",
            **{k: v for k, v in self.model_dump(include=knobs).items() if v is not None},
        }
        req = build_request(Img2ImgRequest, fields, IMG2IMG_RENAMED, OpenAIError)
        return Mapped(req, (width, height), quality, self.response_format == "url")


class EditRequest(_ImageForm, _EditKnobs):  # type: ignore[misc,valid-type]  # built above
    """OpenAI's `images.edit` form (besides the `image` and `mask` files), plus /img2img's
    fields."""

    prompt: str = Field(..., description="What the edited image shows.")
    quality: QualityName | None = Field(None, description="Steps preset, as for generations.")
    output_compression: int | None = Field(None, description="Accepted, ignored.")
    background: str | None = Field(None, description="opaque or auto; transparent is refused.")
    input_fidelity: str | None = Field(None, description="Ignored: `strength` says how much.")
    stream: bool | None = Field(
        None,
        description="Server-sent events: image_edit.partial_image previews, then"
        " image_edit.completed per image.",
    )
    partial_images: int | None = Field(
        None, description="0-3 previews while streaming (default 0); ignored without stream."
    )

    def to_img2img(self, image: str, mask: str | None) -> Mapped:
        """Our request from the form and the files (base64; the mask already in /img2img's
        white-means-repaint convention: mask_from_alpha)."""
        _check_stream(self)
        if self.background not in (None, "auto", "opaque"):
            raise OpenAIError(
                "background",
                f"{self.background!r} is not supported: SDXL draws opaque pictures",
                code="unsupported_value",
            )
        preset = PRESETS[QUALITY[self.quality or "auto"]]
        fields = {
            "prompt": self.prompt,
            "image": image,
            "mask": mask,
            "num_inference_steps": preset.steps,
        }
        if self.stream:
            fields["previews"] = self.partial_images or 0
        mapped = self._mapped(fields, set(_EditKnobs.model_fields), preset.name)
        return dataclasses.replace(mapped, stream=bool(self.stream), family="image_edit")


class VariationRequest(_ImageForm, _VariationKnobs):  # type: ignore[misc,valid-type]
    """OpenAI's `images.create_variation` form (besides the `image` file), plus /img2img's
    fields: `prompt` (default VARIATION_PROMPT) and `strength` (default VARIATION_STRENGTH)."""

    def to_img2img(self, image: str) -> Mapped:
        fields = {
            "prompt": VARIATION_PROMPT,
            "image": image,
            "strength": VARIATION_STRENGTH,
            "num_inference_steps": PRESETS["medium"].steps,
        }
        return self._mapped(fields, set(_VariationKnobs.model_fields))


def form_fields(form: Any) -> dict[str, str]:
    """A multipart form's text fields (the last value of each; empty ones, which the SDK sends
    for None, left out), files excluded. Raises OpenAIError for a file where text belongs."""
    out: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in _FILES or key in ("image[]", "mask[]"):
            continue
        if not isinstance(value, str):
            raise OpenAIError(key, "send this field as text, not as a file")
        if value != "" or key == "prompt":
            out[key] = value
    return out


def parse_form(model: type[BaseModel], fields: dict[str, str]) -> Any:
    """A form's text fields as `model` (EditRequest, VariationRequest); a 400 naming the first
    field that does not fit."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "body"
        raise OpenAIError(field, err["msg"]) from None


def form_files(form: Any, name: str, required: bool) -> list[Any]:
    """The files sent as `name` or `name[]` (the SDK's spelling of a list), in order."""
    files = form.getlist(name) + form.getlist(f"{name}[]")
    for f in files:
        if isinstance(f, str):
            raise OpenAIError(name, f"send {name} as a file part (an image file), not as text")
    if required and not files:
        raise OpenAIError(name, f"missing: send the picture as the multipart file part {name!r}")
    return files


def mask_from_alpha(pic: Picture) -> Picture:
    """OpenAI's mask (fully transparent pixels = the area to edit) as /img2img's (white =
    repaint, black = keep): 1 - alpha, opaque grey."""
    if pic.alpha is None:
        raise OpenAIError(
            "mask",
            "the mask has no alpha channel: send a PNG whose transparent pixels mark the area to"
            " edit (OpenAI's convention)",
        )
    grey = (1.0 - pic.alpha.astype(np.float32))[..., None]
    return Picture(rgb=np.repeat(grey, 3, axis=2))


def multipart_schema(model: type[BaseModel], files: dict[str, str]) -> dict:
    """The OpenAPI requestBody of a multipart route: `model`'s fields as text parts, `files` as
    binary parts (name -> description)."""
    schema = model.model_json_schema()
    props = {n: {"type": "string", "format": "binary", "description": d} for n, d in files.items()}
    schema["properties"] = {**props, **schema.get("properties", {})}
    schema["required"] = ["image", *schema.get("required", [])]
    schema.pop("additionalProperties", None)
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


# --- the result store (response_format url) ---------------------------------------------------


class OpenAISettings(BaseModel):
    """serve_config `args.openai`: the links of `response_format: url`."""

    model_config = ConfigDict(extra="forbid")
    results_ttl_s: float = Field(
        3600.0, gt=0, description="How long a link answers (OpenAI's last an hour too)."
    )
    results_max_images: int = Field(
        256, ge=1, description="Images kept at most; beyond it the oldest links expire early."
    )
    results_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Bytes of image files kept at most (in the Progress replica's memory);"
        " beyond it the oldest links expire early.",
    )
    public_url: str | None = Field(
        None,
        description="The links' base, e.g. https://images.example.com (behind a proxy); null ="
        " the scheme, host and route prefix the request came in with.",
    )


MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
RESULT_ID = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpg|webp)$")


class ResultStore:
    """Image files behind `url` answers: bounded in count and bytes, each kept ttl_s. Ids are
    unguessable (192 random bits): the link is the permission, as OpenAI's links are, so
    GET /v1/images/results/{id} needs no API key (deployments/guard.py)."""

    def __init__(self, settings: OpenAISettings, clock=time.monotonic):
        self.settings, self.clock = settings, clock
        self._items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._bytes = 0

    def put(self, files: list[tuple[bytes, str]]) -> list[str] | None:
        """Keep (data, output_format) files; their ids, or None when together they are more than
        the store holds at all."""
        s = self.settings
        size = sum(len(d) for d, _ in files)
        if size > s.results_max_bytes or len(files) > s.results_max_images:
            return None
        self._expire()
        while self._items and (
            self._bytes + size > s.results_max_bytes
            or len(self._items) + len(files) > s.results_max_images
        ):
            self._drop(next(iter(self._items)))
        ids, until = [], self.clock() + s.results_ttl_s
        for data, fmt in files:
            rid = f"{secrets.token_urlsafe(24)}.{_EXT[fmt]}"
            self._items[rid] = (data, MEDIA_TYPES[fmt], until)
            self._bytes += len(data)
            ids.append(rid)
        return ids

    def get(self, result_id: str) -> tuple[bytes, str, float] | None:
        """(data, media type, seconds left), or None once expired or pushed out."""
        self._expire()
        item = self._items.get(result_id)
        if item is None:
            return None
        data, media, until = item
        return data, media, until - self.clock()

    def stats(self) -> dict[str, int]:
        self._expire()
        return {"images": len(self._items), "bytes": self._bytes}

    def _expire(self) -> None:
        now = self.clock()
        while self._items:  # insertion order is expiry order: one ttl for all
            first, (_, _, until) = next(iter(self._items.items()))
            if until > now:
                break
            self._drop(first)

    def _drop(self, result_id: str) -> None:
        data, _, _ = self._items.pop(result_id)
        self._bytes -= len(data)


def result_missing(result_id: str, ttl_s: float | None = None) -> OpenAIError:
    keep = f" {ttl_s:g} s" if ttl_s else " a while"
    return OpenAIError(
        "path",
        f"no image {result_id!r}: links answer for{keep} after the request (fewer when the"
        " bounded store is full), then are gone; ask again, or use response_format b64_json",
        404,
        "not_found",
    )


def too_big_for_links(size: int, settings: OpenAISettings) -> OpenAIError:
    return OpenAIError(
        "response_format",
        f"the answer's images ({size} bytes) are more than the link store holds"
        f" ({settings.results_max_bytes} bytes, {settings.results_max_images} images): use"
        " b64_json",
    )
