"""GPU benchmark of the SDXL hires fix with a FULL-SIZE SDXL of random weights (nothing downloaded).

The architecture is the published stabilityai/stable-diffusion-xl-base-1.0 one, written inline
below; weights are random, so the pictures are meaningless but every kernel, shape and byte of
VRAM is that of the real model. It runs the product's own stages (hiresfix.sdxl.BaseStage /
RefineStage) on the same request the service gets:

    base 768 px, 30 steps  ->  upscale x2 to 1536 px  ->  img2img refine at strength 0.5

and prints the time of each part, the whole hires fix, and peak VRAM. No Ray.

    python bench/gpu_sdxl.py                     # fp16 on cuda, random x2plus-shaped RealESRGAN
    python bench/gpu_sdxl.py --lanczos           # LANCZOS upscale instead
    python bench/gpu_sdxl.py --tiny --device cpu --size 64 --steps 4 --repeats 1   # smoke test
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

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from hiresfix.images import psnr  # noqa: E402
from hiresfix.runtime import PRECISIONS, torch_dtype  # noqa: E402
from hiresfix.schemas import GenerateRequest  # noqa: E402
from hiresfix.sdxl import BaseStage, RefineStage, SDXLSettings  # noqa: E402
from hiresfix.sdxl.generate import encode_prompt  # noqa: E402
from hiresfix.sdxl.tiny import SDXL_SCHEDULER, clip_tokenizer, tiny_sdxl_pipeline  # noqa: E402

# --- stabilityai/stable-diffusion-xl-base-1.0, as published (unet/, vae/, text_encoder*/) -------

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_type="UNetMidBlock2DCrossAttn",
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    # madebyollin/sdxl-vae-fp16-fix (what serve_config.yaml runs) says False; the stock VAE says
    # True and then diffusers decodes in float32 (--stock-vae).
    force_upcast=False,
)
CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)
CLIP_BIGG = dict(  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    layer_norm_eps=1e-5,
)
# Parameter counts of the published weights: a typo in the configs above changes them.
PUBLISHED_PARAMS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def full_size_sdxl(
    device: str, dtype: torch.dtype, stock_vae: bool = False
) -> StableDiffusionXLPipeline:
    tokenizer = clip_tokenizer(tempfile.mkdtemp(prefix="sdxl-tok-"))  # small vocab; ids fit 49408
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise straight on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**{**SDXL_VAE, "force_upcast": stock_vae})
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )
    for name, want in PUBLISHED_PARAMS.items():
        got = sum(p.numel() for p in getattr(pipe, name).parameters())
        assert got == want, f"{name}: {got:,} parameters, the published model has {want:,}"
    return pipe.to(device=device, dtype=dtype)


# --- the measured request -----------------------------------------------------------------------


class Upscale:
    """The upscale stage's own code (UpscalerBank: tiles, fp16 with NaN check, exact resize) on a
    RealESRGAN_x2plus-shaped net of random weights or a given file; LANCZOS with --lanczos."""

    def __init__(self, weights: str | None, device: str, dtype: str, lanczos: bool, tile: int):
        from hiresfix.upscale import UpscalerBank, UpscalerModelSpec, UpscalerSettings

        self.use_neural = not lanczos
        path = Path(weights).resolve() if weights else None
        if path is None and self.use_neural:
            from random_nets import (
                save_random_x2plus,  # bench/ is on sys.path as the script's folder
            )

            path = save_random_x2plus(Path(tempfile.mkdtemp(prefix="x2plus-")))
        models = [UpscalerModelSpec(name=path.stem, file=path.name)] if path else []
        self.bank = UpscalerBank.from_settings(
            UpscalerSettings(
                weights_dir=str(path.parent) if path else "weights",
                device="cuda" if device.startswith("cuda") else "cpu",
                dtype=dtype,
                tile_size=tile,
                models=models,
            )
        )
        info = self.bank.models_info()
        if self.use_neural and not info[0].available:
            raise SystemExit(f"upscaler not loaded: {info[0].reason}: {info[0].detail}")
        self.name = (
            f"{info[0].name}, {info[0].dtype}, tile {tile}" if self.use_neural else "lanczos"
        )

    def __call__(self, batch, size: tuple[int, int]):
        outs = self.bank.upscale(
            batch.pictures, 0, use_neural=self.use_neural, target_sizes=[size] * len(batch.pictures)
        )
        assert all(o.upscaler_used != "lanczos" for o in outs) or not self.use_neural, outs[
            0
        ].fallback_detail
        return dataclasses.replace(
            batch, pictures=[o.picture for o in outs], timings=dict(batch.timings)
        )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> tuple[float, float]:
    if not device.startswith("cuda"):
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def hold_vae_bf16(pipe) -> None:
    from hiresfix.sdxl.loading import _set_vae_dtype

    settings = SDXLSettings(vae_dtype="bf16")
    _set_vae_dtype(pipe.vae, settings, pipe.unet.device, pipe.unet.dtype)


def timed(fn, device: str, repeats: int = 7) -> float:
    """Median seconds of fn(), GPU work included."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hires_fix(
    base: BaseStage, refine: RefineStage, upscale: Upscale, req: GenerateRequest, device: str
) -> dict:
    t = {}
    sync(device)
    t0 = time.perf_counter()
    batch = base.run(req)
    sync(device)
    t1 = time.perf_counter()
    batch = upscale(batch, req.output_size())
    sync(device)
    t2 = time.perf_counter()
    out = refine.hires(batch, req)
    sync(device)
    t3 = time.perf_counter()
    assert out.pictures[0].size == req.output_size()
    t.update(base=t1 - t0, upscale=t2 - t1, refine=t3 - t2, hires_fix=t3 - t0)
    return t, out.pictures[0].rgb_u8()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=PRECISIONS)
    ap.add_argument("--size", type=int, default=768, help="base width = height")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--upscaler-weights", help="a RealESRGAN file; default a random x2plus-shaped net"
    )
    ap.add_argument(
        "--upscale-tile",
        type=int,
        default=800,
        help="upscaler tile_size (serve_config.yaml, x2plus)",
    )
    ap.add_argument("--lanczos", action="store_true", help="upscale with LANCZOS instead")
    ap.add_argument("--stock-vae", action="store_true", help="force_upcast VAE (decode in fp32)")
    ap.add_argument("--no-vae-tiling", action="store_true")
    ap.add_argument("--variants", action="store_true", help="then also with VAE tiling off")
    ap.add_argument(
        "--levers",
        action="store_true",
        help="then also with fused QKV projections, a channels_last UNet, a stock (fp16-unsafe)"
        " VAE upcast per call, and that VAE held in bf16",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="then also with torch.compile(unet); compiling both sizes took > 4 min on an H200",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="the tiny SDXL instead (smoke-test this script)"
    )
    args = ap.parse_args()

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "no CUDA device: this benchmark needs a GPU (or --tiny --device cpu for a smoke test)"
        )
    dtype = torch_dtype(args.dtype)

    t0 = time.perf_counter()
    if args.tiny:
        pipe = tiny_sdxl_pipeline(workdir=tempfile.mkdtemp()).to(device=device, dtype=dtype)
    else:
        pipe = full_size_sdxl(device, dtype, stock_vae=args.stock_vae)
    pipe.set_progress_bar_config(disable=True)
    if not args.no_vae_tiling:
        pipe.vae.enable_tiling()
    # Refine with the base weights, shared (the service's default: no separate refiner).
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, dtype=dtype)
    base, refine = BaseStage(pipe), RefineStage(img2img)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # drop the float32 construction buffers from the reserved figure
    upscale = Upscale(args.upscaler_weights, device, args.dtype, args.lanczos, args.upscale_tile)
    build_s = time.perf_counter() - t0
    weights_gib = (
        sum(
            p.numel() * p.element_size()
            for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
            for p in m.parameters()
        )
        / 2**30
    )

    req = GenerateRequest(
        prompt="a photo of an astronaut riding a horse on the moon, detailed, sharp",
        negative_prompt="blurry, ugly",
        seed=1234,
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=7.0,
        scheduler=args.scheduler,
        hires_fix=True,
        hires_scale=args.scale,
        denoising_strength=args.strength,
    )
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(
        f"{name}, {args.dtype}, {'tiny' if args.tiny else 'full-size'} SDXL with random weights"
        f" ({weights_gib:.2f} GiB), built in {build_s:.1f} s;"
        f" median of {args.repeats} runs per variant"
    )
    # Variants of the same loaded model, in one process, so their ratios compare like with like.
    variants = [("as configured" + ("" if args.no_vae_tiling else " (VAE tiling on)"), None)]
    if args.variants and not args.no_vae_tiling:
        variants.append(("VAE tiling off", lambda: pipe.vae.disable_tiling()))
    if args.levers:  # issue 14's levers, one on top of the other
        variants.append(("+ fused QKV projections (UNet, VAE)", pipe.fuse_qkv_projections))
        variants.append(
            ("+ channels_last UNet", lambda: pipe.unet.to(memory_format=torch.channels_last))
        )
        # A VAE that overflows in fp16 (the stock SDXL one): diffusers' fp32 copy per call, then
        # the product's answer to it (sdxl.vae_dtype: auto picks bf16 on such a GPU).
        variants.append(
            (
                "stock VAE: fp32 upcast per call",
                lambda: pipe.vae.register_to_config(force_upcast=True),
            )
        )
        variants.append(("+ that VAE held in bf16 (sdxl.vae_dtype)", lambda: hold_vae_bf16(pipe)))
    if args.compile:
        variants.append(("+ torch.compile(unet)", lambda: pipe.unet.compile()))
    results = []
    for label, change in variants:
        if change:
            change()
        results.append(measure(label, base, refine, upscale, req, args, device))
        if len(results) > 1:  # same seed: how far this lever alone moved the final picture
            before = results[-2]
            print(
                f"  PSNR of the hires fix vs '{before['variant']}':"
                f" {psnr(before['picture'], results[-1]['picture']):.1f} dB"
            )
    for r in results:
        del r["picture"]
    print(
        json.dumps(
            {
                "device": name,
                "dtype": args.dtype,
                "tiny": args.tiny,
                "size": args.size,
                "steps": args.steps,
                "strength": args.strength,
                "upscaler": upscale.name,
                "variants": results,
            }
        )
    )


