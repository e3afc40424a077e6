"""AUTOMATIC1111 API compatibility: txt2img and extra-single-image mapped onto our requests.

Tools written for A1111 (editor plugins, chat front-ends, scripts) send this JSON to port 7860; with
this route they work unchanged against a hiresfix cluster. The mapping is data (A1111 name -> ours).
A1111 clients send dozens of fields: those we cannot honour are reported back in `info["ignored"]`
when they would have changed the picture, never silently dropped; an unknown sampler is an error
that lists the supported ones.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import struct
import zlib

from pydantic import BaseModel, ConfigDict, Field

from hiresfix import __version__
from hiresfix.images import PNG_PARAMETERS  # the PNG text chunk's key, as A1111 names it
from hiresfix.samplers import BY_NAME, SAMPLERS
from hiresfix.schemas import (
    GenerateRequest,
    Img2ImgRequest,
    ProgressInfo,
    RequestError,
    UpscaleRequest,
    build_request,
)

# A1111 sampler name (lower case) -> ours, from the one sampler table. A1111 >= 1.9 moved "Karras"
# into a separate `scheduler` field.
# Our own names are accepted too: GET /sdapi/v1/samplers lists them as aliases.
SAMPLER_BY_A1111 = {s.a1111.lower(): s.name for s in SAMPLERS} | {s.name: s.name for s in SAMPLERS}
# A1111's upscaler names for the RealESRGAN family -> the model names our profiles configure.
UPSCALER_ALIASES = {
    "r-esrgan 2x+": "RealESRGAN_x2plus",
    "r-esrgan 4x+": "RealESRGAN_x4plus",
    "r-esrgan 4x+ anime6b": "RealESRGAN_x4plus_anime_6B",
    "r-esrgan animevideo": "realesr-animevideov3",
    "r-esrgan general 4xv3": "realesr-general-x4v3",
}
LANCZOS_NAMES = {"lanczos", "nearest", "none"}
# Fields that only steer A1111's own bookkeeping (saving, UI state): nothing to report.
HARMLESS = {
    "send_images",
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "sampler_index",
    "override_settings_restore_afterwards",
    "disable_extra_networks",
    "comments",
}
# Our field -> the A1111 field a client sent, to name the right one in errors.
A1111_FIELD = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "hires_scale": "hr_scale",
    "hires_steps": "hr_second_pass_steps",
    "hires_width": "hr_resize_x",
    "hires_height": "hr_resize_y",
    "hires_prompt": "hr_prompt",
    "hires_negative_prompt": "hr_negative_prompt",
    "hires_guidance_scale": "hr_cfg",
    "hires_scheduler": "hr_sampler_name",
    "scheduler": "sampler_name",
    "use_face_restoration": "restore_faces",
}


class A1111Error(RequestError):
    """A 422 naming the A1111 field the client sent (not ours)."""


class _GenerationFields(BaseModel):
    """The fields txt2img and img2img share, with A1111's defaults."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1 = random.")
    sampler_name: str | None = Field(
        None, description=f"One of {', '.join(s.a1111 for s in SAMPLERS)} (any case); null = Euler."
    )
    scheduler: str | None = Field(None, description="'Karras' turns DPM++ 2M into DPM++ 2M Karras.")
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = False
    force_task_id: str | None = Field(
        None,
        description="The task's id, as hiresfix's request id (GET /progress/{id},"
        " POST /internal/progress; it wins over an X-Request-ID header).",
    )


