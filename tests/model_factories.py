"""Random-weight networks for tests, saved to disk so they load through the product's own path."""

from __future__ import annotations

from pathlib import Path


def build_random_gfpgan(path: Path, seed: int = 0) -> Path:
    """A GFPGANv1Clean (the v1.3/v1.4 layout) with random weights: 86 M params, ~350 MB.

    Build once.
    """
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(seed)
    net = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"params_ema": state}, path)
    return path
