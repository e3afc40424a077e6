"""Tiled upscaler vs a plain untiled spandrel forward: time and peak memory (prints figures).

Each variant runs in a fresh subprocess, so the peak RSS of one cannot hide inside the other's:
    peak growth = ru_maxrss after the run - RSS just before it (model loaded, kernels warmed up).
(tracemalloc does not see torch's allocations; this does.) Runs alternate between the variants and
the fastest of --repeats is reported, because this box is shared and timings are noisy.

    python bench/upscale_bench.py                 # 1024 px input, animevideov3, tiles 512 and 192
    python bench/upscale_bench.py --quick         # 256 px, one repeat: a smoke run
    python bench/upscale_bench.py --tile 512,256,192 --threads 1 --repeats 3
    python bench/upscale_bench.py --company --device cuda  # same bits alone and batched? (+ timing)

Targets (issue): time ratio tiled/plain <= 1.15, peak memory >= 3x lower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "weights" / "realesr-animevideov3-x4.safetensors"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu() -> float:
    """CPU seconds of this process: on a shared box far steadier than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _image(size: int):
    import numpy as np
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def child(args) -> None:
    import gc

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    rgb = _image(args.size)
    if args.child == "plain":
        import spandrel

        desc = spandrel.ModelLoader().load_from_file(args.weights).eval()
        scale = desc.scale
        desc(torch.rand(1, 3, 32, 32))  # warm-up: kernels, allocator

        def run():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
            return desc(x)[0].permute(1, 2, 0)  # HWC view, like the Picture the bank returns
    else:
        from hiresfix.images import Picture
        from hiresfix.upscale import UpscaleJob, UpscalerBank, UpscalerModelSpec, UpscalerSettings

        bank = UpscalerBank.from_settings(
            UpscalerSettings(
                weights_dir=str(Path(args.weights).parent),
                num_threads=args.threads,
                tile_size=args.tile,
                tile_overlap=args.overlap,
                tile_batch=args.batch,
                dtype=args.dtype,
                models=[UpscalerModelSpec(name="m", file=Path(args.weights).name)],
            )
        )
        assert bank.neural_available(), bank.models_info()
        scale = bank.models_info()[0].scale
        bank.upscale([Picture(rgb[:32, :32].copy())], scale)  # warm-up
        pic = Picture(rgb)

        def run():
            out = bank.upscale_jobs([UpscaleJob(pic, (args.size * scale, args.size * scale))])[0]
            assert out.fallback_reason is None, out.fallback_detail
            return out.picture.rgb

    gc.collect()
    before = _rss()
    c0, t0 = _cpu(), time.perf_counter()
    out = run()
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {
        "variant": args.child,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_before_mb": before / 2**20,
        "peak_growth_mb": max(0, peak - before) / 2**20,
        "out_shape": list(out.shape),
    }
    if args.save:
        u8 = (np.clip(np.asarray(out), 0, 1) * 255 + 0.5).astype(np.uint8)
        np.save(args.save, u8)
    print("RESULT " + json.dumps(result), flush=True)