class Txt2ImgRequest(_GenerationFields):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI that hiresfix honours (A1111's
    defaults). Any other field is accepted and, if it would have mattered, listed in
    info.ignored."""

    enable_hr: bool = False
    denoising_strength: float | None = Field(
        None, description="Hires strength; null = 0.7 as in A1111."
    )
    hr_scale: float = 2.0
    hr_upscaler: str | None = Field(
        None, description="R-ESRGAN names, a configured model name, or Lanczos."
    )
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None
    refiner_switch_at: float | None = None

    def to_generate(self, upscalers: list[str]) -> tuple[GenerateRequest, list[str]]:
        """Our request, plus notes on what was not honoured.

        Raises A1111Error naming the A1111 field.
        """
        extra = self.model_extra or {}
        notes = [
            f"{k}: not supported, ignored"
            for k, v in extra.items()
            if k not in HARMLESS and _matters(v)
        ]
        fields = dict(**_shared_fields(self, extra), refiner_switch_at=self.refiner_switch_at)
        if self.enable_hr:
            fields.update(
                hires_fix=True,
                hires_scale=self.hr_scale,
                hires_steps=self.hr_second_pass_steps,
                hires_width=self.hr_resize_x,
                hires_height=self.hr_resize_y,
                denoising_strength=0.7
                if self.denoising_strength is None
                else self.denoising_strength,
                hires_prompt=self.hr_prompt,
                hires_negative_prompt=self.hr_negative_prompt,
                hires_scheduler=_sampler(
                    "hr_sampler_name", self.hr_sampler_name, self.hr_scheduler
                ),
                hires_guidance_scale=self.hr_cfg,
            )
            fields.update(_upscaler(self.hr_upscaler, upscalers, notes))
        if not self.prompt.strip():
            raise A1111Error("prompt", "prompt is empty: hiresfix needs some text to draw")
        if fields["num_images"] > 4:
            raise A1111Error(
                "batch_size",
                f"batch_size x n_iter is {fields['num_images']}; at most 4 per request",
            )
        return build_request(GenerateRequest, fields, A1111_FIELD, A1111Error), notes


def _sampler(field: str, name: str | None, scheduler: str | None) -> str | None:
    if not name:
        return None
    key = name.strip().lower()
    if (scheduler or "").strip().lower() == "karras" and not key.endswith("karras"):
        key += " karras"
    if key not in SAMPLER_BY_A1111:
        raise A1111Error(
            field,
            f"sampler {name!r} (scheduler {scheduler!r}) is not available; use one of:"
            f" {', '.join(s.a1111 for s in SAMPLERS)}",
        )
    return SAMPLER_BY_A1111[key]


def _upscaler(name: str | None, configured: list[str], notes: list[str]) -> dict:
    if not name:
        return {}
    key = name.strip().lower()
    if key in LANCZOS_NAMES:
        return {"use_realesrgan": False}
    ours = next((c for c in configured if c.lower() == key), None) or UPSCALER_ALIASES.get(key)
    if ours in configured:
        return {"upscaler": ours}
    notes.append(
        f"upscaler {name!r} is not available here (latent upscaling is not supported);"
        " the default upscaler ran"
    )
    return {}


def _matters(value) -> bool:
    """Would A1111 have done something with this value? Defaults and empties do nothing."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value not in (0, -1, 1)  # A1111's numeric defaults (seeds, strengths, noise scales)
    if isinstance(value, (str, list, dict, tuple)):
        return len(value) > 0
    return True


PREVIEW_EVERY_N_STEPS = 10


