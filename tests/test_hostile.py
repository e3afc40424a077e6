"""Hand-written hostile requests the OpenAPI fuzzer (tests/test_fuzz.py) will not make, against the
real service (main app, test limits: 1024 px, 4 MiB images, 1024x1024 input pixels).

Each is answered with a 4xx in our error shape naming the field to change, or with a 200 where the
input is legitimately acceptable; the service stays healthy after all of them.

Already covered in tests/test_service.py and not repeated here: junk/non-base64/header-only images
and the 5000x5000 bomb (test_upscale_bad_images), a 9 MB body and a too-long base64 string
(test_oversized_bodies_are_413_before_parsing), malformed fields (test_generate_bad_input_is_4xx_
naming_the_field); in tests/test_guard.py: API keys, per-key 429, admission 503.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from hiresfix.schemas import ErrorResponse
from tests.serve_harness import FUZZ_BODY_TIMEOUT_S

pytestmark = pytest.mark.serve

TINY = {"width": 64, "height": 64, "num_inference_steps": 1, "seed": 7}
JSON = {"content-type": "application/json"}


# ---------------------------------------------------------------- helpers
def post(service, path, body=None, *, content=None, headers=None, timeout=120):
    if content is None:
        content, headers = json.dumps(body).encode(), {**JSON, **(headers or {})}
    return httpx.post(service.url + path, content=content, headers=headers, timeout=timeout)


def refused(r: httpx.Response, status: int, field: str) -> ErrorResponse:
    """Our error shape, this status, naming this field (and the field in the summary)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = ErrorResponse.model_validate_json(r.content)
    assert [d.field for d in err.detail][:1] == [field] or any(
        d.field.split(".")[0] == field for d in err.detail
    ), err
    return err


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:1000]
    return r.json()


def healthy(service) -> None:
    h = ok(httpx.get(service.url + "/health", timeout=30))
    assert h["status"] == "ok", h


