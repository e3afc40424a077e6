"""A tiny, randomly initialised SDXL (base and refiner) built from configs, fully offline.

Same classes and the same on-disk layout as the real stabilityai/stable-diffusion-xl-* repos, only
small: it loads through exactly the code path of real weights (`from_pretrained`) and makes a 64 px
image in well under a second on a CPU. Its pictures are noise-like; what matters is that they are
deterministic and respond to every parameter the way the real model does.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SEED = 20240607
_MARKER = "hiresfix_tiny.json"  # written last: its presence means the folder is complete
_VERSION = 1

# Words that get BPE merges of their own, so that common prompts tokenise into few tokens.
_WORDS = (
    "a an the of in on with and photo portrait painting of cat dog astronaut castle city night day "
    "sunset forest mountain lake sea sky cloud red green blue white black blurry ugly bad detailed "
    "high quality sharp face woman man girl boy car house tree flower"
).split()

# The SDXL scheduler config (stabilityai/stable-diffusion-xl-base-1.0, scheduler/).
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)

# Text encoders: two different widths, like CLIP-L (768) and OpenCLIP-bigG (1280) in SDXL. Equal
# widths would make single-file loading put the first encoder's weights into the second one.
_TE1 = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    hidden_act="quick_gelu",
)
_TE2 = dict(
    hidden_size=48,
    intermediate_size=53,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    hidden_act="gelu",
)
_TIME_EMBED = 8  # addition_time_embed_dim (256 in SDXL)


def build_tiny_sdxl(folder: str | os.PathLike, refiner: bool = False) -> Path:
    """Build the tiny SDXL base (or refiner) into `folder` with `save_pretrained`; return the
    folder.

    Deterministic (fixed seed, global RNG untouched) and idempotent: a complete folder is left as it
    is. Built in a temporary sibling and renamed into place, so concurrent builders never see half a
    model and a crash leaves nothing behind.
    """
    folder = Path(folder)
    if _complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Replicas of one app (base, refine) start together and build the same folder: one builds, the
    # others wait on the lock and find it complete (without it the loser's rename failed and Serve
    # restarted that replica: a whole extra model load at every service start).
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(folder):
            _build(folder, refiner)
    return folder


def _complete(folder: Path) -> bool:
    if (folder / _MARKER).is_file() and (folder / "model_index.json").is_file():
        return True
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} exists but is not a complete tiny SDXL (no {_MARKER}); delete it to rebuild"
        )
    return False


def _build(folder: Path, refiner: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        pipe = tiny_sdxl_pipeline(refiner=refiner, workdir=tmp / "_tokenizer")
        shutil.rmtree(tmp / "_tokenizer")
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(
            json.dumps({"version": _VERSION, "seed": SEED, "refiner": refiner})
        )
        if folder.exists():  # empty folder (e.g. a mount point): fill it, the marker last
            for item in sorted(tmp.iterdir(), key=lambda p: p.name == _MARKER):
                os.replace(item, folder / item.name)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_sdxl_pipeline(refiner: bool = False, workdir: str | os.PathLike | None = None):
    """The tiny pipeline in memory (float32, CPU). The refiner has no first text encoder and is
    conditioned on an aesthetic score instead of the target size, like the real refiner."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="tiny-tok-"))
    tokenizer = clip_tokenizer(workdir)
    with torch.random.fork_rng(devices=[]):
        # One seed per component: each is the same whichever others are built (the base and the
        # refiner share their VAE, hence their latent space, as the real pair does).
        vae = _seeded(
            1,
            lambda: AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 16, 32, 32),
                layers_per_block=1,
                norm_num_groups=8,
                sample_size=64,
                scaling_factor=0.13025,
            ),
        )
        text_encoder_2 = _seeded(
            3, lambda: CLIPTextModelWithProjection(_clip_config(_TE2, tokenizer))
        )
        text_encoder = (
            None if refiner else _seeded(2, lambda: CLIPTextModel(_clip_config(_TE1, tokenizer)))
        )
        unet = _seeded(5 if refiner else 4, lambda: tiny_unet(refiner))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)  # the real file has extra keys
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_unet(refiner: bool = False) -> UNet2DConditionModel:
    # SDXL's layout (text_time conditioning, linear projections, transformer depth growing with
    # depth), two levels deep. Base: 6 time ids (size, crop, target); refiner: 5 (aesthetic score).
    n_time_ids = 5 if refiner else 6
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=_TE2["hidden_size"] + (0 if refiner else _TE1["hidden_size"]),
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        projection_class_embeddings_input_dim=n_time_ids * _TIME_EMBED + _TE2["projection_dim"],
        norm_num_groups=32,
    )


def clip_tokenizer(workdir: str | os.PathLike, words=_WORDS) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer from a generated vocab.json + merges.txt.

    The vocab holds the 256 byte symbols (bare and as word ends), one left-to-right merge chain per
    word in `words`, then the two special tokens, as CLIP's own vocab is ordered. Every merge yields
    a token in the vocab, which the BPE model requires. Any text tokenises (bytes are the fallback).
    """
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols]
    known = set(vocab)
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        joined = parts[0]
        for part in parts[1:]:
            merge = f"{joined} {part}"
            joined += part
            if joined not in known:
                merges.append(merge)
                vocab.append(joined)
                known.add(joined)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    )
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(workdir, model_max_length=77)


def _clip_config(dims: dict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # eos_token_id must be the real id: CLIP pools the text embedding at the first eos token.
    return CLIPTextConfig(
        vocab_size=1000,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )


def _seeded(seed: int, make):
    torch.manual_seed(SEED + seed)
    return make().eval()


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes stand for themselves, the rest move to
    # U+0100+.
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]