def _shared_fields(req: _GenerationFields, extra: dict) -> dict:
    """The fields txt2img and img2img map the same way, in our names."""
    sampler = req.sampler_name or extra.get("sampler_index")  # the older name of the same field
    return dict(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        seed=None if req.seed < 0 else req.seed,
        width=req.width,
        height=req.height,
        num_inference_steps=req.steps,
        guidance_scale=req.cfg_scale,
        scheduler=_sampler("sampler_name", sampler, req.scheduler) or "euler",
        num_images=req.batch_size * req.n_iter,
        use_face_restoration=req.restore_faces,
        # A1111 shows a live preview every show_progress_every_n_steps (10 by default): here one
        # per 10 steps, at least one, for /sdapi/v1/progress's current_image.
        previews=min(10, max(1, req.steps // PREVIEW_EVERY_N_STEPS)),
    )


class Txt2ImgResponse(BaseModel):
    """A1111's answer: base64 PNGs, the parameters as received, and `info` as a JSON string."""

    images: list[str]
    parameters: dict
    info: str


def info_json(gen: GenerateRequest, seeds: list[int], response: dict, notes: list[str]) -> str:
    """A1111's `info` keys (seed, all_seeds, sizes, sampler, steps, cfg) plus what hiresfix adds."""
    w, h = gen.output_size()
    return json.dumps(
        {
            "prompt": gen.prompt,
            "negative_prompt": gen.negative_prompt,
            "seed": seeds[0] if seeds else None,
            "all_seeds": seeds,
            "width": w,
            "height": h,
            "sampler_name": gen.scheduler,
            "steps": gen.num_inference_steps,
            "cfg_scale": gen.guidance_scale,
            "denoising_strength": gen.denoising_strength if gen.hires_fix else None,
            "upscaler_used": response.get("upscaler_used"),
            "fallback_reason": response.get("fallback_reason"),
            "fallback_detail": response.get("fallback_detail"),
            "face_restoration": response.get("face_restoration"),
            "timings": response.get("timings"),
            "ignored": notes,
        }
    )


class ExtrasRequest(BaseModel):
    """A1111's `POST /sdapi/v1/extra-single-image` (upscale, optionally GFPGAN), A1111's
    defaults."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    image: str = ""
    resize_mode: int = Field(
        0, description="0 = by upscaling_resize; 1 (to a size) is not supported."
    )
    upscaling_resize: float = 2.0
    upscaler_1: str | None = None
    upscaler_2: str | None = None
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = Field(0.0, description="> 0 runs face restoration at this weight.")
    codeformer_visibility: float = 0.0

    def to_upscale(self, upscalers: list[str]) -> tuple[UpscaleRequest, list[str]]:
        extra = self.model_extra or {}
        notes = [
            f"{k}: not supported, ignored"
            for k, v in extra.items()
            if k not in HARMLESS and _matters(v)
        ]
        if self.resize_mode != 0:
            raise A1111Error(
                "resize_mode", "only resize_mode 0 is supported: give upscaling_resize (a factor)"
            )
        if (
            self.upscaler_2
            and self.upscaler_2.lower() != "none"
            and self.extras_upscaler_2_visibility > 0
        ):
            notes.append("upscaler_2: blending a second upscaler is not supported, ignored")
        if self.codeformer_visibility > 0:
            notes.append(
                "codeformer_visibility: use gfpgan_visibility (the configured face model), ignored"
            )
        fields = dict(
            image=self.image,
            scale=self.upscaling_resize,
            **_upscaler(self.upscaler_1, upscalers, notes),
        )
        if self.gfpgan_visibility > 0:
            fields.update(
                use_face_restoration=True, face_restoration_weight=min(1.0, self.gfpgan_visibility)
            )
        return build_request(
            UpscaleRequest, fields, {"scale": "upscaling_resize"}, A1111Error
        ), notes


class ExtrasResponse(BaseModel):
    """A1111's answer (`image`, `html_info`), plus `info`: our response metadata as a JSON
    string."""

    image: str
    html_info: str
    info: str


# --- the read-only routes A1111 clients call at start-up ------------------------------------
# Shapes from A1111's modules/api/models.py (SamplerItem, SchedulerItem, UpscalerItem, SDModelItem,
# FaceRestorerItem); every name listed here is one that txt2img / extra-single-image accept.


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None = None


def samplers() -> list[SamplerItem]:
    """hiresfix/samplers.py's table; A1111 names the Karras variant's schedule in `options`."""
    return [
        SamplerItem(
            name=s.a1111,
            aliases=[s.name],
            options={"scheduler": "karras"} if s.options.get("use_karras_sigmas") else {},
        )
        for s in SAMPLERS
    ]


def schedulers() -> list[SchedulerItem]:
    """A1111 >= 1.9's separate `scheduler` field: Karras turns DPM++ 2M into DPM++ 2M Karras;
    Automatic is each sampler's own schedule."""
    return [
        SchedulerItem(name="automatic", label="Automatic"),
        SchedulerItem(name="karras", label="Karras", default_rho=7.0),
    ]


# A1111 lists these first; both select LANCZOS here (A1111 reports scale 4 for them too).
LANCZOS_ITEMS = ("None", "Lanczos")


def upscalers(configured: list[str], scales: dict[str, float | None]) -> list[UpscalerItem]:
    """Exactly the names that select an upscaler here: None and Lanczos (LANCZOS), each
    configured model by its own name, and A1111's R-ESRGAN names of the configured models."""
    items = [UpscalerItem(name=n, scale=4) for n in LANCZOS_ITEMS]
    items += [UpscalerItem(name=c, model_name=c, scale=scales.get(c)) for c in configured]
    display = {
        "r-esrgan 2x+": "R-ESRGAN 2x+",
        "r-esrgan 4x+": "R-ESRGAN 4x+",
        "r-esrgan 4x+ anime6b": "R-ESRGAN 4x+ Anime6B",
        "r-esrgan animevideo": "R-ESRGAN AnimeVideo",
        "r-esrgan general 4xv3": "R-ESRGAN General 4xV3",
    }
    lower = {c.lower() for c in configured}
    items += [
        UpscalerItem(name=display.get(alias, alias), model_name=ours, scale=scales.get(ours))
        for alias, ours in UPSCALER_ALIASES.items()
        if ours in configured and alias not in lower
    ]
    return items


def checkpoint(source: str | None) -> SDModelItem:
    """The one served SDXL model, as A1111 lists a checkpoint (no hash: none is computed)."""
    source = source or "hiresfix-sdxl"
    name = source.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".safetensors", ".ckpt"):
        name = name.removesuffix(ext)
    return SDModelItem(title=name, model_name=name, filename=source)


def face_restorers(names: list[str]) -> list[FaceRestorerItem]:
    """The configured face models (restore_faces / gfpgan_visibility run the first)."""
    return [FaceRestorerItem(name=n) for n in names]


def options(source: str | None, face_names: list[str]) -> dict:
    """GET /sdapi/v1/options: the settings A1111 clients read at start-up, as this deployment
    has them. They are fixed by its serve_config, not per call."""
    return {
        "sd_model_checkpoint": checkpoint(source).title,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "face_restoration": False,
        "face_restoration_model": face_names[0] if face_names else None,
        "eta_noise_seed_delta": 0,
        "img2img_fix_steps": False,
        "upscaler_for_img2img": None,
        "enable_pnginfo": False,
    }


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options' answer (A1111 answers null): what did not change, and why."""

    changed: list[str] = Field(default_factory=list, description="Always empty.")
    unchanged: dict[str, str] = Field(
        default_factory=dict, description="Each key sent that differs from GET, and why."
    )


def update_options(sent: dict, source: str | None, face_names: list[str]) -> OptionsUpdate:
    """Nothing is changed: the options are the deployment's (serve_config), shared by every
    client. Keys that already hold the sent value are fine; the others are listed. Asking for
    another checkpoint is a 422: the pictures would silently come from this one."""
    current = options(source, face_names)
    model = checkpoint(source)
    wanted = sent.get("sd_model_checkpoint")
    if wanted is not None and str(wanted).split(" [")[0] not in (model.title, model.filename):
        raise A1111Error(
            "sd_model_checkpoint",
            f"{wanted!r} is not served here: this deployment serves one model, {model.title!r}"
            " (GET /sdapi/v1/sd-models)",
        )
    unchanged = {}
    for key, value in sent.items():
        if key == "sd_model_checkpoint" or current.get(key, object()) == value:
            continue
        unchanged[key] = (
            "fixed by this deployment's configuration (serve_config), not per client"
            if key in current
            else "not an option hiresfix has; ignored"
        )
    return OptionsUpdate(unchanged=unchanged)


# --- img2img ------------------------------------------------------------------------------------
# A1111's resize_mode numbers -> ours (3, "Just resize (latent upscale)", resizes the pixels here).
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}
IMG2IMG_FIELD = {
    **A1111_FIELD,
    "strength": "denoising_strength",
    "image": "init_images",
    "mask_invert": "inpainting_mask_invert",
    "inpaint_padding": "inpaint_full_res_padding",
}


