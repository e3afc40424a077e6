"""End to end: the real Ray Serve graph over real HTTP, tiny SDXL, real RealESRGAN weights."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from tests.serve_harness import API_KEYS

pytestmark = pytest.mark.serve

TINY = {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 1234}


def post(service, path, body, timeout=300, headers=None):
    if path.startswith("/nolib/"):  # that app checks API keys
        headers = {"authorization": f"Bearer {API_KEYS[0]}", **(headers or {})}
    return httpx.post(service.url + path, json=body, timeout=timeout, headers=headers)


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def decode_bytes(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def png_b64(arr: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def astronaut(size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC))


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:2000]
    return r.json()


# ---------------------------------------------------------------- health / models / docs
def test_health_reports_models_and_deployments(service):
    h = ok(httpx.get(service.url + "/health", timeout=30))
    assert h["status"] == "ok"
    assert h["realesrgan_available"] is True
    assert h["face_restoration_available"] is True
    assert set(h["deployments"]) == {"SDXLBase", "Upscaler", "RefineFace", "Progress", "Jobs"}
    assert all(d["state"] == "HEALTHY" for d in h["deployments"].values())
    by_name = {m["name"]: m for m in h["models"]}
    assert by_name["realesr-animevideov3"]["available"] is True
    assert by_name["realesr-animevideov3"]["scale"] == 4
    assert by_name["realesr-animevideov3"]["device"] == "cpu"
    assert by_name["missing"]["available"] is False
    assert by_name["missing"]["reason"] == "weights_missing"
    assert by_name["corrupt"]["available"] is False
    assert by_name["gfpgan-random"]["available"] is True
    assert by_name["gfpgan-missing"]["available"] is False


def test_models_lists_configured_upscalers_and_faces(service):
    m = ok(httpx.get(service.url + "/models", timeout=30))
    names = [u["name"] for u in m["upscalers"]]
    assert names[:2] == ["realesr-animevideov3", "missing"]
    assert [u["name"] for u in m["upscalers"] if u["default"]] == ["realesr-animevideov3"]
    assert {f["name"] for f in m["face_models"]} == {"gfpgan-random", "gfpgan-missing"}


def test_openapi_documents_the_schemas(service):
    spec = ok(httpx.get(service.url + "/openapi.json", timeout=30))
    assert {"/generate", "/upscale", "/health", "/models"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {
        "prompt",
        "hires_fix",
        "hires_scale",
        "use_realesrgan",
        "face_restoration_weight",
    } <= set(props)
    assert httpx.get(service.url + "/docs", timeout=30).status_code == 200


# ---------------------------------------------------------------- /generate
def test_generate_without_hires(service):
    r = ok(post(service, "/generate", {"prompt": "a red fox", **TINY}))
    im = decode(r["image"])
    assert im.size == (64, 64) and (r["width"], r["height"]) == (64, 64)
    assert r["seed"] == 1234 and r["upscaler_used"] is None and r["fallback_reason"] is None
    assert {"base", "encode", "total"} <= set(r["timings"])
    assert np.asarray(im).std() > 1  # an actual picture, not a flat fill


def test_generate_random_seed_is_returned_and_reproduces(service):
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 3}
    r1 = ok(post(service, "/generate", body))
    assert isinstance(r1["seed"], int)
    r2 = ok(post(service, "/generate", {**body, "seed": r1["seed"]}))
    assert r2["image"] == r1["image"]


def test_generate_hires_with_realesrgan(service):
    r = ok(
        post(
            service,
            "/generate",
            {"prompt": "a castle", **TINY, "hires_fix": True, "hires_scale": 2.0},
        )
    )
    assert decode(r["image"]).size == (128, 128)
    assert r["upscaler_used"] == "realesr-animevideov3"
    assert r["fallback_reason"] is None
    assert {"base", "upscale", "refine"} <= set(r["timings"])


def test_generate_hires_realesrgan_off_uses_lanczos(service):
    body = {"prompt": "a castle", **TINY, "hires_fix": True, "use_realesrgan": False}
    r = ok(post(service, "/generate", body))
    assert decode(r["image"]).size == (128, 128)
    assert r["upscaler_used"] == "lanczos"
    assert r["fallback_reason"] == "disabled_by_request"


def test_generate_hires_fractional_scale_snaps_to_8(service):
    body = {
        "prompt": "a boat",
        **TINY,
        "width": 64,
        "height": 96,
        "hires_fix": True,
        "hires_scale": 1.5,
    }
    r = ok(post(service, "/generate", body))
    assert decode(r["image"]).size == (96, 144)


def test_generate_hires_resize_to_width(service):
    """A1111's "Resize width to": the height follows the base's aspect ratio, through the
    upscaler."""
    body = {
        "prompt": "a boat",
        **TINY,
        "width": 64,
        "height": 96,
        "hires_fix": True,
        "hires_width": 112,
    }
    r = ok(post(service, "/generate", body))
    assert decode(r["image"]).size == (112, 168) and r["upscaler_used"] == "realesr-animevideov3"


def test_generate_ensemble_of_experts_then_hires(service):
    # base -> RefineFace.finish (from the switch point) -> Upscaler -> RefineFace.hires
    body = {
        "prompt": "a harbour",
        **TINY,
        "num_inference_steps": 6,
        "refiner_switch_at": 0.5,
        "hires_fix": True,
        "scheduler": "euler",
    }
    r = ok(post(service, "/generate", body))
    assert decode(r["image"]).size == (128, 128) and r["upscaler_used"] == "realesr-animevideov3"
    # The refine model here is the base weights, so handing over at 0.5 across two replicas must
    # continue exactly where the base stopped: bit-identical to one uninterrupted run (for a
    # single-step sampler; multistep ones restart their history at the handover).
    plain = ok(post(service, "/generate", {**body, "refiner_switch_at": None}))
    # Pixels, not bytes: each PNG's `parameters` text chunk names its own refiner_switch_at.
    assert np.array_equal(np.asarray(decode(r["image"])), np.asarray(decode(plain["image"])))


def test_generate_num_images_and_formats(service):
    r = ok(
        post(
            service,
            "/generate",
            {"prompt": "tulips", **TINY, "num_images": 2, "output_format": "jpeg"},
        )
    )
    assert r["seeds"] == [1234, 1235] and len(r["images"]) == 2
    assert r["images"][0] != r["images"][1]
    assert decode(r["images"][1]).format == "JPEG"


def together(service, bodies: list[dict]) -> list[dict]:
    """POST every body to /generate at once (one thread each); the 200 answers, in order."""
    out: list = [None] * len(bodies)

    def go(i):
        out[i] = post(service, "/generate", bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return [ok(r) for r in out]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), dtype=np.int16)


# Batched rows may differ from the same request alone by this much per 8-bit channel (CPU: 1;
# serve_config.yaml documents it); alone, a request's pictures are bit for bit the same.
BATCHED_TOLERANCE = 2


def test_concurrent_identical_requests_get_the_same_pictures(service):
    body = {"prompt": "two cats", **TINY, "seed": 77, "hires_fix": True}
    a, b = together(service, [body, body])
    shared = a["batched_with"].get("base", 1) > 1 or a["batched_with"].get("refine", 1) > 1
    if not shared:
        assert a["image"] == b["image"]
    diff = np.abs(pixels(a["image"]) - pixels(b["image"])).max()
    assert diff <= BATCHED_TOLERANCE, (diff, a["batched_with"])


def test_compatible_requests_sent_together_share_the_sdxl_calls(service):
    """The test config batches up to 2 compatible requests per SDXL call (50 ms window): two sent
    at once share the base call (and usually the hires call), each keeps its own prompt's and
    seed's pictures, and the answer says who shared."""
    first = {"prompt": "two cats", **TINY, "seed": 77, "hires_fix": True}
    second = {**first, "prompt": "a red house", "seed": 5, "num_images": 2}
    alone = [ok(post(service, "/generate", body)) for body in (first, second)]
    for a in alone:
        assert a["batched_with"] == {"base": 1, "refine": 1}, a["batched_with"]
    for _attempt in range(4):  # arrival within the window depends on this box's load
        out = together(service, [first, second])
        if out[0]["batched_with"]["base"] == 2:
            break
    assert [o["batched_with"]["base"] for o in out] == [2, 2], [o["batched_with"] for o in out]
    for o, a in zip(out, alone):
        assert o["seeds"] == a["seeds"] and len(o["images"]) == len(a["images"])
        for mine, theirs in zip(o["images"], a["images"]):
            diff = np.abs(pixels(mine) - pixels(theirs)).max()
            assert diff <= BATCHED_TOLERANCE, (diff, o["batched_with"])
    assert pixels(out[0]["image"]).tolist() != pixels(out[1]["image"]).tolist()


