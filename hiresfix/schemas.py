"""The request/response contract: one pydantic model per request type.

These classes are the single source of truth for the HTTP API (FastAPI validates with them and
renders them at /docs), the CLI (builds its flags from them) and the README. Field names follow the
contract that existing clients already send (A1111-style names on port 7860).
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hiresfix.samplers import SamplerName

# Hard bounds that protect a replica whatever the profile. Profiles set stricter ones (ingress
# limits, including the largest hires output side).
MAX_SIDE = 2048
MAX_STEPS = 150
SEED_MAX = 2**32 - 1

OutputFormat = Literal["png", "jpeg", "webp"]


class FallbackReason(str, Enum):
    """Why the neural upscaler was not used; LANCZOS served the request instead."""

    disabled_by_request = "disabled_by_request"
    not_installed = "not_installed"  # torch/spandrel cannot be imported
    weights_missing = "weights_missing"  # configured file absent (or checksum mismatch)
    out_of_memory = "out_of_memory"  # still OOM at the smallest tile
    upscaler_unavailable = "upscaler_unavailable"  # its replica (or node) died or is restarting
    error = "error"  # anything else; fallback_detail says what


_X8 = {"multipleOf": 8}


class _Strict(BaseModel):
    # Unknown fields are a 422, not silently ignored: a typo like "hires_fixx" must not pass.
    # NaN and inf are no value for any knob: a 422 naming the field, not a silent default.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FaceOptions(_Strict):
    use_face_restoration: bool = Field(False, description="Run the face restoration pass.")
    face_restoration_weight: float = Field(
        0.6, ge=0.0, le=1.0, description="0 = original face, 1 = fully restored face."
    )
    face_model: str | None = Field(
        None, description="A configured face restorer name (GET /models); null = default."
    )


class UpscaleOptions(_Strict):
    use_realesrgan: bool = Field(True, description="Use the neural upscaler; false forces LANCZOS.")
    upscaler: str | None = Field(
        None, description="A configured upscaler name (GET /models); null = the default."
    )


QualityName = Literal["fast", "balanced", "best"]
# `quality`: the fields each preset fills in when a request leaves them out (fields sent win).
# DPM++ 2M Karras reaches at 15-25 steps what Euler needs 30+ for; the second pass's strength sets
# its step count (steps x strength). Cost, measured: README "SDXL and the hires fix".
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"num_inference_steps": 15, "scheduler": "dpmpp_2m_karras", "denoising_strength": 0.35},
    "balanced": {
        "num_inference_steps": 25,
        "scheduler": "dpmpp_2m_karras",
        "denoising_strength": 0.45,
    },
    "best": {"num_inference_steps": 40, "scheduler": "dpmpp_2m_karras", "denoising_strength": 0.5},
}


class GenerateRequest(UpscaleOptions, FaceOptions):
    prompt: str = Field(..., min_length=1, max_length=4000, description="What to draw.")
    negative_prompt: str = Field("", max_length=4000)
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="null = random; the seed used is returned."
    )
    quality: QualityName | None = Field(
        None,
        description=(
            "Speed/quality preset: fast (15 steps), balanced (25), best (40), DPM++ 2M Karras,"
            " hires strength 0.35/0.45/0.5. It fills only the fields the request leaves out."
        ),
    )
    # multipleOf in the document (clients and fuzzers generate valid sizes); the validator below
    # keeps the friendlier message that suggests the nearest sizes.
    width: int = Field(768, ge=64, le=MAX_SIDE, description="Multiple of 8.", json_schema_extra=_X8)
    height: int = Field(
        768, ge=64, le=MAX_SIDE, description="Multiple of 8.", json_schema_extra=_X8
    )
    num_inference_steps: int = Field(30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    scheduler: SamplerName = Field(
        "euler", description="Sampler (also of the second pass, unless hires_scheduler)."
    )
    num_images: int = Field(
        1, ge=1, le=4, description="Images per request, seeds seed, seed+1, ..."
    )
    previews: int = Field(
        0,
        ge=0,
        le=10,
        description=(
            "Previews of the first denoising pass, evenly spread, read with"
            " GET /progress/{request_id}?preview=true (send your own X-Request-ID). Taken from"
            " the latents (no VAE call): a few ms each, blurry and slightly off-colour."
        ),
    )
    hires_fix: bool = Field(False, description="Upscale by hires_scale, then refine with img2img.")
    hires_scale: float = Field(2.0, ge=1.0, le=4.0)
    hires_width: int = Field(
        0,
        ge=0,
        le=4 * MAX_SIDE,
        description=(
            "Resize to this width instead of by hires_scale (A1111 'Resize width to'); 0 = unset."
            " Set alone, the height follows the aspect ratio."
        ),
    )
    hires_height: int = Field(
        0,
        ge=0,
        le=4 * MAX_SIDE,
        description="Resize to this height instead; 0 = unset. Alone: width follows.",
    )
    hires_steps: int = Field(
        0, ge=0, le=MAX_STEPS, description="Second-pass steps; 0 = derived from steps and strength."
    )
    denoising_strength: float = Field(
        # Below 0.001 not one of the 1000 training timesteps would run (diffusers fails on an
        # empty schedule).
        0.5,
        ge=0.001,
        le=1.0,
        description="Second-pass strength.",
    )
    hires_prompt: str = Field("", max_length=4000, description="Empty = same as prompt.")
    hires_negative_prompt: str = Field("", max_length=4000, description="Empty = same.")
    hires_scheduler: SamplerName | None = Field(
        None, description="Second-pass sampler; null = scheduler."
    )
    hires_guidance_scale: float | None = Field(
        None, ge=0.0, le=30.0, description="Second-pass CFG scale; null = guidance_scale."
    )
    refiner_switch_at: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description=(
            "Ensemble-of-experts: base denoises to this fraction, the refine model finishes."
        ),
    )
    output_format: OutputFormat = "png"

    @model_validator(mode="before")
    @classmethod
    def _quality_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("quality") in QUALITY_PRESETS:
            data = {**QUALITY_PRESETS[data["quality"]], **data}
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain some text")
        return v

    @field_validator("width", "height", "hires_width", "hires_height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(
                f"must be a multiple of 8 (got {v}; try {v - v % 8} or {v - v % 8 + 8})"
            )
        return v

    @field_validator("hires_width", "hires_height")
    @classmethod
    def _hires_target_fits(cls, v: int, info: ValidationInfo) -> int:
        # Only an enlargement in the base's proportions: a stretched image would be a silent defect,
        # and A1111's crop-to-fit surprises people; say what to change instead.
        d = info.data  # the fields declared above this one that validated
        if not v or not d.get("hires_fix"):
            return v
        side = info.field_name.removeprefix("hires_")
        if d.get(side) and v < d[side]:
            raise ValueError(f"the hires fix enlarges: {v} is below the base {side} {d[side]}")
        if side == "height" and d.get("hires_width") and d.get("width") and d.get("height"):
            follow = resize_to(d["width"], d["height"], d["hires_width"], 0)[1]
            if abs(follow - v) > 8:
                raise ValueError(
                    f"{d['hires_width']}x{v} changes the aspect ratio of"
                    f" {d['width']}x{d['height']}:"
                    f" set only hires_width or hires_height (the other follows, e.g. hires_height"
                    f" {follow}) or both in proportion"
                )
        return v

    def output_size(self) -> tuple[int, int]:
        if not self.hires_fix:
            return self.width, self.height
        if self.hires_width or self.hires_height:
            return resize_to(self.width, self.height, self.hires_width, self.hires_height)
        return hires_size(self.width, self.height, self.hires_scale)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Target size of an upscale: rounded, then snapped to a multiple of 8 (latent grid)."""
    return _snap8(width * scale), _snap8(height * scale)


