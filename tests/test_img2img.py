"""POST /img2img: the schema (no Ray), the stage in-process on the tiny SDXL, then the real service.

The init image is a real photo (scikit-image's astronaut); every test decodes the pictures and
asserts on them: size, that the input shaped the result, that a mask keeps what it keeps.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from hiresfix.images import Picture
from hiresfix.plan import img2img_plan, steps_of
from hiresfix.schemas import Img2ImgRequest, RequestError
from hiresfix.stages import ImageBatch

TINY = {"prompt": "an astronaut", "num_inference_steps": 8, "seed": 7}


def photo(w: int, h: int | None = None) -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h or w), Image.BICUBIC))


def b64(arr: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode(s: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(s))) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def half_mask(w: int, h: int) -> np.ndarray:
    """White (repaint) right half, black (keep) left half."""
    m = np.zeros((h, w), np.uint8)
    m[:, w // 2 :] = 255
    return m


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---------------------------------------------------------------- schema and plan (no Ray)
def test_schema_sizes_and_field_errors():
    r = Img2ImgRequest(image="x", prompt="a cat")
    assert (r.strength, r.resize_mode, r.mask, r.num_inference_steps) == (0.75, "resize", None, 30)
    assert r.output_size(100, 60) == (96, 56)  # the image's size, snapped to the latent grid
    assert Img2ImgRequest(image="x", prompt="a", width=128).output_size(100, 50) == (128, 64)
    assert Img2ImgRequest(image="x", prompt="a", width=64, height=96).output_size(9, 9) == (64, 96)
    for kw, field in (
        ({"width": 100}, "width"),
        ({"strength": 0}, "strength"),
        ({"prompt": " "}, "prompt"),
        ({"mask_blur": -1}, "mask_blur"),
        ({"resize_mode": "zoom"}, "resize_mode"),
        ({"hires_scale": 9}, "hires_scale"),
        ({"unknown": 1}, "unknown"),
    ):
        with pytest.raises(ValueError) as e:
            Img2ImgRequest(**{"image": "x", "prompt": "a", **kw})
        assert e.value.errors()[0]["loc"][0] == field
    # The /generate view of it: what the hires fix, face pass and limits read.
    gen = Img2ImgRequest(image="x", prompt="a", hires_fix=True, hires_scale=1.5).as_generate(
        128, 64
    )
    assert (gen.width, gen.height, gen.output_size()) == (128, 64, (192, 96))
    with pytest.raises(RequestError) as e:  # a tiny image and no size given: say what to set
        Img2ImgRequest(image="x", prompt="a").as_generate(32, 32)
    assert e.value.field == "image" and "set width and height" in e.value.message
    with pytest.raises(RequestError) as e:
        Img2ImgRequest(image="x", prompt="a", hires_fix=True, hires_width=64).as_generate(128, 128)
    assert e.value.field == "hires_width" and "enlarges" in e.value.message


def test_plan_runs_img2img_then_the_generate_stages():
    req = Img2ImgRequest(
        image="x",
        prompt="a",
        strength=0.5,
        num_inference_steps=20,
        hires_fix=True,
        hires_steps=6,
        use_face_restoration=True,
    )
    plan = img2img_plan(req, req.as_generate(128, 128), (128, 128), None)
    assert steps_of(plan) == {"img2img": 10, "upscale": 1, "hires": 6, "face": 1}
    assert [(c.deployment, c.method) for c in plan] == [
        ("base", "img2img"),
        ("upscaler", "upscale"),
        ("refine", "hires"),
        ("refine", "restore_faces"),
    ]
    assert plan[1].fallback is not None and plan[0].fallback is None
    tiny = Img2ImgRequest(image="x", prompt="a", strength=0.01, num_inference_steps=10)
    assert steps_of(img2img_plan(tiny, tiny.as_generate(64, 64), (64, 64), None)) == {"img2img": 1}


# ---------------------------------------------------------------- the stage in-process (tiny SDXL)
@pytest.fixture(scope="module")
def img2img_stage(base_pipe):
    from hiresfix.sdxl.img2img import Img2ImgStage

    return Img2ImgStage(base_pipe)


def run_stage(stage, arr, mask=None, **kw):
    req = Img2ImgRequest(image="unused", **{**TINY, **kw})
    pic = Picture.from_pil(Image.fromarray(arr))
    size = req.output_size(pic.width, pic.height)
    m = None if mask is None else Picture.from_pil(Image.fromarray(mask))
    return stage.run(ImageBatch([pic], [None]), req, size, m)


def test_stage_output_follows_the_init_image_and_strength(img2img_stage):
    """Same seed, two photos: the pictures differ, and the less the strength, the more (the tiny
    model's random VAE does not reconstruct a photo, so 'looks like the photo' cannot be asked)."""
    a, b = photo(64), np.asarray(Image.fromarray(data.coffee()).resize((64, 64), Image.BICUBIC))
    gap = {}
    for s in (0.2, 1.0):
        pa = run_stage(img2img_stage, a, strength=s).pictures[0]
        pb = run_stage(img2img_stage, b, strength=s).pictures[0]
        assert pa.size == pb.size == (64, 64)
        gap[s] = float(np.abs(pa.rgb - pb.rgb).mean())
    assert gap[0.2] > 2 * gap[1.0] > 0  # the input shapes the picture, more at low strength
    low = run_stage(img2img_stage, a, strength=0.2)
    again = run_stage(img2img_stage, a, strength=0.2)
    assert low.seeds == [7] and np.array_equal(again.pictures[0].rgb, low.pictures[0].rgb)
    two = run_stage(img2img_stage, a, strength=0.5, num_images=2, width=96, resize_mode="crop")
    assert [p.size for p in two.pictures] == [(96, 96)] * 2 and two.seeds == [7, 8]
    assert not np.array_equal(two.pictures[0].rgb, two.pictures[1].rgb)


def test_stage_inpaints_only_where_the_mask_is_white(img2img_stage):
    src = photo(64)
    out = run_stage(img2img_stage, src, mask=half_mask(64, 64), strength=1.0, mask_blur=2)
    rgb, ref = out.pictures[0].rgb, src.astype(np.float32) / 255
    kept, painted = np.abs(rgb - ref)[:, :24], np.abs(rgb - ref)[:, 40:]  # 4 sigma from the edge
    assert kept.max() < 1 / 255 + 1e-6  # exactly the input, up to 8-bit rounding
    assert painted.mean() > 0.05  # redrawn


def test_only_masked_redraws_the_crop_at_full_size_and_fill_starts_from_the_surroundings(
    img2img_stage, monkeypatch
):
    """A1111's "Only masked" (inpaint_area) and "fill" (inpaint_fill): pixels the mask keeps stay
    exactly the input in every mode; the masked square is redrawn from a 32 px crop (16 px square
    + 8 px padding) blown up to the full 64 px, so it differs from the whole-picture pass."""
    import hiresfix.sdxl.img2img as mod

    src, mask = photo(64), np.zeros((64, 64), np.uint8)
    mask[24:40, 20:36] = 255
    resized, real = [], mod._resize
    monkeypatch.setattr(
        mod, "_resize", lambda a, size: resized.append(a.shape[:2]) or real(a, size)
    )
    common = {"mask": mask, "strength": 0.6, "mask_blur": 0}
    whole = run_stage(img2img_stage, src, **common).pictures[0].rgb
    assert set(resized) == {(64, 64)}  # the whole picture is redrawn as it is (mask: no-op)
    only = (
        run_stage(img2img_stage, src, **common, inpaint_area="only_masked", inpaint_padding=8)
        .pictures[0]
        .rgb
    )
    assert (32, 32) in resized  # the crop (and its mask) blown up to the output size
    filled = run_stage(img2img_stage, src, **common, inpaint_fill="fill").pictures[0].rgb
    ref, outside = src.astype(np.float32) / 255, mask == 0
    for rgb in (whole, only, filled):
        assert np.abs(rgb - ref)[outside].max() < 1 / 255 + 1e-6
    inside = ~outside
    assert np.abs(only - whole)[inside].mean() > 0.02
    assert np.abs(filled - whole)[inside].mean() > 0.02


def test_inpaint_box_and_fill_helpers():
    from hiresfix.sdxl.img2img import fill_masked, inpaint_box

    m = np.zeros((64, 96), np.float32)
    m[20:40, 40:56] = 1
    box = inpaint_box(m, 4, (96, 64))  # 24x28 with padding, widened to the output's 3:2
    assert box == (27, 16, 69, 44) and (box[2] - box[0]) / (box[3] - box[1]) == 1.5
    assert inpaint_box(m, 0, (64, 64)) == (38, 20, 58, 40)  # square: widened by 4, centred
    assert inpaint_box(np.zeros_like(m), 4, (96, 64)) is None  # nothing masked
    assert inpaint_box(np.ones_like(m), 0, (96, 64)) is None  # all of it: the whole picture
    edge = np.zeros_like(m)
    edge[0:4, 90:96] = 1
    x0, y0, x1, y1 = inpaint_box(edge, 8, (96, 64))  # shifted inside the picture, not clipped
    assert (x1, y0) == (96, 0) and (x1 - x0) / (y1 - y0) == 1.5
    rgb = np.zeros((64, 96, 3), np.float32)
    rgb[:, :48], rgb[:, 48:] = (1, 0, 0), (0, 0, 1)  # red left, blue right
    f = fill_masked(rgb, m)
    assert np.array_equal(f[m == 0], rgb[m == 0])  # kept pixels unchanged
    assert f[30, 41, 0] > 0.9 and f[30, 54, 2] > 0.9  # each side filled from its own neighbours
    assert 0.2 < f[30, 48, 0] < 0.8  # the middle: a blend


def test_a_step_callback_answering_true_stops_the_pass_early(img2img_stage):
    """A1111's interrupt/skip end: run_cancellable answers the stage's step callback with the
    progress callback's verdict; diffusers then skips the rest and decodes what it has."""
    import asyncio

    from deployments.cancel import run_cancellable

    req = Img2ImgRequest(image="unused", **{**TINY, "strength": 1.0})
    batch = ImageBatch([Picture.from_pil(Image.fromarray(photo(64)))], [None])
    seen = []

    def stop_after_two(done: int, _latents) -> bool:
        seen.append(done)
        return done >= 2

    early = asyncio.run(
        run_cancellable(
            lambda on_step: img2img_stage.run(batch, req, (64, 64), on_step=on_step),
            "img2img",
            stop_after_two,
        )
    )
    full = img2img_stage.run(batch, req, (64, 64))
    assert seen == [1, 2]  # no step ran after the stop
    assert early.pictures[0].size == (64, 64) and np.isfinite(early.pictures[0].rgb).all()
    assert not np.array_equal(early.pictures[0].rgb, full.pictures[0].rgb)


def test_resize_modes_keep_the_content_where_expected():
    from hiresfix.sdxl.img2img import fit_picture

    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = 255  # left half white
    pic = Picture.from_pil(Image.fromarray(arr))
    crop = fit_picture(pic, (32, 32), "crop").rgb  # the centre: half white, half black
    assert crop.shape == (32, 32, 3) and crop[:, :8].mean() > 0.9 and crop[:, -8:].mean() < 0.1
    fill = fit_picture(pic, (64, 64), "fill").rgb  # fitted, edges extended up and down
    assert fill.shape == (64, 64, 3) and fill[:4, :24].mean() > 0.9 and fill[-4:, -24:].mean() < 0.1
    stretch = fit_picture(pic, (64, 64), "resize").rgb
    assert stretch.shape == (64, 64, 3) and stretch[:, :24].mean() > 0.9


# ---------------------------------------------------------------- the CLI flags (no server)
def test_cli_img2img_flags_come_from_the_schema(tmp_path):
    from hiresfix.cli import _payload, build_parser

    ns = build_parser().parse_args(
        ["img2img", "in.png", "a cat", "--strength", "0.4", "--resize-mode", "crop", "--hires-fix"]
    )
    assert _payload(ns, Img2ImgRequest) == {
        "prompt": "a cat",
        "strength": 0.4,
        "resize_mode": "crop",
        "hires_fix": True,
    }
    sub = build_parser()._subparsers._group_actions[0].choices["img2img"]
    assert set(Img2ImgRequest.model_fields) - {"image", "prompt"} <= {a.dest for a in sub._actions}


# ---------------------------------------------------------------- the real service
def post(service, path, body, timeout=300, headers=None):
    return httpx.post(service.url + path, json=body, timeout=timeout, headers=headers)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:2000]
    return r.json()


