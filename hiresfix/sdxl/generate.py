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

Batching: run_batch / hires_batch run the jobs of several compatible requests (equal
hiresfix.sdxl.batching keys) as ONE diffusers call: each job's prompt is encoded on its own, its
embeddings repeated once per image, and the rows of all jobs concatenated, with one CPU generator
per image as above; the output rows are split back per job. run and hires are the one-job case.
Each job's on_step sees only its own rows of the latents. A job whose on_step raises (its client
went away) is dropped from the call and gets that exception as its outcome; the others go on. A job
whose on_step answers True (interrupt/skip) only stops its progress reporting: its picture is the
call's final one, unless every remaining job stopped too, which ends the call early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hiresfix.images import Picture
from hiresfix.schedule import hires_schedule_length
from hiresfix.schemas import SEED_MAX, GenerateRequest
from hiresfix.sdxl.batching import (
    BASE_KEY_FIELDS,
    HIRES_KEY_FIELDS,
    base_key,
    check_one_key,
    hires_key,
)
from hiresfix.sdxl.schedulers import make_scheduler
from hiresfix.stages import ImageBatch

# (step index, timestep, latents after the step) -> stop early?: progress, tests, cancellation,
# interrupt. The timestep comes as the scheduler holds it, often a GPU tensor: int() on it would
# wait for the GPU at every step, so the serving path never converts it (tests do).
StepCallback = Callable[[int, Any, Any], bool | None]
# A job of a shared call: the request (with, for hires, its upscaled pictures) and its callback.
BaseJob = tuple[GenerateRequest, StepCallback | None]
HiresJob = tuple[ImageBatch, GenerateRequest, StepCallback | None]
# One per job, in order: its ImageBatch, or the exception its on_step raised (the job was dropped
# from the call there), as asyncio.gather(..., return_exceptions=True) answers.
Outcome = ImageBatch | Exception

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
        return _only(self.run_batch([(req, on_step)]))

    def batch_key(self, job: BaseJob) -> tuple:
        """Jobs of equal keys can share one run_batch call."""
        return base_key(job[0])

    def run_batch(self, jobs: Sequence[BaseJob]) -> list[Outcome]:
        """The base pass of several requests with one base_key as one diffusers call.

        Returns one outcome per job (see Outcome). Raises ValueError for jobs of different keys,
        and whatever the call itself raises (out of memory, ...) for all of them."""
        if not jobs:
            return []
        start = time.perf_counter()
        reqs = [req for req, _ in jobs]
        check_one_key([base_key(r) for r in reqs], BASE_KEY_FIELDS)
        req = reqs[0]  # every field the call takes is equal across the jobs
        seeds = [request_seeds(r.seed, r.num_images) for r in reqs]
        pipe = request_pipeline(self.pipe, req.scheduler)
        embeds = [
            encode_prompt(pipe, r.prompt, r.negative_prompt, req.guidance_scale) for r in reqs
        ]
        ensemble = req.refiner_switch_at is not None
        members = _Members([on_step for _, on_step in jobs], [len(s) for s in seeds])
        with self._serial:
            out = members.call(
                pipe,
                **_rows(embeds, members.counts),
                width=req.width,
                height=req.height,
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale,
                num_images_per_prompt=1,  # the rows are already one per image
                generator=generators(list(itertools.chain(*seeds))),
                # Ensemble-of-experts: stop at the switch point and hand over still-noisy latents.
                denoising_end=req.refiner_switch_at,
                output_type="latent" if ensemble else "pil",
            )
        outcomes = []
        # On the CPU: the batch may be pickled to a refine replica on another device.
        images = None if out is None else out.images.cpu() if ensemble else out.images
        for part, job_seeds in zip(members.split(images), seeds):
            if isinstance(part, Exception):
                outcomes.append(part)
            elif ensemble:
                # A clone: a slice would pickle the whole call's latents with each job.
                outcomes.append(ImageBatch(pictures=[], seeds=job_seeds, latents=part.clone()))
            else:
                pictures = [Picture.from_pil(im) for im in part]
                outcomes.append(ImageBatch(pictures=pictures, seeds=job_seeds))
        members.record(outcomes, "base", time.perf_counter() - start)
        return outcomes


