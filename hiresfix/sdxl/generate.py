"""The two SDXL stages of a hires-fix request, read top to bottom.

    BaseStage.run       text -> N pictures at width x height (or, for ensemble-of-experts, latents
                        stopped at refiner_switch_at)
    (upscale stage)     pictures -> pictures at hires size          [hiresfix/upscale, not here]
    RefineStage.hires   img2img of the upscaled pictures at denoising_strength (A1111 hires fix)
    RefineStage.finish  ensemble-of-experts: the refine model finishes the base latents and decodes

Image i of a request is seeded with seed + i through its own CPU torch.Generator: it starts from
the same noise on any device, alone or in a batch, and the second pass reuses the same seeds. The
same request on the same machine gives the same pictures bit for bit, overlapping requests included.

Concurrency: one stage object serves overlapping requests from several threads. The heavy modules
are shared read-only; everything diffusers keeps per call (scheduler state, _guidance_scale,
_num_timesteps, ...) lives on a per-request pipeline object that only wraps them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from hiresfix.images import Picture
from hiresfix.schedule import hires_schedule_length
from hiresfix.schemas import SEED_MAX, GenerateRequest
from hiresfix.sdxl.schedulers import make_scheduler
from hiresfix.stages import ImageBatch

# (step index, timestep) -> stop early?: progress, tests, cancellation, interrupt
# (step index, timestep, latents after the step) -> stop early?
StepCallback = Callable[[int, int, Any], bool | None]

# Fast (Rust) tokenizers keep padding/truncation settings on themselves and SDXL's encode_prompt
# switches them within each call, so overlapping calls pad with each other's settings (mismatched
# tensors, or "Already borrowed"). Text encoding takes milliseconds: it is simply serialised.
_TEXT_LOCK = threading.Lock()
# With a VAE whose config says force_upcast (the stock SDXL VAE) in fp16/bf16, diffusers casts the
# shared VAE to float32 and back inside each call; overlapping calls would race on its dtype.
# Such pipelines run one call at a time; an fp16-safe VAE (vae_path) lets calls overlap.
_VAE_CAST_LOCK = threading.RLock()


class BaseStage:
    def __init__(self, pipe):
        self.pipe = pipe
        self._serial = _vae_guard(pipe)

    def run(self, req: GenerateRequest, *, on_step: StepCallback | None = None) -> ImageBatch:
        start = time.perf_counter()
        seeds = request_seeds(req.seed, req.num_images)
        pipe = request_pipeline(self.pipe, req.scheduler)
        embeds = encode_prompt(pipe, req.prompt, req.negative_prompt, req.guidance_scale)
        ensemble = req.refiner_switch_at is not None
        with self._serial:
            out = pipe(
                **embeds,
                width=req.width,
                height=req.height,
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale,
                num_images_per_prompt=req.num_images,
                generator=generators(seeds),
                # Ensemble-of-experts: stop at the switch point and hand over still-noisy latents.
                denoising_end=req.refiner_switch_at,
                output_type="latent" if ensemble else "pil",
                callback_on_step_end=_diffusers_callback(on_step),
            )
        if ensemble:
            # On the CPU: the batch may be pickled to a refine replica on another device.
            batch = ImageBatch(pictures=[], seeds=list(seeds), latents=out.images.cpu())
        else:
            batch = ImageBatch(
                pictures=[Picture.from_pil(im) for im in out.images], seeds=list(seeds)
            )
        batch.add_time("base", time.perf_counter() - start)
        return batch


class RefineStage:
    def __init__(self, img2img_pipe):
        self.pipe = img2img_pipe
        self._serial = _vae_guard(img2img_pipe)

    def hires(
        self, batch: ImageBatch, req: GenerateRequest, *, on_step: StepCallback | None = None
    ) -> ImageBatch:
        """A1111 hires fix, second pass: img2img of pictures already resized to the hires size."""
        start = time.perf_counter()
        pictures = batch.pictures
        sizes = {p.size for p in pictures}
        if not pictures or len(sizes) != 1 or any(v % 8 for v in next(iter(sizes))):
            raise ValueError(
                f"hires needs pictures of one size, multiples of 8 (got {sorted(sizes)})"
            )
        seeds = _batch_seeds(batch, len(pictures))
        pipe = request_pipeline(self.pipe, req.hires_scheduler or req.scheduler)
        cfg = req.guidance_scale if req.hires_guidance_scale is None else req.hires_guidance_scale
        embeds = encode_prompt(
            pipe,
            req.hires_prompt or req.prompt,
            req.hires_negative_prompt or req.negative_prompt,
            cfg,
        )
        steps = hires_schedule_length(
            req.num_inference_steps,
            req.hires_steps,
            req.denoising_strength,
            pipe.scheduler.config.num_train_timesteps,
        )
        with self._serial:
            out = pipe(
                **embeds,
                image=[p.to_pil() for p in pictures],
                strength=req.denoising_strength,
                num_inference_steps=steps,
                guidance_scale=cfg,
                num_images_per_prompt=len(pictures),
                generator=generators(seeds),
                callback_on_step_end=_diffusers_callback(on_step),
            )
        refined = [
            p.with_pixels(Picture.from_pil(im).rgb, p.alpha) for p, im in zip(pictures, out.images)
        ]
        result = dataclasses.replace(
            batch, pictures=refined, seeds=list(seeds), timings=dict(batch.timings)
        )
        result.add_time("refine", time.perf_counter() - start)
        return result

    def finish(
        self, batch: ImageBatch, req: GenerateRequest, *, on_step: StepCallback | None = None
    ) -> ImageBatch:
        """Ensemble-of-experts: denoise the base latents from refiner_switch_at to the end,
        decode."""
        if batch.latents is None or req.refiner_switch_at is None:
            raise ValueError("finish needs a batch from BaseStage.run with refiner_switch_at set")
        start = time.perf_counter()
        latents = batch.latents
        seeds = _batch_seeds(batch, latents.shape[0])
        pipe = request_pipeline(self.pipe, req.scheduler)
        embeds = encode_prompt(pipe, req.prompt, req.negative_prompt, req.guidance_scale)
        with self._serial:
            out = pipe(
                **embeds,
                image=latents,  # 4 channels: taken as latents, neither encoded nor re-noised
                denoising_start=req.refiner_switch_at,
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale,
                num_images_per_prompt=latents.shape[0],
                generator=generators(seeds),
                callback_on_step_end=_diffusers_callback(on_step),
            )
        pictures = [Picture.from_pil(im) for im in out.images]
        result = dataclasses.replace(
            batch, pictures=pictures, seeds=list(seeds), latents=None, timings=dict(batch.timings)
        )
        result.add_time("refine", time.perf_counter() - start)
        return result


# --- per-request helpers ------------------------------------------------------------------------


def request_seeds(seed: int | None, n: int) -> list[int]:
    if seed is None:
        seed = secrets.randbelow(SEED_MAX + 1)
    return [(seed + i) % (SEED_MAX + 1) for i in range(n)]


def generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the initial noise is drawn on the CPU and moved, so a seed gives the same
    # image on a CPU and on any GPU.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def request_pipeline(pipe, scheduler_name: str, cls: type | None = None):
    """A pipeline of the same class (or `cls`: img2img, inpaint) around the same modules with a
    fresh scheduler: cheap (no weights are copied or moved), and nothing a call writes on it is
    seen by another request."""
    cls = cls or type(pipe)
    scheduler = make_scheduler(scheduler_name, pipe.scheduler.config)
    expected, optional = cls._get_signature_keys(cls)
    options = {
        k: pipe.config[k] for k in optional if k in pipe.config
    }  # force_zeros_for_empty_prompt, ...
    modules = {k: v for k, v in pipe.components.items() if k in expected or k in optional}
    per_request = cls(**{**modules, "scheduler": scheduler}, **options)
    per_request.set_progress_bar_config(disable=True)
    return per_request


@torch.no_grad()
def encode_prompt(pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
    # An empty negative prompt goes in as None: SDXL then uses zero embeddings for the
    # unconditional branch (force_zeros_for_empty_prompt), as it was trained.
    cfg = guidance_scale > 1.0
    with _TEXT_LOCK:
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompt,
            device=pipe._execution_device,
            num_images_per_prompt=1,  # the pipeline repeats them num_images_per_prompt times
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt or None,
        )
    return {
        "prompt_embeds": pe,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": npe if cfg else None,
        "negative_pooled_prompt_embeds": npooled if cfg else None,
    }


def _batch_seeds(batch: ImageBatch, n: int) -> list[int]:
    seeds = list(batch.seeds) if len(batch.seeds) == n else [None] * n
    return [s if s is not None else secrets.randbelow(SEED_MAX + 1) for s in seeds]


def _vae_guard(pipe):
    vae = pipe.vae
    if getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32:
        return _VAE_CAST_LOCK
    return contextlib.nullcontext()


def _diffusers_callback(on_step: StepCallback | None):
    if on_step is None:
        return None

    def callback(pipe, step_index, timestep, tensors):
        # `tensors` holds the latents (diffusers' default callback_on_step_end_tensor_inputs):
        # the step's previews are drawn from them.
        if on_step(int(step_index), int(timestep), tensors.get("latents")):
            # Stop early (A1111's interrupt/skip): diffusers skips the remaining steps and
            # decodes the latents as they are now.
            pipe._interrupt = True
        return {}

    return callback
