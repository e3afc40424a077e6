"""hiresfix's UpscalerBank vs Real-ESRGAN's own `RealESRGANer`, side by side on this CPU.

The peer is what users run today: PyPI `realesrgan` 0.3.0 + `basicsr` 1.4.2, installed by this
script into its own venv (.cache/peer-venv) that reuses the project's torch, numpy and OpenCV
through a .pth file (both sides run the very same torch/oneDNN build), with the usual
`torchvision.transforms.functional_tensor` alias that basicsr needs on torchvision >= 0.17.

Same x4plus weights (../shared/weights), same photo (skimage astronaut, resized), outscale 2, the
same thread count, a fresh process per run, a warm-up call first, runs rotating between the sides.
Settings:
  untiled   W x H = 128 x 160: the peer with tile 0; hiresfix with the CPU profile (tile 192,
            overlap 16: the image fits in one tile)
  tile 192  256 x 320: the peer with tile 192 (tile_pad 10); hiresfix with the CPU profile
Peer options are inference_realesrgan.py's defaults (tile_pad 10, pre_pad 0, fp32 on a CPU).
hiresfix runs twice per round: its default CPU precision (fp32) and `dtype: bf16` (the CPU's
native bf16 dot products; ~51 dB from fp32 in 8-bit output). Prints each run, the medians of wall
and CPU seconds, the ratio hiresfix / peer (target <= 0.8), and how far apart the outputs are
(PSNR in 8 bits: peer vs hiresfix differs by edge handling and the final resample; bf16 vs fp32 by
precision). CPU seconds are steadier than wall time on a shared box.

    python bench/peer_upscale.py                      # both settings, 3 runs each
    python bench/peer_upscale.py --runs 5 --setting untiled
    python bench/peer_upscale.py --profile untiled    # torch profiler table of one hiresfix call
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "realesrgan-x4plus.safetensors"
PEER_VENV = ROOT / ".cache" / "peer-venv"
PEER_PINS = ["basicsr==1.4.2", "realesrgan==0.3.0", "addict", "yapf", "future"]
SETTINGS = {"untiled": ((128, 160), 0), "tile192": ((256, 320), 192)}
CPU_PROFILE = {"tile_size": 192, "tile_overlap": 16}  # serve_config.cpu.yaml's upscaler
# hiresfix twice: `dtype: fp32`, and `dtype: bf16`, which `auto` (the default) picks on a CPU with
# native bf16 (AVX512-BF16 / AMX; hiresfix/upscale/runner.py), else fp32.
SIDES = {"peer": "peer", "ours": "hiresfix fp32", "ours_bf16": "hiresfix bf16"}


def peer_python() -> Path:
    """The peer's venv, built on first use (~10 s: only pure-Python packages are installed)."""
    py = PEER_VENV / "bin" / "python"
    if py.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # torch, numpy, OpenCV, scikit-image from the project's venv: one torch build for both sides.
    Path(purelib, "hiresfix-main-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "wheel", "setuptools"], check=True)
    # basicsr's setup.py imports torch: build without isolation, against the shared torch.
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", *PEER_PINS], check=True)
    return py


def photo(w: int, h: int):
    import numpy as np
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(im)  # RGB uint8


def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    (w, h), tile = SETTINGS[args.setting]
    rgb = photo(w, h)
    if args.child == "peer":
        import torchvision.transforms.functional as tvf

        sys.modules.setdefault("torchvision.transforms.functional_tensor", tvf)
        from basicsr.archs.rrdbnet_arch import RRDBNet
        from realesrgan import RealESRGANer
        from safetensors.torch import load_file

        net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
        # RealESRGANer reads a .pth with `params_ema`, as the release files are.
        pth = Path(tempfile.mkdtemp()) / "RealESRGAN_x4plus.pth"
        torch.save({"params_ema": load_file(args.weights)}, pth)
        up = RealESRGANer(
            scale=4, model_path=str(pth), model=net, tile=tile, tile_pad=10, pre_pad=0, half=False,
            device=torch.device("cpu"),
        )  # fmt: skip
        bgr = np.ascontiguousarray(rgb[..., ::-1])

        def run():
            out, _ = up.enhance(bgr, outscale=2)
            return out[..., ::-1]
    else:
        sys.path.insert(0, str(ROOT))
        from hiresfix.images import Picture
        from hiresfix.upscale import UpscalerBank, UpscalerModelSpec, UpscalerSettings

        bank = UpscalerBank.from_settings(
            UpscalerSettings(
                weights_dir=str(Path(args.weights).parent),
                num_threads=args.threads,
                device="cpu",
                dtype="bf16" if args.child == "ours_bf16" else "fp32",
                **CPU_PROFILE,
                models=[UpscalerModelSpec(name="x4plus", file=Path(args.weights).name)],
            )
        )
        assert bank.neural_available(), bank.models_info()
        pic = Picture(rgb.astype(np.float32) / 255.0)

        def run():
            out = bank.upscale([pic], 2.0)[0]
            assert out.fallback_reason is None, out.fallback_detail
            return out.picture.rgb_u8()

    run()  # warm-up: kernels, allocator, oneDNN primitive caches
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    c0, t0 = time.process_time(), time.perf_counter()
    out = run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.save:
        np.save(args.save, np.ascontiguousarray(out))
    result = {"seconds": seconds, "cpu_seconds": cpu, "shape": list(out.shape)}
    print("RESULT " + json.dumps(result), flush=True)


def _run(args, who: str, setting: str, save: str | None) -> dict:
    py = str(peer_python()) if who == "peer" else sys.executable
    cmd = [py, __file__, "--child", who, "--setting", setting, "--weights", args.weights]
    cmd += ["--threads", str(args.threads)] + (["--save", save] if save else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{who} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    ap.add_argument("--profile", choices=list(SETTINGS), help="profile one hiresfix call instead")
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.profile:
        args.child, args.setting = "ours", args.profile
        return child(args)
    import numpy as np
    import torch

    settings = list(SETTINGS) if args.setting == "both" else [args.setting]
    print(
        f"{Path(args.weights).name}, outscale 2, {args.threads} threads, torch {torch.__version__},"
        f" {args.runs} runs per side, fresh process each, alternating; seconds of one call after a"
        " warm-up call"
    )
    peer_python()
    sys.path.insert(0, str(ROOT))
    from hiresfix.images import psnr
    from hiresfix.upscale.runner import cpu_has_native_bf16

    auto = "bf16" if cpu_has_native_bf16() else "fp32"
    print(f"hiresfix's default (dtype auto) on this CPU: {auto}")
    for setting in settings:
        (w, h), tile = SETTINGS[setting]
        wall: dict[str, list[float]] = {k: [] for k in SIDES}
        cpu: dict[str, list[float]] = {k: [] for k in SIDES}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.runs):
                order = list(SIDES)[r % 3 :] + list(SIDES)[: r % 3]  # rotate: drift hits all
                for who in order:
                    save = os.path.join(tmp, f"{who}.npy") if r == 0 else None
                    res = _run(args, who, setting, save)
                    wall[who].append(res["seconds"])
                    cpu[who].append(res["cpu_seconds"])
                print(
                    f"  {setting:8s} {w}x{h} run {r + 1}: "
                    + ", ".join(
                        f"{SIDES[k]} {wall[k][-1]:6.2f} s ({cpu[k][-1]:6.2f} s CPU)" for k in SIDES
                    ),
                    flush=True,
                )
            outs = {k: np.load(os.path.join(tmp, f"{k}.npy")) for k in SIDES}
        med = statistics.median
        label = "untiled" if not tile else f"tile {tile}"
        print(f"{label} {w}x{h} -> {2 * w}x{2 * h}, median of {args.runs}:")
        for k in SIDES:
            line = f"  {SIDES[k]:14s} wall {med(wall[k]):6.2f} s  CPU {med(cpu[k]):6.2f} s"
            if k != "peer":
                line += (
                    f"  hiresfix/peer wall {med(wall[k]) / med(wall['peer']):.2f}"
                    f" CPU {med(cpu[k]) / med(cpu['peer']):.2f} (target <= 0.80);"
                    f" vs peer {psnr(outs['peer'], outs[k]):.1f} dB"
                )
            print(line, flush=True)
        print(f"  bf16 vs fp32 output: {psnr(outs['ours'], outs['ours_bf16']):.1f} dB", flush=True)


if __name__ == "__main__":
    main()
