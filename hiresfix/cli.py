"""`hiresfix` command line: a thin client of the HTTP API, plus weights download and compare.

The generate/upscale flags are built from the same pydantic schemas the server validates with, so
the CLI can never drift from the API.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import sys
import threading
import time
import types
import typing
import uuid
from pathlib import Path

from pydantic import BaseModel, ValidationError

from hiresfix.apidoc import ordered_fields
from hiresfix.schemas import GenerateRequest, Img2ImgRequest, UpscaleRequest

DEFAULT_URL = "http://127.0.0.1:7860"


# ---------- flags from the schema ----------
def _add_schema_flags(p: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    for name, f in ordered_fields(model):
        if name in skip:
            continue
        ann = f.annotation
        origin = typing.get_origin(ann)
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if origin in (typing.Union, types.UnionType) and len(args) == 1:
            ann, origin = args[0], typing.get_origin(args[0])
        flag = "--" + name.replace("_", "-")
        help_ = (f.description or "") + ("" if f.is_required() else f" (default: {f.default})")
        if ann is bool:
            p.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif origin is typing.Literal:
            p.add_argument(flag, dest=name, choices=typing.get_args(ann), default=None, help=help_)
        else:
            p.add_argument(
                flag,
                dest=name,
                type=ann if ann in (int, float, str) else str,
                default=None,
                help=help_,
            )


def _payload(ns: argparse.Namespace, model: type[BaseModel]) -> dict:
    return {k: v for k, v in vars(ns).items() if k in model.model_fields and v is not None}


# ---------- HTTP with a progress line ----------
def progress_line(info: dict) -> str:
    """One status line from GET /progress: 'hires 6/15 | 63% | 12.3 s | ETA 7 s'."""
    stage = (
        f"{info['stage']} {info['step']}/{info['stage_steps']}" if info.get("stage") else "queued"
    )
    eta = f" | ETA {info['eta_s']:.0f} s" if info.get("eta_s") is not None else ""
    return f"{stage} | {info['progress'] * 100:3.0f}% | {info['elapsed_s']:.1f} s{eta}"


def _post(url: str, path: str, payload: dict, timeout: float, quiet: bool) -> dict:
    import httpx

    base = url.rstrip("/")
    # /generate and /img2img are followed at GET /progress/{id}: the id must be ours, known before
    # the answer.
    rid = f"cli-{uuid.uuid4().hex[:16]}" if path in ("/generate", "/img2img") else None
    done = threading.Event()

    def spin() -> None:
        t0, frames, i = time.time(), "|/-\\", 0
        with httpx.Client(timeout=2.0) as client:
            while not done.wait(0.5):
                line = f"waiting for {path} ... {time.time() - t0:5.1f}s"
                if rid:
                    try:
                        r = client.get(f"{base}/progress/{rid}")
                        if r.status_code == 200:
                            line = progress_line(r.json())
                    except (httpx.HTTPError, ValueError, KeyError):
                        pass  # no bar this time; the request itself is unaffected
                sys.stderr.write(f"\r{frames[i % 4]} {line:<60}")
                sys.stderr.flush()
                i += 1
        sys.stderr.write("\r" + " " * 64 + "\r")

    spinner = threading.Thread(target=spin, daemon=True)
    if not quiet and sys.stderr.isatty():
        spinner.start()
    try:
        r = httpx.post(
            base + path,
            json=payload,
            timeout=timeout,
            headers={"x-request-id": rid} if rid else None,
        )
    except httpx.ConnectError:
        # The message says all there is to say; the httpx traceback would only bury it.
        raise SystemExit(
            f"error: no hiresfix server at {url} (start one with `serve run serve_config.cpu.yaml`)"
        ) from None
    finally:
        done.set()
        if spinner.is_alive():
            spinner.join(timeout=3)
    if r.status_code >= 400:
        try:
            msg = r.json().get("error", r.text)
        except ValueError:
            msg = r.text
        raise SystemExit(f"error {r.status_code}: {msg}")
    return r.json()


def _write_images(resp: dict, out: Path, as_json: bool) -> None:
    fmt = resp.get("output_format", "png")
    images = resp.get("images") or [resp["image"]]
    paths = []
    for i, b64 in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        if path.suffix == "":
            path = path.with_suffix("." + fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(b64))
        paths.append(str(path))
    if as_json:
        slim = {k: v for k, v in resp.items() if k not in ("image", "images")}
        print(json.dumps({**slim, "files": paths}, indent=2))
    else:
        for p in paths:
            print(p)
        extra = f" (fallback: {resp['fallback_reason']})" if resp.get("fallback_reason") else ""
        print(
            f"{resp['width']}x{resp['height']} seed={resp.get('seed')}"
            f" upscaler={resp.get('upscaler_used')}{extra}"
            f" total={resp.get('timings', {}).get('total')}s",
            file=sys.stderr,
        )


# ---------- subcommands ----------
def cmd_generate(ns: argparse.Namespace) -> None:
    payload = _payload(ns, GenerateRequest)
    GenerateRequest.model_validate(
        payload
    )  # fail here, with the server's own message, before sending
    _write_images(_post(ns.url, "/generate", payload, ns.timeout, ns.json), Path(ns.out), ns.json)


def cmd_upscale(ns: argparse.Namespace) -> None:
    payload = _payload(ns, UpscaleRequest)
    payload["image"] = base64.b64encode(Path(ns.input).read_bytes()).decode()
    UpscaleRequest.model_validate(payload)
    _write_images(_post(ns.url, "/upscale", payload, ns.timeout, ns.json), Path(ns.out), ns.json)


def cmd_img2img(ns: argparse.Namespace) -> None:
    payload = _payload(ns, Img2ImgRequest)
    payload["image"] = base64.b64encode(Path(ns.input).read_bytes()).decode()
    if ns.mask:
        payload["mask"] = base64.b64encode(Path(ns.mask).read_bytes()).decode()
    Img2ImgRequest.model_validate(payload)
    _write_images(_post(ns.url, "/img2img", payload, ns.timeout, ns.json), Path(ns.out), ns.json)


def cmd_weights(ns: argparse.Namespace) -> None:
    from hiresfix.upscale.download import DownloadError, download_weights, known_weights
    from hiresfix.weights import sha256_file

    try:
        paths = download_weights(ns.names or None, ns.weights_dir, progress=True)
    except DownloadError as exc:  # offline, unknown name, checksum: the message says what to do
        raise SystemExit(f"error: {exc}") from exc
    # No official hash is published for most release files: print what was fetched, so ops can pin
    # it in the profile (`sha256:` on the model entry) and every later load is checked against it.
    for path in paths:
        known = known_weights(path.name)
        how = (
            "matches the known hash"
            if known and known.sha256
            else "no official hash known: pin it in the profile"
        )
        print(f"{path}  sha256 {sha256_file(path)}  ({how})")


def cmd_compare(ns: argparse.Namespace) -> None:
    from hiresfix.images import decode_image
    from hiresfix.upscale.compare import compare_images

    if ns.input:
        raw = Path(ns.input).read_bytes()
    else:
        gen = _post(
            ns.url,
            "/generate",
            {"prompt": ns.prompt, "seed": ns.seed, "width": ns.width, "height": ns.height},
            ns.timeout,
            True,
        )
        raw = base64.b64decode(gen["image"])
    original = decode_image(raw)
    b64 = base64.b64encode(raw).decode()
    results = []
    for name in ["lanczos", *ns.upscaler]:
        body = {"image": b64, "scale": ns.scale, "use_realesrgan": name != "lanczos"}
        if name != "lanczos":
            body["upscaler"] = name
        resp = _post(ns.url, "/upscale", body, ns.timeout, True)
        label = (
            resp["upscaler_used"]
            if not resp.get("fallback_reason") or name == "lanczos"
            else f"{name} -> lanczos ({resp['fallback_reason']})"
        )
        results.append((label, decode_image(resp["image"])))
    sheet = compare_images(original, results)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(ns.out)
    print(ns.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiresfix", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def client(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", default=DEFAULT_URL, help=f"server (default {DEFAULT_URL})")
        sp.add_argument(
            "--timeout", type=float, default=600.0, help="seconds to wait for the answer"
        )

    g = sub.add_parser("generate", help="text -> image through POST /generate")
    client(g)
    g.add_argument("prompt", help="what to draw")
    g.add_argument(
        "-o", "--out", default="out/generate.png", help="output file (a -N suffix per extra image)"
    )
    g.add_argument(
        "--json", action="store_true", help="print the full response (without image data)"
    )
    _add_schema_flags(g, GenerateRequest, skip={"prompt"})
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("upscale", help="upscale an image file through POST /upscale")
    client(u)
    u.add_argument("input", help="PNG/JPEG/WebP file")
    u.add_argument("-o", "--out", default="out/upscale.png")
    u.add_argument("--json", action="store_true")
    _add_schema_flags(u, UpscaleRequest, skip={"image"})
    u.set_defaults(func=cmd_upscale)

    i = sub.add_parser(
        "img2img", help="redraw (or, with --mask, inpaint) an image file through POST /img2img"
    )
    client(i)
    i.add_argument("input", help="PNG/JPEG/WebP file")
    i.add_argument("prompt", help="what to draw")
    i.add_argument("--mask", help="mask image file: white = repaint, black = keep")
    i.add_argument("-o", "--out", default="out/img2img.png")
    i.add_argument("--json", action="store_true")
    _add_schema_flags(i, Img2ImgRequest, skip={"image", "prompt", "mask"})
    i.set_defaults(func=cmd_img2img)

    w = sub.add_parser("weights", help="download official upscaler weights (checksummed)")
    w.add_argument("names", nargs="*", help="model names (default: all known)")
    w.add_argument(
        "--weights-dir",
        default=os.environ.get("HIRESFIX_WEIGHTS_DIR", "weights"),
        help="target folder (default: $HIRESFIX_WEIGHTS_DIR or ./weights)",
    )
    w.set_defaults(func=cmd_weights)

    c = sub.add_parser(
        "compare", help="side-by-side PNG: LANCZOS vs neural upscalers, with a zoomed crop"
    )
    client(c)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="image file to upscale")
    src.add_argument("--prompt", help="generate the input through /generate first")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--width", type=int, default=512)
    c.add_argument("--height", type=int, default=512)
    c.add_argument("--scale", type=float, default=2.0)
    c.add_argument(
        "--upscaler", action="append", default=[], help="configured upscaler name (repeatable)"
    )
    c.add_argument("-o", "--out", default="out/compare.png")
    c.set_defaults(func=cmd_compare)

    for name, help_ in (
        (
            "stop",
            "drain every ingress (running requests finish, new ones get 503), then shut Serve down",
        ),
        ("drain", "drain every ingress and wait, without stopping (`--undo` opens it again)"),
    ):
        d = sub.add_parser(name, help=help_)
        d.add_argument(
            "--address",
            default=os.environ.get("RAY_ADDRESS", "auto"),
            help="Ray cluster (GCS address; default $RAY_ADDRESS or auto: this machine's)",
        )
        d.add_argument(
            "--timeout", type=float, default=300.0, help="seconds to wait for running requests"
        )
        if name == "drain":
            d.add_argument("--undo", action="store_true", help="end a drain: admit requests again")
        d.set_defaults(func=cmd_stop)
    return p


def cmd_stop(ns: argparse.Namespace) -> None:
    """`serve shutdown` cuts running requests; this drains first (deployments/drain.py)."""
    import ray

    from deployments import drain

    ray.init(address=ns.address, log_to_driver=False, logging_level="ERROR")
    say = functools.partial(print, flush=True)
    if ns.cmd == "stop":
        result = drain.stop(ns.timeout, say=say)
    elif ns.undo:
        drain.undrain()
        return say("drain ended: every ingress admits requests again")
    else:
        result = drain.drain(ns.timeout, say=say)
        say(result.summary())
    if result.timed_out:
        raise SystemExit(3)


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except ValidationError as exc:  # same message the server would give, without a round trip
        raise SystemExit(
            "error: "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from exc
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
