"""Which SDXL requests can share one diffusers call (BaseStage.run_batch, RefineStage.hires_batch).

No torch: the Ray side groups the requests of a @serve.batch with these keys before any model code
runs. Requests with equal keys differ only in what each image row carries on its own (prompt and
negative prompt embeddings, seed, number of images); everything else is one argument of the call:

    width, height            the latents of one call are one tensor of one size
    num_inference_steps      one timestep schedule per call
    guidance_scale           one CFG scale per call; it also decides whether CFG runs at all (> 1),
                             i.e. whether the UNet batch holds negative rows
    scheduler                one scheduler object steps the whole batch
    refiner_switch_at        one denoising_end per call, and latents (not pictures) come out
    picture size (hires)     the img2img batch is one tensor of one size
    denoising_strength       where the hires schedule starts and how strongly it re-noises
    hires steps (effective)  the schedule length RefineStage.hires asks for (hires_schedule_length)
    hires cfg, scheduler     the second pass's own, or else the first pass's
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from hiresfix.schedule import hires_schedule_length
from hiresfix.schemas import GenerateRequest

T = TypeVar("T")

BASE_KEY_FIELDS = (
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "refiner_switch_at",
)
HIRES_KEY_FIELDS = ("size", "denoising_strength", "schedule_length", "guidance_scale", "scheduler")


def base_key(req: GenerateRequest) -> tuple:
    """Equal for requests whose base pass can be one diffusers call (fields: BASE_KEY_FIELDS)."""
    return tuple(getattr(req, name) for name in BASE_KEY_FIELDS)


def hires_key(batch: Any, req: GenerateRequest, train_steps: int = 1000) -> tuple:
    """Equal for (upscaled batch, request) pairs whose hires pass can be one diffusers call
    (fields: HIRES_KEY_FIELDS). `train_steps`: the scheduler's num_train_timesteps (SDXL: 1000),
    which caps the schedule length."""
    sizes = tuple(sorted({p.size for p in batch.pictures}))
    size = sizes[0] if len(sizes) == 1 else sizes  # several sizes: hires refuses it anyway
    steps = hires_schedule_length(
        req.num_inference_steps, req.hires_steps, req.denoising_strength, train_steps
    )
    cfg = req.guidance_scale if req.hires_guidance_scale is None else req.hires_guidance_scale
    return (size, req.denoising_strength, steps, cfg, req.hires_scheduler or req.scheduler)


def group(items: Iterable[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of `items` grouped by key: groups in order of first appearance, indices ascending."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def check_one_key(keys: list[tuple], fields: tuple[str, ...]) -> None:
    """ValueError naming the first field where a job differs from the first job."""
    for i, k in enumerate(keys[1:], 1):
        for name, a, b in zip(fields, keys[0], k):
            if a != b:
                raise ValueError(
                    f"jobs 0 and {i} cannot share one diffusers call: {name} {a!r} != {b!r}"
                    " (group them with hiresfix.sdxl.batching first)"
                )


async def run_groups(
    jobs: Sequence[T], key: Callable[[T], Hashable], run_batch: Callable[[list[T]], list]
) -> list:
    """The jobs of one @serve.batch: each group of equal keys as one `run_batch` call in a worker
    thread, the groups side by side (as separate requests always ran). One outcome per job, in
    order; an error of a group's call itself is the outcome of each of its jobs."""
    groups = group(jobs, key)
    results = await asyncio.gather(
        *(asyncio.to_thread(run_batch, [jobs[i] for i in g]) for g in groups),
        return_exceptions=True,
    )
    outcomes: list = [None] * len(jobs)
    for indices, result in zip(groups, results):
        for k, i in enumerate(indices):
            outcomes[i] = result if isinstance(result, BaseException) else result[k]
    return outcomes
