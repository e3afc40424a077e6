"""Profile limits and configured model names: domain rules, checked without Ray or HTTP."""

from __future__ import annotations

import pytest

from hiresfix.limits import Limits, check_models
from hiresfix.schemas import GenerateRequest, RequestError, UpscaleRequest


def refused(check, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        check(*args)
    return e.value


def test_hires_steps_obey_the_profile_step_limit():
    limits = Limits(max_steps=50)
    req = GenerateRequest(prompt="x", width=64, height=64, hires_fix=True, hires_steps=150)
    e = refused(limits.check_generate, req)
    assert e.field == "hires_steps" and e.status == 422 and "50" in e.message
    limits.check_generate(req.model_copy(update={"hires_steps": 50}))  # at the limit: fine
    limits.check_generate(
        req.model_copy(update={"hires_fix": False})
    )  # no second pass: not checked


def test_base_size_and_steps_name_the_field():
    limits = Limits(max_side=512, max_steps=20)
    assert (
        refused(limits.check_generate, GenerateRequest(prompt="x", width=1024, height=64)).field
        == "width"
    )
    assert (
        refused(limits.check_generate, GenerateRequest(prompt="x", width=64, height=520)).field
        == "height"
    )
    e = refused(
        limits.check_generate,
        GenerateRequest(prompt="x", width=64, height=64, num_inference_steps=21),
    )
    assert e.field == "num_inference_steps"


@pytest.mark.parametrize(
    "extra, knob",
    [
        ({"hires_scale": 4.0}, "hires_scale"),
        ({"hires_width": 4096}, "hires_width"),
        ({"hires_height": 4096}, "hires_height"),
    ],
)
def test_hires_output_limit_names_the_knob_that_set_it(extra, knob):
    req = GenerateRequest(prompt="x", width=512, height=512, hires_fix=True, **extra)
    e = refused(Limits(max_output_side=1536).check_generate, req)
    assert e.field == knob and "1536" in e.message


def test_upscale_size_is_exact_and_bounded():
    limits = Limits(max_output_side=1000)
    req = UpscaleRequest(image="x", scale=1.5)
    assert limits.upscale_size(req, 101, 67) == (152, 100)
    e = refused(limits.upscale_size, req.model_copy(update={"scale": 4.0}), 300, 200)
    assert e.field == "scale" and "1200" in e.message


def test_unknown_models_are_client_errors_that_list_the_configured_ones():
    e = refused(check_models, GenerateRequest(prompt="x", upscaler="nope"), ["a", "b"], ["f"])
    assert e.field == "upscaler" and "a, b" in e.message
    e = refused(check_models, UpscaleRequest(image="x", face_model="g"), ["a"], ["f"])
    assert e.field == "face_model" and "f" in e.message
    check_models(GenerateRequest(prompt="x", upscaler="a", face_model="f"), ["a"], ["f"])


def test_body_limit_covers_the_base64_image():
    limits = Limits(max_input_bytes=3 * 1024 * 1024)
    assert limits.max_body_bytes() >= 4 * 1024 * 1024
