"""Batched SDXL stages vs one request at a time: images/s of N compatible requests. No Ray.

N requests with distinct prompts and seeds and one base_key / hires_key run either one after
another (BaseStage.run, RefineStage.hires: what a replica without batching does) or as one shared
diffusers call per stage (run_batch, hires_batch). The two modes alternate, the median of a few
runs is printed per stage as images/s, their ratio ("batched / one at a time"), and the largest
pixel difference between a request's pictures batched and alone. The hires pass of both modes
refines the same inputs (the alone base pictures, LANCZOS-upscaled), so it compares like with like.

    python bench/sdxl_batch.py                        # tiny SDXL on the CPU, 64 px, 4 steps
    python bench/sdxl_batch.py --full --device cuda --size 768 --steps 10   # full-size, random
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hiresfix.schemas import GenerateRequest, hires_size  # noqa: E402
from hiresfix.sdxl import BaseStage, RefineStage  # noqa: E402
from hiresfix.upscale.resample import resize_picture  # noqa: E402

PROMPTS = [
    "a photo of a cat on a windowsill",
    "a castle on a hill at night",
    "a red sports car in the rain",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
    "a watercolour of a lighthouse",
    "a forest path in autumn",
    "a portrait of an old fisherman",
]


def build(args) -> tuple[BaseStage, RefineStage, str]:
    if args.full:
        # bench/ is on sys.path as the script's folder: the full-size random SDXL of gpu_sdxl.py.
        from diffusers import StableDiffusionXLImg2ImgPipeline
        from gpu_sdxl import full_size_sdxl

        from hiresfix.runtime import torch_dtype

        dtype = torch_dtype(args.dtype or "fp16")
        pipe = full_size_sdxl(args.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.enable_tiling()  # as gpu_sdxl.py (and serve_config.yaml) run it
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, dtype=dtype)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return BaseStage(pipe), RefineStage(img2img), f"full-size SDXL (random), {dtype}"
    from hiresfix.sdxl import (
        SDXLSettings,
        build_tiny_sdxl,
        load_base_pipeline,
        load_refine_pipeline,
    )

    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="sdxl-batch-"))
    if not (cache / "tiny-sdxl").exists():
        build_tiny_sdxl(cache / "tiny-sdxl")
    s = SDXLSettings(
        source="tiny", cache_dir=str(cache), device=args.device, dtype=args.dtype or "auto"
    )
    base_pipe = load_base_pipeline(s)
    refine_pipe = load_refine_pipeline(s, base=base_pipe)
    return BaseStage(base_pipe), RefineStage(refine_pipe), f"tiny SDXL, {base_pipe.dtype}"


def requests(args) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            prompt=PROMPTS[i % len(PROMPTS)] + (f", variation {i}" if i >= len(PROMPTS) else ""),
            negative_prompt="blurry, ugly",
            seed=1000 + 17 * i,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            hires_fix=True,
            hires_scale=2.0,
            denoising_strength=args.strength,
        )
        for i in range(args.batch)
    ]


def upscaled(batch, size):
    pictures = [resize_picture(p, size) for p in batch.pictures]
    return dataclasses.replace(batch, pictures=pictures, timings=dict(batch.timings))


def timed(device: str, fn):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def one_at_a_time(base, refine, reqs, ups, device):
    base_s, based = timed(device, lambda: [base.run(r) for r in reqs])
    hires_s, hired = timed(device, lambda: [refine.hires(u, r) for u, r in zip(ups, reqs)])
    return base_s, hires_s, based, hired


def batched(base, refine, reqs, ups, device):
    base_s, based = timed(device, lambda: base.run_batch([(r, None) for r in reqs]))
    hires_s, hired = timed(
        device, lambda: refine.hires_batch([(u, r, None) for u, r in zip(ups, reqs)])
    )
    return base_s, hires_s, based, hired


def max_diff(a, b) -> float:
    """Largest difference over every picture of two lists of ImageBatch, in 8-bit levels."""
    return max(
        float(np.abs(p.rgb - q.rgb).max() * 255)
        for x, y in zip(a, b)
        for p, q in zip(x.pictures, y.pictures)
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 / fp16 / bf16; default: fp16 on cuda")
    ap.add_argument("--full", action="store_true", help="full-size random SDXL (a GPU)")
    ap.add_argument("--size", type=int, default=64, help="base width = height")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strength", type=float, default=0.5, help="hires denoising_strength")
    ap.add_argument("--batch", type=int, default=8, help="requests")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", help="tiny model folder (default: a fresh temp dir)")
    args = ap.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device")

    t0 = time.perf_counter()
    base, refine, model = build(args)
    build_s = time.perf_counter() - t0
    reqs = requests(args)
    hires_wh = hires_size(args.size, args.size, 2.0)
    hires_steps = int(args.steps * args.strength)

    # Warm-up of both modes at the measured shapes (allocator, cuDNN/cuBLAS tuning per batch size).
    short = [r.model_copy(update={"num_inference_steps": 2}) for r in reqs]
    alone = [base.run(r) for r in short]
    warm_ups = [upscaled(b, hires_wh) for b in alone]
    batched(base, refine, short, warm_ups, device)
    one_at_a_time(base, refine, short, warm_ups, device)

    # The hires inputs: each request's own base pictures, upscaled (LANCZOS stands in for the
    # upscaler stage), the same for both modes.
    alone = [base.run(r) for r in reqs]
    ups = [upscaled(b, hires_wh) for b in alone]
    runs = {"one at a time": [], "batched": []}
    for i in range(args.repeats):
        modes = [("one at a time", one_at_a_time), ("batched", batched)]
        for name, mode in modes if i % 2 == 0 else modes[::-1]:  # alternate which goes first
            base_s, hires_s, based, hired = mode(base, refine, reqs, ups, device)
            runs[name].append((base_s, hires_s))
            if name == "one at a time":
                seq_base, seq_hires = based, hired
            else:
                bat_base, bat_hires = based, hired
    assert not any(isinstance(o, Exception) for o in bat_base + bat_hires)

    images = sum(r.num_images for r in reqs)
    med = {
        name: {
            "base": statistics.median(b for b, _ in rs),
            "hires": statistics.median(h for _, h in rs),
            "both": statistics.median(b + h for b, h in rs),
        }
        for name, rs in runs.items()
    }
    diff = {"base": max_diff(seq_base, bat_base), "hires": max_diff(seq_hires, bat_hires)}
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(
        f"{dev_name}, {model} (built in {build_s:.1f} s): {args.batch} requests x 1 image,"
        f" base {args.size} px / {args.steps} steps, hires {hires_wh[0]} px strength"
        f" {args.strength} ({hires_steps} steps); median of {args.repeats} runs,"
        f" torch threads {torch.get_num_threads()}"
    )
    print(
        f"  {'stage':<12} {'one at a time':>15} {'batched':>12} {'batched / one at a time':>24}"
        f" {'max |batched - alone|':>22}"
    )
    for stage in ("base", "hires", "both"):
        seq = images / med["one at a time"][stage]
        bat = images / med["batched"][stage]
        d = f"{max(diff.values()) if stage == 'both' else diff[stage]:.0f} of 255"
        print(f"  {stage:<12} {seq:>9.2f} img/s {bat:>6.2f} img/s {bat / seq:>23.2f}x {d:>22}")
    print(
        json.dumps(
            {
                "device": dev_name,
                "model": model,
                "requests": args.batch,
                "size": args.size,
                "steps": args.steps,
                "strength": args.strength,
                "median_s": med,
                "runs_s": runs,
                "max_diff_8bit": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
