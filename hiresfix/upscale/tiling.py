"""Tiled inference: fixed-size overlapping tiles, feathered blending, output accumulated on the CPU.

Why it is shaped like this:
* Only one batch of tiles is ever on the device, and a batch never holds more pixels than one
  `tile` x `tile` input (`batch` only caps the count), so device memory is bounded by `tile` alone,
  not by the image nor by how it happens to split. The full-size output is a CPU tensor, written
  tile by tile.
* The image is reflect-padded by `border` source pixels before tiling, so border pixels get
  context like inner ones (a conv's own zero padding darkens and rings at the frame edge).
* All tiles of one image have the same size (the image is split into n equal tiles no larger than
  `tile`, evenly spaced), so tiles of every image of the same size, across requests, stack into one
  batch. It also keeps the overlap close to the asked one instead of a large last-tile overlap.
* Blend weights are separable 1-D ramps, normalised so that they sum to exactly 1 at every output
  pixel (a partition of unity): no weight-sum buffer and no seam. Inside an overlap of `ov` px the
  incoming tile has weight 0 for its first ov/4 px (the pixels that saw its zero-padded edge), a
  linear ramp over the next ov/2, then 1. How far a tile edge disturbs the output grows with the
  net's receptive field (RRDB's is far wider than Compact's); ov = 32 keeps tiled output equal to
  untiled (>= 45 dB PSNR) for both (figures: bench/results/upscaler-notes.md).
* Tiles of other requests sharing a pass must not change a tile's bits (same seed and parameters
  give the same image, with or without concurrency). On the CPU the runner makes the forward
  batch-invariant (runner._OneDnnConv2d: only a lone small tile used to take another kernel), so
  passes are simply filled. Where that is not established (GPU: cuDNN/cuBLAS choose kernels by the
  whole input shape, batch included), `fixed_batch` gives every pass of one tile shape the same
  batch size, padded with zero tiles: a lone job pays for the empty slots, the memory bound holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hiresfix.upscale.caps import SizeRule

# A batch of CPU float32 tiles (B, C, h, w) -> float32 output (B, C, h*s, w*s) in [0, 1], any
# device.
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AxisPlan:
    """Tiling of one image axis, in padded source coordinates."""

    length: int  # unpadded source length
    before: int  # padding before (the border context)
    after: int  # padding after (border context + whatever the size rule needs)
    tile: int
    starts: tuple[int, ...]

    @property
    def padded(self) -> int:
        return self.length + self.before + self.after


def plan_axis(
    length: int, *, tile: int, overlap: int, border: int, rule: SizeRule, fixed: int | None = None
) -> AxisPlan:
    """Split `length` (+ border on both sides) into equal tiles of at most `tile` px."""
    padded = length + 2 * border
    cap = rule.max_tile_side(tile)
    overlap = min(overlap, cap // 2)
    if fixed is not None:
        t = fixed
    elif padded <= cap:
        t = rule.tile_side(padded)
    else:
        n = math.ceil((padded - overlap) / (cap - overlap))
        t = rule.tile_side(math.ceil((padded + (n - 1) * overlap) / n))
    extra = max(0, t - padded)  # tiny images: pad up to the smallest tile the model accepts
    total = padded + extra
    if total <= t:
        starts: tuple[int, ...] = (0,)
    else:
        n = max(2, math.ceil((total - overlap) / max(1, t - overlap)))
        starts = tuple(round(i * (total - t) / (n - 1)) for i in range(n))
    return AxisPlan(length, border, border + extra, t, starts)


def plan_image(
    height: int, width: int, *, tile: int, overlap: int, border: int, rule: SizeRule
) -> tuple[AxisPlan, AxisPlan]:
    kw = dict(tile=tile, overlap=overlap, border=border, rule=rule)
    py, px = plan_axis(height, **kw), plan_axis(width, **kw)
    if rule.square and py.tile != px.tile:
        side = max(py.tile, px.tile)
        py, px = plan_axis(height, fixed=side, **kw), plan_axis(width, fixed=side, **kw)
    return py, px


def axis_weights(plan: AxisPlan, scale: int) -> list[torch.Tensor]:
    """Per-tile 1-D output weights (length tile*scale), summing to 1 at every output position."""
    n, t = len(plan.starts), plan.tile
    pos = (
        torch.arange(t * scale, dtype=torch.float64) + 0.5
    ) / scale  # in source px from tile start
    raws = []
    for i, s in enumerate(plan.starts):
        w = torch.ones_like(pos)
        if i > 0:
            w = torch.minimum(w, _ramp(pos, plan.starts[i - 1] + t - s))
        if i < n - 1:
            w = torch.minimum(w, _ramp(t - pos, s + t - plan.starts[i + 1]))
        raws.append(w.clamp_min(1e-6))  # never exactly 0, so every covered pixel normalises
    total = torch.zeros(plan.padded * scale, dtype=torch.float64)
    for s, w in zip(plan.starts, raws):
        total[s * scale : (s + t) * scale] += w
    return [(w / total[s * scale : (s + t) * scale]).float() for s, w in zip(plan.starts, raws)]


def _ramp(dist: torch.Tensor, overlap: int) -> torch.Tensor:
    """0 for the outer quarter of the overlap, linear over its middle half, then 1."""
    if overlap <= 0:
        return torch.ones_like(dist)
    return ((dist - overlap / 4) / (overlap / 2)).clamp(0.0, 1.0)


def pad_image(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Reflect padding (C, H, W); reflect cannot exceed the image, so grow it in steps, and
    fall back to edge replication for 1-px sides."""
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
        if max(step) <= 0:
            return F.pad(x[None], (left, right, top, bottom), mode="replicate")[0]
        x = F.pad(x[None], tuple(step), mode="reflect")[0]
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return x


