"""Tiling engine unit tests: exact arithmetic with stand-in forwards (no weights, milliseconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiresfix.upscale.caps import SizeRule
from hiresfix.upscale.tiling import axis_weights, pad_image, plan_axis, plan_image, upscale_planes


def nearest(scale):
    def fwd(x):
        return F.interpolate(x, scale_factor=scale, mode="nearest")

    return fwd


def blur_then_nearest(scale):
    """A local operator with a 1-px receptive radius (zero padded, like a conv), then upsampling."""
    k = torch.full((3, 1, 3, 3), 1 / 9)

    def fwd(x):
        return F.interpolate(
            F.conv2d(x, k, padding=1, groups=3), scale_factor=scale, mode="nearest"
        )

    return fwd


@pytest.mark.parametrize("length", [1, 5, 31, 64, 100, 257, 1000])
@pytest.mark.parametrize("tile,overlap", [(32, 8), (64, 16), (512, 32), (48, 0)])
@pytest.mark.parametrize(
    "rule", [SizeRule(), SizeRule(minimum=4, multiple_of=4), SizeRule(minimum=2)]
)
def test_axis_plan_covers_with_valid_tiles(length, tile, overlap, rule):
    p = plan_axis(length, tile=tile, overlap=overlap, border=overlap // 2, rule=rule)
    assert p.tile <= max(rule.max_tile_side(tile), rule.tile_side(0))
    assert p.tile % rule.multiple_of == 0 and p.tile >= rule.minimum
    assert p.starts[0] == 0 and p.starts[-1] + p.tile == p.padded
    assert all(b - a <= p.tile for a, b in zip(p.starts, p.starts[1:]))  # no gaps
    if len(p.starts) > 1:
        assert min(a + p.tile - b for a, b in zip(p.starts, p.starts[1:])) >= min(
            overlap, p.tile // 2
        )
    # Equal tiles, no needless extra tile: n tiles of size t cannot be n-1.
    ov = min(overlap, rule.max_tile_side(tile) // 2)
    assert (len(p.starts) - 1) * (p.tile - ov) < p.padded


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_weights_partition_of_unity(scale):
    p = plan_axis(300, tile=64, overlap=24, border=12, rule=SizeRule())
    total = torch.zeros(p.padded * scale)
    for s, w in zip(p.starts, axis_weights(p, scale)):
        assert w.min() >= 0
        total[s * scale : (s + p.tile) * scale] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_square_rule_gives_square_tiles():
    py, px = plan_image(40, 200, tile=64, overlap=16, border=8, rule=SizeRule(square=True))
    assert py.tile == px.tile


@pytest.mark.parametrize("shape", [(3, 1, 1), (3, 2, 3), (3, 5, 4)])
def test_pad_image_tiny_sources(shape):
    x = torch.rand(shape)
    y = pad_image(x, 7, 5, 6, 9)
    assert y.shape == (3, shape[1] + 15, shape[2] + 12)
    assert torch.equal(y[:, 6 : 6 + shape[1], 7 : 7 + shape[2]], x)


@pytest.mark.parametrize(
    "rule", [SizeRule(), SizeRule(minimum=4, multiple_of=4), SizeRule(square=True)]
)
@pytest.mark.parametrize("size", [(37, 53), (3, 2), (64, 64)])
def test_tiled_nearest_is_exact(rule, size):
    x = torch.rand(3, *size)
    out = upscale_planes([x], nearest(2), scale=2, rule=rule, tile=16, overlap=4, batch=3)[0]
    want = F.interpolate(x[None], scale_factor=2, mode="nearest")[0].permute(1, 2, 0)
    assert out.shape == want.shape
    assert torch.allclose(out, want, atol=1e-6)


def test_tiled_equals_untiled_for_local_operator():
    x = torch.rand(3, 70, 45)
    kw = dict(scale=3, rule=SizeRule(), overlap=8, border=4)
    whole = upscale_planes([x], blur_then_nearest(3), tile=1000, batch=1, **kw)[0]
    tiled = upscale_planes([x], blur_then_nearest(3), tile=20, batch=4, **kw)[0]
    assert torch.allclose(whole, tiled, atol=1e-5)


def test_tiles_of_equal_shape_share_batches():
    calls = []

    def fwd(x):
        calls.append(x.shape[0])
        return nearest(2)(x)

    a, b, c = (torch.rand(3, 90, 90) for _ in range(3))
    kw = dict(scale=2, rule=SizeRule(), tile=96, overlap=8)
    py, px = plan_image(90, 90, border=4, **{k: kw[k] for k in ("tile", "overlap", "rule")})
    per_image, per_pass = len(py.starts) * len(px.starts), (96 * 96) // (py.tile * px.tile)
    assert (per_image, per_pass) == (4, 3)  # 2 x 2 tiles of 53 px; 3 fit in one 96 x 96 pass
    outs = upscale_planes([a, b, c], fwd, batch=8, **kw)
    assert calls == [3, 3, 3, 3]  # 12 tiles of three images in 4 full passes
    calls.clear()
    for img in (a, b, c):
        upscale_planes([img], fwd, batch=8, **kw)
    assert calls == [3, 1] * 3  # alone: 6 passes, half of them nearly empty
    for o, src in zip(outs, (a, b, c)):
        assert torch.allclose(o, F.interpolate(src[None], scale_factor=2)[0].permute(1, 2, 0))


def test_batch_never_exceeds_one_tile_of_pixels():
    calls = []

    def fwd(x):
        calls.append(x.shape)
        return nearest(2)(x)

    upscale_planes(
        [torch.rand(3, 200, 200)], fwd, scale=2, rule=SizeRule(), tile=64, overlap=8, batch=16
    )
    assert all(s[0] * s[2] * s[3] <= 64 * 64 for s in calls)
    upscale_planes(
        [torch.rand(3, 10, 10) for _ in range(20)],
        fwd,
        scale=2,
        rule=SizeRule(),
        tile=64,
        overlap=8,
        batch=16,
    )
    assert max(s[0] for s in calls) == 64 * 64 // (18 * 18)  # 10 px + 2 x 4 px border context


def test_fixed_batch_pads_every_pass_to_the_same_size():
    """For a forward whose output depends on the batch size (as GPU kernels chosen by shape may),
    `fixed_batch` gives every pass of a tile shape the same size: a plane's bits then do not depend
    on which other planes shared its passes. Zero tiles fill the gaps; the memory bound holds."""
    calls = []

    def batch_dependent(x):
        calls.append(tuple(x.shape))
        return nearest(2)(x) + 1e-3 * x.shape[0]

    a, b, c = torch.rand(3, 90, 90), torch.rand(3, 90, 90), torch.rand(3, 40, 40)
    kw = dict(scale=2, rule=SizeRule(), tile=96, overlap=8, batch=8)
    alone = upscale_planes([a], batch_dependent, fixed_batch=True, **kw)[0]
    assert [s[0] for s in calls] == [3, 3]  # 4 tiles of 53 px: 3 + 1 padded to 3
    together = upscale_planes([b, c, a], batch_dependent, fixed_batch=True, **kw)
    assert torch.equal(together[2], alone)
    assert all(s[0] * s[2] * s[3] <= 96 * 96 for s in calls)
    unfixed = upscale_planes([b, a], batch_dependent, **kw)[1]
    assert not torch.equal(unfixed, alone)  # the stand-in really is batch dependent