def measure(label: str, base, refine, upscale, req: GenerateRequest, args, device: str) -> dict:
    # Warm-up: cuDNN/cuBLAS autotuning, allocator growth, compilation (both sizes); not measured.
    t0 = time.perf_counter()
    hires_fix(base, refine, upscale, req.model_copy(update={"num_inference_steps": 4}), device)
    warm_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs, pictures = zip(
        *(hires_fix(base, refine, upscale, req, device) for _ in range(args.repeats))
    )
    allocated, reserved = peak_gib(device)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    refine_steps = int(args.steps * args.strength)
    out_w, out_h = req.output_size()
    print(f"{label} (warm-up {warm_s:.1f} s):")
    rows = [
        (
            f"base {args.size}x{args.size}, {args.steps} steps, {args.scheduler}",
            med["base"],
            args.steps,
        ),
        (f"upscale to {out_w}x{out_h} ({upscale.name})", med["upscale"], 0),
        (
            f"refine {out_w}x{out_h}, strength {args.strength}, {refine_steps} steps",
            med["refine"],
            refine_steps,
        ),
        ("hires fix, total (goal <= 2.5 s)", med["hires_fix"], 0),
    ]
    for row, seconds, steps in rows:
        rate = f"  {steps / seconds:6.2f} it/s (incl. text encoding and VAE)" if steps else ""
        print(f"  {row:<58} {seconds:8.2f} s{rate}")
    print(f"  peak VRAM while serving: {allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    # What reusing the base pass's prompt embeddings in the refine pass would save (issue 14's
    # lever): each pass encodes prompt + negative once.
    encode_s = timed(lambda: encode_prompt(base.pipe, req.prompt, req.negative_prompt, 7.0), device)
    print(
        f"  text encoding, prompt + negative, per pass: {encode_s * 1e3:.1f} ms"
        f" ({encode_s / med['hires_fix'] * 100:.2f}% of the hires fix)"
    )
    return {
        "variant": label,
        "picture": pictures[-1],  # the same seed each run: compared across variants (PSNR)
        "warmup_s": round(warm_s, 1),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "runs_s": runs,
        "peak_vram_gib": {"allocated": round(allocated, 2), "reserved": round(reserved, 2)},
    }


if __name__ == "__main__":
    main()
