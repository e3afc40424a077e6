"""Write an SDXL pipeline as one original-layout (A1111/ComfyUI) .safetensors checkpoint, so the
tests can load single files offline from the tiny model.

The inverse of what diffusers' `from_single_file` reads (diffusers/loaders/single_file_utils.py:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint), the same mapping as diffusers'
scripts/convert_diffusers_to_original_sdxl.py, which is not shipped in the wheel.

Layout written (SDXL base; the refiner has no CLIP-L and its OpenCLIP sits at embedders.0):
    model.diffusion_model.*                 UNet, input_blocks / middle_block / output_blocks
    first_stage_model.*                     VAE, encoder.down.N.block.M / decoder.up.N ...
    conditioner.embedders.0.transformer.*   CLIP-L, transformers' own names (text_model.*)
    conditioner.embedders.1.model.*         OpenCLIP-bigG: resblocks, fused in_proj, text_projection
"""

from __future__ import annotations

import os
import re

import torch
from safetensors.torch import save_file

from hiresfix.sdxl.single_file import OPEN_CLIP_BASE, OPEN_CLIP_REFINER, UNET

VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."


def save_single_file(pipe, path: str | os.PathLike) -> None:
    """Save `pipe` (StableDiffusionXL[Img2Img]Pipeline) as one original-layout .safetensors file."""
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config, prefix=UNET))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config, prefix=VAE))
    if pipe.text_encoder is not None:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), prefix=CLIP_L))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), prefix=OPEN_CLIP_BASE))
    else:  # refiner
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), prefix=OPEN_CLIP_REFINER))
    # safetensors refuses views that share storage; every tensor gets its own contiguous copy.
    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()},
        str(path),
        metadata={"format": "pt"},
    )


# --- UNet ---------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def unet_to_ldm(sd: dict, config, prefix: str = "") -> dict:
    # ldm numbers the UNet as flat sequences: input_blocks = conv_in, then per level
    # `layers_per_block` (resnet[, attention]) pairs and one downsampler; output_blocks = per level
    # layers_per_block + 1 (resnet[, attention][, upsampler]) entries; middle_block = resnet,
    # attention, resnet.
    per = config["layers_per_block"] + 1
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            b, i, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per + i}.0.{_rename(rest, _RESNET)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            b, i, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per + i}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], _RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            b, i, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * per + i}.0.{_rename(rest, _RESNET)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            b, i, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * per + i}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if up_has_attn[b] else 1}.conv.{m[2]}"
        else:
            new = _rename(key, _UNET_TOP)
            if new == key:
                raise KeyError(f"no original-layout name for UNet weight {key!r}")
        out[prefix + new] = value
    return out


# --- VAE ----------------------------------------------------------------------------------------

_VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_to_ldm(sd: dict, config, prefix: str = "") -> dict:
    # The ldm decoder numbers its up levels from the bottom (up.0 is the last, full-resolution one).
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTN)}"
            if value.ndim == 2:  # ldm's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[prefix + new] = value
    return out


# --- text encoders ------------------------------------------------------------------------------


def clip_to_ldm(sd: dict, prefix: str = CLIP_L) -> dict:
    # The original file keeps transformers' names under `text_model.` (transformers >= 5.6 dropped
    # that level from CLIPTextModel's own state dict).
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in sd.items()
        if not k.endswith("position_ids")
    }


_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_to_ldm(sd: dict, prefix: str = OPEN_CLIP_BASE) -> dict:
    # OpenCLIP keeps q, k, v as one fused in_proj and stores text_projection transposed, as a bare
    # parameter (x @ P rather than a Linear).
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T,
    }
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{part}") for p in ("q", "k", "v")]
            )
        for key in [k for k in sd if k.startswith(src)]:
            out[dst + _rename(key[len(src) :], _OPEN_CLIP_LAYER)] = sd.pop(key)
    if sd:
        raise KeyError(f"no original-layout name for text encoder weights {sorted(sd)}")
    return {prefix + k: v for k, v in out.items()}


def _rename(key: str, table: dict) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key
