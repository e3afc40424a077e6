"""Seconds per face of the face restoration pass: detection, alignment, restorer forward, paste.

Uses skimage's astronaut photo (one face) and a GFPGAN built with RANDOM weights (same
architecture and size as GFPGANv1.3/1.4, so the timing is representative; the picture is not),
loaded through FaceRestorer/spandrel exactly like a real weights file.

    python bench/face_bench.py                 # CPU, 1 thread, 3 runs
    python bench/face_bench.py --threads 2 --runs 5
    python bench/face_bench.py --weights weights/GFPGANv1.4.pth   # a real file instead

Runs on CUDA as well when torch sees a GPU (skip with --cpu-only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from random_nets import save_random_gfpgan  # noqa: E402  (bench/ is on sys.path as the script's folder)


def _bench(restorer, picture, runs: int, device: str) -> dict:
    import torch

    restorer.restore(picture, 0.5)  # warm-up (allocator, cudnn autotune, first-call overheads)
    rows, cpu = [], []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        c0 = time.process_time()
        w0 = time.perf_counter()
        _, info = restorer.restore(picture, 0.5)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - w0
        cpu.append(time.process_time() - c0)
        assert info.applied and info.faces_found == 1, info
        t = restorer.last_timings
        rows.append((t.detect, t.align, t.forward, t.paste, wall))
    med = [statistics.median(col) for col in zip(*rows)]
    return {
        "detect": med[0],
        "align": med[1],
        "forward": med[2],
        "paste": med[3],
        "total": med[4],
        "process_cpu": statistics.median(cpu),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenCV threads on CPU")
    ap.add_argument(
        "--weights", type=Path, default=None, help="a real face model file instead of random GFPGAN"
    )
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import cv2
    import numpy as np
    import torch
    from skimage import data

    from hiresfix.face import FaceRestorer, FaceSettings
    from hiresfix.images import Picture

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    picture = Picture(data.astronaut().astype(np.float32) / 255.0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights.resolve() if args.weights else save_random_gfpgan(Path(tmp))
        print(
            f"model: {weights.name}  image: astronaut 512x512 (1 face)"
            f"  torch {torch.__version__}  threads {args.threads}"
        )
        for device in devices:
            t0 = time.perf_counter()
            r = FaceRestorer.from_settings(
                FaceSettings(models=[{"name": "face", "file": str(weights)}], device=device)
            )
            load = time.perf_counter() - t0
            if not r.available():
                print(f"{device}: unavailable: {r.models_info()[0].detail}")
                continue
            info = r.models_info()[0]
            res = _bench(r, picture, args.runs, device)
            name = (
                torch.cuda.get_device_name()
                if device == "cuda"
                else f"CPU x{args.threads} thread(s)"
            )
            print(
                f"{device} ({name}, {info.architecture} {info.dtype}), seconds per face,"
                f" median of {args.runs}:"
                f" detect {res['detect']:.3f} | align {res['align']:.4f}"
                f" | forward {res['forward']:.3f}"
                f" | paste {res['paste']:.4f} | total {res['total']:.3f}"
                f" (process CPU {res['process_cpu']:.2f}) | load {load:.1f}"
            )
            del r
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
