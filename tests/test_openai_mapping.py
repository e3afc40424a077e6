"""The OpenAI Images API mapping (hiresfix/openai_api.py), Ray-free: their request becomes ours,
our answer becomes theirs, errors take their shape."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from deployments.guard import error_response
from hiresfix.images import Picture
from hiresfix.openai_api import (
    NAMED_SIZES,
    RESULT_ID,
    SERVED_ID,
    VARIATION_PROMPT,
    VARIATION_STRENGTH,
    EditRequest,
    ImageGenerationRequest,
    OpenAIError,
    OpenAISettings,
    ResultStore,
    VariationRequest,
    check_model,
    form_fields,
    form_files,
    is_openai_path,
    mask_from_alpha,
    model_list,
    openai_error,
    parse_form,
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
        ({"response_format": "link"}, "response_format", "unsupported_value"),
        ({"stream": True, "response_format": "url"}, "response_format", "unsupported_value"),
        ({"stream": True, "partial_images": 4}, "partial_images", "invalid_value"),
        ({"previews": 2}, "previews", "invalid_value"),  # spelled partial_images here
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
    with pytest.raises(OpenAIError, match="use b64_json .* or url"):
        mapped(response_format="link")
    assert mapped(response_format="url").url and not mapped(response_format="b64_json").url
    with pytest.raises(OpenAIError, match="a stream carries the images themselves"):
        mapped(stream=True, response_format="url")
    assert mapped(stream=True, partial_images=2).request.previews == 2
    assert mapped(stream=True).request.previews == 0 and mapped(stream=True).stream
    assert mapped(partial_images=2).request.previews == 0  # no stream: no previews to take
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


# --- edits, variations, links -------------------------------------------------------------------


def test_edit_form_strings_become_our_img2img_request():
    body = EditRequest.model_validate(
        {
            "prompt": "a red planet",
            "n": "2",
            "size": "256x128",
            "quality": "high",
            "response_format": "url",
            "output_format": "webp",
            "seed": "7",
            "strength": "0.4",
            "hires_fix": "true",
            "use_face_restoration": "false",
            "model": "gpt-image-1",
            "input_fidelity": "high",
        }
    )
    m = body.to_img2img("aW1hZ2U=", "bWFzaw==")
    r = m.request
    assert (r.prompt, r.image, r.mask, r.num_images, r.width, r.height) == (
        "a red planet",
        "aW1hZ2U=",
        "bWFzaw==",
        2,
        256,
        128,
    )
    assert (r.seed, r.strength, r.hires_fix, r.use_face_restoration) == (7, 0.4, True, False)
    assert (r.num_inference_steps, r.output_format, m.quality, m.url) == (30, "webp", "high", True)
    # No size (or auto): the image's own size; the default strength of /img2img.
    plain = EditRequest(prompt="x", size="auto").to_img2img("aW1hZ2U=", None).request
    assert (plain.width, plain.height, plain.strength, plain.mask) == (0, 0, 0.75, None)


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"width": "64"}, "width"),
        ({"num_images": "2"}, "num_images"),
        ({"strenght": "0.5"}, "strenght"),
        ({"n": "5"}, "n"),
        ({"size": "big"}, "size"),
        ({"size": "4096x4096"}, "size"),  # over GenerateRequest's hard bound: named as size
        ({"response_format": "link"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"stream": "true", "response_format": "url"}, "response_format"),
        ({"stream": "true", "partial_images": "5"}, "partial_images"),
        ({"stream": "maybe"}, "stream"),
        ({"background": "transparent"}, "background"),
        ({"prompt": "  "}, "prompt"),
        ({"mask_blur": "-1"}, "mask_blur"),
    ],
)
def test_edit_refusals_name_the_openai_parameter(kw, param):
    with pytest.raises(OpenAIError) as err:
        parse_form(EditRequest, {"prompt": "x", **kw}).to_img2img("aW1hZ2U=", None)
    assert (err.value.status, err.value.field) == (400, param)


def test_variation_defaults_and_overrides():
    r = VariationRequest.model_validate({"n": "3"}).to_img2img("aW1hZ2U=").request
    assert (r.prompt, r.strength, r.num_images, r.mask) == (
        VARIATION_PROMPT,
        VARIATION_STRENGTH,
        3,
        None,
    )
    own = VariationRequest.model_validate({"prompt": "a cat", "strength": "0.3"})
    assert own.to_img2img("aW1hZ2U=").request.strength == 0.3
    with pytest.raises(OpenAIError) as err:  # variations have no mask
        VariationRequest.model_validate({"mask_blur": "3"}).to_img2img("aW1hZ2U=")
    assert err.value.field == "mask_blur"


def test_alpha_mask_becomes_white_means_repaint():
    alpha = np.ones((4, 6), np.float32)
    alpha[:, 3:] = 0.0  # transparent right half: edit there
    alpha[0, 0] = 0.25
    pic = mask_from_alpha(Picture(rgb=np.zeros((4, 6, 3), np.float32), alpha=alpha))
    assert pic.alpha is None and pic.rgb.shape == (4, 6, 3)
    assert np.all(pic.rgb[:, 3:] == 1.0) and np.all(pic.rgb[1:, :3] == 0.0)
    assert np.allclose(pic.rgb[0, 0], 0.75)
    with pytest.raises(OpenAIError) as err:
        mask_from_alpha(Picture(rgb=np.zeros((4, 6, 3), np.float32)))
    assert err.value.field == "mask" and "alpha" in err.value.message


def test_form_fields_and_files():
    up = UploadFile(io.BytesIO(b"png"), filename="a.png")
    form = FormData(
        [("prompt", "x"), ("n", "2"), ("seed", ""), ("image[]", up), ("image[]", up), ("mask", up)]
    )
    assert form_fields(form) == {"prompt": "x", "n": "2"}  # empty = the SDK's None: left out
    assert len(form_files(form, "image", required=True)) == 2
    assert form_files(FormData([]), "mask", required=False) == []
    with pytest.raises(OpenAIError, match="missing"):
        form_files(FormData([("prompt", "x")]), "image", required=True)
    with pytest.raises(OpenAIError) as err:
        form_files(FormData([("image", "text")]), "image", required=True)
    assert err.value.field == "image"
    with pytest.raises(OpenAIError) as err:
        form_fields(FormData([("prompt", up)]))
    assert err.value.field == "prompt"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_result_store_is_bounded_in_age_count_and_bytes():
    clock = Clock()
    s = OpenAISettings(results_ttl_s=10, results_max_images=3, results_max_bytes=100)
    store = ResultStore(s, clock)
    a, b = store.put([(b"a" * 10, "png"), (b"b" * 10, "jpeg")])
    assert RESULT_ID.match(a) and a.endswith(".png") and b.endswith(".jpg") and a != b
    assert store.get(a) == (b"a" * 10, "image/png", 10.0)
    clock.now = 5.0
    (c,) = store.put([(b"c" * 10, "webp")])
    (d,) = store.put([(b"d" * 10, "png")])  # a fourth image: the oldest link goes early
    assert store.get(a) is None and store.get(b)[1] == "image/jpeg" and store.get(d)[2] == 10.0
    (e,) = store.put([(b"e" * 85, "png")])  # bytes: 30 + 85 > 100, the two oldest go
    assert store.get(b) is None and store.get(c) is None and store.get(e) is not None
    assert store.stats() == {"images": 2, "bytes": 95}
    clock.now = 15.01  # d and e were put at 5: expired
    assert store.get(d) is None and store.stats() == {"images": 0, "bytes": 0}
    assert store.put([(b"x" * 101, "png")]) is None  # more than the store holds at all
    assert store.put([(b"x", "png")] * 4) is None
    assert store.get("nope") is None