class Img2ImgA1111Request(_GenerationFields):
    """The fields of A1111's StableDiffusionImg2ImgProcessingAPI that hiresfix honours (A1111's
    defaults). A1111's img2img has no hires fix: enable_hr and the hr_* fields are reported in
    info.ignored like any other field it cannot honour."""

    init_images: list[str] | None = Field(
        None, description="Base64 images; the first is used (one init image per request)."
    )
    denoising_strength: float = 0.75
    resize_mode: int = Field(
        0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 as 0."
    )
    mask: str | None = Field(None, description="Base64 mask: white = inpaint.")
    mask_blur: int | None = Field(None, description="Overrides mask_blur_x / mask_blur_y.")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_mask_invert: int = Field(0, description="1 = inpaint where the mask is black.")
    inpaint_full_res: bool = Field(
        True, description="'Only masked': redraw a crop around the mask at the full size."
    )
    inpaint_full_res_padding: int = Field(0, description="Pixels of context around the mask.")
    inpainting_fill: int = Field(
        0, description="0 fill, 1 original; 2 latent noise and 3 latent nothing run as 1."
    )
    include_init_images: bool = Field(
        False, description="Echo init_images and mask back in `parameters`."
    )

    def to_img2img(self, upscalers: list[str]) -> tuple[Img2ImgRequest, list[str]]:
        """Our request, plus notes on what was not honoured. Raises A1111Error naming the A1111
        field."""
        extra = self.model_extra or {}
        notes = [
            f"{k}: not supported, ignored"
            for k, v in extra.items()
            if k not in HARMLESS and _matters(v)
        ]
        if not self.init_images or not self.init_images[0]:
            raise A1111Error("init_images", "give one base64 image to start from")
        if len(self.init_images) > 1:
            notes.append("init_images: only the first image is used")
        if self.resize_mode not in RESIZE_MODES:
            raise A1111Error(
                "resize_mode", "use 0 (just resize), 1 (crop and resize) or 2 (resize and fill)"
            )
        if self.resize_mode == 3:
            notes.append("resize_mode: latent upscale is not supported; the pixels were resized")
        if self.inpainting_fill not in (0, 1, 2, 3):
            raise A1111Error(
                "inpainting_fill",
                "use 0 (fill), 1 (original), 2 (latent noise), 3 (latent nothing)",
            )
        if self.mask and self.inpainting_fill in (2, 3):
            notes.append("inpainting_fill: latent noise / nothing are not served; original used")
        if not self.prompt.strip():
            raise A1111Error("prompt", "prompt is empty: hiresfix needs some text to draw")
        blur = (
            self.mask_blur
            if self.mask_blur is not None
            else max(self.mask_blur_x, self.mask_blur_y)
        )
        fields = dict(
            image=self.init_images[0],
            mask=self.mask or None,
            mask_blur=blur,
            mask_invert=bool(self.inpainting_mask_invert),
            resize_mode=RESIZE_MODES[self.resize_mode],
            inpaint_area="only_masked" if self.inpaint_full_res else "whole",
            inpaint_padding=self.inpaint_full_res_padding,
            inpaint_fill="fill" if self.inpainting_fill == 0 else "original",
            strength=self.denoising_strength,
            **_shared_fields(self, extra),
        )
        if fields["num_images"] > 4:
            raise A1111Error(
                "batch_size",
                f"batch_size x n_iter is {fields['num_images']}; at most 4 per request",
            )
        return build_request(Img2ImgRequest, fields, IMG2IMG_FIELD, A1111Error), notes

    def parameters(self) -> dict:
        """The request as A1111 echoes it: without the images unless include_init_images."""
        skip = {"include_init_images"} | (
            set() if self.include_init_images else {"init_images", "mask"}
        )
        return self.model_dump(exclude=skip)


