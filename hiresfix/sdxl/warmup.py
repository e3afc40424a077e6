"""Warm-up at replica start: one small picture per configured size, through the same stage calls
requests use, so the first client of a size does not pay for autotuning or compiling.

Used by the deployments' constructors; Ray Serve routes a replica no traffic before that returns.
"""

from __future__ import annotations

import time

import numpy as np

from hiresfix.images import Picture
from hiresfix.sdxl.generate import BaseStage, RefineStage
from hiresfix.sdxl.settings import WarmupSettings
from hiresfix.stages import ImageBatch


def warm_up_base(stage: BaseStage, warmup: WarmupSettings) -> dict[str, float]:
    """Seconds per warmed base size ("WxH")."""
    seconds = {}
    for req in warmup.requests():
        t0 = time.perf_counter()
        batch = stage.run(req)
        _check(batch, (req.width, req.height))
        seconds[f"{req.width}x{req.height}"] = time.perf_counter() - t0
    return seconds


def warm_up_hires(stage: RefineStage, warmup: WarmupSettings) -> dict[str, float]:
    """Seconds per warmed hires size ("WxH"): the img2img pass on a grey picture of that size, as
    the upscaler would hand it over."""
    seconds = {}
    for req in warmup.requests():
        w, h = req.output_size()
        grey = Picture(np.full((h, w, 3), 0.5, dtype=np.float32))
        t0 = time.perf_counter()
        batch = stage.hires(ImageBatch(pictures=[grey], seeds=[req.seed]), req)
        _check(batch, (w, h))
        seconds[f"{w}x{h}"] = time.perf_counter() - t0
    return seconds


def _check(batch: ImageBatch, size: tuple[int, int]) -> None:
    got = [p.size for p in batch.pictures]
    if got != [size]:  # a warm-up that drew something else warmed nothing
        raise RuntimeError(f"warm-up at {size[0]}x{size[1]} drew {got}")
