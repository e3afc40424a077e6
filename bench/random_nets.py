"""Full-size networks with RANDOM weights for the benchmarks: speed and memory depend on the shape,
not on the values, and nothing is downloaded. Each is saved as the release file would be and then
loaded by the product's own loading code (spandrel detection included)."""

from __future__ import annotations

from pathlib import Path


def save_random_x2plus(folder: Path) -> Path:
    """RealESRGAN_x2plus's shape: RRDBNet, 64 features, 23 blocks, grow 32, pixel-unshuffle input
    (12 channels into an x4 body), saved like the release file (`params_ema`)."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=12, out_nc=3, num_filters=64, num_blocks=23, scale=4, shuffle_factor=2)
    path = Path(folder) / "RealESRGAN_x2plus-random.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    return path


def save_random_gfpgan(folder: Path) -> Path:
    """GFPGANv1.3/1.4's shape, saved like the release file."""
    import torch
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(0)
    path = Path(folder) / "GFPGAN-random.pth"
    torch.save({"params_ema": GFPGAN().state_dict()}, path)
    return path
