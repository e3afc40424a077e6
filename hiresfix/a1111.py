"""AUTOMATIC1111 API compatibility: txt2img and extra-single-image mapped onto our requests.

Tools written for A1111 (editor plugins, chat front-ends, scripts) send this JSON to port 7860; with
this route they work unchanged against a hiresfix cluster. The mapping is data (A1111 name -> ours).
A1111 clients send dozens of fields: those we cannot honour are reported back in `info["ignored"]`
when they would have changed the picture, never silently dropped; an unknown sampler is an error
that lists the supported ones.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hiresfix.samplers import SAMPLERS
from hiresfix.schemas import GenerateRequest, RequestError, UpscaleRequest

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
    "force_task_id",
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


class Txt2ImgRequest(BaseModel):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI that hiresfix honours (A1111's
    defaults). Any other field is accepted and, if it would have mattered, listed in
    info.ignored."""

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
        sampler = self.sampler_name or extra.get(
            "sampler_index"
        )  # the older name of the same field
        fields = dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=None if self.seed < 0 else self.seed,
            width=self.width,
            height=self.height,
            num_inference_steps=self.steps,
            guidance_scale=self.cfg_scale,
            scheduler=_sampler("sampler_name", sampler, self.scheduler) or "euler",
            num_images=self.batch_size * self.n_iter,
            use_face_restoration=self.restore_faces,
            refiner_switch_at=self.refiner_switch_at,
        )
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
        return _build(GenerateRequest, fields, A1111_FIELD), notes


def _build(model: type[BaseModel], fields: dict, a1111_names: dict[str, str]):
    """Our request from mapped fields; a validation error names the A1111 field the client sent."""
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        ours = str(err["loc"][0]) if err["loc"] else "body"
        raise A1111Error(
            a1111_names.get(ours, ours), err["msg"].removeprefix("Value error, ")
        ) from None


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
        return _build(UpscaleRequest, fields, {"scale": "upscaling_resize"}), notes


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