def test_upscale_bits_do_not_depend_on_concurrent_requests(service):
    # Concurrent requests share forward passes (@serve.batch); a request's pixels must not change.
    a = {"image": png_b64(astronaut(64)), "scale": 2}
    alone = ok(post(service, "/upscale", a))["image"]
    others = [
        {"image": png_b64(np.asarray(Image.fromarray(data.coffee()).resize((s, s)))), "scale": 2}
        for s in (48, 64, 80)
    ]
    for _ in range(3):
        out = {}
        threads = [
            threading.Thread(
                target=lambda i=i, b=b, out=out: out.__setitem__(i, post(service, "/upscale", b))
            )
            for i, b in enumerate([a, *others])
        ]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert ok(out[0])["image"] == alone


# ---------------------------------------------------------------- progress
def test_progress_follows_a_generate_request(service):
    """GET /progress/{X-Request-ID} while /generate runs: stage, step, growing fraction, ETA; then
    done. A second request with the same id while the first runs is refused (409)."""
    rid = f"test-progress-{time.time_ns()}"
    body = {
        "prompt": "a lighthouse",
        "width": 256,
        "height": 256,
        "num_inference_steps": 30,
        "seed": 7,
        "hires_fix": True,
        "hires_steps": 8,
        "previews": 3,
    }
    out = {}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "r",
            httpx.post(
                service.url + "/generate", json=body, headers={"x-request-id": rid}, timeout=300
            ),
        )
    )
    t.start()
    seen, clash = [], None
    deadline = time.time() + 240
    while t.is_alive() and time.time() < deadline:
        r = httpx.get(f"{service.url}/progress/{rid}", timeout=30)
        if r.status_code == 200:
            seen.append(r.json())
            if clash is None and seen[-1]["stage"] is not None:
                clash = httpx.post(
                    service.url + "/generate",
                    json={"prompt": "x", **TINY},
                    headers={"x-request-id": rid},
                    timeout=60,
                )
        time.sleep(0.05)
    t.join()
    assert ok(out["r"])["request_id"] == rid
    running = [s for s in seen if s["state"] == "running" and s["stage"] is not None]
    assert running, seen[:3]
    assert running[0]["plan"] == {"base": 30, "upscale": 1, "hires": 8}
    fractions = [s["progress"] for s in running]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 1
    assert any(s["stage"] == "base" and 0 < s["step"] < 30 for s in running), (
        "seen mid-run, not only at the end"
    )
    assert any(s["eta_s"] is not None and s["eta_s"] > 0 for s in running)
    assert clash is not None and clash.status_code == 409
    assert clash.json()["detail"][0]["field"] == "x-request-id"
    for _ in range(100):  # the end is recorded fire-and-forget: it lands within moments
        final = ok(httpx.get(f"{service.url}/progress/{rid}", timeout=30))
        if final["state"] != "running":
            break
        time.sleep(0.05)
    assert final["state"] == "done" and final["progress"] == 1.0 and final["eta_s"] is None
    # Three previews of the base pass (steps 8, 15, 22 of 30), kept a while after the end.
    assert final["previews"] == 3 and final["preview"] is None
    shown = ok(httpx.get(f"{service.url}/progress/{rid}?preview=true", timeout=30))
    im = Image.open(io.BytesIO(base64.b64decode(shown["preview"])))
    assert (im.format, im.size) == ("PNG", (256 // 8, 256 // 8))
    assert any(s["previews"] for s in running), "previews appear while the request runs"


def test_progress_without_a_client_id_and_for_unknown_ids(service):
    r = ok(post(service, "/generate", {"prompt": "a kite", **TINY}))
    assert r["request_id"]  # assigned by the server (Serve's own request id)
    for _ in range(100):
        p = ok(httpx.get(f"{service.url}/progress/{r['request_id']}", timeout=30))
        if p["state"] == "done":
            break
        time.sleep(0.05)
    assert p["state"] == "done" and p["plan"] == {"base": 4}
    missing = httpx.get(f"{service.url}/progress/no-such-request", timeout=30)
    assert missing.status_code == 404 and "X-Request-ID" in missing.json()["detail"][0]["message"]
    bad = httpx.post(
        service.url + "/generate",
        json={"prompt": "x", **TINY},
        headers={"x-request-id": "spaces are not allowed"},
        timeout=60,
    )
    assert bad.status_code == 400 and bad.json()["detail"][0]["field"] == "x-request-id"


# ---------------------------------------------------------------- /upscale and the five fallbacks
def test_upscale_with_real_model(service):
    src = astronaut(64)
    r = ok(post(service, "/upscale", {"image": png_b64(src), "scale": 2}))
    im = decode(r["image"])
    assert im.size == (128, 128) and r["upscaler_used"] == "realesr-animevideov3"
    assert r["fallback_reason"] is None
    # Colour fidelity through the service: channel means within a few levels of the source.
    assert np.abs(np.asarray(im.convert("RGB"), float).mean((0, 1)) - src.mean((0, 1))).max() < 6


def test_upscale_fractional_scale_exact_size(service):
    r = ok(post(service, "/upscale", {"image": png_b64(astronaut(40)), "scale": 1.5}))
    assert decode(r["image"]).size == (60, 60)


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"use_realesrgan": False}, "disabled_by_request"),
        ({"upscaler": "missing"}, "weights_missing"),
        ({"upscaler": "corrupt"}, "error"),
        ({"upscaler": "chaos-oom"}, "out_of_memory"),
        ({"upscaler": "chaos-error"}, "error"),
    ],
)
def test_upscale_fallbacks_are_reported_and_service_survives(service, body, reason):
    src = astronaut(48)
    r = ok(post(service, "/upscale", {"image": png_b64(src), "scale": 2, **body}))
    im = decode(r["image"])
    assert im.size == (96, 96)
    assert r["upscaler_used"] == "lanczos"
    assert r["fallback_reason"] == reason
    assert r["fallback_detail"]
    # The fallback really is LANCZOS.
    want = np.asarray(Image.fromarray(src).resize((96, 96), Image.LANCZOS), float)
    assert np.abs(np.asarray(im.convert("RGB"), float) - want).mean() < 2.0
    assert ok(httpx.get(service.url + "/health", timeout=30))["status"] == "ok"


