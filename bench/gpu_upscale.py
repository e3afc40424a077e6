"""GPU latency and peak VRAM of a RealESRGAN_x2plus-shaped network, standalone (torch + spandrel).

The net is an RRDBNet with RealESRGAN_x2plus's shape (64 features, 23 blocks, grow 32,
pixel-unshuffle input: 12 channels into an x4 body) with RANDOM weights: speed and memory depend on
the shape, not on the values, and no weight file is needed. It is built with spandrel's own RRDBNet
and then loaded through `spandrel.ModelLoader().load_from_state_dict`, the same detection path the
service uses, which must report scale 2.

    python bench/gpu_upscale.py                       # fp16, 768 -> 1536, 10 timed runs
    python bench/gpu_upscale.py --dtype bf16 --size 1024 --batch 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=768, help="input side in px (output is 2x)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: this benchmark needs one")

    import spandrel
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=12, out_nc=3, num_filters=64, num_blocks=23, scale=4, shuffle_factor=2)
    desc = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    assert desc.scale == 2 and desc.input_channels == 3, (desc.scale, desc.input_channels)
    dtype, dev = DTYPES[args.dtype], torch.device("cuda")
    if (dtype is torch.float16 and not desc.supports_half) or (dtype is torch.bfloat16 and not desc.supports_bfloat16):
        raise SystemExit(f"{desc.architecture.name} does not support {args.dtype}")
    torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick the fastest kernels
    model = desc.model.eval().to(dev, dtype)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev, dtype=dtype)

    with torch.inference_mode():
        for _ in range(args.warmup):
            y = model(x)
        torch.cuda.synchronize()
        del y
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))  # ms, measured on the GPU's own clock
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        finite = bool(torch.isfinite(y).all())

    out = tuple(y.shape)
    assert out == (args.batch, 3, 2 * args.size, 2 * args.size), out
    print(f"device   : {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, spandrel {spandrel.__version__}")
    print(f"model    : {desc.architecture.name} {' '.join(desc.tags)}, x{desc.scale}, {args.dtype},"
          f" weights {weights_mb:.1f} MiB")
    print(f"shape    : {args.batch}x3x{args.size}x{args.size} -> {'x'.join(map(str, out))}")
    print(f"latency  : median {statistics.median(times):.1f} ms, min {min(times):.1f} ms, max {max(times):.1f} ms"
          f" over {args.runs} runs ({args.batch * args.runs * 1000 / sum(times):.2f} images/s)")
    print(f"peak VRAM: {peak / 2**20:.0f} MiB allocated ({(peak - before) / 2**20:.0f} MiB above weights+input),"
          f" {reserved / 2**20:.0f} MiB reserved by the caching allocator")
    if not finite:
        print("warning  : output has NaN/inf (random weights overflowing in low precision;"
              " the service redoes such tiles in fp32)")


if __name__ == "__main__":
    main()
