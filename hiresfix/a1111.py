"""AUTOMATIC1111 API compatibility: txt2img and extra-single-image mapped onto our requests.

Tools written for A1111 (editor plugins, chat front-ends, scripts) send this JSON to port 7860; with
this route they work unchanged against a hiresfix cluster. The mapping is data (A1111 name -> ours).
A1111 clients send dozens of fields: those we cannot honour are reported back in `info["ignored"]`
when they would have changed the picture, never silently dropped; an unknown sampler is an error that
lists the supported ones.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hiresfix.schemas import GenerateRequest, UpscaleRequest

# A1111 sampler name (lower case) -> ours. A1111 >= 1.9 moved "Karras" into a separate `scheduler`.
SAMPLERS = {
    "euler": "euler",
    "euler a": "euler_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "ddim": "ddim",
    "unipc": "unipc",
}
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
HARMLESS = {"send_images", "save_images", "do_not_save_samples", "do_not_save_grid", "sampler_index",
            "override_settings_restore_afterwards", "disable_extra_networks", "comments", "force_task_id"}
# Our field -> the A1111 field a client sent, to name the right one in errors.
A1111_FIELD = {
    "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images": "batch_size",
    "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps", "hires_width": "hr_resize_x",
    "hires_height": "hr_resize_y", "hires_prompt": "hr_prompt", "hires_negative_prompt": "hr_negative_prompt",
    "hires_guidance_scale": "hr_cfg", "hires_scheduler": "hr_sampler_name", "scheduler": "sampler_name",
    "use_face_restoration": "restore_faces",
}


class A1111Error(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class Txt2ImgRequest(BaseModel):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI that hiresfix honours (A1111's
    defaults). Any other field is accepted and, if it would have mattered, listed in info.ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1 = random.")
    sampler_name: str | None = Field(None, description=f"One of {', '.join(SAMPLERS)} (any case); null = Euler.")
    scheduler: str | None = Field(None, description="'Karras' turns DPM++ 2M into DPM++ 2M Karras.")
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = False
    enable_hr: bool = False
    denoising_strength: float | None = Field(None, description="Hires strength; null = 0.7 as in A1111.")
    hr_scale: float = 2.0
    hr_upscaler: str | None = Field(None, description="R-ESRGAN names, a configured model name, or Lanczos.")
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
        """Our request, plus notes on what was not honoured. Raises A1111Error naming the A1111 field."""
        extra = self.model_extra or {}
        notes = [f"{k}: not supported, ignored" for k, v in extra.items() if k not in HARMLESS and _matters(v)]
        sampler = self.sampler_name or extra.get("sampler_index")  # the older name of the same field
        fields = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt,
            seed=None if self.seed < 0 else self.seed, width=self.width, height=self.height,
            num_inference_steps=self.steps, guidance_scale=self.cfg_scale,
            scheduler=_sampler("sampler_name", sampler, self.scheduler) or "euler",
            num_images=self.batch_size * self.n_iter, use_face_restoration=self.restore_faces,
            refiner_switch_at=self.refiner_switch_at,
        )
        if self.enable_hr:
            fields.update(
                hires_fix=True, hires_scale=self.hr_scale, hires_steps=self.hr_second_pass_steps,
                hires_width=self.hr_resize_x, hires_height=self.hr_resize_y,
                denoising_strength=0.7 if self.denoising_strength is None else self.denoising_strength,
                hires_prompt=self.hr_prompt, hires_negative_prompt=self.hr_negative_prompt,
                hires_scheduler=_sampler("hr_sampler_name", self.hr_sampler_name, self.hr_scheduler),
                hires_guidance_scale=self.hr_cfg,
            )
            fields.update(_upscaler(self.hr_upscaler, upscalers, notes))
        if not self.prompt.strip():
            raise A1111Error("prompt", "prompt is empty: hiresfix needs some text to draw")
        if fields["num_images"] > 4:
            raise A1111Error("batch_size", f"batch_size x n_iter is {fields['num_images']}; at most 4 per request")
        return _build(GenerateRequest, fields, A1111_FIELD), notes


def _build(model: type[BaseModel], fields: dict, a1111_names: dict[str, str]):
    """Our request from mapped fields; a validation error names the A1111 field the client sent."""
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        ours = str(err["loc"][0]) if err["loc"] else "body"
        raise A1111Error(a1111_names.get(ours, ours), err["msg"].removeprefix("Value error, ")) from None


def _sampler(field: str, name: str | None, scheduler: str | None) -> str | None:
    if not name:
        return None
    key = name.strip().lower()
    if (scheduler or "").strip().lower() == "karras" and not key.endswith("karras"):
        key += " karras"
    if key not in SAMPLERS:
        raise A1111Error(field, f"sampler {name!r} (scheduler {scheduler!r}) is not available; use one of:"
                         f" {', '.join(n.title() if n != 'dpm++ 2m karras' else 'DPM++ 2M Karras' for n in SAMPLERS)}")
    return SAMPLERS[key]


def _upscaler(name: str | None, configured: list[str], notes: list[str]) -> dict:
    if not name:
        return {}
    key = name.strip().lower()
    if key in LANCZOS_NAMES:
        return {"use_realesrgan": False}
    ours = next((c for c in configured if c.lower() == key), None) or UPSCALER_ALIASES.get(key)
    if ours in configured:
        return {"upscaler": ours}
    notes.append(f"upscaler {name!r} is not available here (latent upscaling is not supported);"
                 " the default upscaler ran")
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


class Txt2ImgResponse(BaseModel):
    """A1111's answer: base64 PNGs, the parameters as received, and `info` as a JSON string."""

    images: list[str]
    parameters: dict
    info: str