@pytest.mark.serve
def test_img2img_with_hires_fix_answers_like_generate(service):
    src = b64(photo(64))
    body = {"image": src, **TINY, "strength": 0.5, "hires_fix": True, "hires_steps": 2}
    rid = f"test-img2img-{time.time_ns()}"
    r = ok(post(service, "/img2img", body, headers={"x-request-id": rid}))
    assert (r["width"], r["height"], r["seed"], r["request_id"]) == (128, 128, 7, rid)
    assert r["upscaler_used"] == "realesr-animevideov3" and r["fallback_reason"] is None
    assert decode(r["image"]).shape == (128, 128, 3) and {"img2img", "refine"} <= set(r["timings"])
    p = ok(httpx.get(f"{service.url}/progress/{rid}", timeout=30))
    assert p["plan"] == {"img2img": 4, "upscale": 1, "hires": 2}  # int(8 x 0.5) img2img steps
    # The input shapes the picture: another photo, same seed, another picture; and the less the
    # strength, the more they differ.
    coffee = b64(np.asarray(Image.fromarray(data.coffee()).resize((64, 64), Image.BICUBIC)))
    gap = {}
    for s in (0.2, 1.0):
        a = decode(ok(post(service, "/img2img", {"image": src, **TINY, "strength": s}))["image"])
        c = decode(ok(post(service, "/img2img", {"image": coffee, **TINY, "strength": s}))["image"])
        gap[s] = float(np.abs(a - c).mean())
    assert gap[0.2] > 2 * gap[1.0] > 0