def company(args) -> None:
    """A job alone vs sharing passes with other jobs (as @serve.batch does): bit-identical output?
    Also the best time of the job alone, and the pass sizes the bank used."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from hiresfix.images import Picture
    from hiresfix.upscale import UpscaleJob, UpscalerBank, UpscalerModelSpec, UpscalerSettings

    torch.set_num_threads(args.threads)
    for weights in args.weights.split(","):
        bank = UpscalerBank.from_settings(
            UpscalerSettings(
                weights_dir=str(Path(weights).parent),
                num_threads=args.threads,
                device=args.device,
                tile_size=int(str(args.tile).split(",")[0]),
                tile_overlap=args.overlap,
                tile_batch=args.batch,
                models=[UpscalerModelSpec(name="m", file=Path(weights).name)],
            )
        )
        r = bank.runner()
        passes: list[int] = []
        # Default arguments bind this iteration's list and image: the hook and job() only run
        # within the iteration, but a closure over a loop variable would not say so.
        r.module.register_forward_pre_hook(lambda m, a, sink=passes: sink.append(a[0].shape[0]))
        rgb = _image(512)

        def job(y: int, x: int, h: int, w: int, rgb=rgb) -> UpscaleJob:
            return UpscaleJob(Picture(rgb[y : y + h, x : x + w].copy()), (w * 4, h * 4))

        a = job(60, 180, args.size, args.size)
        others = [job(300, 100, args.size, args.size), job(200, 40, args.size // 2 + 7, args.size)]
        times = []
        for _ in range(args.repeats):
            passes.clear()
            t0 = time.perf_counter()
            alone = bank.upscale_jobs([a])[0].picture.rgb
            times.append(time.perf_counter() - t0)
        print(
            f"{Path(weights).name} on {r.device_name}/{r.dtype_name}:"
            f" batch_invariant={r.batch_invariant};"
            f" {args.size} px job alone: best {min(times) * 1e3:.1f} ms of {args.repeats},"
            f" passes {passes}"
        )
        for k in range(1, len(others) + 1):
            for company in ([*others[:k], a], [a, *others[:k]]):
                passes.clear()
                got = bank.upscale_jobs(company)[0 if company[0] is a else -1].picture.rgb
                diff = float(np.abs(got - alone).max())
                same = np.array_equal(got, alone)
                print(
                    f"  with {k} other job(s), A {'last' if company[0] is not a else 'first'}:"
                    f" passes {passes},"
                    f" {'bit-identical' if same else f'DIFFERS (max {diff:.1e})'}"
                )


def _run_child(args, variant: str, tile: int, save: str | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--size",
        str(args.size),
        "--weights",
        args.weights,
        "--tile",
        str(tile),
        "--overlap",
        str(args.overlap),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
    ]
    if save:
        cmd += ["--save", save]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{variant} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=1024, help="input side (px); output is size*scale")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument(
        "--tile",
        default="512,192",
        help=(
            "tile sizes to compare, comma-separated"
            " (512 = the settings default; 192 = CPU sweet spot)"
        ),
    )
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads (default: all cores; use 1 on a busy shared box for steadier figures)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="the tiled side's precision (fp32: tiling cost alone; auto: the product default,"
        " bf16 on CPUs with native bf16)",
    )
    ap.add_argument("--quick", action="store_true", help="256 px input, one repeat")
    ap.add_argument(
        "--company",
        action="store_true",
        help="determinism check instead: one job alone vs batched with others (--size: its side;"
        " --weights: comma-separated files; --tile: the first one)",
    )
    ap.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="for --company"
    )
    ap.add_argument("--child", choices=["plain", "tiled"], help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.tile = int(args.tile)
        return child(args)
    if args.company:
        if args.size == ap.get_default("size"):
            args.size = 128
        return company(args)
    if args.quick:
        args.size, args.repeats = 256, 1
    tiles = [int(t) for t in str(args.tile).split(",")]

    sys.path.insert(0, str(ROOT))
    import numpy as np

    from hiresfix.images import psnr
    from hiresfix.upscale.caps import SizeRule
    from hiresfix.upscale.tiling import plan_image

    print(
        f"input {args.size}x{args.size}, {Path(args.weights).name}, {args.threads} thread(s),"
        f" overlap {args.overlap}, tile_batch {args.batch}, best of {args.repeats}"
    )
    for t in tiles:
        py, px = plan_image(
            args.size,
            args.size,
            tile=t,
            overlap=args.overlap,
            border=args.overlap // 2,
            rule=SizeRule(),
        )
        n = len(py.starts) * len(px.starts)
        print(
            f"  tile {t}: {n} tiles of {px.tile}x{py.tile}"
            f" = {n * py.tile * px.tile / args.size**2:.3f}x"
            " the pixels of one untiled pass"
        )

    variants = [("plain", 0)] + [("tiled", t) for t in tiles]
    runs: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
    agree = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:  # alternate order: drift hits both
                save = os.path.join(tmp, f"{v[0]}{v[1]}.npy") if r == 0 else None
                res = _run_child(args, v[0], v[1], save)
                runs[v].append(res)
                name = "plain" if v[0] == "plain" else f"tile {v[1]}"
                print(
                    f"  run {r + 1} {name:9s}: {res['seconds']:7.2f} s wall,"
                    f" {res['cpu_seconds']:7.2f} s CPU,"
                    f" peak growth {res['peak_growth_mb']:7.1f} MiB",
                    flush=True,
                )
        plain = np.load(os.path.join(tmp, "plain0.npy"))
        m = 16 * (plain.shape[0] // args.size)  # frame edge: plain zero-pads, tiled reflect-pads
        for t in tiles:
            tiled = np.load(os.path.join(tmp, f"tiled{t}.npy"))
            agree[t] = psnr(plain[m:-m, m:-m], tiled[m:-m, m:-m])

    out_mb = 3 * 4 * plain.shape[0] * plain.shape[1] / 2**20  # the float32 output both must hold
    best = {
        v: (
            min(x["seconds"] for x in rs),
            min(x["cpu_seconds"] for x in rs),
            max(x["peak_growth_mb"] for x in rs),
        )
        for v, rs in runs.items()
    }
    pw, pc, pm = best[("plain", 0)]
    print(
        f"\nplain untiled spandrel forward: {pw:.2f} s wall, {pc:.2f} s CPU,"
        f" peak growth {pm:.0f} MiB"
        f" (output alone: {out_mb:.0f} MiB)"
    )
    print(
        "tiled (ours)   time ratio (wall / CPU)   peak memory lower"
        "   beyond output   agrees with plain"
    )
    for t in tiles:
        w, c, mem = best[("tiled", t)]
        ok = "ok" if c / pc <= 1.15 and pm / mem >= 3 else "misses a target"
        print(
            f"  tile {t:4d}      {w / pw:5.3f} / {c / pc:5.3f}           {pm / mem:5.2f}x"
            f"              {(pm - out_mb) / max(mem - out_mb, 1e-9):5.2f}x"
            f"        {agree[t]:.1f} dB   {ok}"
        )
    print("targets: time ratio <= 1.15, peak memory >= 3x lower")


if __name__ == "__main__":
    main()
