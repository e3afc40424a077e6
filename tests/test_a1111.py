"""The AUTOMATIC1111 txt2img mapping, Ray-free: what an A1111 client sends becomes our request."""

from __future__ import annotations

import json

import pytest

from hiresfix.a1111 import (
    A1111Error,
    ExtrasRequest,
    Txt2ImgRequest,
    checkpoint,
    face_restorers,
    info_json,
    options,
    samplers,
    schedulers,
    update_options,
    upscalers,
)
from hiresfix.samplers import SAMPLERS

CONFIGURED = ["RealESRGAN_x2plus", "RealESRGAN_x4plus", "realesr-animevideov3"]


def gen(**kw):
    return Txt2ImgRequest(**{"prompt": "a castle", **kw}).to_generate(CONFIGURED)


def test_a_typical_client_payload_maps_field_by_field():
    req, notes = gen(
        negative_prompt="blurry",
        seed=42,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        steps=28,
        cfg_scale=6.5,
        width=832,
        height=1216,
        batch_size=2,
        n_iter=1,
        restore_faces=True,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="R-ESRGAN 4x+",
        hr_second_pass_steps=12,
        denoising_strength=0.35,
        hr_prompt="a castle, detailed",
        hr_sampler_name="Euler a",
        hr_cfg=5.0,
        send_images=True,
        save_images=False,
        styles=[],
        override_settings={},
        alwayson_scripts={},
    )
    assert notes == []  # every field either honoured or a no-op default
    assert (req.prompt, req.negative_prompt, req.seed) == ("a castle", "blurry", 42)
    assert (req.scheduler, req.num_inference_steps, req.guidance_scale) == (
        "dpmpp_2m_karras",
        28,
        6.5,
    )
    assert (req.width, req.height, req.num_images, req.use_face_restoration) == (832, 1216, 2, True)
    assert req.hires_fix and req.output_size() == (1248, 1824)
    assert (req.upscaler, req.use_realesrgan, req.hires_steps, req.denoising_strength) == (
        "RealESRGAN_x4plus",
        True,
        12,
        0.35,
    )
    assert (req.hires_prompt, req.hires_scheduler, req.hires_guidance_scale) == (
        "a castle, detailed",
        "euler_a",
        5.0,
    )


def test_defaults_follow_a1111():
    req, _ = gen()
    assert (req.width, req.height, req.num_inference_steps, req.scheduler, req.seed) == (
        512,
        512,
        50,
        "euler",
        None,
    )
    assert not req.hires_fix
    hr, _ = gen(enable_hr=True)
    assert hr.denoising_strength == 0.7 and hr.output_size() == (1024, 1024) and hr.upscaler is None
    assert gen(sampler_index="Euler a")[0].scheduler == "euler_a"  # the older field name
    assert gen(sampler_name="dpm++ 2m karras")[0].scheduler == "dpmpp_2m_karras"


def test_upscaler_names_and_what_cannot_be_honoured():
    assert gen(enable_hr=True, hr_upscaler="Lanczos")[0].use_realesrgan is False
    assert (
        gen(enable_hr=True, hr_upscaler="realesr-animevideov3")[0].upscaler
        == "realesr-animevideov3"
    )
    assert (
        gen(enable_hr=True, hr_upscaler="R-ESRGAN AnimeVideo")[0].upscaler == "realesr-animevideov3"
    )
    req, notes = gen(
        enable_hr=True,
        hr_upscaler="Latent (nearest-exact)",
        styles=["cinematic"],
        tiling=True,
        subseed_strength=0,
        restore_faces=False,
    )
    assert req.upscaler is None and req.use_realesrgan  # the default neural upscaler instead
    assert len(notes) == 3 and any("latent upscaling is not supported" in n for n in notes)
    assert "styles: not supported, ignored" in notes and "tiling: not supported, ignored" in notes


@pytest.mark.parametrize(
    "kw, field, text",
    [
        ({"sampler_name": "LMS"}, "sampler_name", "DPM++ 2M Karras"),
        ({"enable_hr": True, "hr_sampler_name": "Heun"}, "hr_sampler_name", "not available"),
        ({"batch_size": 4, "n_iter": 2}, "batch_size", "at most 4"),
        ({"prompt": "  "}, "prompt", "empty"),
        ({"width": 500}, "width", "try 496 or 504"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"cfg_scale": 99}, "cfg_scale", "less than or equal to 30"),
        ({"enable_hr": True, "hr_resize_x": 256}, "hr_resize_x", "enlarges"),
    ],
)
def test_errors_name_the_a1111_field(kw, field, text):
    with pytest.raises(A1111Error) as e:
        Txt2ImgRequest(**{"prompt": "a castle", **kw}).to_generate(CONFIGURED)
    assert e.value.field == field and text in e.value.message


def test_info_is_a1111_shaped_json():
    req, notes = gen(enable_hr=True, seed=7, batch_size=2, styles=["x"])
    info = json.loads(
        info_json(
            req, [7, 8], {"upscaler_used": "lanczos", "fallback_reason": "weights_missing"}, notes
        )
    )
    assert (info["seed"], info["all_seeds"], info["width"], info["height"]) == (
        7,
        [7, 8],
        1024,
        1024,
    )
    assert info["upscaler_used"] == "lanczos" and info["fallback_reason"] == "weights_missing"
    assert info["ignored"] == ["styles: not supported, ignored"]


