"""The request schemas: defaults that clients rely on, and the errors that name what to change."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hiresfix.schemas import QUALITY_PRESETS, GenerateRequest, UpscaleRequest, hires_size


def test_defaults_match_the_client_contract():
    r = GenerateRequest(prompt="a cat")
    assert (r.width, r.height, r.num_inference_steps) == (768, 768, 30)
    assert (r.hires_fix, r.hires_scale, r.hires_steps, r.use_realesrgan) == (False, 2.0, 0, True)
    assert (r.use_face_restoration, r.face_restoration_weight, r.output_format) == (
        False,
        0.6,
        "png",
    )
    assert r.output_size() == (768, 768)
    assert r.model_copy(update={"hires_fix": True}).output_size() == (1536, 1536)
    assert UpscaleRequest(image="x").scale == 2.0


def test_hires_sizes_snap_to_the_latent_grid():
    assert hires_size(768, 768, 2.0) == (1536, 1536)
    assert hires_size(64, 96, 1.5) == (96, 144)
    assert all(v % 8 == 0 for v in hires_size(72, 200, 1.3))


def errors(**kw):
    with pytest.raises(ValidationError) as e:
        GenerateRequest(**kw)
    return {(".".join(map(str, x["loc"])) or "body"): x["msg"] for x in e.value.errors()}


def test_messages_say_what_to_change():
    assert "try 96 or 104" in errors(prompt="x", width=100)["width"]
    assert "some text" in errors(prompt="   ")["prompt"]
    assert "extra" in errors(prompt="x", hires_fixx=True)["hires_fixx"].lower()
    assert (
        "less than or equal to 4"
        in errors(prompt="x", hires_fix=True, hires_scale=4.5)["hires_scale"]
    )


def test_hires_resize_to_a1111_style():
    """hires_width/hires_height replace hires_scale; alone, the other side follows the aspect
    ratio."""
    g = lambda **kw: GenerateRequest(prompt="x", hires_fix=True, **kw)  # noqa: E731
    assert g(hires_width=1024).output_size() == (1024, 1024)
    assert g(width=64, height=96, hires_height=144).output_size() == (96, 144)
    assert g(width=832, height=1216, hires_width=1248).output_size() == (1248, 1824)
    assert g(hires_width=1024, hires_height=1024, hires_scale=4).output_size() == (1024, 1024)
    assert GenerateRequest(prompt="x", hires_width=512).output_size() == (
        768,
        768,
    )  # no hires_fix: unused
    assert (
        "enlarges: 512 is below the base width 768"
        in errors(prompt="x", hires_fix=True, hires_width=512)["hires_width"]
    )
    msg = errors(prompt="x", hires_fix=True, hires_width=1024, hires_height=1536)["hires_height"]
    assert "changes the aspect ratio of 768x768" in msg and "hires_height 1024" in msg
    assert "try 1000 or 1008" in errors(prompt="x", hires_fix=True, hires_width=1001)["hires_width"]


# ------------------------------------------------------------------- quality presets
@pytest.mark.parametrize("name", ["fast", "balanced", "best"])
def test_quality_preset_fills_the_fields_left_out(name):
    req = GenerateRequest(prompt="a cat", quality=name)
    for field, value in QUALITY_PRESETS[name].items():
        assert getattr(req, field) == value
    assert req.quality == name


def test_quality_presets_order_steps_and_strength():
    fast, balanced, best = (QUALITY_PRESETS[n] for n in ("fast", "balanced", "best"))
    for key in ("num_inference_steps", "denoising_strength"):
        assert fast[key] < balanced[key] < best[key]
    # Without a preset the defaults are what they always were.
    plain = GenerateRequest(prompt="a cat")
    assert (plain.num_inference_steps, plain.scheduler, plain.quality) == (30, "euler", None)


def test_fields_sent_win_over_the_quality_preset():
    req = GenerateRequest(prompt="a cat", quality="fast", num_inference_steps=40, scheduler="ddim")
    assert (req.num_inference_steps, req.scheduler) == (40, "ddim")
    assert req.denoising_strength == QUALITY_PRESETS["fast"]["denoising_strength"]


def test_unknown_quality_is_refused_naming_the_choices():
    with pytest.raises(ValidationError) as e:
        GenerateRequest(prompt="a cat", quality="ultra")
    assert e.value.errors()[0]["loc"] == ("quality",)
    assert "'fast', 'balanced' or 'best'" in e.value.errors()[0]["msg"]