def astronaut(size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png_16bit(arr: np.ndarray) -> bytes:
    import cv2

    ok_, buf = cv2.imencode(".png", (arr.astype(np.uint16) * 257)[..., ::-1])
    assert ok_
    return buf.tobytes()


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height and whose IDAT holds one compressed row: 100 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def upscale(service, image: str, scale: float = 2, timeout=120) -> httpx.Response:
    return post(service, "/upscale", {"image": image, "scale": scale}, timeout=timeout)


# ---------------------------------------------------------------- hostile images
@pytest.mark.parametrize(
    "kind",
    ["png", "png-16bit", "jpeg", "webp"],
)
def test_truncated_files_are_400_naming_image(service, kind):
    """A real file cut in half: the header reads fine, the pixels do not."""
    src = astronaut(64)
    raw = {
        "png": lambda: encode(Image.fromarray(src), "PNG"),
        "png-16bit": lambda: png_16bit(src),
        "jpeg": lambda: encode(Image.fromarray(src), "JPEG", quality=90),
        "webp": lambda: encode(Image.fromarray(src), "WEBP", quality=90),
    }[kind]()
    err = refused(upscale(service, b64(raw[: len(raw) // 2])), 400, "image")
    assert "Traceback" not in err.error and "Error" not in err.detail[0].message


@pytest.mark.parametrize(
    "bit_depth, colour_type",
    [(8, 2), (16, 2), (16, 6), (1, 0)],
    ids=["rgb8", "rgb16", "rgba16", "1bit"],
)
def test_png_declaring_100k_by_100k_is_413_at_once(service, bit_depth, colour_type):
    """10^10 pixels declared in a ~100-byte file: refused from the header, nothing allocated."""
    raw = png_header_only(100_000, 100_000, bit_depth, colour_type)
    assert len(raw) < 200
    t0 = time.perf_counter()
    r = upscale(service, b64(raw))
    assert time.perf_counter() - t0 < 10
    refused(r, 413, "image")


def test_png_declaring_one_row_of_2_billion_pixels_is_413(service):
    refused(upscale(service, b64(png_header_only(2**31 - 1, 1))), 413, "image")


def test_16bit_tiff_is_400_naming_image(service):
    """TIFF is not one of the accepted formats (PNG, JPEG, WebP): say so, whatever its depth."""
    im = Image.fromarray(astronaut(32)[..., 0].astype(np.uint16) * 257)
    raw = encode(im, "TIFF")
    assert raw[:2] in (b"II", b"MM")
    err = refused(upscale(service, b64(raw)), 400, "image")
    assert "TIFF" in err.detail[0].message


def test_animated_gif_is_400_naming_image(service):
    frames = [Image.fromarray(astronaut(32)), Image.fromarray(255 - astronaut(32))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    err = refused(upscale(service, b64(buf.getvalue())), 400, "image")
    assert "GIF" in err.detail[0].message


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"], ids=["animated-webp", "apng"])
def test_animated_webp_and_apng_upscale_their_first_frame(service, fmt):
    """WebP and PNG are accepted formats; an animated one is answered with its first frame,
    upscaled (a still image, never a crash or a stack of frames)."""
    first, second = astronaut(32), 255 - astronaut(32)
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(first).save(
        buf, fmt, save_all=True, append_images=[Image.fromarray(second)], duration=100, **extra
    )
    with Image.open(io.BytesIO(buf.getvalue())) as probe:
        assert getattr(probe, "n_frames", 1) == 2  # really animated
    r = ok(upscale(service, b64(buf.getvalue()), scale=1))
    out = Image.open(io.BytesIO(base64.b64decode(r["image"])))
    assert out.size == (32, 32) and getattr(out, "n_frames", 1) == 1
    got = np.asarray(out.convert("RGB"), float)
    assert np.abs(got - first).mean() < np.abs(got - second).mean()


def test_cmyk_jpeg_is_accepted_and_keeps_its_colours(service):
    """Print-workflow JPEGs are CMYK: converted to RGB, colours kept (a red patch stays red)."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (220, 20, 20)
    rgb[:, 16:] = (20, 20, 220)
    raw = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"
    r = ok(upscale(service, b64(raw), scale=1))
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB"), float)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[4:-4, 2:12].mean((0, 1)) - (220, 20, 20)).max() < 25
    assert np.abs(out[4:-4, 20:30].mean((0, 1)) - (20, 20, 220)).max() < 25


@pytest.mark.parametrize(
    "wrap",
    ["mime-76-crlf", "spaces-and-tabs", "data-url", "data-url-wrapped", "a1111-extras"],
)
def test_base64_with_whitespace_and_data_url_is_accepted(service, wrap):
    raw = encode(Image.fromarray(astronaut(24)), "PNG")
    s = b64(raw)
    image = {
        "mime-76-crlf": "\r\n".join(s[i : i + 76] for i in range(0, len(s), 76)) + "\r\n",
        "spaces-and-tabs": " \t" + " ".join(s[i : i + 10] for i in range(0, len(s), 10)) + "\n",
        "data-url": "data:image/png;base64," + s,
        "data-url-wrapped": "data:image/png;base64,"
        + "\n".join(s[i : i + 64] for i in range(0, len(s), 64)),
        "a1111-extras": "data:image/png;base64," + s,
    }[wrap]
    if wrap == "a1111-extras":
        r = ok(
            post(service, "/sdapi/v1/extra-single-image", {"image": image, "upscaling_resize": 1})
        )
    else:
        r = ok(upscale(service, image, scale=1))
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB"))
    assert np.array_equal(out, astronaut(24))  # scale 1: the very pixels


def test_url_safe_base64_is_400_naming_image(service):
    """'-' and '_' are not standard base64: refused, not silently mis-decoded."""
    raw = encode(Image.fromarray(astronaut(24)), "PNG")
    s = base64.urlsafe_b64encode(raw).decode()
    assert "-" in s or "_" in s
    refused(upscale(service, s), 400, "image")


# ---------------------------------------------------------------- hostile JSON
def _raw_exchange(service, head: bytes, body_part: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send the head and part of a body, then read what the server answers within wait_s."""
    u = urlsplit(service.url)
    with socket.create_connection((u.hostname, u.port), timeout=wait_s) as s:
        t0 = time.perf_counter()
        s.sendall(head + body_part)
        got = b""
        try:
            while b"\r\n\r\n" not in got or len(got) < got.find(b"\r\n\r\n") + 4 + _length(got):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        return got, time.perf_counter() - t0


def _length(resp: bytes) -> int:
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _status_and_body(resp: bytes) -> tuple[int, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_50mb_json_body_is_413_before_it_is_sent(service):
    """Content-Length says 50 MB: the answer comes from the headers, before the body is sent."""
    length = 50 * 1024 * 1024
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    resp, took = _raw_exchange(service, head, b'{"prompt": "' + b"a" * 1000, wait_s=20)
    assert resp, "no answer within 20 s to a 50 MB Content-Length with 1 KB sent"
    status, body = _status_and_body(resp)
    assert status == 413 and took < 10, (status, took, resp[:500])
    assert ErrorResponse.model_validate_json(body).detail[0].field == "body"


def test_50mb_json_body_sent_whole_is_413(service):
    big = b'{"prompt": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    t0 = time.perf_counter()
    try:
        r = post(service, "/generate", content=big, headers=JSON, timeout=60)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        # Answering early and closing is fair: the server need not drain 50 MB it refused.
        pass
    else:
        refused(r, 413, "body")
    assert time.perf_counter() - t0 < 30
    healthy(service)


def test_50mb_chunked_json_body_without_length_is_413(service):
    """No Content-Length (chunked): the body-size limit must still hold, not read it all."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    t0 = time.perf_counter()
    try:
        r = httpx.post(service.url + "/generate", content=chunks(), headers=JSON, timeout=60)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass
    else:
        refused(r, 413, "body")
    assert time.perf_counter() - t0 < 30
    healthy(service)


@pytest.mark.parametrize(
    "content, field",
    [
        (b'{"prompt": "x",', "body"),  # truncated JSON
        (b"[" * 100_000 + b"]" * 100_000, "body"),  # nesting deeper than any parser's stack
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "body"),  # beyond int() digit limit
        (b'{"prompt": "\xff\xfe"}', "body"),  # not UTF-8
        (b"null", "body"),
        (b"[]", "body"),
        (b'"a string"', "body"),
        (b"", "body"),
    ],
    ids=["truncated", "deep", "huge-int", "not-utf8", "null", "array", "string", "empty"],
)
def test_malformed_json_is_4xx_in_our_shape(service, content, field):
    r = post(service, "/generate", content=content, headers=JSON, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    refused(r, r.status_code, field)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate", {"prompt": "x"}, "guidance_scale"),
        ("/generate", {"prompt": "x", "hires_fix": True}, "hires_scale"),
        ("/generate", {"prompt": "x", "hires_fix": True}, "denoising_strength"),
        ("/generate", {"prompt": "x"}, "hires_guidance_scale"),
        ("/generate", {"prompt": "x"}, "refiner_switch_at"),
        ("/generate", {"prompt": "x"}, "face_restoration_weight"),
        ("/generate", {"prompt": "x"}, "width"),  # an int field
        ("/upscale", {"image": "AAAA"}, "scale"),
        ("/sdapi/v1/txt2img", {"prompt": "x"}, "cfg_scale"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, "hr_scale"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, "denoising_strength"),
        ("/sdapi/v1/extra-single-image", {"image": "AAAA"}, "upscaling_resize"),
    ],
)
def test_nan_and_inf_are_422_naming_the_field(service, path, body, field, literal):
    text = json.dumps(body)[:-1] + f', "{field}": {literal}}}'
    refused(post(service, path, content=text.encode(), headers=JSON, timeout=60), 422, field)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_nan_face_weight_on_a1111_extras_is_422(service, literal):
    """gfpgan_visibility is a weight in [0, 1] (A1111 clamps it): NaN and inf are no weight."""
    text = f'{{"image": "AAAA", "gfpgan_visibility": {literal}}}'
    r = post(service, "/sdapi/v1/extra-single-image", content=text.encode(), headers=JSON)
    refused(r, 422, "gfpgan_visibility")


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    "prompt",
    [
        "a café in Zürich, 東京の夜景, ночной город, مدينة في الليل, 🦊🏰✨",
        "\u202eRTL override\u202c and zero\u200bwidth\u200d joiners, combining e\u0301\u0301\u0301",
        "emoji only 👨‍👩‍👧‍👦🏳️‍🌈" * 100,
        "tab\tnew\nline\r\nNUL\x00 bell\x07 DEL\x7f",
        "\ufeffBOM first",
        "漢" * 4000,  # the longest prompt in characters, each one its own token(s)
        "a," * 2000,  # 4000 characters, ~4000 CLIP tokens: truncated to the encoder's 77
    ],
    ids=["scripts", "bidi-zero-width", "emoji", "controls", "bom", "4000-cjk", "4000-tokens"],
)
def test_unicode_and_long_prompts_generate(service, prompt):
    r = ok(post(service, "/generate", {"prompt": prompt, "negative_prompt": prompt, **TINY}))
    assert r["width"] == 64


def test_lone_surrogate_prompt_is_answered_not_a_500(service):
    """JSON may escape half a UTF-16 pair ("\\ud800"): Python reads it as a str that cannot be
    encoded; the service must answer 200 or a 4xx naming the prompt, never a 500."""
    for path, body in (
        ("/generate", {**TINY}),
        ("/sdapi/v1/txt2img", {"width": 64, "height": 64, "steps": 1, "seed": 7}),
    ):
        text = json.dumps(body)[:-1] + ', "prompt": "a fox \\ud800 at night"}'
        r = post(service, path, content=text.encode(), headers=JSON, timeout=120)
        if r.status_code != 200:
            refused(r, 422, "prompt")


@pytest.mark.parametrize("path", ["/generate", "/sdapi/v1/txt2img"])
def test_10k_token_prompt_is_422_naming_prompt(service, path):
    prompt = "cat " * 10_000  # 40 000 characters, 10 000 tokens
    body = {"prompt": prompt, "width": 64, "height": 64}
    err = refused(post(service, path, body), 422, "prompt")
    assert "4000" in err.detail[0].message or "4000" in err.error


def test_10k_token_hires_prompt_is_422_naming_it(service):
    body = {"prompt": "x", "hires_fix": True, "hires_prompt": "cat " * 10_000, **TINY}
    refused(post(service, "/generate", body), 422, "hires_prompt")


# ---------------------------------------------------------------- content types
BODY = json.dumps({"prompt": "a fox", **TINY}).encode()


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
        "image/png",
    ],
)
def test_wrong_content_type_is_422_in_our_shape(service, content_type):
    """A JSON route reads only JSON: another declared type is refused, naming the body."""
    r = post(service, "/generate", content=BODY, headers={"content-type": content_type})
    err = refused(r, 422, "body")
    assert "application/json" in err.detail[0].message and content_type in err.detail[0].message


def test_real_multipart_upload_is_422_in_our_shape(service):
    files = {"image": ("a.png", encode(Image.fromarray(astronaut(16)), "PNG"), "image/png")}
    r = httpx.post(service.url + "/upscale", files=files, data={"scale": "2"}, timeout=60)
    refused(r, 422, "body")


def test_no_content_type_is_422_saying_what_to_send(service):
    """No Content-Type at all: FastAPI does not guess JSON. The answer says what to send."""
    r = httpx.post(service.url + "/generate", content=BODY, timeout=120)
    assert "content-type" not in r.request.headers
    err = refused(r, 422, "body")
    assert "application/json" in err.detail[0].message


def test_json_with_a_charset_and_vendor_type_is_accepted(service):
    for ct in ("application/json; charset=utf-8", "application/vnd.api+json"):
        ok(post(service, "/generate", content=BODY, headers={"content-type": ct}))


# ---------------------------------------------------------------- wrong methods and paths
@pytest.mark.parametrize(
    "method, path, status, field",
    [
        ("GET", "/generate", 405, "method"),
        ("PUT", "/upscale", 405, "method"),
        ("DELETE", "/health", 405, "method"),
        ("GET", "/no-such-route", 404, "path"),
        ("POST", "/progress/abc", 405, "method"),
        ("GET", "/progress/", 404, "path"),
    ],
)
def test_wrong_method_or_path_is_answered_in_our_shape(service, method, path, status, field):
    r = httpx.request(method, service.url + path, timeout=30)
    refused(r, status, field)


# ---------------------------------------------------------------- slow loris
def test_slow_loris_uploads_do_not_block_other_clients(service):
    """Connections that send headers and then dribble (or stop sending) their body hold nothing
    that other clients need: /health and a real /generate are answered meanwhile. The slow
    connections are answered or closed once the client stops, and the service stays healthy."""
    u = urlsplit(service.url)
    body = json.dumps({"prompt": "slow", **TINY}).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow = []
    for _ in range(8):
        s = socket.create_connection((u.hostname, u.port), timeout=30)
        s.sendall(head + body[:5])
        slow.append(s)
    stop = threading.Event()

    def dribble(sockets):
        pos = 5
        while not stop.is_set() and pos < len(body) - 1:
            for s in sockets:
                try:
                    s.sendall(body[pos : pos + 1])
                except OSError:
                    pass
            pos += 1
            stop.wait(0.5)

    t = threading.Thread(target=dribble, args=(slow[:4],), daemon=True)  # half dribble, half stall
    t.start()
    try:
        t0 = time.perf_counter()
        healthy(service)
        ok(post(service, "/generate", {"prompt": "not slow", **TINY}))
        assert time.perf_counter() - t0 < 60
    finally:
        stop.set()
        t.join(5)
    # The client stops sending (never the last byte): the server closes or answers in bounded time
    # only at request_timeout_s (300 s here), so we hang up ourselves and check nothing leaked.
    for s in slow:
        s.close()
    time.sleep(1)
    healthy(service)


def _read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 answer with a Content-Length (headers and body may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data  # closed early: the caller's assertion shows what came
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(h.partition(b": ")[::2] for h in head.split(b"\r\n")[1:])
    length = int({k.lower(): v for k, v in fields.items()}.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_stalled_uploads_cannot_take_every_admission_slot(service):
    """More stalled uploads than the fuzz app's max_in_flight, each sending 5 bytes of its body and
    stopping: a real client's POST is still served, and each stalled one gets its 408 (our shape)
    once body_timeout_s passes."""
    u = urlsplit(service.url)
    head = (
        b"POST /fuzz/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    stalled = []
    try:
        for _ in range(48):
            s = socket.create_connection((u.hostname, u.port), timeout=30)
            s.sendall(head + b'{"pro')
            stalled.append(s)
        time.sleep(1)
        r = post(service, "/fuzz/generate", {"prompt": "a fox", **TINY}, timeout=60)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        for s in stalled:
            s.settimeout(FUZZ_BODY_TIMEOUT_S + 20)
            answer = _read_answer(s)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"field":"body"' in answer, answer
    finally:
        for s in stalled:
            s.close()
    ok(post(service, "/fuzz/generate", {"prompt": "a fox", **TINY}, timeout=60))