def resize_to(width: int, height: int, to_width: int, to_height: int) -> tuple[int, int]:
    """A1111's "resize to": a side left 0 follows the aspect ratio (snapped to 8)."""
    return (
        to_width or _snap8(to_height * width / height),
        to_height or _snap8(to_width * height / width),
    )


def _snap8(v: float) -> int:
    return max(8, int(round(v / 8.0)) * 8)


class UpscaleRequest(UpscaleOptions, FaceOptions):
    image: str = Field(
        ..., min_length=1, description="Base64 PNG/JPEG/WebP (a data: URL is accepted)."
    )
    scale: float = Field(2.0, ge=1.0, le=8.0, description="Any factor, e.g. 1.5, 2, 3, 4.")
    output_format: OutputFormat = "png"


# --- POST /img2img ------------------------------------------------------------------------------
def _as_generate(name: str):
    """The /generate field of that name, bounds and description included: one definition."""
    return copy.copy(GenerateRequest.model_fields[name])


ResizeMode = Literal["resize", "crop", "fill"]


class Img2ImgRequest(UpscaleOptions, FaceOptions):
    """img2img (and inpainting with `mask`) of your image; then, optionally, the hires fix and the
    face pass exactly as /generate runs them."""

    image: str = Field(
        ..., min_length=1, description="Base64 PNG/JPEG/WebP (a data: URL is accepted)."
    )
    prompt: str = _as_generate("prompt")
    negative_prompt: str = _as_generate("negative_prompt")
    strength: float = Field(
        0.75,
        ge=0.001,
        le=1.0,
        description="How much to change the image: 0 keeps it, 1 redraws it from noise.",
    )
    mask: str | None = Field(
        None,
        min_length=1,
        description=(
            "Inpainting: base64 mask image, white = repaint, black = keep (grey: partly);"
            " resized like the image. Pixels it keeps come back unchanged."
        ),
    )
    mask_blur: int = Field(4, ge=0, le=64, description="Feathers the mask's edge, in pixels.")
    mask_invert: bool = Field(False, description="Repaint where the mask is black instead.")
    inpaint_area: Literal["whole", "only_masked"] = Field(
        "whole",
        description=(
            "With a mask: only_masked redraws a crop around the mask (plus inpaint_padding) at"
            " the full output size and pastes it back, for more detail in a small area"
            " (A1111's 'Only masked'); whole redraws the whole picture."
        ),
    )
    inpaint_padding: int = Field(
        32, ge=0, le=1024, description="only_masked: pixels of context kept around the mask."
    )
    inpaint_fill: Literal["original", "fill"] = Field(
        "original",
        description=(
            "What the masked area starts from: the picture as it is (original), or its"
            " surroundings' colours smoothed into it (fill: for removing an object)."
        ),
    )
    width: int = Field(
        0,
        ge=0,
        le=MAX_SIDE,
        description="Output width, multiple of 8; 0 = the image's (rounded down to 8).",
        json_schema_extra=_X8,
    )
    height: int = Field(
        0,
        ge=0,
        le=MAX_SIDE,
        description="Output height, multiple of 8; 0 = the image's, or follows width.",
        json_schema_extra=_X8,
    )
    resize_mode: ResizeMode = Field(
        "resize",
        description=(
            "When the size differs from the image's: resize (stretch), crop (cover, then"
            " centre-crop) or fill (fit, then extend the edges)."
        ),
    )
    seed: int | None = _as_generate("seed")
    num_inference_steps: int = Field(
        30, ge=1, le=MAX_STEPS, description="Schedule length; strength x steps of it run."
    )
    guidance_scale: float = _as_generate("guidance_scale")
    scheduler: SamplerName = _as_generate("scheduler")
    num_images: int = _as_generate("num_images")
    previews: int = _as_generate("previews")
    hires_fix: bool = _as_generate("hires_fix")
    hires_scale: float = _as_generate("hires_scale")
    hires_width: int = _as_generate("hires_width")
    hires_height: int = _as_generate("hires_height")
    hires_steps: int = _as_generate("hires_steps")
    denoising_strength: float = _as_generate("denoising_strength")
    hires_prompt: str = _as_generate("hires_prompt")
    hires_negative_prompt: str = _as_generate("hires_negative_prompt")
    hires_scheduler: SamplerName | None = _as_generate("hires_scheduler")
    hires_guidance_scale: float | None = _as_generate("hires_guidance_scale")
    output_format: OutputFormat = "png"

    _prompt_not_blank = field_validator("prompt")(GenerateRequest._prompt_not_blank.__func__)

    @field_validator("width", "height", "hires_width", "hires_height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        return GenerateRequest._multiple_of_8(v) if v else v

    def output_size(self, image_width: int, image_height: int) -> tuple[int, int]:
        """The img2img pass's size for an image of that size (before any hires fix)."""
        if self.width and self.height:
            return self.width, self.height
        if self.width or self.height:  # one side given: the other keeps the image's proportions
            return resize_to(image_width, image_height, self.width, self.height)
        return max(8, image_width // 8 * 8), max(8, image_height // 8 * 8)  # down to the grid

    def as_generate(self, width: int, height: int) -> GenerateRequest:
        """The same request as /generate would take at the img2img size: what the hires, face and
        limit checks read. Raises RequestError naming the field (a hires size below the image's,
        a size off the limits)."""
        fields = self.model_dump(
            exclude={
                "image",
                "mask",
                "mask_blur",
                "mask_invert",
                "strength",
                "resize_mode",
                "width",
                "height",
                "inpaint_area",
                "inpaint_padding",
                "inpaint_fill",
            }
        )
        try:
            return GenerateRequest(**fields, width=width, height=height)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "body"
            message = err["msg"].removeprefix("Value error, ")
            if field in ("width", "height") and not getattr(self, field):
                message = (
                    f"the image gives an output of {width}x{height}, {field}: {message};"
                    " set width and height"
                )
                field = "image"
            raise RequestError(field, message) from None


class FaceRestorationInfo(BaseModel):
    applied: bool = False
    faces_found: int = 0
    model: str | None = None
    reason: str | None = Field(None, description="Why it was not applied, when requested.")


class ImageResponse(BaseModel):
    image: str = Field(..., description="Base64 of the first image.")
    images: list[str] = Field(default_factory=list, description="All images (num_images).")
    width: int
    height: int
    seed: int | None = None
    seeds: list[int] = Field(default_factory=list)
    upscaler_used: str | None = Field(
        None,
        description=(
            "Model name, 'lanczos', or null when the request had no upscale stage (at scale 1"
            " the stage passes the picture through and still names the model)."
        ),
    )
    fallback_reason: FallbackReason | None = None
    fallback_detail: str | None = None
    face_restoration: FaceRestorationInfo = Field(default_factory=FaceRestorationInfo)
    output_format: OutputFormat = "png"
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds per stage, and total."
    )
    request_id: str | None = Field(
        None, description="/generate: the X-Request-ID sent, or one assigned."
    )
    batched_with: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "base, refine: how many requests (this one included) shared the stage's model call;"
            " 1 = it ran alone. Sizes come from the deployment's user_config max_batch_size."
        ),
    )