class RefineStage:
    def __init__(self, img2img_pipe):
        self.pipe = img2img_pipe
        self._serial = _vae_guard(img2img_pipe)

    def hires(
        self, batch: ImageBatch, req: GenerateRequest, *, on_step: StepCallback | None = None
    ) -> ImageBatch:
        """A1111 hires fix, second pass: img2img of pictures already resized to the hires size."""
        return _only(self.hires_batch([(batch, req, on_step)]))

    def batch_key(self, job: HiresJob) -> tuple:
        """Jobs of equal keys can share one hires_batch call."""
        return hires_key(job[0], job[1], self.pipe.scheduler.config.num_train_timesteps)

    def hires_batch(self, jobs: Sequence[HiresJob]) -> list[Outcome]:
        """The hires pass of several requests with one hires_key as one diffusers call.

        Returns one outcome per job (see Outcome); the input batches are not modified. Raises
        ValueError for pictures off the latent grid (the size is part of the key: a whole group
        is refused together) or jobs of different keys, and whatever the call itself raises."""
        if not jobs:
            return []
        start = time.perf_counter()
        for batch, _, _ in jobs:
            sizes = {p.size for p in batch.pictures}
            if not batch.pictures or len(sizes) != 1 or any(v % 8 for v in next(iter(sizes))):
                raise ValueError(
                    f"hires needs pictures of one size, multiples of 8 (got {sorted(sizes)})"
                )
        batches = [batch for batch, _, _ in jobs]
        reqs = [req for _, req, _ in jobs]
        req = reqs[0]  # every field the call takes is equal across the jobs
        pipe = request_pipeline(self.pipe, req.hires_scheduler or req.scheduler)
        train_steps = pipe.scheduler.config.num_train_timesteps
        check_one_key(
            [hires_key(b, r, train_steps) for b, r in zip(batches, reqs)], HIRES_KEY_FIELDS
        )
        seeds = [_batch_seeds(b, len(b.pictures)) for b in batches]
        cfg = req.guidance_scale if req.hires_guidance_scale is None else req.hires_guidance_scale
        embeds = [
            encode_prompt(
                pipe,
                r.hires_prompt or r.prompt,
                r.hires_negative_prompt or r.negative_prompt,
                cfg,
            )
            for r in reqs
        ]
        steps = hires_schedule_length(
            req.num_inference_steps, req.hires_steps, req.denoising_strength, train_steps
        )
        members = _Members([on_step for _, _, on_step in jobs], [len(s) for s in seeds])
        with self._serial:
            out = members.call(
                pipe,
                **_rows(embeds, members.counts),
                image=[p.to_pil() for b in batches for p in b.pictures],
                strength=req.denoising_strength,
                num_inference_steps=steps,
                guidance_scale=cfg,
                num_images_per_prompt=1,  # the rows are already one per picture
                generator=generators(list(itertools.chain(*seeds))),
            )
        outcomes = []
        parts = members.split(None if out is None else out.images)
        for batch, job_seeds, part in zip(batches, seeds, parts):
            if isinstance(part, Exception):
                outcomes.append(part)
                continue
            refined = [
                p.with_pixels(Picture.from_pil(im).rgb, p.alpha)
                for p, im in zip(batch.pictures, part)
            ]
            outcomes.append(
                dataclasses.replace(
                    batch,
                    pictures=refined,
                    seeds=job_seeds,
                    timings=dict(batch.timings),
                    shared=dict(batch.shared),
                )
            )
        members.record(outcomes, "refine", time.perf_counter() - start)
        return outcomes

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
    fresh scheduler: cheap, and nothing a call writes on it is seen by another request."""
    scheduler = make_scheduler(scheduler_name, pipe.scheduler.config)
    return same_modules(pipe, cls or type(pipe), scheduler)


def same_modules(pipe, cls: type, scheduler):
    """A `cls` pipeline around `pipe`'s own modules: none is copied, moved or cast (diffusers'
    from_pipe casts every module to one dtype, the VAE's own precision included)."""
    expected, optional = cls._get_signature_keys(cls)
    options = {
        k: pipe.config[k] for k in optional if k in pipe.config
    }  # force_zeros_for_empty_prompt, ...
    modules = {k: v for k, v in pipe.components.items() if k in expected or k in optional}
    wrapped = cls(**{**modules, "scheduler": scheduler}, **options)
    wrapped.set_progress_bar_config(disable=True)
    return wrapped


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


