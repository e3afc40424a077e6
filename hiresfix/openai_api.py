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
spelled `size` and `n` here. `response_format: url`, `background: transparent`, `stream: true` and
gif/svg output are refused with a 400 saying so; `output_compression`, `style`, `moderation`,
`user` and `safety_identifier` are accepted and ignored (JPEG and WebP are encoded at quality 95).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from hiresfix.schemas import GenerateRequest, ImageResponse, RequestError

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
_NOT_PARAMS = {"body", "path", "method", "authorization", "x-request-id"}
# Our field -> the parameter an OpenAI client sent (errors from GenerateRequest name it).
OPENAI_PARAM = {
    "width": "size",
    "height": "size",
    "hires_width": "size",
    "hires_height": "size",
    "num_images": "n",
}
# What each status means on /v1/*, for the OpenAPI document.
OPENAI_ERRORS: dict[int | str, str] = {
    400: "A parameter is missing, malformed, unsupported (`response_format: url`, `stream`,"
    " transparent backgrounds) or outside this deployment's limits: `param` names it.",
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


def openai_error_docs(*codes: int) -> dict:
    """`responses=` for a /v1 route: its error statuses, all in OpenAIErrorResponse. "4XX" stands
    for any other client error (a wrong method's 405), and keeps FastAPI from listing a 422: a
    field error is a 400 here."""
    docs = {c: {"model": OpenAIErrorResponse, "description": OPENAI_ERRORS[c]} for c in codes}
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
}
_NOT_KNOBS = {"prompt", "output_format", *RENAMED}


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
    response_format: str | None = Field(None, description="b64_json only.")
    output_format: str | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, description="Accepted, ignored.")
    background: str | None = Field(None, description="opaque or auto; transparent is refused.")
    stream: bool | None = Field(None, description="Streaming is not supported yet.")
    partial_images: int | None = Field(None, description="Only with stream; ignored.")
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
        if fields["num_images"] > 4:
            raise OpenAIError("n", f"at most 4 images per request here (got {self.n})")
        try:
            req = GenerateRequest(**fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            ours = str(err["loc"][0]) if err["loc"] else "body"
            raise OpenAIError(
                OPENAI_PARAM.get(ours, ours), err["msg"].removeprefix("Value error, ")
            ) from None
        return Mapped(req, (width, height), preset.name)


@dataclass(frozen=True)
class Mapped:
    request: GenerateRequest
    size: tuple[int, int]
    quality: str


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
    if body.response_format not in (None, "b64_json"):
        raise OpenAIError(
            "response_format",
            f"{body.response_format!r} is not served: only b64_json (the image in the answer);"
            " this service keeps no image store to link to",
            code="unsupported_value",
        )
    if body.stream:
        raise OpenAIError(
            "stream",
            "streaming is not supported yet: send stream false (or leave it out)",
            code="unsupported_value",
        )
    if body.background not in (None, "auto", "opaque"):
        raise OpenAIError(
            "background",
            f"{body.background!r} is not supported: SDXL draws opaque pictures; use opaque or auto",
            code="unsupported_value",
        )
    if body.output_format not in (None, "png", "jpeg", "webp"):
        raise OpenAIError(
            "output_format",
            f"{body.output_format!r} is not served: use png, jpeg or webp",
            code="unsupported_value",
        )
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
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
    b64_json: str
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


def to_openai(ours: ImageResponse, mapped: Mapped, created: int | None = None) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()) if created is None else created,
        data=[OpenAIImage(b64_json=b) for b in ours.images or [ours.image]],
        output_format=ours.output_format,
        quality=mapped.quality,
        size=f"{ours.width}x{ours.height}",
        hiresfix=ours.model_dump(mode="json", exclude={"image", "images"}),
    )
