"""The OpenAI Images API mapping (hiresfix/openai_api.py), Ray-free: their request becomes ours,
our answer becomes theirs, errors take their shape."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from deployments.guard import error_response
from hiresfix.openai_api import (
    NAMED_SIZES,
    SERVED_ID,
    ImageGenerationRequest,
    OpenAIError,
    check_model,
    is_openai_path,
    model_list,
    openai_error,
    parse_size,
    to_openai,
)
from hiresfix.schemas import ImageResponse


def mapped(max_side=None, **kw):
    return ImageGenerationRequest(**{"prompt": "a castle", **kw}).to_generate(max_side)


@pytest.mark.parametrize("size", NAMED_SIZES + ("auto", "1000x600", "64x64"))
@pytest.mark.parametrize("quality", ["low", "medium", "high", "standard", "hd", "auto"])
@pytest.mark.parametrize("max_side", [None, 1024, 128])
def test_the_size_asked_is_the_size_delivered(size, quality, max_side):
    m = mapped(max_side, size=size, quality=quality)
    req = m.request
    want = (1024, 1024) if size == "auto" else tuple(int(v) for v in size.split("x"))
    assert m.size == want and req.output_size() == want
    if max_side:  # the base pass fits the profile
        assert max(req.width, req.height) <= max_side
    assert req.width * req.height <= 1024 * 1024  # never beyond SDXL's native area
    if req.hires_fix:  # the base keeps the aspect ratio (to the 8 px grid)
        assert abs(req.width / req.height - want[0] / want[1]) < 0.08


def test_size_rule_and_presets():
    # Small sizes at low/medium: the base pass at the size itself, no hires fix.
    small = mapped(size="256x256", quality="low").request
    assert (small.width, small.height, small.hires_fix, small.num_inference_steps) == (
        256,
        256,
        False,
        15,
    )
    assert mapped(size="512x512").request.num_inference_steps == 25  # auto = medium
    # high / hd: the base at size / 1.5, the hires fix to the size, strength 0.4.
    for q in ("high", "hd"):
        hd = mapped(size="1024x1024", quality=q)
        r = hd.request
        assert hd.quality == "high"
        assert (r.width, r.height, r.hires_fix, r.hires_width, r.hires_height) == (
            680,
            680,
            True,
            1024,
            1024,
        )
        assert (r.num_inference_steps, r.denoising_strength) == (30, 0.4)
    # Beyond one megapixel or max_side: a smaller base, the hires fix brings it to the size.
    wide = mapped(max_side=1024, size="1792x1024", quality="low").request
    assert (wide.width, wide.height, wide.output_size()) == (1024, 584, (1792, 1024))
    assert mapped(size="1536x1024").request.width * 832 == 1248 * 832  # 1248x832, ~1 MP
    assert mapped(size="auto").quality == "medium"


def test_hiresfix_fields_ride_along_and_win_over_presets():
    m = mapped(
        size="512x512",
        quality="high",
        seed=7,
        num_inference_steps=3,
        denoising_strength=0.3,
        scheduler="dpmpp_2m_karras",
        upscaler="RealESRGAN_x4plus",
        use_face_restoration=True,
        negative_prompt="blurry",
        n=2,
        output_format="webp",
        user="someone",
        style="vivid",
        output_compression=80,
        background="opaque",
        response_format="b64_json",
        model="dall-e-3",
        stream=False,
    )
    r = m.request
    assert (r.seed, r.num_inference_steps, r.denoising_strength, r.scheduler) == (
        7,
        3,
        0.3,
        "dpmpp_2m_karras",
    )
    assert (r.upscaler, r.use_face_restoration, r.negative_prompt) == (
        "RealESRGAN_x4plus",
        True,
        "blurry",
    )
    assert (r.num_images, r.output_format, r.output_size()) == (2, "webp", (512, 512))
    # hires_fix false: the base at the size asked, whatever the preset; true: size / hires_scale.
    off = mapped(size="1024x1024", quality="high", hires_fix=False).request
    assert (off.width, off.hires_fix) == (1024, False)
    on = mapped(size="512x512", hires_fix=True, hires_scale=2.0).request
    assert (on.width, on.hires_fix, on.output_size()) == (256, True, (512, 512))


@pytest.mark.parametrize(
    "kw, param, code",
    [
        ({"size": "huge"}, "size", "invalid_value"),
        ({"size": "100x100"}, "size", "invalid_value"),
        ({"n": 5}, "n", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"response_format": "url"}, "response_format", "unsupported_value"),
        ({"stream": True}, "stream", "unsupported_value"),
        ({"background": "transparent"}, "background", "unsupported_value"),
        ({"output_format": "gif"}, "output_format", "unsupported_value"),
        ({"output_compression": 101}, "output_compression", "invalid_value"),
        ({"width": 512}, "width", "invalid_value"),  # spelled size here
        ({"num_images": 2}, "num_images", "invalid_value"),  # spelled n here
        ({"hires_fixx": True}, "hires_fixx", "unknown_parameter"),
    ],
)
def test_refusals_name_the_openai_parameter(kw, param, code):
    with pytest.raises(OpenAIError) as err:
        body = ImageGenerationRequest(prompt="a castle", **kw)
        body.to_generate(1024)
    assert (err.value.status, err.value.field) == (400, param)
    status, shape = openai_error(
        err.value.status, err.value.field, err.value.message, err.value.code
    )
    assert status == 400
    assert shape["error"]["param"] == param and shape["error"]["code"] == code
    assert shape["error"]["type"] == "invalid_request_error" and shape["error"]["message"]


def test_wrong_types_and_bounds_fail_validation_before_the_mapping():
    """The HTTP layer answers these 400 in OpenAI's shape (deployments/http.py)."""
    for kw in (
        {"scheduler": "LMS"},
        {"quality": "ultra"},
        {"seed": "x"},
        {"seed": -1},  # GenerateRequest's bounds, in /docs too
        {"hires_scale": 9.0},
        {"n": "two"},
    ):
        with pytest.raises(ValidationError):
            ImageGenerationRequest(prompt="a castle", **kw)