def test_a_front_door_uses_the_main_apps_stages(service):
    """The "fuzz" app (`stages_from: hiresfix`) has no model replica of its own: its requests run
    on the main app's stages and report to its board, with the door's own limits and the models
    it offers."""
    import ray

    ray.init(address=service.gcs_address(), namespace="serve", log_to_driver=False)
    try:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    finally:
        ray.shutdown()
    fuzz = {n.split("#")[1] for n in names if n.startswith("SERVE_REPLICA::fuzz#")}
    assert fuzz == {"Ingress", "Jobs"}, names
    h = ok(httpx.get(service.url + "/fuzz/health", timeout=30))
    assert h["status"] == "ok" and h["realesrgan_available"] and h["face_restoration_available"]
    assert h["deployments"]["SDXLBase"]["running_replicas"] == 1, h["deployments"]
    offered = ok(httpx.get(service.url + "/fuzz/models", timeout=30))
    assert [m["name"] for m in offered["upscalers"]] == ["realesr-animevideov3"]
    assert [m["name"] for m in offered["face_models"]] == ["gfpgan-random"]
    rid = f"front-door-{time.time_ns()}"
    body = {"prompt": "a fox", **TINY, "hires_fix": True, "use_face_restoration": True}
    r = ok(post(service, "/fuzz/generate", body, headers={"x-request-id": rid}))
    assert (r["upscaler_used"], r["width"]) == ("realesr-animevideov3", 128), r
    assert ok(httpx.get(f"{service.url}/progress/{rid}", timeout=30))["state"] == "done"
    # The main app configures this upscaler; the door does not offer it.
    bad = post(service, "/fuzz/generate", {**body, "upscaler": "chaos-error"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "upscaler", bad.text
    big = post(service, "/fuzz/generate", {**body, "width": 256})  # its own limits: 128 px
    assert big.status_code == 422 and big.json()["detail"][0]["field"] == "width", big.text


def test_library_missing_falls_back_and_health_says_so(service):
    # The "nolib" app's upscaler replica runs on an interpreter where spandrel is not installed.
    h = ok(httpx.get(service.url + "/nolib/health", timeout=30))
    assert h["status"] == "ok" and h["realesrgan_available"] is False
    reasons = {m["name"]: m["reason"] for m in h["models"] if m["kind"] == "upscaler"}
    assert (
        reasons["realesr-animevideov3"] == "not_installed"
        and reasons["missing"] == "weights_missing"
    )
    r = ok(post(service, "/nolib/upscale", {"image": png_b64(astronaut(48)), "scale": 2}))
    assert (r["upscaler_used"], r["fallback_reason"]) == ("lanczos", "not_installed")
    assert "spandrel" in r["fallback_detail"] and decode(r["image"]).size == (96, 96)
    g = ok(post(service, "/nolib/generate", {"prompt": "a fox", **TINY, "hires_fix": True}))
    assert (g["upscaler_used"], g["fallback_reason"], g["width"]) == (
        "lanczos",
        "not_installed",
        128,
    )


def test_upscale_oom_retries_with_smaller_tiles_before_falling_back(service):
    # Tiles above min_tile "run out of memory": halving recovers, so the neural model still serves.
    r = ok(
        post(
            service,
            "/upscale",
            {"image": png_b64(astronaut(96)), "scale": 2, "upscaler": "chaos-oom-recovers"},
        )
    )
    assert (r["upscaler_used"], r["fallback_reason"]) == ("chaos-oom-recovers", None)
    assert decode(r["image"]).size == (192, 192)


def test_hires_fallback_reported_on_generate(service):
    body = {"prompt": "a castle", **TINY, "hires_fix": True, "upscaler": "missing"}
    r = ok(post(service, "/generate", body))
    assert decode(r["image"]).size == (128, 128)
    assert (r["upscaler_used"], r["fallback_reason"]) == ("lanczos", "weights_missing")


def test_upscale_keeps_alpha(service):
    rgba = np.dstack([astronaut(32), np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))])
    r = ok(post(service, "/upscale", {"image": png_b64(rgba), "scale": 2}))
    im = decode(r["image"])
    assert im.mode == "RGBA" and im.size == (64, 64)
    a = np.asarray(im)[..., 3].astype(float)
    assert a[:, :4].mean() < 30 and a[:, -4:].mean() > 225


