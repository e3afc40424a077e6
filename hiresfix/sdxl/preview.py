"""Previews of a running denoising pass, straight from its latents: no VAE call, a few ms each.

What A1111's "Approx cheap" live preview and ComfyUI's latent2rgb preview do: SDXL's four latent
channels are close to a linear map of RGB, so one small matrix product gives a recognisable
(blurry, slightly off-colour) picture at 1/8 of the size. Used for GET /progress/{id}?preview=true,
A1111's `current_image` and OpenAI's `partial_images` (hiresfix/schemas.py `previews`).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# RGB = latent @ FACTORS + BIAS, fitted on SDXL's VAE (the values the community previewers use).
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def preview_steps(previews: int, total_steps: int) -> frozenset[int]:
    """After which steps (1-based) of a `total_steps` pass the `previews` previews are taken:
    evenly spread, the last one before the end (the finished picture is the answer itself)."""
    if previews <= 0 or total_steps <= 1:
        return frozenset()
    n = min(previews, total_steps - 1)
    return frozenset(max(1, round(total_steps * k / (n + 1))) for k in range(1, n + 1))


def render_preview(latents: torch.Tensor) -> bytes:
    """The first image of a (batch, channels, h, w) latent batch as a PNG at latent size (1/8 of
    the picture: small to hold and to send; the OpenAI stream resizes it to the picture's size)."""
    import torch  # loaded in the replica by then; importing this module needs no torch

    lat = latents[0].detach().to("cpu", torch.float32)
    if lat.shape[0] == len(_SDXL_FACTORS):
        rgb = torch.einsum("chw,cr->hwr", lat, torch.tensor(_SDXL_FACTORS)) + torch.tensor(
            _SDXL_BIAS
        )
        rgb = (rgb.clamp(-1, 1) + 1) * 127.5
    else:  # another latent space (a test model): its first three channels, stretched
        rgb = lat[:3].permute(1, 2, 0)
        lo, hi = rgb.amin(), rgb.amax()
        rgb = (rgb - lo) / (hi - lo + 1e-6) * 255
    pixels = np.ascontiguousarray(rgb.round().to(torch.uint8).numpy())
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG", compress_level=1)  # speed over size
    return out.getvalue()