@pytest.mark.serve
def test_inpainting_keeps_the_pixels_the_mask_keeps(service):
    src = photo(96, 64)
    body = {
        "image": b64(src),
        "mask": b64(half_mask(96, 64)),
        **TINY,
        "strength": 1.0,
        "mask_blur": 2,
        "num_images": 2,
    }
    r = ok(post(service, "/img2img", body))
    ref = src.astype(np.float32) / 255
    for im in r["images"]:
        out = decode(im)
        assert out.shape == (64, 96, 3)
        assert np.abs(out - ref)[:, :40].max() <= 1 / 255 + 1e-6  # kept: the input, exactly
        assert np.abs(out - ref)[:, 56:].mean() > 0.05  # repainted
    inverted = decode(ok(post(service, "/img2img", {**body, "mask_invert": True}))["image"])
    assert np.abs(inverted - ref)[:, 56:].max() <= 1 / 255 + 1e-6
    # Resized to another size first: the kept half is the resized input there.
    big = decode(ok(post(service, "/img2img", {**body, "width": 192, "num_images": 1}))["image"])
    assert big.shape == (128, 192, 3)


@pytest.mark.serve
def test_img2img_png_carries_a1111_parameters_and_png_info_reads_them(service):
    body = {"image": b64(photo(64)), **TINY, "strength": 0.6, "negative_prompt": "blurry"}
    png = httpx.post(
        service.url + "/img2img", json=body, headers={"accept": "image/png"}, timeout=300
    )
    assert png.status_code == 200 and png.headers["x-seed"] == "7"
    with Image.open(io.BytesIO(png.content)) as im:
        text = im.info["parameters"]  # what A1111 tools read
    assert text.startswith("an astronaut\nNegative prompt: blurry\nSteps: 8, Sampler: Euler")
    info = ok(
        post(service, "/sdapi/v1/png-info", {"image": base64.b64encode(png.content).decode()})
    )
    assert info["info"] == text
    p = info["parameters"]
    assert (p["Prompt"], p["Seed"], p["Denoising strength"], p["Size-1"]) == (
        "an astronaut",
        "7",
        "0.6",
        "64",
    )