class _NobodyLeft(Exception):
    """Every job of a shared call was dropped: nobody wants its pictures."""


class _Members:
    """The jobs of one shared diffusers call: which rows of its batch are whose, and each one's
    on_step, called with its own rows of the latents, so previews and cancellation stay per job."""

    def __init__(self, on_steps: list[StepCallback | None], counts: list[int]):
        self.on_steps = on_steps
        self.counts = counts
        ends = list(itertools.accumulate(counts))
        self.rows = [slice(end - n, end) for end, n in zip(ends, counts)]
        self.failed: dict[int, Exception] = {}
        self.stopped: set[int] = set()

    def call(self, pipe, **kwargs):
        """pipe(**kwargs) with the joint step callback; None when every job was dropped."""
        callback = self._callback if any(self.on_steps) else None
        try:
            return pipe(**kwargs, callback_on_step_end=callback)
        except _NobodyLeft:
            return None

    def _callback(self, pipe, step_index, timestep, tensors):
        # `tensors` holds the latents (diffusers' default callback_on_step_end_tensor_inputs):
        # the step's previews are drawn from them.
        latents = tensors.get("latents")
        for j, on_step in enumerate(self.on_steps):
            if on_step is None or j in self.failed or j in self.stopped:
                continue
            rows = None if latents is None else latents[self.rows[j]]
            try:
                if on_step(int(step_index), timestep, rows):
                    self.stopped.add(j)  # interrupt/skip: no more progress for this job
            except Exception as exc:  # RequestCancelled and the like: this job's outcome
                self.failed[j] = exc
        if len(self.failed) == len(self.on_steps):
            # Abandon the call, as a lone request's raising on_step always did.
            raise _NobodyLeft
        if len(self.failed) + len(self.stopped) == len(self.on_steps):
            # Every job left asked to stop early (A1111's interrupt/skip): diffusers skips the
            # remaining steps and decodes the latents as they are now.
            pipe._interrupt = True
        return {}

    def split(self, images) -> list[Any]:
        """Each job's rows of the call's output, or the exception that dropped it."""
        return [
            self.failed[j] if j in self.failed else images[rows] for j, rows in enumerate(self.rows)
        ]

    def record(self, outcomes: list[Outcome], stage: str, seconds: float) -> None:
        # Each job reports the wall time of the whole shared call, and how many shared it.
        for outcome in outcomes:
            if isinstance(outcome, ImageBatch):
                outcome.add_time(stage, seconds)
                outcome.shared[stage] = (len(self.counts), sum(self.counts))


def _rows(embeds: list[dict], counts: list[int]) -> dict:
    """The embeddings of the call's batch: each job's repeated once per image, jobs in order (the
    order of the generators)."""
    return {
        key: None
        if embeds[0][key] is None
        else torch.cat([e[key].repeat_interleave(n, dim=0) for e, n in zip(embeds, counts)])
        for key in embeds[0]
    }


def _only(outcomes: list[Outcome]) -> ImageBatch:
    (outcome,) = outcomes
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


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
        if on_step(int(step_index), timestep, tensors.get("latents")):
            # Stop early (A1111's interrupt/skip): diffusers skips the remaining steps and
            # decodes the latents as they are now.
            pipe._interrupt = True
        return {}

    return callback
