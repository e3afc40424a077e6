"""Exact-size LANCZOS resampling on float data (no 8-bit round trip, so 16-bit sources stay 16-bit).

PIL resamples mode "F" (32-bit float) images with its antialiased LANCZOS, one channel at a time;
that is both the fallback upscaler and the final "model's native scale -> requested size" step.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
from PIL import Image

from hiresfix.images import Picture


def resize_plane(a: np.ndarray, size: tuple[int, int], *, inplace: bool = False) -> np.ndarray:
    """float32 H x W (or H x W x C) -> (h, w[, C]) at size=(w, h), LANCZOS, clamped to [0, 1].

    `inplace`: when no resampling is needed, clamp `a` itself instead of copying it (the caller
    owns it; at 4096 px a copy is another 200 MB at the memory peak)."""
    if (a.shape[1], a.shape[0]) == tuple(size):
        if inplace and a.dtype == np.float32 and a.flags.writeable:
            return np.clip(a, 0.0, 1.0, out=a)
        return np.clip(a, 0.0, 1.0, dtype=np.float32)
    if a.ndim == 2:
        im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F")
        out = np.asarray(im.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
        return np.clip(out, 0.0, 1.0)  # LANCZOS rings past the input range
    out = np.empty((size[1], size[0], a.shape[2]), np.float32)

    def channel(c: int) -> None:
        out[..., c] = resize_plane(a[..., c], size)

    # PIL releases the GIL while resampling, so channels run in parallel: a x4 net answering a x2
    # request spends much of its host time here. Same per-channel arithmetic, so the same bits.
    list(_pool().map(channel, range(a.shape[2])))
    return out


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="resample")


def resize_picture(pic: Picture, size: tuple[int, int]) -> Picture:
    """LANCZOS to exactly `size`; keeps alpha, bit depth, grayscale and info."""
    if pic.size == tuple(size):
        return replace(pic, info=dict(pic.info))
    if pic.grayscale:
        # Equal channels stay equal: resample one, replicate.
        g = resize_plane(pic.rgb[..., 0], size)
        rgb = np.repeat(g[..., None], 3, axis=2)
    else:
        rgb = resize_plane(pic.rgb, size)
    alpha = None if pic.alpha is None else resize_plane(pic.alpha, size)
    return replace(pic, rgb=rgb, alpha=alpha, info=dict(pic.info))