# ---------------------------------------------------------------- AUTOMATIC1111 API
def test_a1111_txt2img_with_hires_fix(service):
    """An A1111 client's request, unchanged: images, parameters and info as A1111 answers them."""
    body = {
        "prompt": "a castle",
        "negative_prompt": "",
        "seed": 1234,
        "sampler_name": "Euler",
        "steps": 4,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "batch_size": 2,
        "n_iter": 1,
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "R-ESRGAN AnimeVideo",
        "denoising_strength": 0.5,
        "send_images": True,
        "save_images": False,
        "styles": ["cinematic"],
    }
    r = ok(post(service, "/sdapi/v1/txt2img", body))
    assert len(r["images"]) == 2 and all(decode(b).size == (128, 128) for b in r["images"])
    assert r["parameters"]["hr_upscaler"] == "R-ESRGAN AnimeVideo"
    info = json.loads(r["info"])
    assert info["all_seeds"] == [1234, 1235] and info["upscaler_used"] == "realesr-animevideov3"
    assert info["ignored"] == ["styles: not supported, ignored"]
    # The same picture our own API makes from the same parameters: one pipeline behind both.
    ours = ok(
        post(
            service,
            "/generate",
            {
                "prompt": "a castle",
                **TINY,
                "num_images": 2,
                "hires_fix": True,
                "scheduler": "euler",
                "guidance_scale": 7,
                "denoising_strength": 0.5,
                "upscaler": "realesr-animevideov3",
            },
        )
    )
    assert ours["images"][0] == r["images"][0]
    bad = post(service, "/sdapi/v1/txt2img", {**body, "sampler_name": "LMS"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "sampler_name"


def test_a1111_extra_single_image(service):
    src = png_b64(astronaut(48))
    r = ok(
        post(
            service,
            "/sdapi/v1/extra-single-image",
            {
                "image": src,
                "upscaling_resize": 2,
                "upscaler_1": "R-ESRGAN AnimeVideo",
                "resize_mode": 0,
            },
        )
    )
    assert decode(r["image"]).size == (96, 96) and "realesr-animevideov3" in r["html_info"]
    assert r["image"] == ok(post(service, "/upscale", {"image": src, "scale": 2}))["image"]
    assert json.loads(r["info"])["upscaler_used"] == "realesr-animevideov3"
    big = post(
        service,
        "/sdapi/v1/extra-single-image",
        {"image": png_b64(astronaut(512)), "upscaling_resize": 8},
    )
    assert big.status_code == 422 and big.json()["detail"][0]["field"] == "upscaling_resize"


# ---------------------------------------------------------------- image/* answers
def test_upscale_answers_with_the_file_when_asked(service):
    """Accept: image/png: the PNG itself, the same bytes the JSON answer carries in base64, with
    the fallback and timings in headers."""
    body = {"image": png_b64(astronaut(48)), "scale": 2}
    as_json = ok(post(service, "/upscale", body))
    r = httpx.post(
        service.url + "/upscale", json=body, headers={"accept": "image/png"}, timeout=300
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == base64.b64decode(as_json["image"])
    assert (
        r.headers["x-upscaler-used"] == "realesr-animevideov3"
        and "x-fallback-reason" not in r.headers
    )
    meta = json.loads(r.headers["x-hiresfix-meta"])
    assert (
        meta["width"] == 96
        and meta["upscaler_used"] == "realesr-animevideov3"
        and "upscale" in meta["timings"]
    )
    off = httpx.post(
        service.url + "/upscale",
        json={**body, "use_realesrgan": False},
        headers={"accept": "image/webp, application/json;q=0.5"},
        timeout=300,
    )
    assert (
        off.headers["content-type"] == "image/webp" and decode_bytes(off.content).format == "WEBP"
    )
    assert off.headers["x-fallback-reason"] == "disabled_by_request"


def test_generate_answers_with_the_file_when_asked(service):
    r = httpx.post(
        service.url + "/generate",
        json={"prompt": "a fox", **TINY, "output_format": "jpeg"},
        headers={"accept": "image/*"},
        timeout=300,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert decode_bytes(r.content).size == (64, 64) and r.headers["x-seed"] == "1234"
    many = httpx.post(
        service.url + "/generate",
        json={"prompt": "a fox", **TINY, "num_images": 2},
        headers={"accept": "image/png"},
        timeout=300,
    )
    assert many.status_code == 406 and many.json()["detail"][0]["field"] == "num_images"


# ---------------------------------------------------------------- faces
def test_face_restoration_on_upscale(service):
    src = np.asarray(data.astronaut())
    body = {
        "image": png_b64(src),
        "scale": 1.0,
        "use_realesrgan": False,
        "use_face_restoration": True,
        "face_restoration_weight": 0.5,
    }
    r = ok(post(service, "/upscale", body, timeout=600))
    fr = r["face_restoration"]
    assert fr["applied"] is True and fr["faces_found"] >= 1 and fr["model"] == "gfpgan-random"
    out = np.asarray(decode(r["image"]).convert("RGB"))
    assert out.shape == src.shape
    assert not np.array_equal(out, src)
    # Far from the face (bottom-right corner) nothing changed.
    assert np.array_equal(out[400:, 400:], src[400:, 400:])


def test_face_model_missing_degrades(service):
    src = astronaut(256)
    body = {
        "image": png_b64(src),
        "scale": 1.0,
        "use_realesrgan": False,
        "use_face_restoration": True,
        "face_model": "gfpgan-missing",
    }
    r = ok(post(service, "/upscale", body))
    fr = r["face_restoration"]
    assert fr["applied"] is False and fr["reason"]
    assert np.array_equal(np.asarray(decode(r["image"]).convert("RGB")), src)


# ---------------------------------------------------------------- bad input: 4xx naming the field
@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "hires_fixx": True}, "hires_fixx"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "width": 100}, "width"),
        ({"prompt": "x", "width": "wide"}, "width"),
        ({"prompt": "x", "height": 4096}, "height"),
        (
            {"prompt": "x", "width": 1024, "height": 1024, "hires_fix": True, "hires_scale": 4},
            "hires_scale",
        ),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 60}, "num_inference_steps"),  # profile limit 50
        ({"prompt": "x", "width": 1536}, "width"),  # profile limit 1024
        ({"prompt": "x", "hires_scale": 9}, "hires_scale"),
        (
            {"prompt": "x", "hires_fix": True, "hires_width": 4096},
            "hires_width",
        ),  # profile output limit
        (
            {"prompt": "x", "hires_fix": True, "hires_width": 1024, "hires_height": 2048},
            "hires_height",
        ),  # aspect
        ({"prompt": "x", "hires_scheduler": "magic"}, "hires_scheduler"),
        ({"prompt": "x", "denoising_strength": 0}, "denoising_strength"),
        ({"prompt": "x", "hires_fix": True, "denoising_strength": 0.0005}, "denoising_strength"),
        ({"prompt": "x", "face_restoration_weight": 1.5}, "face_restoration_weight"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "scheduler": "magic"}, "scheduler"),
        ({"prompt": "x", "upscaler": "../../etc/passwd"}, "upscaler"),
        ({"prompt": "x", "face_model": "nope"}, "face_model"),
    ],
)
def test_generate_bad_input_is_4xx_naming_the_field(service, body, field):
    r = post(service, "/generate", body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()
    assert any(d["field"].split(".")[0] == field for d in err["detail"]), err
    assert field in err["error"] or field == "body"


def _bomb_png(w: int, h: int) -> str:
    """A tiny file that claims to be w x h: the header says huge, the payload is a few bytes."""
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    "image, status",
    [
        ("not base64 at all!!", 400),
        (base64.b64encode(b"GIF89a garbage bytes").decode(), 400),
        (base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode(), 400),
        ("bomb", 413),
    ],
)
def test_upscale_bad_images(service, image, status):
    if image == "bomb":
        image = _bomb_png(5000, 5000)
        assert len(image) < 200_000
    r = post(service, "/upscale", {"image": image, "scale": 2}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["detail"][0]["field"] == "image"


def test_oversized_bodies_are_413_before_parsing(service):
    """The test profile takes images up to 4 MiB: a 9 MB body is refused from its Content-Length,
    and a too-long base64 string in a body under that is refused before it is decoded."""
    big = '{"image": "' + "A" * 9_000_000 + '", "scale": 2}'
    r = httpx.post(
        service.url + "/upscale",
        content=big,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body", r.text[:300]
    r = post(service, "/upscale", {"image": "A" * 5_800_000, "scale": 2}, timeout=60)
    assert r.status_code == 413 and r.json()["detail"][0]["field"] == "image", r.text[:300]
    assert ok(httpx.get(service.url + "/health", timeout=30))["status"] == "ok"


def test_upscale_output_too_large_is_rejected(service):
    r = post(service, "/upscale", {"image": png_b64(astronaut(512)), "scale": 8}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "scale"


def test_replicas_survive_bad_input(service):
    h = ok(httpx.get(service.url + "/health", timeout=30))
    assert h["status"] == "ok" and all(d["state"] == "HEALTHY" for d in h["deployments"].values())


def test_health_answers_fast_while_stages_are_busy_and_cancel_stops_work(service):
    slow = {
        "prompt": "a busy street",
        "width": 384,
        "height": 384,
        "num_inference_steps": 50,
        "seed": 9,
    }
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: Serve cancels the request
        post(service, "/generate", slow, timeout=3)
    t0 = time.perf_counter()
    h = ok(httpx.get(service.url + "/health", timeout=30))
    assert time.perf_counter() - t0 < 3 and h["status"] == "ok"
    # The cancelled generation's thread stopped at its next denoising step instead of running on.
    deadline = time.time() + 30
    while "generate cancelled by the client or its timeout" not in service.log_tail(200_000):
        assert time.time() < deadline, service.log_tail()
        time.sleep(0.5)
    assert ok(post(service, "/generate", {"prompt": "after", **TINY}))["width"] == 64


# ---------------------------------------------------------------- CLI against the live server
def test_cli_generate_and_upscale(service, tmp_path):
    cli = [sys.executable, "-m", "hiresfix.cli"]
    out = tmp_path / "gen.png"
    p = subprocess.run(
        [
            *cli,
            "generate",
            "a tiny robot",
            "--url",
            service.url,
            "-o",
            str(out),
            "--width",
            "64",
            "--height",
            "64",
            "--num-inference-steps",
            "3",
            "--seed",
            "5",
            "--hires-fix",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert Image.open(out).size == (128, 128)
    assert '"upscaler_used": "realesr-animevideov3"' in p.stdout
    up = tmp_path / "up.webp"
    p = subprocess.run(
        [
            *cli,
            "upscale",
            str(out),
            "--url",
            service.url,
            "-o",
            str(up),
            "--scale",
            "1.5",
            "--no-use-realesrgan",
            "--output-format",
            "webp",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert Image.open(up).size == (192, 192) and Image.open(up).format == "WEBP"
    p = subprocess.run(
        [*cli, "generate", "x", "--url", service.url, "--width", "100"],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "width" in p.stderr and "multiple of 8" in p.stderr


def test_cli_shows_progress_on_a_terminal(service, tmp_path):
    """On a terminal, `hiresfix generate` follows its own request at GET /progress while it
    waits."""
    import os
    import pty

    out = tmp_path / "p.png"
    parent, child = pty.openpty()  # stderr is a terminal; stdout a pipe
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hiresfix.cli",
            "generate",
            "a harbour",
            "--url",
            service.url,
            "-o",
            str(out),
            "--width",
            "256",
            "--height",
            "256",
            "--num-inference-steps",
            "50",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=child,
        text=True,
    )
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=300)
    os.close(parent)
    assert proc.returncode == 0 and Image.open(out).size == (256, 256)
    lines = seen.decode(errors="replace")
    assert re.search(r"base \d+/50 \| +\d+% \| [\d.]+ s", lines), lines[-500:]


def test_cli_compare_writes_a_labelled_sheet(service, tmp_path):
    src = tmp_path / "src.png"
    Image.fromarray(astronaut(64)).save(src)
    out = tmp_path / "compare.png"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hiresfix.cli",
            "compare",
            "--url",
            service.url,
            "--input",
            str(src),
            "--upscaler",
            "realesr-animevideov3",
            "--upscaler",
            "missing",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    sheet = Image.open(out)
    # Original + three results (LANCZOS, the model, the fallback) side by side, and a zoom row.
    assert sheet.width >= 4 * 128 and sheet.height > 128