def info_json(gen: GenerateRequest, seeds: list[int], response: dict, notes: list[str]) -> str:
    """A1111's `info` keys (seed, all_seeds, sizes, sampler, steps, cfg) plus what hiresfix adds."""
    w, h = gen.output_size()
    return json.dumps({
        "prompt": gen.prompt, "negative_prompt": gen.negative_prompt,
        "seed": seeds[0] if seeds else None, "all_seeds": seeds, "width": w, "height": h,
        "sampler_name": gen.scheduler, "steps": gen.num_inference_steps, "cfg_scale": gen.guidance_scale,
        "denoising_strength": gen.denoising_strength if gen.hires_fix else None,
        "upscaler_used": response.get("upscaler_used"), "fallback_reason": response.get("fallback_reason"),
        "fallback_detail": response.get("fallback_detail"), "face_restoration": response.get("face_restoration"),
        "timings": response.get("timings"), "ignored": notes,
    })


class ExtrasRequest(BaseModel):
    """A1111's `POST /sdapi/v1/extra-single-image` (upscale, optionally GFPGAN), A1111's defaults."""

    model_config = ConfigDict(extra="allow")

    image: str = ""
    resize_mode: int = Field(0, description="0 = by upscaling_resize; 1 (to a size) is not supported.")
    upscaling_resize: float = 2.0
    upscaler_1: str | None = None
    upscaler_2: str | None = None
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = Field(0.0, description="> 0 runs face restoration at this weight.")
    codeformer_visibility: float = 0.0

    def to_upscale(self, upscalers: list[str]) -> tuple[UpscaleRequest, list[str]]:
        extra = self.model_extra or {}
        notes = [f"{k}: not supported, ignored" for k, v in extra.items() if k not in HARMLESS and _matters(v)]
        if self.resize_mode != 0:
            raise A1111Error("resize_mode", "only resize_mode 0 is supported: give upscaling_resize (a factor)")
        if self.upscaler_2 and self.upscaler_2.lower() != "none" and self.extras_upscaler_2_visibility > 0:
            notes.append("upscaler_2: blending a second upscaler is not supported, ignored")
        if self.codeformer_visibility > 0:
            notes.append("codeformer_visibility: use gfpgan_visibility (the configured face model), ignored")
        fields = dict(image=self.image, scale=self.upscaling_resize, **_upscaler(self.upscaler_1, upscalers, notes))
        if self.gfpgan_visibility > 0:
            fields.update(use_face_restoration=True, face_restoration_weight=min(1.0, self.gfpgan_visibility))
        return _build(UpscaleRequest, fields, {"scale": "upscaling_resize"}), notes


class ExtrasResponse(BaseModel):
    """A1111's answer (`image`, `html_info`), plus `info`: our response metadata as a JSON string."""

    image: str
    html_info: str
    info: str