def test_extras_single_image_maps_to_an_upscale():
    req, notes = ExtrasRequest(
        image="abc",
        upscaling_resize=3,
        upscaler_1="R-ESRGAN 2x+",
        gfpgan_visibility=0.8,
        show_extras_results=True,
    ).to_upscale(CONFIGURED)
    assert (req.image, req.scale, req.upscaler, req.use_realesrgan) == (
        "abc",
        3,
        "RealESRGAN_x2plus",
        True,
    )
    assert (req.use_face_restoration, req.face_restoration_weight) == (True, 0.8)
    assert notes == ["show_extras_results: not supported, ignored"]
    plain, notes = ExtrasRequest(
        image="abc",
        upscaler_1="Lanczos",
        upscaler_2="R-ESRGAN 4x+",
        extras_upscaler_2_visibility=0.5,
    ).to_upscale(CONFIGURED)
    assert (
        plain.use_realesrgan is False
        and not plain.use_face_restoration
        and "upscaler_2" in notes[0]
    )
    for kw, field in (
        ({"resize_mode": 1}, "resize_mode"),
        ({"upscaling_resize": 20}, "upscaling_resize"),
        ({"image": ""}, "image"),
    ):
        with pytest.raises(A1111Error) as e:
            ExtrasRequest(**{"image": "abc", **kw}).to_upscale(CONFIGURED)
        assert e.value.field == field


# --- the read-only lists A1111 clients fetch at start-up ---------------------------------------
def test_samplers_list_every_name_txt2img_takes():
    items = samplers()
    assert [s.name for s in items] == [s.a1111 for s in SAMPLERS]
    by_name = {s.name: s for s in items}
    assert by_name["DPM++ 2M Karras"].options == {"scheduler": "karras"}
    assert by_name["Euler a"].aliases == ["euler_a"] and by_name["Euler"].options == {}
    for s in items:  # A1111's name and our alias both select the sampler
        for name in (s.name, *s.aliases):
            assert gen(sampler_name=name)[0].scheduler == s.aliases[0]
    assert {s.name for s in schedulers()} == {"automatic", "karras"}
    assert gen(sampler_name="DPM++ 2M", scheduler="karras")[0].scheduler == "dpmpp_2m_karras"


def test_upscalers_list_exactly_the_names_that_select_a_served_model():
    items = upscalers(CONFIGURED, {"RealESRGAN_x4plus": 4, "RealESRGAN_x2plus": 2})
    names = [u.name for u in items]
    assert names[:2] == ["None", "Lanczos"]
    assert set(names) == {
        "None",
        "Lanczos",
        *CONFIGURED,
        "R-ESRGAN 2x+",
        "R-ESRGAN 4x+",
        "R-ESRGAN AnimeVideo",
    }  # no Anime6B or General 4xV3: their models are not configured here
    by_name = {u.name: u for u in items}
    assert (by_name["R-ESRGAN 4x+"].model_name, by_name["R-ESRGAN 4x+"].scale) == (
        "RealESRGAN_x4plus",
        4,
    )
    for u in items:  # every listed name is honoured by hr_upscaler: no "not available" note
        req, notes = gen(enable_hr=True, hr_upscaler=u.name)
        assert notes == [], u.name
        if u.model_name:
            assert req.upscaler == u.model_name and req.use_realesrgan
        else:
            assert not req.use_realesrgan
    assert [u.name for u in upscalers([], {})] == ["None", "Lanczos"]


def test_checkpoint_face_restorers_and_options():
    model = checkpoint("/models/sd_xl_base_1.0.safetensors")
    assert (model.title, model.model_name, model.filename) == (
        "sd_xl_base_1.0",
        "sd_xl_base_1.0",
        "/models/sd_xl_base_1.0.safetensors",
    )
    assert checkpoint("stabilityai/stable-diffusion-xl-base-1.0").title == (
        "stable-diffusion-xl-base-1.0"
    )
    assert [f.name for f in face_restorers(["gfpgan"])] == ["gfpgan"]
    opts = options("tiny", ["gfpgan"])
    assert opts["sd_model_checkpoint"] == "tiny" and opts["face_restoration_model"] == "gfpgan"


def test_posting_options_changes_nothing_and_says_so():
    same = update_options({"sd_model_checkpoint": "tiny", "samples_format": "png"}, "tiny", [])
    assert same.changed == [] and same.unchanged == {}
    told = update_options({"CLIP_stop_at_last_layers": 2, "no_such_option": 1}, "tiny", [])
    assert set(told.unchanged) == {"CLIP_stop_at_last_layers", "no_such_option"}
    assert "configuration" in told.unchanged["CLIP_stop_at_last_layers"]
    assert update_options({"sd_model_checkpoint": "tiny [abc123]"}, "tiny", []).unchanged == {}
    with pytest.raises(A1111Error) as err:  # the pictures would come from another model
        update_options({"sd_model_checkpoint": "dreamshaper"}, "tiny", [])
    assert err.value.field == "sd_model_checkpoint" and "tiny" in err.value.message
