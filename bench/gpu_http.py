"""The hires fix end to end through HTTP on a GPU: issue 14's "<= 2.5 s" and "8 clients >= 1.6x".

bench/gpu_sdxl.py times the stages in one process; this runs the product as users do: the Serve
graph of serve_config.yaml (its deployments, batching and stage settings) on a local Ray, over
real HTTP, with
  - a FULL-SIZE SDXL of random weights (bench/gpu_sdxl.py's published architecture) saved with
    save_pretrained and loaded by the SDXL replicas as `sdxl.source: diffusers` (nothing
    downloaded), its warm-up at the measured size;
  - a random RealESRGAN_x2plus-shaped upscaler file (bench/random_nets.py), serve_config.yaml's
    tile 800;
  - one replica per stage (autoscaling off: the figures are one GPU's), no face models.
Then: one client sends the hires fix `--repeats` times (after one unmeasured request), and
`--clients` clients send `--per-client` each at once (different seeds); images/s of both, and their
ratio.
Peak GPU memory is nvidia-smi's used memory (every replica's CUDA context and cache together).

    python bench/gpu_http.py                      # on the GPU (bench/device/run_http.sh)
    python bench/gpu_http.py --tiny --device cpu --size 64 --steps 2 --clients 2   # smoke test here
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serve_harness import free_port  # noqa: E402


def save_models(args, folder: Path) -> tuple[Path, Path]:
    """The SDXL folder and the upscaler file the replicas load; this process keeps no GPU memory."""
    import torch

    from bench.random_nets import save_random_x2plus
    from hiresfix.runtime import torch_dtype

    t0 = time.perf_counter()
    if args.tiny:
        from hiresfix.sdxl.tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(workdir=tempfile.mkdtemp())
    else:
        from bench.gpu_sdxl import full_size_sdxl

        pipe = full_size_sdxl(args.device, torch_dtype(args.dtype))
    pipe.save_pretrained(folder / "sdxl", safe_serialization=True)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    upscaler = save_random_x2plus(folder)
    size = sum(f.stat().st_size for f in (folder / "sdxl").rglob("*.safetensors")) / 2**30
    print(f"models saved in {time.perf_counter() - t0:.1f} s (SDXL {size:.2f} GiB)", flush=True)
    return folder / "sdxl", upscaler


def serve_config(args, sdxl: Path, upscaler: Path, port: int) -> dict:
    """serve_config.yaml with these models, one replica per stage, and nothing else changed."""
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    cfg.pop("logging_config", None)  # plain text lines in the log tail
    app = cfg["applications"][0]
    a = app["args"]
    cuda = args.device.startswith("cuda")
    a["sdxl"].update(
        source="diffusers",
        path=str(sdxl),
        variant=None,
        vae_path=None,  # the saved VAE is the fp16-safe kind (force_upcast false)
        device=args.device,
        dtype=args.dtype,
        warmup={"sizes": [[args.size, args.size]], "hires_scale": args.scale, "steps": 2},
    )
    a["upscaler"].update(
        weights_dir=str(upscaler.parent),
        default=upscaler.stem,
        device="cuda" if cuda else "cpu",
        models=[{"name": upscaler.stem, "file": upscaler.name, "tile_size": 800}],
    )
    a["face"] = {"device": "cuda" if cuda else "cpu", "models": []}
    a["limits"]["max_side"] = max(a["limits"]["max_side"], int(args.size * args.scale))
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        if not cuda:  # a smoke test on a small CPU box: no GPUs, no CPU reservations
            d.setdefault("ray_actor_options", {}).pop("num_gpus", None)
            d["ray_actor_options"]["num_cpus"] = 0
    return cfg


class Service:
    """The product's launcher (what scripts/serve runs) on a fresh local Ray; stop() is its
    SIGTERM: drain, then Serve and that Ray shut down."""

    def __init__(self, config: Path, log: Path):
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve_run", str(config), "--address", "local"],
            cwd=ROOT,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, url: str, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                sys.exit(f"serve run exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                r = httpx.get(url + "/health", timeout=5)
                if r.status_code == 200 and r.json()["status"] == "ok":
                    return time.monotonic() - t0
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        sys.exit(f"not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class GpuMemory:
    """Peak nvidia-smi memory.used (MiB) over the run, sampled in a thread."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.peak = max(self.peak, max(int(x) for x in out.split()))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return  # no nvidia-smi (a CPU smoke test): nothing to report
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def request_body(args, seed: int) -> dict:
    # bench/gpu_sdxl.py's request, as JSON
    return {
        "prompt": "a photo of an astronaut riding a horse on the moon, detailed, sharp",
        "negative_prompt": "blurry, ugly",
        "seed": seed,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": 7.0,
        "scheduler": "euler",
        "hires_fix": True,
        "hires_scale": args.scale,
        "denoising_strength": args.strength,
    }


