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
import openai
import pytest
from PIL import Image

from tests.serve_harness import API_KEYS

pytestmark = pytest.mark.serve

FAST = {"num_inference_steps": 2}  # tiny SDXL, 256 px: well under a second a pass


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def async_client(service):
    return openai.AsyncOpenAI(
        base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=300
    )


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
    assert same.data[0].b64_json == first.data[0].b64_json  # same seed, same bytes
    assert other.data[0].b64_json != first.data[0].b64_json
    assert other.model_extra["hiresfix"]["seeds"] == [2]


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
        ({"response_format": "url"}, openai.BadRequestError, "response_format", None),
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
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a castle", stream=True)
    assert err.value.param == "stream"
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
