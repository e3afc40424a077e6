"""Serving overhead of /upscale: the same upscale through Ray Serve + HTTP vs in-process.

Starts `serve run` on an upscale-focused copy of serve_config.cpu.yaml, then for one image:
  in-process  UpscalerBank.upscale (the model code alone)
  service     POST /upscale, end to end as a client sees it
and prints the overhead (service - in-process) split into image decode/encode (reported by the
service's own timings) and the rest (HTTP, JSON/base64, Ray hops). Not a test; prints figures.

    python bench/serve_overhead.py --weights ../shared/weights --size 512 --runs 5
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
    ns = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)

    import httpx
    from PIL import Image
    from skimage import data

    from hiresfix.images import Picture
    from hiresfix.upscale import UpscalerBank, UpscalerSettings
    from tests.serve_harness import ServeApp, make_test_config

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
    bank.upscale([pic], ns.scale, model="realesr-animevideov3")  # warm-up
    inproc = []
    for _ in range(ns.runs):
        t = time.perf_counter()
        bank.upscale([pic], ns.scale, model="realesr-animevideov3")
        inproc.append(time.perf_counter() - t)

    with tmpdir:
        app = ServeApp(tmp, Path(ns.weights), tmp / "no-face.safetensors")
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


if __name__ == "__main__":
    main()
