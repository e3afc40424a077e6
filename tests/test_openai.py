"""The OpenAI Images API and the A1111 start-up lists, through the official clients' eyes: the
`openai` SDK against the real Serve app (tests/serve_harness.py), tiny SDXL, real RealESRGAN."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from skimage import data

from tests.serve_harness import API_KEYS, NOLIB_RESULTS_TTL_S

pytestmark = pytest.mark.serve

FAST = {"num_inference_steps": 2}  # tiny SDXL, 256 px: well under a second a pass


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture  # one per test: its connection pool belongs to the event loop of asyncio.run
def async_client(service):
    return openai.AsyncOpenAI(
        base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=300
    )


def pixels(b64: str) -> np.ndarray:
    return np.asarray(picture(b64).convert("RGB"), dtype=np.int16)


def picture(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_generate_with_the_sdk_sync_and_async(client, async_client):
    first = client.images.generate(
        prompt="a lighthouse at dusk",
        model="dall-e-3",  # OpenAI's names mean the served model
        size="256x256",
        quality="low",
        extra_body={"seed": 1, **FAST},
    )
    assert first.size == "256x256" and first.quality == "low" and first.output_format == "png"
    assert first.created > 0 and len(first.data) == 1
    im = picture(first.data[0].b64_json)
    assert (im.format, im.size) == ("PNG", (256, 256))
    assert first.model_extra["hiresfix"]["seeds"] == [1]
    assert first._request_id  # the x-request-id header, as the SDK reads it

    async def both():
        args = {"prompt": "a lighthouse at dusk", "size": "256x256", "quality": "low"}
        return await asyncio.gather(
            async_client.images.generate(**args, extra_body={"seed": 1, **FAST}),
            async_client.images.generate(**args, extra_body={"seed": 2, **FAST}),
        )

    same, other = asyncio.run(both())
    # Same seed, same bytes; the two sent together may share one SDXL call (the test config
    # batches), whose rows are within one level of 8 bits of a request alone.
    if same.model_extra["hiresfix"]["batched_with"]["base"] == 1:
        assert same.data[0].b64_json == first.data[0].b64_json
    diff = np.abs(pixels(same.data[0].b64_json) - pixels(first.data[0].b64_json)).max()
    assert diff <= 2, (diff, same.model_extra["hiresfix"]["batched_with"])
    assert other.data[0].b64_json != first.data[0].b64_json
    assert other.model_extra["hiresfix"]["seeds"] == [2]


def test_stream_sends_partial_images_from_the_denoising_then_the_image(client, async_client):
    """stream: true with the official SDK: OpenAI's event types, partial images drawn from the
    running pass's latents, then the same picture the plain call answers."""
    args = {
        "prompt": "a lighthouse at dusk",
        "size": "256x256",
        "quality": "low",
        "extra_body": {"seed": 21, "num_inference_steps": 8},
    }
    events = list(client.images.generate(**args, stream=True, partial_images=2))
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], types
    partial, done = events[:2], events[2]
    assert [e.partial_image_index for e in partial] == [0, 1]
    for e in events:
        assert (e.size, e.quality, e.output_format, e.background) == (
            "256x256",
            "low",
            "png",
            "opaque",
        )
        assert e.created_at > 0 and picture(e.b64_json).size == (256, 256)
    # Two different moments of the denoising, and neither is the finished picture.
    assert not np.array_equal(rgb(partial[0].b64_json), rgb(partial[1].b64_json))
    assert not np.array_equal(rgb(partial[1].b64_json), rgb(done.b64_json))
    plain = client.images.generate(**args)
    assert np.array_equal(rgb(done.b64_json), rgb(plain.data[0].b64_json))

    async def stream_async():
        stream = await async_client.images.generate(
            **{**args, "output_format": "jpeg"}, stream=True, n=2
        )
        return [e async for e in stream]

    # No partial_images: only the completed images, one event each, in the format asked.
    got = asyncio.run(stream_async())
    assert [e.type for e in got] == ["image_generation.completed"] * 2
    assert all(picture(e.b64_json).format == "JPEG" for e in got)
    assert got[0].b64_json != got[1].b64_json  # seeds 21 and 22


