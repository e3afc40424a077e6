"""What each `quality` preset of /generate costs: a whole hires fix (base, x2, refine) per preset,
in seconds and as a ratio to `balanced`, measured in the same run. No Ray.

The presets are hiresfix.schemas.QUALITY_PRESETS (steps, sampler, hires strength); the upscale
between the passes is LANCZOS here, the same for every preset, so the figures compare the two SDXL
passes, which is all a preset changes. Presets alternate, median of --repeats.

    python bench/quality_presets.py                     # tiny SDXL on the CPU, 128 px
    python bench/quality_presets.py --full --device cuda --size 768   # full-size, random weights
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdxl_batch import build, timed, upscaled  # noqa: E402

from hiresfix.schedule import hires_steps_run  # noqa: E402
from hiresfix.schemas import QUALITY_PRESETS, GenerateRequest, hires_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 / fp16 / bf16; default: fp16 on cuda")
    ap.add_argument("--full", action="store_true", help="full-size random SDXL (a GPU)")
    ap.add_argument("--size", type=int, default=128, help="base width = height")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", help="tiny model folder (default: a fresh temp dir)")
    args = ap.parse_args()
    base, refine, what = build(args)
    reqs = {
        name: GenerateRequest(
            prompt="a lighthouse on a cliff at dusk",
            width=args.size,
            height=args.size,
            seed=7,
            hires_fix=True,
            hires_scale=2,
            quality=None if name == "(none)" else name,
        )
        for name in (*QUALITY_PRESETS, "(none)")  # (none): the defaults, 30 euler steps
    }
    hires = hires_size(args.size, args.size, 2)

    def hires_fix(req):
        return refine.hires(upscaled(base.run(req), hires), req)

    for req in reqs.values():  # warm-up: first-call costs out of the figures
        timed(args.device, lambda req=req: hires_fix(req))
    seconds: dict[str, list[float]] = {name: [] for name in reqs}
    for _ in range(args.repeats):
        for name, req in reqs.items():
            seconds[name].append(timed(args.device, lambda req=req: hires_fix(req))[0])
    print(
        f"{args.device}, {what}: hires fix {args.size} -> {hires[0]} px per preset,"
        f" median of {args.repeats}"
    )
    ref = statistics.median(seconds["balanced"])
    print(f"  {'preset':9} {'steps':>5} {'hires':>5} {'seconds':>8} {'vs balanced':>12}")
    for name, req in reqs.items():
        s = statistics.median(seconds[name])
        second = hires_steps_run(req.num_inference_steps, req.hires_steps, req.denoising_strength)
        print(f"  {name:9} {req.num_inference_steps:>5} {second:>5} {s:>8.2f} {s / ref:>11.2f}x")


if __name__ == "__main__":
    main()