@pytest.mark.serve
@pytest.mark.parametrize(
    "extra, status, field",
    [
        ({"mask": "not base64!"}, 400, "mask"),
        ({"image": "bm90IGFuIGltYWdl"}, 400, "image"),  # "not an image"
        ({"width": 100}, 422, "width"),
        ({"strength": 0}, 422, "strength"),
        ({"image": b64(photo(32))}, 422, "image"),  # 32 px: below 64, and no size given
        ({"width": 2048, "height": 64}, 422, "width"),  # over the profile's max_side
        ({"upscaler": "nope", "hires_fix": True}, 422, "upscaler"),
        ({"hires_fix": True, "hires_width": 32}, 422, "hires_width"),
        ({"output_format": "gif"}, 422, "output_format"),
    ],
)
def test_img2img_bad_input_names_the_field(service, extra, status, field):
    r = post(service, "/img2img", {"image": b64(photo(64)), **TINY, **extra}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["detail"][0]["field"] == field and "Traceback" not in r.text


@pytest.mark.serve
def test_img2img_image_answer_is_one_picture(service):
    body = {"image": b64(photo(64)), **TINY, "num_images": 2}
    r = post(service, "/img2img", body, headers={"accept": "image/png"}, timeout=60)
    assert r.status_code == 406 and r.json()["detail"][0]["field"] == "num_images"


@pytest.mark.serve
def test_cli_img2img_with_a_mask(service, tmp_path):
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(photo(64)).save(src)
    Image.fromarray(half_mask(64, 64)).save(mask)
    cmd = [sys.executable, "-m", "hiresfix.cli", "img2img", str(src), "an astronaut"]
    p = subprocess.run(
        [*cmd, "--url", service.url, "--mask", str(mask), "-o", str(out), "--json"]
        + ["--num-inference-steps", "4", "--strength", "1", "--seed", "3", "--width", "96"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["width"] == 96
    with Image.open(out) as im:
        assert im.size == (96, 96) and "Denoising strength: 1" in im.info["parameters"]
    bad = subprocess.run([*cmd, "--url", service.url, "--strength", "2"], capture_output=True)
    assert bad.returncode != 0 and b"strength" in bad.stderr