class ProgressInfo(BaseModel):
    """GET /progress/{request_id}: where a /generate request is (send your own X-Request-ID)."""

    request_id: str
    state: Literal["running", "done", "failed", "cancelled"]
    stage: str | None = Field(
        None,
        description="base, finish, img2img, upscale, hires or face; null before the first step.",
    )
    step: int = Field(0, description="Steps done in the current stage.")
    stage_steps: int = Field(0, description="Steps the current stage runs.")
    progress: float = Field(
        ..., ge=0.0, le=1.0, description="Whole request; upscale and face count as one step each."
    )
    elapsed_s: float
    eta_s: float | None = Field(
        None, description="Seconds left at the pace so far; null until the first step."
    )
    previews: int = Field(0, description="Previews taken so far (the request's `previews`).")
    preview: str | None = Field(
        None, description="With ?preview=true: the latest preview, base64 PNG; null before one."
    )
    plan: dict[str, int] = Field(default_factory=dict, description="Steps per stage, in order.")
    detail: str | None = Field(None, description="Why it failed, when it did.")
    signal: Literal["interrupt", "skip"] | None = Field(
        None, description="An A1111 interrupt or skip on its way to the running pass."
    )


class ModelInfo(BaseModel):
    name: str
    kind: Literal["upscaler", "face"]
    available: bool
    default: bool = False
    scale: int | None = None
    architecture: str | None = None
    device: str | None = None
    dtype: str | None = None
    reason: str | None = None
    detail: str | None = None