def test_refusal_messages_say_what_to_do():
    with pytest.raises(OpenAIError, match="only b64_json"):
        mapped(response_format="url")
    with pytest.raises(OpenAIError, match="not supported yet"):
        mapped(stream=True)
    with pytest.raises(OpenAIError, match="use 'size'"):
        mapped(height=512)
    with pytest.raises(OpenAIError, match="WIDTHxHEIGHT"):
        parse_size("big")
    assert parse_size(None) == parse_size("auto") == (1024, 1024)
    assert parse_size("1536x1024") == (1536, 1024)


def test_openai_error_shape_and_statuses():
    # A field error from our checks (422) is OpenAI's 400; our field names become theirs.
    assert openai_error(422, "size", "1536 exceeds this deployment's limit of 1024") == (
        400,
        {
            "error": {
                "message": "size: 1536 exceeds this deployment's limit of 1024",
                "type": "invalid_request_error",
                "param": "size",
                "code": "invalid_value",
            }
        },
    )
    for status, kind, code in [
        (401, "invalid_request_error", "invalid_api_key"),
        (404, "invalid_request_error", "not_found"),
        (409, "invalid_request_error", "conflict"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_exceeded"),
        (500, "server_error", "internal_error"),
        (503, "server_error", "service_unavailable"),
    ]:
        got, body = openai_error(status, "body", "why")
        assert got == status
        assert body["error"] == {"message": "why", "type": kind, "param": None, "code": code}
    assert openai_error(401, "authorization", "send a key")[1]["error"]["param"] is None
    assert (
        openai_error(422, "foo", "Extra inputs are not permitted")[1]["error"]["code"]
        == "unknown_parameter"
    )


def test_openai_paths_relative_to_the_route_prefix():
    assert is_openai_path("/v1/images/generations")
    assert is_openai_path("/v1/models") and is_openai_path("/v1")
    assert is_openai_path("/nolib/v1/models", "/nolib")
    assert not is_openai_path("/sdapi/v1/txt2img")
    assert not is_openai_path("/v10/models") and not is_openai_path("/generate")
    assert not is_openai_path("/nolib/generate", "/nolib")


def test_models_and_model_names():
    ids = [m.id for m in model_list("stabilityai/sdxl").data]
    assert ids == [SERVED_ID, "stabilityai/sdxl"]
    assert model_list(None).model_dump()["object"] == "list"
    assert model_list(None).data[0].object == "model"
    for ok in (None, SERVED_ID, "dall-e-3", "gpt-image-1", "stabilityai/sdxl"):
        check_model(ok, "stabilityai/sdxl")
    with pytest.raises(OpenAIError) as err:
        check_model("llama", "stabilityai/sdxl")
    assert (err.value.status, err.value.field, err.value.code) == (404, "model", "model_not_found")


def test_answer_is_openai_shaped_with_our_metadata():
    ours = ImageResponse(
        image="AAA",
        images=["AAA", "BBB"],
        width=512,
        height=512,
        seed=7,
        seeds=[7, 8],
        upscaler_used="lanczos",
        output_format="jpeg",
    )
    m = mapped(size="512x512", quality="hd", n=2)
    body = json.loads(to_openai(ours, m, created=123).model_dump_json())
    assert body["created"] == 123
    assert [d["b64_json"] for d in body["data"]] == ["AAA", "BBB"]
    assert (body["size"], body["quality"], body["output_format"]) == ("512x512", "high", "jpeg")
    assert body["usage"] is None and body["background"] == "opaque"
    assert body["hiresfix"]["seeds"] == [7, 8] and "images" not in body["hiresfix"]


def _call(app, path, root=""):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root, "headers": []}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_guard_refusals_take_the_shape_of_their_path():
    refusal = error_response(429, "authorization", "wait for one", "too many", {"retry-after": "3"})
    status, body = _call(refusal, "/v1/images/generations")
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["param"] is None
    status, body = _call(refusal, "/nolib/v1/images/generations", "/nolib")
    assert body["error"]["code"] == "rate_limit_exceeded"
    status, body = _call(refusal, "/generate")
    assert status == 429 and body["error"] == "too many"
    assert body["detail"] == [{"field": "authorization", "message": "wait for one"}]
