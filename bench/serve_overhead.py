"""Serving overhead of /upscale: the same upscale through Ray Serve + HTTP vs in-process.

Starts `serve run` on an upscale-focused copy of serve_config.cpu.yaml, then for one image:
  in-process  UpscalerBank.upscale (the model code alone)
  service     POST /upscale, end to end as a client sees it
and prints the overhead (service - in-process) split into image decode/encode (reported by the
service's own timings) and the rest (HTTP, JSON/base64, Ray hops). Not a test; prints figures.

Then the no-model round trip (issue 14): the same PNG sent to /upscale at scale 1.0 with
use_realesrgan false, answered as image/png, against the bare work it stands for, measured in the
same run, alternating: Pillow decoding that PNG and encoding it again at the service's PNG setting
(hiresfix.images.PNG_COMPRESS_LEVEL). Targets: round trip / bare <= 1.25; serving overhead (round
trip minus the service's own decode + encode: HTTP, ingress, Ray) <= 10 ms. Alternating with both,
Ray Serve's own floor: a no-op deployment in the same cluster (FLOOR_PREFIX) that takes the same
request bytes and answers as many bytes as the PNG answer, so what is ours is printed apart from
what any Serve app pays on this machine.

    python bench/serve_overhead.py --weights ../shared/weights --size 512 --runs 5
    python bench/serve_overhead.py --bare-only --ingress proxy direct haproxy
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default=str(REPO.parent / "shared" / "weights"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bare-runs", type=int, default=15, help="no-model round trips (and refs)")
    ap.add_argument("--bare-only", action="store_true", help="only the no-model round trip")
    ap.add_argument(
        "--ingress",
        nargs="+",
        choices=["proxy", "direct", "haproxy"],
        default=["proxy"],
        help="how HTTP reaches the ingress replica, one cluster each, in this order (with"
        " --bare-only): Serve's Python proxy; direct (RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the"
        " replica's own port, 30000+); haproxy (RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy on the usual"
        " port in front of the replicas' own ports: scripts/serve --ingress haproxy)",
    )
    ns = ap.parse_args()
    if not ns.bare_only and len(ns.ingress) > 1:
        ap.error("several --ingress choices go with --bare-only")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)

    import httpx
    from PIL import Image
    from skimage import data

    from hiresfix.images import Picture
    from hiresfix.upscale import UpscalerBank, UpscalerSettings
    from tests.serve_harness import make_test_config

    src = Image.fromarray(data.astronaut()).resize((ns.size, ns.size), Image.BICUBIC)
    buf = io.BytesIO()
    src.save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()

    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    # The very settings the service will run with, so only the serving path differs.
    cfg = make_test_config(tmp, Path(ns.weights), tmp / "no-face.safetensors", 0)
    settings = cfg["applications"][0]["args"]["upscaler"]
    bank = UpscalerBank.from_settings(UpscalerSettings(**settings))
    pic = Picture.from_pil(src)
    inproc = []
    if not ns.bare_only:
        bank.upscale([pic], ns.scale, model="realesr-animevideov3")  # warm-up
    for _ in range(0 if ns.bare_only else ns.runs):
        t = time.perf_counter()
        bank.upscale([pic], ns.scale, model="realesr-animevideov3")
        inproc.append(time.perf_counter() - t)

    if ns.bare_only:
        with tmpdir:
            for ingress in ns.ingress:
                bare_only(ns, ingress, tmp / ingress, buf.getvalue())
        return
    with tmpdir:
        app = start_service(ns, ns.ingress[0], tmp)
        try:
            app.wait_ready()
            body = {"image": b64, "scale": ns.scale}
            httpx.post(app.url + "/upscale", json=body, timeout=600).raise_for_status()  # warm-up
            svc, codec, server, stage = [], [], [], []
            for _ in range(ns.runs):
                t = time.perf_counter()
                r = httpx.post(app.url + "/upscale", json=body, timeout=600)
                svc.append(time.perf_counter() - t)
                r.raise_for_status()
                tm = r.json()["timings"]
                codec.append(tm.get("decode", 0) + tm.get("encode", 0))
                server.append(tm["total"])
                stage.append(tm["upscale"])
                assert r.json()["upscaler_used"] == "realesr-animevideov3", r.json()[
                    "fallback_detail"
                ]
            # The same request answered with the PNG itself (Accept: image/png): no base64, no JSON.
            bin_http, bin_hops = [], []
            for _ in range(ns.runs):
                t = time.perf_counter()
                r = httpx.post(
                    app.url + "/upscale", json=body, headers={"accept": "image/png"}, timeout=600
                )
                wall = time.perf_counter() - t
                r.raise_for_status()
                tm = json.loads(r.headers["x-hiresfix-meta"])["timings"]
                bin_http.append(wall - tm["total"])
                bin_hops.append(
                    tm["total"] - tm["upscale"] - tm.get("decode", 0) - tm.get("encode", 0)
                )
            bare = no_model_round_trip(
                app.url, buf.getvalue(), ns.bare_runs, app.url + FLOOR_PREFIX + "/"
            )
        finally:
            app.stop()

    med = statistics.median
    over = med(svc) - med(inproc)
    print(f"image {ns.size}px x{ns.scale}, {ns.runs} runs, median seconds")
    print(f"  in-process upscale            {med(inproc):8.3f}")
    print(
        f"  service: upscale stage        {med(stage):8.3f}"
        "   (replica's own time for the same work)"
    )
    print(f"  service: client round trip    {med(svc):8.3f}")
    print(f"  overhead vs in-process        {over * 1000:8.1f} ms")
    print(f"    image decode+encode         {med(codec) * 1000:8.1f} ms")
    hops = [t - u - c for t, u, c in zip(server, stage, codec)]  # per run, then the median
    http = [c - t for c, t in zip(svc, server)]
    print(f"    Ray hops (server total - stage - codec)    {med(hops) * 1000:8.1f} ms")
    print(f"    HTTP + JSON/base64 (client - server total) {med(http) * 1000:8.1f} ms")
    print(
        "  serving overhead (hops + HTTP), the target   "
        f"{med([h + x for h, x in zip(hops, http)]) * 1000:8.1f} ms"
    )
    print(f"  ratio service/in-process      {med(svc) / med(inproc):8.3f}")
    print("  the same, answered with the PNG itself (Accept: image/png):")
    print(f"    Ray hops                                   {med(bin_hops) * 1000:8.1f} ms")
    print(f"    HTTP (client - server total)               {med(bin_http) * 1000:8.1f} ms")
    print(
        "  serving overhead, image/png answer           "
        f"{med([h + x for h, x in zip(bin_hops, bin_http)]) * 1000:8.1f} ms"
    )
    print_bare(ns, bare)


FLOOR_PREFIX = "/serve-floor"  # the no-op app's route


def start_service(ns, ingress: str, tmp: Path):
    """The service (the test profile's main app) and Serve's floor app, on a local cluster whose
    ingress replicas `ingress` fronts (tests/serve_harness.py's ServeApp)."""
    from tests.serve_harness import ServeApp

    weights, face = Path(ns.weights), tmp / "no-face.safetensors"
    return ServeApp(tmp, weights, face, nolib=False, edit=_with_floor, ingress=ingress)


def bare_only(ns, ingress: str, tmp: Path, png: bytes) -> None:
    """The no-model round trip (and Serve's floor) on a cluster started for `ingress`."""
    tmp.mkdir()
    app = start_service(ns, ingress, tmp)
    try:
        app.wait_ready()
        # Direct ingress keeps the proxy too: both, alternating rounds. HAProxy takes the usual
        # port (app.url).
        front = "HAProxy" if ingress == "haproxy" else "proxy"  # on the usual port
        urls = [(front, app.url, app.url + FLOOR_PREFIX + "/")]
        if ingress == "direct":  # each app's replica has a port of its own
            floor = app.replica_url(FLOOR_PREFIX + "/") + FLOOR_PREFIX + "/"
            urls.append(("direct ingress", app.replica_url(), floor))
        for label, url, floor_url in urls * 2:
            print(f"== through the {label}: {url} (second round: the same again)")
            print_bare(ns, no_model_round_trip(url, png, ns.bare_runs, floor_url))
    finally:
        app.stop()


def _with_floor(cfg: dict) -> None:
    cfg["applications"].append(
        {
            "name": "serve-floor",
            "route_prefix": FLOOR_PREFIX,
            "import_path": "bench.serve_floor:app",
        }
    )


def print_bare(ns, bare: dict[str, list[float]]) -> None:
    med = statistics.median
    trip, ref, codec_ms = (med(bare[k]) for k in ("trip", "ref", "codec"))
    over_ms = med([t - c for t, c in zip(bare["trip"], bare["codec"])]) * 1000
    print(
        f"no-model /upscale, {ns.size} px PNG, scale 1.0, use_realesrgan false, Accept: image/png"
        f" (median of {ns.bare_runs}, alternating with the reference)"
    )
    print(f"  bare Pillow decode + encode (reference)      {ref * 1000:8.1f} ms")
    print(f"  client round trip                            {trip * 1000:8.1f} ms")
    print(f"    service's own decode + encode              {codec_ms * 1000:8.1f} ms")
    print(
        f"  round trip / bare                            {trip / ref:8.2f}"
        f"   {'ok' if trip / ref <= 1.25 else 'MISSES'} (target <= 1.25)"
    )
    print(
        f"  serving overhead (round trip - codec)        {over_ms:8.1f} ms"
        f"   {'ok' if over_ms <= 10 else 'MISSES'} (target <= 10 ms)"
    )
    inside = med([r - c for r, c in zip(bare["route"], bare["codec"])]) * 1000
    outside = med([t - r for t, r in zip(bare["trip"], bare["route"])]) * 1000
    print(f"    inside the route, besides the codec        {inside:8.1f} ms")
    print(f"    outside it (HTTP, proxy, Ray, FastAPI)     {outside:8.1f} ms")
    print(f"  the same route with an 8 px PNG (fixed cost) {med(bare['tiny']) * 1000:8.1f} ms")
    floor_ms, floor_tiny_ms = med(bare["floor"]) * 1000, med(bare["floor_tiny"]) * 1000
    print(f"  Ray Serve's floor: a no-op app, same bytes   {floor_ms:8.1f} ms")
    print(f"    the same with 8 px bytes                   {floor_tiny_ms:8.1f} ms")
    print(f"  ours above that floor (overhead - floor)     {over_ms - floor_ms:8.1f} ms")
    print(
        f"  round trip / bare, were ours free            {(codec_ms + floor_ms / 1000) / ref:8.2f}"
        "   (service's codec + the floor)"
    )


def no_model_round_trip(url: str, png: bytes, runs: int, floor_url: str) -> dict[str, list[float]]:
    """The no-model /upscale round trip and, alternating with it, the bare Pillow work and the
    same bytes through Serve's no-op app at `floor_url` (bench/serve_floor.py)."""
    import httpx
    from PIL import Image

    from hiresfix.images import PNG_COMPRESS_LEVEL, png_zlib

    level, strategy = png_zlib(PNG_COMPRESS_LEVEL)

    def bare() -> None:
        im = Image.open(io.BytesIO(png))
        im.load()
        im.save(io.BytesIO(), "PNG", compress_level=level, compress_type=strategy)

    body = {"image": base64.b64encode(png).decode(), "scale": 1.0, "use_realesrgan": False}
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tiny, "PNG")
    # The same route with an 8 px PNG: the per-request cost of HTTP, Ray and the route itself.
    small = {**body, "image": base64.b64encode(tiny.getvalue()).decode()}
    keys = ("trip", "ref", "codec", "route", "tiny", "floor", "floor_tiny")
    out: dict[str, list[float]] = {k: [] for k in keys}
    with httpx.Client(timeout=120) as client:  # one connection, as a client script would keep

        def floor(req: dict, answer_bytes: int) -> float:
            data = json.dumps(req).encode()
            head = {"content-type": "application/json", "x-answer-bytes": str(answer_bytes)}
            t = time.perf_counter()
            r = client.post(floor_url, content=data, headers=head)
            took = time.perf_counter() - t
            r.raise_for_status()
            assert len(r.content) == answer_bytes, len(r.content)
            return took

        for i in range(runs + 1):
            t = time.perf_counter()
            bare()
            ref = time.perf_counter() - t
            t = time.perf_counter()
            r = client.post(url + "/upscale", json=body, headers={"accept": "image/png"})
            trip = time.perf_counter() - t
            r.raise_for_status()
            assert r.headers["content-type"] == "image/png", r.headers
            tm = json.loads(r.headers["x-hiresfix-meta"])["timings"]
            t = time.perf_counter()
            client.post(url + "/upscale", json=small, headers={"accept": "image/png"})
            tiny_trip = time.perf_counter() - t
            floor_trip = floor(body, len(r.content))
            floor_tiny = floor(small, len(tiny.getvalue()))
            if i:  # the first is a warm-up
                out["trip"].append(trip)
                out["ref"].append(ref)
                out["codec"].append(tm.get("decode", 0) + tm.get("encode", 0))
                out["route"].append(tm["total"])
                out["tiny"].append(tiny_trip)
                out["floor"].append(floor_trip)
                out["floor_tiny"].append(floor_tiny)
    return out


if __name__ == "__main__":
    main()
