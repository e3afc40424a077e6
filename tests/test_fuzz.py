"""Property-based fuzzing of the real service from its own OpenAPI document (schemathesis).

Every route in the document gets a bounded number of generated requests, schema-valid (positive)
and schema-invalid (negative), sent over real HTTP to the "fuzz" copy of the app
(tests/serve_harness.py FUZZ_LIMITS: 128 px, 4 steps, 256 px output, 128x128 input), whose OpenAPI
document is the main app's but whose largest valid request costs seconds on a CPU: big generated
values become fast 422s. Each answer must be:

- no server error: no 5xx at all (there is no load here, so not even a 503);
- a status the document lists for that route (status_code_conformance);
- of a documented content type, with a body that matches the documented schema: ImageResponse and
  friends for a 200, ErrorResponse for every error (content_type_conformance,
  response_schema_conformance);
- for every 4xx, an error that names the field to change.

Three passes per route: "positive" and "negative" are the document's own data, untouched. Most
positive requests still end in a 422 there (the document allows 2048 px and 150 steps, any width
where the service wants a multiple of 8, a random string as the image), so a third pass,
"in-limits", keeps every generated field but fits the size, step and scale fields into the fuzz
app's limits and puts a real small image where one is expected: those requests reach the stages
(SDXL, hires fix, upscaler, face pass) and must mostly succeed.

Hand-written hostile inputs the fuzzer will not find live in tests/test_hostile.py.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from hiresfix.openai_api import ImageGenerationRequest, OpenAIErrorResponse
from hiresfix.samplers import SAMPLERS
from hiresfix.schemas import SEED_MAX, ErrorResponse
from tests.serve_harness import FUZZ_LIMITS

pytestmark = pytest.mark.serve

PREFIX = "/fuzz"  # the small-limits app (tests/serve_harness.py fuzz_app)

# Generated cases per route and pass (0: not run). Bounded so the whole module stays near a minute
# and a half on a busy 2-core machine; derandomized, so a failure reproduces on the next run.
OPERATIONS = {
    ("POST", "/generate"): {"positive": 25, "negative": 25, "in-limits": 25},
    ("POST", "/sdapi/v1/txt2img"): {"positive": 25, "negative": 25, "in-limits": 20},
    ("POST", "/upscale"): {"positive": 20, "negative": 20, "in-limits": 20},
    ("POST", "/sdapi/v1/extra-single-image"): {"positive": 20, "negative": 20, "in-limits": 15},
    # A path parameter that is any string has no invalid form: no negative pass.
    ("GET", "/progress/{request_id}"): {"positive": 15, "negative": 0, "in-limits": 0},
    ("GET", "/health"): {"positive": 2, "negative": 0, "in-limits": 0},
    ("GET", "/models"): {"positive": 2, "negative": 0, "in-limits": 0},
    ("POST", "/v1/images/generations"): {"positive": 20, "negative": 20, "in-limits": 15},
    ("GET", "/v1/models"): {"positive": 2, "negative": 0, "in-limits": 0},
    # Multipart: generated files are rarely pictures (400s); tests/test_openai.py sends real ones.
    ("POST", "/v1/images/edits"): {"positive": 10, "negative": 10, "in-limits": 0},
    ("POST", "/v1/images/variations"): {"positive": 8, "negative": 8, "in-limits": 0},
    ("GET", "/v1/images/results/{result_id}"): {"positive": 4, "negative": 0, "in-limits": 0},
    ("GET", "/sdapi/v1/samplers"): {"positive": 1, "negative": 0, "in-limits": 0},
    ("GET", "/sdapi/v1/schedulers"): {"positive": 1, "negative": 0, "in-limits": 0},
    ("GET", "/sdapi/v1/upscalers"): {"positive": 1, "negative": 0, "in-limits": 0},
    ("GET", "/sdapi/v1/sd-models"): {"positive": 1, "negative": 0, "in-limits": 0},
    ("GET", "/sdapi/v1/face-restorers"): {"positive": 1, "negative": 0, "in-limits": 0},
    ("GET", "/sdapi/v1/options"): {"positive": 1, "negative": 0, "in-limits": 0},
    ("POST", "/sdapi/v1/options"): {"positive": 10, "negative": 10, "in-limits": 0},
    ("POST", "/img2img"): {"positive": 20, "negative": 20, "in-limits": 15},
    ("POST", "/sdapi/v1/img2img"): {"positive": 20, "negative": 20, "in-limits": 15},
    ("POST", "/sdapi/v1/png-info"): {"positive": 10, "negative": 10, "in-limits": 5},
    ("GET", "/sdapi/v1/progress"): {"positive": 3, "negative": 3, "in-limits": 0},
    ("POST", "/sdapi/v1/interrupt"): {"positive": 2, "negative": 0, "in-limits": 0},
    ("POST", "/sdapi/v1/skip"): {"positive": 2, "negative": 0, "in-limits": 0},
    ("POST", "/internal/progress"): {"positive": 4, "negative": 4, "in-limits": 0},
    # Jobs: a valid body is queued (202) and runs later, so no in-limits pass (it would load the
    # machine after the test); the synchronous routes' passes reach the stages for them.
    ("POST", "/jobs/generate"): {"positive": 8, "negative": 8, "in-limits": 0},
    ("POST", "/jobs/upscale"): {"positive": 6, "negative": 6, "in-limits": 0},
    ("POST", "/jobs/img2img"): {"positive": 6, "negative": 6, "in-limits": 0},
    ("GET", "/jobs/{job_id}"): {"positive": 4, "negative": 0, "in-limits": 0},
    ("DELETE", "/jobs/{job_id}"): {"positive": 4, "negative": 0, "in-limits": 0},
    ("GET", "/jobs"): {"positive": 2, "negative": 0, "in-limits": 0},
}
PASSES = ("positive", "negative", "in-limits")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SEEN: dict[str, Counter] = {}  # "METHOD path mode" -> status counts, printed at the end


@pytest.fixture(scope="module")
def fuzz_schema(service):
    return schemathesis.openapi.from_url(service.url + PREFIX + "/openapi.json", timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _report():
    t0 = time.perf_counter()
    yield
    lines = [f"  {k}: {dict(sorted(v.items()))}" for k, v in SEEN.items()]
    total = sum(sum(v.values()) for v in SEEN.values())
    print(
        f"\nfuzzed {total} requests in {time.perf_counter() - t0:.1f} s:\n" + "\n".join(lines),
        flush=True,
    )


def test_the_document_lists_exactly_the_fuzzed_routes(service, fuzz_schema):
    """A new route must join OPERATIONS; and the fuzz app documents the same API as the main one."""
    listed = {
        (method.upper(), path)
        for path, item in fuzz_schema.raw_schema["paths"].items()
        for method in item
    }
    assert listed == set(OPERATIONS)
    main = requests.get(service.url + "/openapi.json", timeout=30).json()
    assert main["paths"] == fuzz_schema.raw_schema["paths"]


# Only the passes a route has (no skipped placeholders).
RUNS = [(m, p, f) for (m, p), passes in OPERATIONS.items() for f in PASSES if passes[f]]


@pytest.mark.parametrize("method, path, fuzz_pass", RUNS, ids=[f"{m} {p} {f}" for m, p, f in RUNS])
def test_fuzz_route(service, fuzz_schema, method, path, fuzz_pass):
    examples = OPERATIONS[method, path][fuzz_pass]
    operation = fuzz_schema[path][method]
    mode = GenerationMode.NEGATIVE if fuzz_pass == "negative" else GenerationMode.POSITIVE
    fit = FIT.get(path) if fuzz_pass == "in-limits" else None
    base_url = service.url + PREFIX
    seen = SEEN.setdefault(f"{method} {path} {fuzz_pass}", Counter())
    session = requests.Session()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each step is a real request
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode), image=st.sampled_from(IMAGES))
    def fuzz(case, image):
        if fit is not None and isinstance(case.body, dict):
            case.body = fit(dict(case.body), image)
        response = case.call(base_url=base_url, session=session, timeout=120)
        seen[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            _check_error(case, response)

    fuzz()
    assert sum(seen.values()) > 0
    if fuzz_pass == "in-limits":  # else the pass never reached the stages: it tested nothing
        assert seen[200] >= examples // 3, dict(seen)


# ---------------------------------------------------------------- fitting into the fuzz limits
MAX_SIDE, MAX_STEPS = FUZZ_LIMITS["max_side"], FUZZ_LIMITS["max_steps"]
MAX_OUT = FUZZ_LIMITS["max_output_side"]
A1111_SAMPLERS = {s.a1111 for s in SAMPLERS}


def _small_images() -> list[str]:
    """Real files the upscale routes accept: 8/16-bit, grey, alpha, JPEG, WebP; all under 64 px."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = []
    for im, fmt in (
        (Image.fromarray(rgb), "PNG"),
        (Image.fromarray(np.dstack([rgb, rgb[..., 0]])), "PNG"),
        (Image.fromarray(rgb[..., 0]), "PNG"),
        (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        (Image.fromarray(rgb).resize((1, 1)), "PNG"),
        (Image.fromarray(rgb), "JPEG"),
        (Image.fromarray(rgb), "WEBP"),
    ):
        buf = io.BytesIO()
        im.save(buf, fmt)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


IMAGES = _small_images()


def _side(v, default: int) -> int:
    """Any generated value -> a multiple of 8 in [64, MAX_SIDE]."""
    v = v if isinstance(v, int) and not isinstance(v, bool) else default
    return 64 + (abs(v) // 8 * 8) % (MAX_SIDE - 64 + 8)


def _clamp(v, lo: float, hi: float, default: float) -> float:
    v = v if isinstance(v, (int, float)) and not isinstance(v, bool) else default
    return min(max(v, lo), hi)


def _fit_generate(b: dict, image: str) -> dict:
    b["width"], b["height"] = _side(b.get("width"), 64), _side(b.get("height"), 64)
    b["num_inference_steps"] = int(_clamp(b.get("num_inference_steps"), 1, MAX_STEPS, 2))
    b["hires_steps"] = int(_clamp(b.get("hires_steps"), 0, MAX_STEPS, 0))
    longest = max(b["width"], b["height"])
    b["hires_scale"] = _clamp(b.get("hires_scale"), 1.0, MAX_OUT / longest, 2.0)
    if b.get("hires_width") or b.get("hires_height"):  # one of them, within the output limit
        side = "width" if b.get("hires_width") else "height"
        b.pop("hires_width" if side == "height" else "hires_height", None)
        b[f"hires_{side}"] = b[side] + _side(b[f"hires_{side}"], 64) % (MAX_OUT - longest + 8)
    return b


def _fit_txt2img(b: dict, image: str) -> dict:
    b["width"], b["height"] = _side(b.get("width"), 64), _side(b.get("height"), 64)
    b["steps"] = int(_clamp(b.get("steps"), 1, MAX_STEPS, 2))
    b["hr_second_pass_steps"] = int(_clamp(b.get("hr_second_pass_steps"), 0, MAX_STEPS, 0))
    b["batch_size"], b["n_iter"] = int(_clamp(b.get("batch_size"), 1, 2, 1)), 1
    b["hr_scale"] = _clamp(b.get("hr_scale"), 1.0, MAX_OUT / max(b["width"], b["height"]), 2.0)
    b["hr_resize_x"] = b["hr_resize_y"] = 0
    b["cfg_scale"] = _clamp(b.get("cfg_scale"), 0, 30, 7)
    b["seed"] = int(_clamp(b.get("seed"), -1, SEED_MAX, -1))
    for name in ("sampler_name", "hr_sampler_name"):
        if b.get(name) not in A1111_SAMPLERS:
            b[name] = None
    b["scheduler"] = b["hr_scheduler"] = None
    if not str(b.get("prompt", "")).strip():
        b["prompt"] = "a fuzzed picture"
    return b


def _fit_upscale(b: dict, image: str) -> dict:
    b["image"] = image
    b["scale"] = _clamp(b.get("scale"), 1.0, 8.0, 2.0)  # 32 px * 8 = the 256 px output limit
    return b


def _fit_extras(b: dict, image: str) -> dict:
    b["image"], b["resize_mode"] = image, 0
    b["upscaling_resize"] = _clamp(b.get("upscaling_resize"), 1.0, 8.0, 2.0)
    b["gfpgan_visibility"] = _clamp(b.get("gfpgan_visibility"), 0.0, 1.0, 0.0)
    return b


def _fit_openai(b: dict, image: str) -> dict:
    """Only the fields the route knows (the fuzzer adds others: a 400 each), in the fuzz limits."""
    b = {k: v for k, v in b.items() if k in ImageGenerationRequest.model_fields}
    b["size"] = f"{_side(b.pop('size', None), 64)}x{_side(None, 64)}"
    b["num_inference_steps"] = int(_clamp(b.get("num_inference_steps"), 1, MAX_STEPS, 2))
    b["hires_steps"] = int(_clamp(b.get("hires_steps"), 0, MAX_STEPS, 0))
    b["hires_scale"] = _clamp(b.get("hires_scale"), 1.0, 2.0, 1.5)
    b["n"] = int(_clamp(b.get("n"), 1, 2, 1))
    b["output_compression"] = int(_clamp(b.get("output_compression"), 0, 100, 90))
    b.update(model=None, response_format="b64_json", stream=False, background=None)
    if b.get("output_format") not in ("png", "jpeg", "webp"):
        b["output_format"] = None
    if not str(b.get("prompt", "")).strip():
        b["prompt"] = "a fuzzed picture"
    return b


def _fit_img2img(b: dict, image: str) -> dict:
    """A real small image (and half the time a mask), an output size and steps in the limits."""
    b = _fit_generate(b, image)
    b["image"] = image
    b["mask"] = image if len(str(b.get("prompt", ""))) % 2 else None
    b["strength"] = _clamp(b.get("strength"), 0.001, 1.0, 0.75)
    b["mask_blur"] = int(_clamp(b.get("mask_blur"), 0, 64, 4))
    if not str(b.get("prompt", "")).strip():
        b["prompt"] = "a fuzzed picture"
    return b


def _fit_a1111_img2img(b: dict, image: str) -> dict:
    b = _fit_txt2img(b, image)
    b["init_images"], b["resize_mode"] = [image], int(_clamp(b.get("resize_mode"), 0, 3, 0))
    b["mask"] = image if b.get("mask") else None
    b["denoising_strength"] = _clamp(b.get("denoising_strength"), 0.001, 1.0, 0.75)
    for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
        b[name] = int(_clamp(b.get(name), 0, 64, 4))
    return b


def _fit_png_info(b: dict, image: str) -> dict:
    return {**b, "image": image}


FIT = {
    "/img2img": _fit_img2img,
    "/sdapi/v1/img2img": _fit_a1111_img2img,
    "/sdapi/v1/png-info": _fit_png_info,
    "/v1/images/generations": _fit_openai,
    "/generate": _fit_generate,
    "/sdapi/v1/txt2img": _fit_txt2img,
    "/upscale": _fit_upscale,
    "/sdapi/v1/extra-single-image": _fit_extras,
}


def _check_error(case, response) -> None:
    """Our error shape, naming a field, for every error (the schema check allows an empty list);
    OpenAI's under /v1/, with a message and a type."""
    where = f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code}"
    if case.path.startswith("/v1/"):
        err = OpenAIErrorResponse.model_validate_json(response.content).error
        assert err.message and err.type, f"{where}: {response.text[:500]}"
        return
    body = ErrorResponse.model_validate_json(response.content)
    assert body.detail and all(d.field for d in body.detail), f"{where}: {response.text[:500]}"
    assert body.error, where
