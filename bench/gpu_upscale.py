"""GPU latency and peak VRAM of the upscaler: RealESRGAN_x2plus-shaped, 768 -> 1536
(prints figures).

Two measurements of the same network on the same input, in one run:
  raw      one plain forward pass of the whole image (the floor any upscaler can reach);
  product  hiresfix's UpscalerBank, as the upscaler deployment runs it: tiles, fp16 with the
           NaN/black check, feathered blending, exact resize, float32 picture back in host memory.
The ratio product/raw is the cost of tiling and of the safety checks.

The net has RealESRGAN_x2plus's shape with RANDOM weights (speed and memory depend on the shape, not
the values), saved as a release file and loaded through the product's spandrel path, which must
detect scale 2. `--weights` adds real files (e.g. an x4 model serving the same x2 request).

    python bench/gpu_upscale.py                       # fp16, 768 -> 1536, tiles 512 and 1024
    python bench/gpu_upscale.py --tiles 800 --cudnn-benchmark both
    python bench/gpu_upscale.py --dtype bf16 --size 1024 --tiles 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from random_nets import save_random_x2plus  # noqa: E402  (bench/ is on sys.path as the script's folder)

from hiresfix.runtime import PRECISIONS, torch_dtype  # noqa: E402

DEVICE = "cuda"  # a module constant so a CPU dry run of this script can swap it


def _raw(path: Path, args, variant: str = "eager") -> dict:
    """One untiled forward of the whole image, timed on the GPU's own clock. `variant`: eager,
    channels_last (NHWC activations), compiled (torch.compile mode reduce-overhead: inductor
    kernels replayed as a CUDA graph), compiled_cl (both)."""
    import spandrel

    desc = spandrel.ModelLoader().load_from_file(str(path))
    dtype, dev = torch_dtype(args.dtype), torch.device(DEVICE)
    model = desc.model.eval().to(dev, dtype)
    x = torch.rand(1, 3, args.size, args.size, device=dev, dtype=dtype)
    if variant.endswith("cl") or variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t_compile = 0.0
    if variant.startswith("compiled"):
        model = torch.compile(model, mode="reduce-overhead")
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize()
        t_compile = time.perf_counter() - t0
    with torch.inference_mode():
        for _ in range(args.warmup):
            y = model(x)
        torch.cuda.synchronize()
        del y
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        finite = bool(torch.isfinite(y).all())
    out = {
        "desc": desc,
        "times": times,
        "peak": torch.cuda.max_memory_allocated(),
        "finite": finite,
        "shape": tuple(y.shape),
        "compile_s": t_compile,
    }
    del model, x, y
    torch.cuda.empty_cache()
    return out


def _product(path: Path, tile: int, args) -> dict:
    """The deployment's code path, wall clock from host picture to host picture."""
    import numpy as np

    from hiresfix.images import Picture
    from hiresfix.upscale import UpscalerBank, UpscalerModelSpec, UpscalerSettings

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bank = UpscalerBank.from_settings(
        UpscalerSettings(
            weights_dir=str(path.parent),
            device=DEVICE,
            dtype=args.dtype,
            tile_size=tile,
            channels_last=args.channels_last,
            models=[UpscalerModelSpec(name="m", file=path.name)],
        )
    )
    info = bank.models_info()[0]
    if not info.available:
        raise SystemExit(f"{path.name}: not loaded: {info.reason}: {info.detail}")
    runner = bank.runner()
    rng = np.random.default_rng(0)
    pic = Picture(rng.random((args.size, args.size, 3), dtype=np.float32))
    target = (2 * args.size, 2 * args.size)
    for _ in range(args.warmup):
        bank.upscale([pic], 2.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = bank.upscale([pic], 2.0)[0]
        times.append(time.perf_counter() - t0)  # .picture is host memory: nothing left in flight
    assert out.picture.size == target and out.upscaler_used == "m", (
        out.picture.size,
        out.upscaler_used,
    )
    res = {
        "times": times,
        "peak": torch.cuda.max_memory_allocated(),
        "redone": runner.redone_tiles,
        "dtype": runner.dtype_name,
        "scale": runner.caps.scale,
    }
    del bank, runner
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=768, help="input side in px (output is 2x)")
    ap.add_argument("--dtype", choices=PRECISIONS, default="fp16")
    ap.add_argument(
        "--tiles",
        default="512,1024",
        help="product tile_size values (serve_config.yaml: 512, x2plus 800)",
    )
    ap.add_argument(
        "--weights", action="append", default=[], help="also a real .pth/.safetensors file"
    )
    ap.add_argument(
        "--cudnn-benchmark",
        choices=["off", "on", "both"],
        default="off",
        help="torch.backends.cudnn.benchmark (the deployment leaves it off)",
    )
    ap.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="the product's upscaler.channels_last (auto: off on a GPU)",
    )
    ap.add_argument(
        "--raw-variants",
        default="eager",
        help="plain forwards to time: eager,channels_last,compiled,compiled_cl (compiled ="
        " torch.compile reduce-overhead, CUDA graphs; the best plain forward we can write)",
    )
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: this benchmark needs one")
    import spandrel

    print(
        f"device : {torch.cuda.get_device_name()}, torch {torch.__version__},"
        f" spandrel {spandrel.__version__}"
    )
    print(
        f"request: {args.size}x{args.size} -> {2 * args.size}x{2 * args.size}, {args.dtype};"
        f" median of {args.runs} after {args.warmup} warm-ups; goal < 0.15 s and < 1.5 GB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = [save_random_x2plus(Path(tmp))] + [Path(w).resolve() for w in args.weights]
        for path in files:
            for mode in ["off", "on"] if args.cudnn_benchmark == "both" else [args.cudnn_benchmark]:
                torch.backends.cudnn.benchmark = mode == "on"
                print(f"cudnn.benchmark {mode}:")
                _one_file(path, args)


def _one_file(path: Path, args) -> None:
    """Raw forward, then the product at each tile size, for one weight file."""
    raw = _raw(path, args)
    desc = raw["desc"]
    best = statistics.median(raw["times"])
    if path.name.startswith("RealESRGAN_x2plus"):
        assert desc.scale == 2 and desc.input_channels == 3, (desc.scale, desc.input_channels)
    raw_s = statistics.median(raw["times"])
    print(
        f"{path.name}: {desc.architecture.name} x{desc.scale}"
        f" ({sum(p.numel() for p in desc.model.parameters()) / 1e6:.1f} M params)"
    )
    print(
        f"  raw forward, whole image      : {raw_s * 1e3:7.1f} ms,"
        f" peak {raw['peak'] / 2**30:.2f} GiB"
        f" allocated{'' if raw['finite'] else ' (output has NaN/inf: random weights overflow)'}"
    )
    for variant in [v for v in args.raw_variants.split(",") if v and v != "eager"]:
        try:
            other = _raw(path, args, variant)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a finding too
            print(f"  raw forward, {variant:17s}: failed: {type(exc).__name__}: {exc}")
            continue
        s = statistics.median(other["times"])
        best = min(best, s)
        print(
            f"  raw forward, {variant:17s}: {s * 1e3:7.1f} ms,"
            f" peak {other['peak'] / 2**30:.2f} GiB allocated"
            + (f", compiled in {other['compile_s']:.0f} s" if other["compile_s"] else "")
        )
    for tile in [int(t) for t in args.tiles.split(",")]:
        prod = _product(path, tile, args)
        s = statistics.median(prod["times"])
        print(
            f"  product, tile_size {tile:<5}     : {s * 1e3:7.1f} ms,"
            f" peak {prod['peak'] / 2**30:.2f} GiB"
            f" allocated; {s / raw_s:.2f}x the raw time, {s / best:.2f}x the best plain forward"
            f" (target <= 1.1x and <= 30 ms); {prod['dtype']},"
            f" {prod['redone']} tile(s) redone in fp32"
        )


if __name__ == "__main__":
    main()
