"""The AUTOMATIC1111 API: the mapping Ray-free (what an A1111 client sends becomes our request, our
answer becomes A1111's), then the routes on the real service (A1111's shapes, decoded images)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from hiresfix.a1111 import (
    A1111Error,
    ExtrasRequest,
    Img2ImgA1111Request,
    Txt2ImgRequest,
    caller_tag,
    checkpoint,
    face_restorers,
    info_json,
    infotext,
    options,
    parse_infotext,
    png_info,
    progress_response,
    samplers,
    schedulers,
    update_options,
    upscalers,
)
from hiresfix.images import Picture, encode_image
from hiresfix.progress import ProgressBoard
from hiresfix.samplers import SAMPLERS
from hiresfix.schemas import GenerateRequest, Img2ImgRequest

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


# --- img2img, infotext, png-info, progress (no Ray) ---------------------------------------------
def test_img2img_maps_a1111_fields_and_defaults():
    req, notes = Img2ImgA1111Request(
        init_images=["abc", "def"],
        prompt="a castle",
        mask="m",
        inpainting_mask_invert=1,
        mask_blur=6,
        resize_mode=1,
        sampler_name="Euler a",
        steps=20,
        cfg_scale=5,
        width=640,
        height=512,
        batch_size=2,
        restore_faces=True,
        enable_hr=True,
        inpainting_fill=1,
        include_init_images=False,
    ).to_img2img(CONFIGURED)
    assert (req.image, req.mask, req.mask_invert, req.mask_blur, req.resize_mode) == (
        "abc",
        "m",
        True,
        6,
        "crop",
    )
    assert (req.strength, req.scheduler, req.num_inference_steps, req.guidance_scale) == (
        0.75,  # A1111's default denoising_strength
        "euler_a",
        20,
        5,
    )
    assert (req.width, req.height, req.num_images, req.use_face_restoration) == (640, 512, 2, True)
    assert "enable_hr: not supported, ignored" in notes  # A1111's img2img has no hires fix
    assert any(n.startswith("init_images: only the first") for n in notes)
    # A1111's default "Only masked" with no padding; inpainting_fill 1: from the original.
    assert (req.inpaint_area, req.inpaint_padding, req.inpaint_fill) == (
        "only_masked",
        0,
        "original",
    )
    plain, notes = Img2ImgA1111Request(init_images=["abc"], prompt="x").to_img2img(CONFIGURED)
    assert (plain.width, plain.height, plain.num_inference_steps, plain.mask) == (
        512,
        512,
        50,
        None,
    )
    assert plain.mask is None and plain.mask_blur == 4 and notes == []
    assert (plain.inpaint_area, plain.inpaint_fill) == ("only_masked", "fill")
    whole, notes = Img2ImgA1111Request(
        init_images=["a"],
        prompt="x",
        mask="m",
        inpaint_full_res=False,
        inpaint_full_res_padding=32,
        inpainting_fill=2,
    ).to_img2img([])
    assert (whole.inpaint_area, whole.inpaint_padding, whole.inpaint_fill) == (
        "whole",
        32,
        "original",
    )
    assert notes == ["inpainting_fill: latent noise / nothing are not served; original used"]
    latent, notes = Img2ImgA1111Request(init_images=["a"], prompt="x", resize_mode=3).to_img2img([])
    assert latent.resize_mode == "resize" and "latent upscale" in notes[0]
    echoed = Img2ImgA1111Request(init_images=["abc"], prompt="x", mask="m")
    assert "init_images" not in echoed.parameters() and "mask" not in echoed.parameters()
    assert echoed.model_copy(update={"include_init_images": True}).parameters()["init_images"]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"init_images": None}, "init_images"),
        ({"init_images": [""]}, "init_images"),
        ({"resize_mode": 7}, "resize_mode"),
        ({"denoising_strength": 0}, "denoising_strength"),
        ({"steps": 0}, "steps"),
        ({"width": 500}, "width"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
        ({"sampler_name": "LMS"}, "sampler_name"),
        ({"prompt": ""}, "prompt"),
        ({"mask_blur": 99}, "mask_blur"),
        ({"inpainting_fill": 7}, "inpainting_fill"),
        ({"inpaint_full_res_padding": -1}, "inpaint_full_res_padding"),
    ],
)
def test_img2img_errors_name_the_a1111_field(kw, field):
    with pytest.raises(A1111Error) as e:
        Img2ImgA1111Request(**{"init_images": ["abc"], "prompt": "a", **kw}).to_img2img([])
    assert e.value.field == field


def test_infotext_round_trips_through_png_info():
    gen = GenerateRequest(
        prompt='a castle, "old": at dusk',
        negative_prompt="blurry\nlow quality",
        seed=5,
        width=512,
        height=768,
        scheduler="dpmpp_2m_karras",
        hires_fix=True,
        hires_steps=10,
        denoising_strength=0.35,
    )
    text = infotext(gen, 5, 512, 768, "realesr-animevideov3")
    p = parse_infotext(text)
    assert p["Prompt"] == gen.prompt and p["Negative prompt"] == gen.negative_prompt
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"]) == (
        "30",
        "DPM++ 2M Karras",
        "Karras",
        "7",
        "5",
    )
    assert (p["Size-1"], p["Size-2"], p["Denoising strength"], p["Hires upscale"]) == (
        "512",
        "768",
        "0.35",
        "2",
    )
    assert (p["Hires steps"], p["Hires upscaler"]) == ("10", "realesr-animevideov3")
    # Through a real PNG file, Latin-1 (tEXt) and not (iTXt): what /sdapi/v1/png-info answers.
    for prompt in ("a castle", "ein Schloß, 城"):
        req = Img2ImgRequest(image="x", prompt=prompt, mask="m", strength=0.4)
        pic = Picture(np.full((8, 8, 3), 0.5, np.float32))
        pic.info["parameters"] = infotext(req, 9, 64, 64)
        png = encode_image(pic, "png")
        with Image.open(io.BytesIO(png)) as im:  # any PNG reader sees it; the pixels are intact
            assert im.info["parameters"] == pic.info["parameters"]
            assert np.asarray(im)[0, 0].tolist() == [128, 128, 128]
        ans = png_info(base64.b64encode(png).decode(), 1 << 20)
        assert ans.info == pic.info["parameters"] and ans.parameters["Prompt"] == prompt
        assert (ans.parameters["Denoising strength"], ans.parameters["Mask blur"]) == ("0.4", "4")
    assert "parameters" not in Image.open(io.BytesIO(encode_image(pic, "jpeg"))).info
    assert png_info("", 100).info == ""  # A1111: a blank image is an empty answer
    for junk, status in (("not base64!", 400), (base64.b64encode(b"junk").decode(), 400)):
        with pytest.raises(A1111Error) as e:
            png_info(junk, 1 << 20)
        assert (e.value.field, e.value.status) == ("image", status)


def test_progress_interrupt_and_skip_on_the_board():
    board, tag = ProgressBoard(), caller_tag("Bearer key-one")
    assert tag != caller_tag("Bearer key-two") and "key-one" not in tag
    idle = progress_response(board.current(tag))
    assert (idle.progress, idle.eta_relative, idle.state["job_count"]) == (0, 0, 0)
    board.begin("other", {"base": 10})  # someone else's (no tag): never seen nor stopped
    board.begin("mine", {"base": 10, "upscale": 1, "hires": 5}, tag)
    assert board.report("mine", "base", 4) is None
    info = progress_response(board.current(tag))
    assert info.state["job"] == "mine" and info.state["sampling_step"] == 4
    assert info.state["sampling_steps"] == 10 and info.progress == round(4 / 16, 4)
    assert info.textinfo == "base 4/10" and info.current_image is None
    assert board.signal(tag, "skip") == ["mine"]
    assert progress_response(board.current(tag)).state["skipped"] is True
    assert board.report("mine", "base", 5) == "skip"  # handed over once
    assert board.report("mine", "hires", 1) is None
    assert board.signal(tag, "interrupt") == ["mine"]
    assert board.report("mine", "hires", 2) == "interrupt"  # stays: every later pass stops
    assert board.report("mine", "hires", 3) == "interrupt"
    assert board.signal(tag, "skip") == ["mine"] and board.get("mine").signal == "interrupt"
    assert board.report("other", "base", 3) is None and board.get("other").signal is None
    board.end("mine", "done")
    assert board.current(tag) is None and board.signal(tag, "interrupt") == []


# --- the routes on the real service -------------------------------------------------------------
def photo_b64(w: int, h: int | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((w, h or w), Image.BICUBIC).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255


def call(service, method, path, body=None, key=None, **kw):  # kw: timeout
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(
        method, service.url + path, json=body, headers=headers, timeout=kw.pop("timeout", 300)
    )


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:2000]
    return r.json()


@pytest.mark.serve
def test_force_task_id_is_the_request_id_and_internal_progress_follows_it(service):
    """A1111's web UI flow: txt2img with force_task_id, POST /internal/progress with id_task
    (live previews newer than id_live_preview); GET /progress/{id} knows the same id."""
    task = f"task(hx{time.time_ns()})"
    t, out = _start(service, "/sdapi/v1/txt2img", {**SLOW, "force_task_id": task})
    seen, deadline = [], time.time() + 120
    while "r" not in out and time.time() < deadline:
        p = ok(
            call(service, "POST", "/internal/progress", {"id_task": task, "id_live_preview": -1})
        )
        seen.append(p)
        if p["live_preview"]:
            break
        time.sleep(0.05)
    t.join(300)
    assert len(ok(out["r"])["images"]) == 1
    live = [p for p in seen if p["live_preview"]]
    assert live, seen[-3:]
    assert live[0]["active"] and not live[0]["completed"] and 0 < live[0]["progress"] < 1
    assert live[0]["live_preview"].startswith("data:image/png;base64,")
    assert pixels(live[0]["live_preview"].split(",", 1)[1]).shape == (384 // 8, 384 // 8, 3)
    assert live[0]["id_live_preview"] >= 1 and live[0]["textinfo"].startswith("base ")
    done = ok(call(service, "POST", "/internal/progress", {"id_task": task, "id_live_preview": 5}))
    assert done["completed"] and not done["active"] and done["progress"] == 1.0
    assert done["live_preview"] is None  # it has all five (50 steps: one per 10)
    assert ok(call(service, "GET", f"/progress/{task}"))["state"] == "done"
    nobody = ok(call(service, "POST", "/internal/progress", {"id_task": "task(nobody)"}))
    assert not (nobody["active"] or nobody["queued"] or nobody["completed"])
    bad = call(service, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "force_task_id": "a b"})
    assert bad.status_code == 400 and bad.json()["detail"][0]["field"] == "force_task_id"


@pytest.mark.serve
def test_a1111_img2img_inpaints_like_our_route(service):
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 48:] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")
    body = {
        "init_images": [photo_b64(96, 64)],
        "mask": base64.b64encode(buf.getvalue()).decode(),
        "mask_blur": 2,
        "prompt": "an astronaut",
        "seed": 11,
        "steps": 6,
        "denoising_strength": 0.9,
        "sampler_name": "Euler a",
        "width": 96,
        "height": 64,
        "batch_size": 2,
        "inpaint_full_res": False,
        "send_images": True,
    }
    r = ok(call(service, "POST", "/sdapi/v1/img2img", body))
    assert len(r["images"]) == 2 and "init_images" not in r["parameters"]
    info = json.loads(r["info"])
    assert (info["all_seeds"], info["width"], info["height"]) == ([11, 12], 96, 64)
    assert info["denoising_strength"] == 0.9 and info["ignored"] == []
    src = pixels(body["init_images"][0])
    for im in r["images"]:
        out = pixels(im)
        assert np.abs(out - src)[:, :40].max() <= 1 / 255 + 1e-6  # the mask keeps it: unchanged
        assert np.abs(out - src)[:, 56:].mean() > 0.02
    ours = {
        "image": body["init_images"][0],
        "mask": body["mask"],
        "mask_blur": 2,
        "prompt": "an astronaut",
        "seed": 11,
        "num_inference_steps": 6,
        "strength": 0.9,
        "scheduler": "euler_a",
        "num_images": 2,
        "inpaint_fill": "fill",  # A1111's default inpainting_fill 0
    }
    assert ok(call(service, "POST", "/img2img", ours))["images"][0] == r["images"][0]
    crop = ok(
        call(
            service,
            "POST",
            "/sdapi/v1/img2img",
            {**body, "mask": None, "resize_mode": 1, "width": 64, "batch_size": 1},
        )
    )
    assert pixels(crop["images"][0]).shape == (64, 64, 3)
    for bad, field in (({"init_images": []}, "init_images"), ({"resize_mode": 9}, "resize_mode")):
        r = call(service, "POST", "/sdapi/v1/img2img", {**body, **bad}, timeout=60)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field
    r = call(service, "POST", "/sdapi/v1/img2img", {**body, "init_images": ["bm9wZQ=="]})
    assert r.status_code == 400 and r.json()["detail"][0]["field"] == "init_images"


@pytest.mark.serve
def test_png_info_reads_our_txt2img_answers(service):
    body = {
        "prompt": "a castle",
        "negative_prompt": "fog",
        "seed": 21,
        "steps": 3,
        "width": 64,
        "height": 64,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
    }
    r = ok(call(service, "POST", "/sdapi/v1/txt2img", body))
    info = ok(call(service, "POST", "/sdapi/v1/png-info", {"image": r["images"][0]}))
    assert info["info"].startswith("a castle\nNegative prompt: fog\nSteps: 3, Sampler: DPM++ 2M")
    p = info["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Size-1"], p["Size-2"]) == (
        "a castle",
        "fog",
        "21",
        "64",
        "64",
    )
    assert p["Schedule type"] == "Karras" and info["items"] == {}
    assert ok(call(service, "POST", "/sdapi/v1/png-info", {"image": ""}))["info"] == ""
    junk = call(service, "POST", "/sdapi/v1/png-info", {"image": "%%%"})
    assert junk.status_code == 400 and junk.json()["detail"][0]["field"] == "image"


def _start(service, path, body, key=None, rid=None):
    """Run a request in a thread; returns (thread, out dict with 'r' and 't' when done)."""
    out, headers = {}, {"x-request-id": rid} if rid else {}
    if key:
        headers["authorization"] = f"Bearer {key}"

    def go():
        t0 = time.perf_counter()
        out["r"] = httpx.post(service.url + path, json=body, headers=headers, timeout=600)
        out["t"] = time.perf_counter()
        out["t0"] = t0

    t = threading.Thread(target=go)
    t.start()
    return t, out


def _wait_running(service, path, out, key=None, min_step=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert "r" not in out, out["r"].text[:500]  # it ended (or failed) before it was seen
        p = ok(call(service, "GET", path, key=key, timeout=30))
        if p["state"]["job_count"] and p["state"]["sampling_step"] >= min_step:
            return p
        time.sleep(0.05)
    raise AssertionError("the job never showed up at /sdapi/v1/progress")


STEPS = 50  # the test profile's max_steps
SLOW = {"prompt": "a busy street", "width": 384, "height": 384, "steps": STEPS, "seed": 3}


@pytest.mark.serve
def test_progress_and_interrupt_end_the_job_early_with_its_picture(service):
    idle = ok(call(service, "GET", "/sdapi/v1/progress"))
    assert (idle["progress"], idle["eta_relative"], idle["state"]["job_count"]) == (0, 0, 0)
    assert ok(call(service, "POST", "/sdapi/v1/interrupt"))["requests"] == []
    rid = f"a1111-interrupt-{time.time_ns()}"
    t, out = _start(service, "/sdapi/v1/txt2img", SLOW, rid=rid)
    p = _wait_running(service, "/sdapi/v1/progress", out, min_step=2)
    assert p["state"]["job"] == rid and p["state"]["sampling_steps"] == STEPS
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["textinfo"].startswith("base ")
    # A live preview every 10 steps (A1111's default), drawn from the latents at 1/8 size.
    while p["current_image"] is None and "r" not in out:
        time.sleep(0.05)
        p = ok(call(service, "GET", "/sdapi/v1/progress"))
    assert p["current_image"], "no current_image while the job ran"
    assert pixels(p["current_image"]).shape == (384 // 8, 384 // 8, 3)
    bare = ok(call(service, "GET", "/sdapi/v1/progress?skip_current_image=true"))
    assert bare["current_image"] is None and bare["state"]["job"] == rid
    t_signal = time.perf_counter()
    assert ok(call(service, "POST", "/sdapi/v1/interrupt"))["requests"] == [rid]
    t.join(300)
    r = ok(out["r"])  # A1111's interrupt: the answer is the picture as it was, not an error
    assert pixels(r["images"][0]).shape == (384, 384, 3)
    # It stopped far short of STEPS: the rest of the run would have taken much longer.
    per_step = (t_signal - out["t0"]) / p["state"]["sampling_step"]
    assert out["t"] - t_signal < 0.5 * per_step * (STEPS - p["state"]["sampling_step"])
    done = ok(call(service, "GET", f"/progress/{rid}"))
    assert done["state"] == "done"


@pytest.mark.serve
def test_skip_ends_the_running_pass_and_the_hires_pass_still_runs(service):
    body = {
        **SLOW,
        "width": 256,
        "height": 256,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_second_pass_steps": 2,
        "hr_upscaler": "Lanczos",
    }
    t, out = _start(service, "/sdapi/v1/txt2img", body)
    _wait_running(service, "/sdapi/v1/progress", out, min_step=2)
    assert len(ok(call(service, "POST", "/sdapi/v1/skip"))["requests"]) == 1
    t.join(300)
    r = ok(out["r"])
    assert pixels(r["images"][0]).shape == (384, 384, 3)  # the hires pass ran after the skip
    assert json.loads(r["info"])["upscaler_used"] == "lanczos"


@pytest.mark.serve
def test_with_api_keys_another_key_neither_sees_nor_stops_the_job(service):
    """The nolib app has API keys on (and one running request per key: key one's job holds its
    slot, so key two does the looking)."""
    from tests.serve_harness import API_KEYS

    one, two = API_KEYS
    rid = f"a1111-keys-{time.time_ns()}"
    t, out = _start(service, "/nolib/sdapi/v1/txt2img", {**SLOW, "steps": 30}, key=one, rid=rid)
    deadline = time.time() + 120
    while True:  # running, seen by its id
        r = call(service, "GET", f"/nolib/progress/{rid}", key=two, timeout=30)
        if r.status_code == 200 and r.json()["step"] >= 1:
            break
        assert time.time() < deadline and "r" not in out, r.text
        time.sleep(0.05)
    assert ok(call(service, "GET", "/nolib/sdapi/v1/progress", key=two))["state"]["job_count"] == 0
    assert ok(call(service, "POST", "/nolib/sdapi/v1/interrupt", key=two))["requests"] == []
    assert call(service, "POST", "/nolib/sdapi/v1/interrupt").status_code == 401
    t.join(300)
    assert pixels(ok(out["r"])["images"][0]).shape == (384, 384, 3)
    assert ok(call(service, "GET", f"/nolib/progress/{rid}", key=two))["state"] == "done"