def test_stream_refusals_come_before_the_stream_in_the_sdks_classes(client, service):
    """A refusal is the plain call's: status, shape and exception class, not an event."""
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a castle", stream=True, partial_images=4)
    assert err.value.param == "partial_images"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a castle", stream=True, size="2048x64")
    assert err.value.param == "size"
    # An edit streams as well: image_edit.* events.
    events = list(
        client.images.edit(
            image=("a.png", photo_png(), "image/png"),
            prompt="a red planet",
            stream=True,
            partial_images=1,
            extra_body={"seed": 4, "num_inference_steps": 8, "strength": 0.5},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert picture(events[0].b64_json).size == picture(events[1].b64_json).size == (96, 64)
    # Without the SDK: the wire format is server-sent events.
    r = httpx.post(
        service.url + "/v1/images/generations",
        json={"prompt": "x", "size": "64x64", "stream": True, "num_inference_steps": 2},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("event: image_generation.completed\ndata: {")


def test_quality_high_runs_the_hires_fix_to_the_size_asked(client):
    r = client.images.generate(
        prompt="a portrait",
        size="256x256",
        quality="hd",
        n=2,
        output_format="webp",
        output_compression=70,
        background="opaque",
        response_format="b64_json",
        user="test",
        extra_body={"seed": 5, **FAST, "upscaler": "realesr-animevideov3"},
    )
    assert (r.quality, r.output_format, r.size, len(r.data)) == ("high", "webp", "256x256", 2)
    for d in r.data:
        im = picture(d.b64_json)
        assert (im.format, im.size) == ("WEBP", (256, 256))
    meta = r.model_extra["hiresfix"]
    assert meta["upscaler_used"] == "realesr-animevideov3" and meta["fallback_reason"] is None
    assert meta["seeds"] == [5, 6] and "refine" in meta["timings"]


def test_errors_are_the_sdks_exception_classes(client, service):
    cases = [
        ({"size": "huge"}, openai.BadRequestError, "size", "invalid_value"),
        ({"response_format": "link"}, openai.BadRequestError, "response_format", None),
        ({"background": "transparent"}, openai.BadRequestError, "background", None),
        ({"extra_body": {"hires_fixx": True}}, openai.BadRequestError, "hires_fixx", None),
        ({"extra_body": {"scheduler": "LMS"}}, openai.BadRequestError, "scheduler", None),
        ({"model": "llama"}, openai.NotFoundError, "model", "model_not_found"),
        ({"size": "2048x64"}, openai.BadRequestError, "size", None),
    ]
    for kw, cls, param, code in cases:
        with pytest.raises(cls) as err:
            client.images.generate(prompt="a castle", **kw)
        e = err.value
        assert e.type == "invalid_request_error" and e.message, kw
        assert e.body["message"]
        if param:
            assert e.param == param, (kw, e.body)
        if code:
            assert e.code == code, (kw, e.body)
    with pytest.raises(openai.BadRequestError) as err:  # over this deployment's max_steps
        client.images.generate(prompt="a castle", extra_body={"num_inference_steps": 51})
    assert err.value.param == "num_inference_steps" and "50" in err.value.body["message"]
    # Our routes keep our shape; /v1/* routes that do not exist answer in OpenAI's.
    missing = httpx.get(service.url + "/v1/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    ours = httpx.post(service.url + "/generate", json={"prompt": "x", "width": 7}, timeout=30)
    assert ours.status_code == 422 and ours.json()["detail"][0]["field"] == "width"


def test_models_and_api_keys(client, service):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "hiresfix-sdxl" and "tiny" in ids
    keyed = openai.OpenAI(base_url=service.url + "/nolib/v1", api_key=API_KEYS[0], max_retries=0)
    assert keyed.models.list().data[0].id == "hiresfix-sdxl"
    wrong = openai.OpenAI(base_url=service.url + "/nolib/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.code == "invalid_api_key" and err.value.param is None


def test_rate_limit_is_the_sdks_rate_limit_error(service):
    """The "nolib" app lets one key run one request: hold one upload open, the next is a 429."""
    host, port = service.url.removeprefix("http://").split(":")
    held = socket.create_connection((host, int(port)))
    try:
        held.sendall(
            b"POST /nolib/v1/images/generations HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + API_KEYS[0].encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        time.sleep(2)  # the guard has counted it (it waits for the rest of the body)
        keyed = openai.OpenAI(
            base_url=service.url + "/nolib/v1", api_key=API_KEYS[0], max_retries=0
        )
        with pytest.raises(openai.RateLimitError) as err:
            keyed.images.generate(prompt="a castle", size="256x256", extra_body=FAST)
        assert err.value.type == "rate_limit_error" and err.value.response.headers["retry-after"]
    finally:
        held.close()


def test_a1111_start_up_lists(service):
    def get(path):
        r = httpx.get(service.url + "/sdapi/v1/" + path, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    samplers = get("samplers")
    assert {"Euler", "Euler a", "DPM++ 2M Karras"} <= {s["name"] for s in samplers}
    assert set(samplers[0]) == {"name", "aliases", "options"}
    assert {s["name"] for s in get("schedulers")} == {"automatic", "karras"}
    ups = get("upscalers")
    names = [u["name"] for u in ups]
    assert names[:2] == ["None", "Lanczos"]
    assert "realesr-animevideov3" in names and "R-ESRGAN AnimeVideo" in names
    assert "R-ESRGAN 4x+" not in names  # RealESRGAN_x4plus is not configured in the test app
    assert {u["name"]: u["scale"] for u in ups}["realesr-animevideov3"] == 4
    assert set(ups[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    models = get("sd-models")
    assert [m["title"] for m in models] == ["tiny"]
    assert {f["name"] for f in get("face-restorers")} == {"gfpgan-random", "gfpgan-missing"}
    opts = get("options")
    assert opts["sd_model_checkpoint"] == "tiny"
    told = httpx.post(
        service.url + "/sdapi/v1/options",
        json={"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2},
        timeout=30,
    )
    assert told.status_code == 200 and list(told.json()["unchanged"]) == [
        "CLIP_stop_at_last_layers"
    ]
    other = httpx.post(
        service.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "other"}, timeout=30
    )
    assert other.status_code == 422 and other.json()["detail"][0]["field"] == "sd_model_checkpoint"
    # A listed upscaler name is honoured by txt2img (no "not available" note).
    body = {
        "prompt": "a castle",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 3,
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "R-ESRGAN AnimeVideo",
    }
    r = httpx.post(service.url + "/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["upscaler_used"] == "realesr-animevideov3" and info["ignored"] == []


# --- edits, variations and url answers ----------------------------------------------------------


def photo_png(w: int = 96, h: int = 64) -> bytes:
    """A real photo (scikit-image's astronaut) as PNG bytes."""
    im = Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def alpha_mask(w: int = 96, h: int = 64) -> bytes:
    """OpenAI's convention: opaque left half (keep), fully transparent right half (edit)."""
    rgba = np.full((h, w, 4), 255, np.uint8)
    rgba[:, w // 2 :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def rgb(b64: str) -> np.ndarray:
    return np.asarray(picture(b64).convert("RGB"), np.float32) / 255


EDIT = {"num_inference_steps": 4, "strength": 1.0, "mask_blur": 2}


def test_edit_with_a_mask_repaints_only_the_transparent_area(client):
    src = photo_png()
    r = client.images.edit(
        image=("astronaut.png", src, "image/png"),
        mask=("mask.png", alpha_mask(), "image/png"),
        prompt="a red planet",
        n=2,
        extra_body={"seed": 3, **EDIT},
    )
    assert (r.size, r.output_format, r.quality, len(r.data)) == ("96x64", "png", "medium", 2)
    ref = np.asarray(Image.open(io.BytesIO(src)).convert("RGB"), np.float32) / 255
    for d in r.data:
        out = rgb(d.b64_json)
        assert out.shape == (64, 96, 3)
        assert np.abs(out - ref)[:, :40].max() <= 1 / 255 + 1e-6  # opaque in the mask: kept
        assert np.abs(out - ref)[:, 56:].mean() > 0.05  # transparent: repainted
    assert r.model_extra["hiresfix"]["seeds"] == [3, 4]
    assert r.data[0].b64_json != r.data[1].b64_json


def test_edit_without_a_mask_sync_and_async_and_several_images(client, async_client):
    src = photo_png()
    other = photo_png(64, 64)
    one = client.images.edit(
        image=("a.png", src, "image/png"),
        prompt="an astronaut on the moon",
        size="128x80",  # the size delivered, resized from the image's 96x64
        quality="low",
        extra_body={"seed": 9, "num_inference_steps": 2},
    )
    im = picture(one.data[0].b64_json)
    assert (im.format, im.size, one.size, one.quality) == ("PNG", (128, 80), "128x80", "low")

    async def go():
        return await async_client.images.edit(
            image=[("a.png", src, "image/png"), ("b.png", other, "image/png")],  # first used
            prompt="an astronaut on the moon",
            size="128x80",
            quality="low",
            extra_body={"seed": 9, "num_inference_steps": 2},
        )

    both = asyncio.run(go())
    assert picture(both.data[0].b64_json).size == (128, 80)
    # Same seed, same first image: the same picture as the one-image edit.
    assert np.array_equal(rgb(both.data[0].b64_json), rgb(one.data[0].b64_json))


def test_variations_sync_and_async(client, async_client):
    src = photo_png(64, 64)
    r = client.images.create_variation(
        image=("a.png", src, "image/png"), n=2, extra_body={"seed": 11, "num_inference_steps": 4}
    )
    assert (r.size, len(r.data)) == ("64x64", 2)
    a, b = (rgb(d.b64_json) for d in r.data)
    ref = np.asarray(Image.open(io.BytesIO(src)).convert("RGB"), np.float32) / 255
    assert a.shape == ref.shape == (64, 64, 3) and np.abs(a - b).mean() > 0.01  # two variations
    assert r.model_extra["hiresfix"]["seeds"] == [11, 12]

    async def go():
        return await async_client.images.create_variation(
            image=("a.png", src, "image/png"),
            size="128x128",
            response_format="url",
            extra_body={"seed": 11, "num_inference_steps": 4},
        )

    linked = asyncio.run(go())
    got = httpx.get(linked.data[0].url, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (128, 128)


def test_url_answers_are_served_from_the_result_store(client, service):
    r = client.images.generate(
        prompt="a lighthouse",
        size="64x64",
        n=2,
        response_format="url",
        output_format="jpeg",
        extra_body={"seed": 1, **FAST},
    )
    assert all(d.b64_json is None for d in r.data)
    urls = [d.url for d in r.data]
    assert urls[0].startswith(service.url + "/v1/images/results/") and urls[0].endswith(".jpg")
    same = client.images.generate(
        prompt="a lighthouse", size="64x64", output_format="jpeg", extra_body={"seed": 1, **FAST}
    )
    for u in urls:
        got = httpx.get(u, timeout=30)  # no API key needed: the link is the permission
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        assert int(got.headers["cache-control"].split("max-age=")[1]) > 0
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    # The same bytes as the b64_json answer for the same seed.
    assert base64.b64decode(same.data[0].b64_json) == httpx.get(urls[0], timeout=30).content
    gone = httpx.get(service.url + "/v1/images/results/" + "A" * 32 + ".png", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    junk = httpx.get(service.url + "/v1/images/results/..%2Fetc", timeout=30)
    assert junk.status_code == 404 and junk.json()["error"]["type"] == "invalid_request_error"


def test_url_links_expire_and_need_no_key(service):
    """The "nolib" app keeps links NOLIB_RESULTS_TTL_S seconds and has API keys on."""
    keyed = openai.OpenAI(base_url=service.url + "/nolib/v1", api_key=API_KEYS[0], max_retries=0)
    r = keyed.images.generate(
        prompt="a castle", size="64x64", response_format="url", extra_body={"seed": 2, **FAST}
    )
    url = r.data[0].url
    assert url.startswith(service.url + "/nolib/v1/images/results/")
    got = httpx.get(url, timeout=30)  # no Authorization header
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)
    time.sleep(NOLIB_RESULTS_TTL_S + 0.5)
    gone = httpx.get(url, timeout=30)
    assert gone.status_code == 404
    err = gone.json()["error"]
    assert err["code"] == "not_found" and "b64_json" in err["message"] and err["param"] is None


def test_edit_and_variation_errors_are_the_sdks_exception_classes(client, service):
    src = photo_png(64, 64)
    opaque = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(opaque, "PNG")
    cases = [
        ({"mask": ("m.png", opaque.getvalue(), "image/png")}, "mask"),  # no alpha channel
        ({"image": ("x.png", b"not an image", "image/png")}, "image"),
        ({"extra_body": {"strenght": 0.5}}, "strenght"),
        ({"extra_body": {"width": 64}}, "width"),  # spelled size here
        ({"extra_body": {"strength": 2}}, "strength"),
        ({"size": "64x60"}, "size"),
        ({"size": "4096x4096"}, "size"),  # over this deployment's max_side
        ({"n": 5}, "n"),
        ({"response_format": "link"}, "response_format"),
    ]
    for kw, param in cases:
        args = {"image": ("a.png", src, "image/png"), "prompt": "a castle", **kw}
        with pytest.raises(openai.BadRequestError) as err:
            client.images.edit(**args)
        assert err.value.param == param, (kw, err.value.body)
        assert err.value.type == "invalid_request_error" and err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.images.create_variation(image=("a.png", src, "image/png"), model="llama")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.create_variation(image=("a.png", src, "image/png"), extra_body={"n": 9})
    assert err.value.param == "n"
    # The body-size guard holds for multipart bodies too: the "fuzz" app takes ~1.3 MB at most.
    big = httpx.post(
        service.url + "/fuzz/v1/images/edits",
        data={"prompt": "x"},
        files={"image": ("big.png", b"\0" * 2_000_000, "image/png")},
        timeout=30,
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # Not multipart, or no image part: a 400 in OpenAI's shape that says what to send.
    for body in ({"json": {"prompt": "x"}}, {"data": {"prompt": "x"}, "files": {"mask": b"1"}}):
        r = httpx.post(service.url + "/v1/images/edits", timeout=30, **body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] in (None, "image") and "multipart" in err["message"], r.text