def generate(url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/generate", json=body, timeout=600)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"/generate answered {r.status_code}: {r.text[:2000]}")
    return seconds, r.json()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--size", type=int, default=768, help="base width = height")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3, help="one client, one after another")
    ap.add_argument("--clients", type=int, default=8, help="then this many at once")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--tiny", action="store_true", help="the tiny SDXL (smoke-test this script)")
    ap.add_argument("--workdir", help="default: a temporary folder")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-http-"))
    work.mkdir(parents=True, exist_ok=True)
    sdxl, upscaler = save_models(args, work)
    port = free_port()
    config = work / "serve_gpu_http.yaml"
    config.write_text(yaml.safe_dump(serve_config(args, sdxl, upscaler, port)))
    url = f"http://127.0.0.1:{port}"
    out = int(args.size * args.scale)
    print(
        f"hires fix through HTTP: base {args.size} px / {args.steps} steps, x{args.scale:g} to"
        f" {out} px, refine strength {args.strength}, {args.dtype}; serve_config.yaml, one"
        " replica per stage",
        flush=True,
    )
    service = Service(config, work / "serve.log")
    try:
        with GpuMemory() as mem:
            ready = service.wait_ready(url, args.ready_timeout)
            print(f"  Serve up and warmed (each replica loads its model) in {ready:.1f} s")
            first, data = generate(url, request_body(args, 1))
            print(f"  first request {first:.2f} s; upscaler_used {data['upscaler_used']}")
            assert (data["width"], data["height"]) == (out, out), (data["width"], data["height"])
            assert data["upscaler_used"] == upscaler.stem, data.get("fallback_detail")
            one = []
            for i in range(args.repeats):
                s, data = generate(url, request_body(args, 100 + i))
                one.append(s)
                stages = ", ".join(f"{k} {v:.3f}" for k, v in data["timings"].items())
                print(f"  run {i + 1}: {s:.2f} s through HTTP; the service's timings: {stages}")
            med = statistics.median(one)
            print(f"  hires fix through HTTP, total (goal <= 2.5 s) {med:.2f} s (median)")
            n = args.clients * args.per_client

            def client(c: int) -> list[dict]:
                seeds = range(1000 + c * args.per_client, 1000 + (c + 1) * args.per_client)
                return [generate(url, request_body(args, s))[1] for s in seeds]

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = [a for got in pool.map(client, range(args.clients)) for a in got]
            wall = time.perf_counter() - t0
            shared = [max(a["batched_with"].values(), default=1) for a in answers]
            print(
                f"  {args.clients} clients x {args.per_client}: {n} hires fixes in {wall:.2f} s ="
                f" {n / wall:.3f} images/s vs one client {1 / med:.3f}:"
                f" {(n / wall) * med:.2f}x (goal >= 1.6x); largest model call shared by"
                f" {max(shared)} requests"
            )
        if mem.peak:
            print(f"  peak GPU memory used (every replica): {mem.peak / 1024:.2f} GiB")
    finally:
        service.stop()


if __name__ == "__main__":
    main()