def img2img_info(
    req: Img2ImgRequest, response: dict, notes: list[str], include_init_images: bool = False
) -> str:
    """A1111's `info` for img2img: the keys txt2img's has, at the size delivered."""
    seeds = response.get("seeds") or []
    return json.dumps(
        {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "seed": seeds[0] if seeds else None,
            "all_seeds": seeds,
            "width": response.get("width"),
            "height": response.get("height"),
            "sampler_name": req.scheduler,
            "steps": req.num_inference_steps,
            "cfg_scale": req.guidance_scale,
            "denoising_strength": req.strength,
            "upscaler_used": response.get("upscaler_used"),
            "fallback_reason": response.get("fallback_reason"),
            "fallback_detail": response.get("fallback_detail"),
            "face_restoration": response.get("face_restoration"),
            "timings": response.get("timings"),
            "ignored": notes,
        }
    )


# --- infotext: the generation parameters A1111 writes into its PNGs (and png-info reads) --------


def infotext(
    req: GenerateRequest | Img2ImgRequest,
    seed: int | None,
    width: int,
    height: int,
    upscaler: str | None = None,
) -> str:
    """A1111's three-part text: prompt, 'Negative prompt: ...', then 'Key: value, ...'. `width` x
    `height` is the first pass's size, as A1111 writes `Size`."""
    sampler = BY_NAME[req.scheduler]
    pairs = {
        "Steps": req.num_inference_steps,
        "Sampler": sampler.a1111,
        "Schedule type": "Karras" if sampler.options.get("use_karras_sigmas") else "Automatic",
        "CFG scale": _num(req.guidance_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    if isinstance(req, Img2ImgRequest):
        pairs["Denoising strength"] = _num(req.strength)
        if req.mask is not None:
            pairs["Mask blur"] = req.mask_blur
    if req.hires_fix:
        if not isinstance(req, Img2ImgRequest):
            pairs["Denoising strength"] = _num(req.denoising_strength)
        if req.hires_width or req.hires_height:
            pairs["Hires resize"] = f"{req.hires_width}x{req.hires_height}"
        else:
            pairs["Hires upscale"] = _num(req.hires_scale)
        if req.hires_steps:
            pairs["Hires steps"] = req.hires_steps
        pairs["Hires upscaler"] = upscaler or req.upscaler or "default"
    if isinstance(req, GenerateRequest) and req.refiner_switch_at is not None:
        pairs["Refiner switch at"] = _num(req.refiner_switch_at)
    if req.use_face_restoration:
        pairs["Face restoration"] = req.face_model or "default"
    pairs["Version"] = f"hiresfix {__version__}"
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _quote(v) -> str:
    s = str(v)
    return json.dumps(s) if any(c in s for c in ',:"\n') else s


_PAIR = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict:
    """The `parameters` dict A1111's png-info answers: Prompt, Negative prompt, and each 'Key:
    value' of the last line as a string (WxH values split into Key-1 and Key-2)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    pairs = _PAIR.findall(last)
    if len(pairs) < 3:  # not a parameters line: the whole text is the prompt
        pairs, body = [], lines
    else:
        body = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    out: dict = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def tag_pictures(batch, req: GenerateRequest | Img2ImgRequest, width: int, height: int) -> None:
    """Each picture carries its own infotext (its seed): PNG answers embed it (hiresfix/images.py),
    so png-info and A1111 tools read the parameters back from the file."""
    for i, pic in enumerate(batch.pictures):
        seed = batch.seeds[i] if i < len(batch.seeds) else None
        pic.info[PNG_PARAMETERS] = infotext(req, seed, width, height, batch.upscaler_used)


class PNGInfoRequest(BaseModel):
    image: str = Field("", description="Base64 PNG (or JPEG/WebP); a data: URL is accepted.")


class PNGInfoResponse(BaseModel):
    info: str = Field("", description="The generation parameters text ('' when none).")
    items: dict = Field(default_factory=dict, description="The file's other text fields.")
    parameters: dict = Field(default_factory=dict, description="`info` parsed, A1111's keys.")


def png_info(image_b64: str, max_bytes: int) -> PNGInfoResponse:
    """Read the text a file carries without decoding its pixels. A blank image is an empty answer,
    as A1111 gives; a non-image is a 400 naming `image`."""
    if not image_b64.strip():
        return PNGInfoResponse()
    data = image_b64.strip()
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > max_bytes * 4 // 3 + 4096:
        raise A1111Error("image", f"image is larger than {max_bytes} bytes", 413)
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise A1111Error("image", "image is not valid base64", 400) from None
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        texts = _png_texts(raw)
    else:
        texts = _exif_texts(raw)
    info = texts.pop(PNG_PARAMETERS, "")
    return PNGInfoResponse(info=info, items=texts, parameters=parse_infotext(info) if info else {})


def _png_texts(raw: bytes) -> dict[str, str]:
    """tEXt, zTXt and iTXt chunks, wherever they are in the file."""
    out, pos = {}, 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        pos += 12 + length
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                out[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, value = body.partition(b"\0")
                out[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _tkey, _, value = rest.partition(b"\0")
                value = zlib.decompress(value) if compressed else value
                out[key.decode("latin-1")] = value.decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # one broken chunk does not hide the others
        if kind == b"IEND":
            break
    return out


def _exif_texts(raw: bytes) -> dict[str, str]:
    """JPEG/WebP: A1111 keeps the parameters in EXIF UserComment."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            comment = im.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:  # PIL raises many types for junk; the client needs no exception names
        raise A1111Error("image", "image could not be read: send PNG, JPEG or WebP", 400) from None
    if isinstance(comment, bytes):
        head, body = comment[:8], comment[8:]
        comment = (
            body.decode("utf-16-be" if head.startswith(b"UNICODE") else "latin-1", "replace")
            if head.rstrip(b"\0") in (b"UNICODE", b"ASCII")
            else comment.decode("utf-8", "replace")
        )
    return {PNG_PARAMETERS: comment.strip("\0")} if comment else {}


# --- /sdapi/v1/progress, interrupt, skip ----------------------------------------------------------
class ProgressResponse(BaseModel):
    """A1111's answer: the job of this caller that runs now (the latest it started)."""

    progress: float = Field(..., description="0 to 1.")
    eta_relative: float = Field(..., description="Seconds left (0 when idle).")
    state: dict = Field(..., description="A1111's shared.state snapshot keys.")
    current_image: str | None = Field(
        None,
        description=(
            "Base64 PNG preview of the running pass (one per 10 steps, drawn from the latents);"
            " null before the first, or with skip_current_image."
        ),
    )
    textinfo: str | None = None


def progress_response(info: ProgressInfo | None) -> ProgressResponse:
    """Our progress board entry in A1111's shape (idle: job_count 0, progress 0)."""
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if info is None or info.state != "running":
        return ProgressResponse(progress=0, eta_relative=0, state=state, textinfo=None)
    stage = info.stage or "queued"
    state.update(
        job=info.request_id,
        job_count=1,
        sampling_step=info.step,
        sampling_steps=info.stage_steps,
        interrupted=info.signal == "interrupt",
        skipped=info.signal == "skip",
    )
    text = f"{stage} {info.step}/{info.stage_steps}" if info.stage else "waiting for a replica"
    return ProgressResponse(
        progress=info.progress,
        eta_relative=info.eta_s or 0.0,
        state=state,
        current_image=info.preview,
        textinfo=text,
    )


class TaskProgressRequest(BaseModel):
    """A1111's POST /internal/progress: a task by the id its request was sent with
    (force_task_id)."""

    id_task: str = Field(..., description="The force_task_id (or X-Request-ID) of the request.")
    id_live_preview: int = Field(-1, description="The preview the client has; -1: none yet.")
    live_preview: bool = Field(True, description="Send the latest preview when it is newer.")


class TaskProgressResponse(BaseModel):
    """A1111's answer to POST /internal/progress."""

    active: bool
    queued: bool
    completed: bool
    progress: float | None = None
    eta: float | None = None
    live_preview: str | None = Field(None, description="data:image/png;base64,... when newer.")
    id_live_preview: int | None = None
    textinfo: str | None = None


def task_progress(info: ProgressInfo | None, want: TaskProgressRequest) -> TaskProgressResponse:
    """Our board entry for A1111's task view: unknown ids are neither active nor completed."""
    if info is None:
        return TaskProgressResponse(
            active=False, queued=False, completed=False, id_live_preview=-1, textinfo="unknown"
        )
    running = info.state == "running"
    newer = want.live_preview and info.preview and info.previews > want.id_live_preview
    return TaskProgressResponse(
        active=running and info.stage is not None,
        queued=running and info.stage is None,
        completed=not running,
        progress=info.progress,
        eta=info.eta_s,
        live_preview=f"data:image/png;base64,{info.preview}" if newer else None,
        id_live_preview=info.previews if newer else want.id_live_preview,
        textinfo=f"{info.stage} {info.step}/{info.stage_steps}" if info.stage else info.state,
    )


def caller_tag(authorization: str | None) -> str:
    """Whose A1111 jobs /progress, /interrupt and /skip see: the API key's (a hash, never the key)
    when keys are on; everyone's A1111 jobs otherwise, as on one A1111 server."""
    if not authorization:
        return "a1111"
    return "a1111:" + hashlib.sha256(authorization.encode()).hexdigest()[:16]


class SignalResponse(BaseModel):
    """A1111 answers {} (interrupt) or null (skip); hiresfix says which jobs it reached."""

    requests: list[str] = Field(
        default_factory=list, description="Request ids told to stop early (empty when idle)."
    )