class _Plane:
    """One image being upscaled: padded source, plan, blend weights and the CPU accumulator."""

    def __init__(
        self, src: torch.Tensor, scale: int, tile: int, overlap: int, border: int, rule: SizeRule
    ):
        c, h, w = src.shape
        self.scale = scale
        self.py, self.px = plan_image(h, w, tile=tile, overlap=overlap, border=border, rule=rule)
        self.src = pad_image(src, self.px.before, self.px.after, self.py.before, self.py.after)
        self.wy = axis_weights(self.py, scale)
        self.wx = axis_weights(self.px, scale)
        # HWC so that the finished tensor is already the layout a Picture holds (no extra copy).
        self.out = torch.zeros(h * scale, w * scale, c, dtype=torch.float32)

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.py.tile, self.px.tile

    def tiles(self):
        for iy in range(len(self.py.starts)):
            for ix in range(len(self.px.starts)):
                yield iy, ix

    def crop(self, iy: int, ix: int) -> torch.Tensor:
        sy, sx = self.py.starts[iy], self.px.starts[ix]
        return self.src[:, sy : sy + self.py.tile, sx : sx + self.px.tile]

    def add(self, iy: int, ix: int, y: torch.Tensor) -> None:
        """Blend one tile's output (C, th*s, tw*s) into the unpadded output."""
        s = self.scale
        rows = _overlap(self.py, iy, s, self.out.shape[0])
        cols = _overlap(self.px, ix, s, self.out.shape[1])
        if rows is None or cols is None:
            return  # the tile lies entirely in the padding
        (a0, a1, r0, r1), (b0, b1, c0, c1) = rows, cols
        wy = self.wy[iy][a0:a1].to(y.device)
        wx = self.wx[ix][b0:b1].to(y.device)
        part = (
            y[:, a0:a1, b0:b1].mul_(wy[:, None] * wx[None, :]).permute(1, 2, 0)
        )  # y is ours: in place
        if part.device.type != "cpu":
            part = part.contiguous().cpu()  # HWC on the device, so the copy back is one block
        self.out[r0:r1, c0:c1] += part


def _overlap(plan: AxisPlan, i: int, s: int, out_len: int):
    """(tile_from, tile_to, out_from, out_to) of tile i's output that lands inside the image."""
    start = (plan.starts[i] - plan.before) * s
    lo, hi = max(0, start), min(out_len, start + plan.tile * s)
    if hi <= lo:
        return None
    return lo - start, hi - start, lo, hi


def upscale_planes(
    planes: list[torch.Tensor],
    forward: Forward,
    *,
    scale: int,
    rule: SizeRule,
    tile: int,
    overlap: int,
    batch: int,
    border: int | None = None,
    fixed_batch: bool = False,
) -> list[torch.Tensor]:
    """Upscale CPU float32 images (C, H, W) by `scale`; returns CPU float32 (H*s, W*s, C).

    Tiles of all planes that have the same tile shape share forward passes of up to `batch` tiles,
    and of at most tile*tile input pixels together.
    `border` (reflect context at the image edge) defaults to half the overlap.
    `fixed_batch`: pad every pass with zero tiles to that full count (for a forward whose per-tile
    output depends on the batch size; see the module notes).
    """
    border = overlap // 2 if border is None else border
    work = [_Plane(p, scale, tile, overlap, border, rule) for p in planes]
    queues: dict[tuple[int, int], list[tuple[_Plane, int, int]]] = {}
    for pl in work:
        queues.setdefault(pl.tile_shape, []).extend((pl, iy, ix) for iy, ix in pl.tiles())
    for (th, tw), items in queues.items():
        per_pass = max(1, min(batch, (tile * tile) // (th * tw)))
        for k in range(0, len(items), per_pass):
            chunk = items[k : k + per_pass]
            x = torch.stack([pl.crop(iy, ix) for pl, iy, ix in chunk])
            if fixed_batch and len(chunk) < per_pass:
                x = torch.cat([x, x.new_zeros((per_pass - len(chunk), *x.shape[1:]))])
            y = forward(x)
            for j, (pl, iy, ix) in enumerate(chunk):
                pl.add(iy, ix, y[j])
            del x, y
    return [pl.out for pl in work]