class ModelsResponse(BaseModel):
    upscalers: list[ModelInfo]
    face_models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    realesrgan_available: bool
    face_restoration_available: bool
    models: list[ModelInfo]
    deployments: dict[str, dict] = Field(default_factory=dict)
    jobs: dict | None = Field(
        None,
        description="The job queue (/jobs): its store, whether jobs survive a restart, counts.",
    )


class FieldError(BaseModel):
    field: str = Field(..., description="The request field (or header) to change.")
    message: str


class ErrorResponse(BaseModel):
    """Every error the service answers, whatever the status: what went wrong, and which field."""

    error: str
    detail: list[FieldError]
    request_id: str | None = None

    @classmethod
    def of(
        cls,
        field: str,
        message: str,
        request_id: str | None = None,
        summary: str | None = None,
    ):
        return cls(
            error=summary or f"{field}: {message}",
            detail=[FieldError(field=field, message=message)],
            request_id=request_id,
        )


class RequestError(ValueError):
    """A request the service refuses: the HTTP layer answers `status` with an ErrorResponse naming
    `field`. Raised by domain checks (limits, configured model names, images) without any Ray."""

    def __init__(
        self, field: str, message: str, status: int = 422, retry_after_s: float | None = None
    ):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status
        self.retry_after_s = retry_after_s  # 429 and 503: when the same request may succeed


def build_request(
    model: type[BaseModel], fields: dict, names: dict[str, str], error: type[RequestError]
) -> Any:
    """`model` from another API's mapped fields (A1111, OpenAI). A validation error becomes
    `error`, naming the field as that API's client sent it (`names`: ours -> theirs)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        ours = str(err["loc"][0]) if err["loc"] else "body"
        raise error(names.get(ours, ours), err["msg"].removeprefix("Value error, ")) from None
