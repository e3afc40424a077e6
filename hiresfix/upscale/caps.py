"""What a loaded model can do, as data.

The engine never asks "is this an RRDBNet?": it reads a `ModelCaps` (scale, channels, precisions,
size requirements, tiling) taken from spandrel's descriptor, the same way spandrel describes its
architectures. A new architecture that spandrel detects therefore needs no code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SizeRule:
    """Input size constraints (spandrel's SizeRequirements, copied so the engine has no
    spandrel)."""

    minimum: int = 0
    multiple_of: int = 1
    square: bool = False

    def tile_side(self, side: int) -> int:
        """Smallest valid tile side >= `side`."""
        side = max(side, self.minimum, 1)
        return math.ceil(side / self.multiple_of) * self.multiple_of

    def max_tile_side(self, limit: int) -> int:
        """Largest valid tile side <= `limit` (never below the minimum: that one must fit)."""
        return max(self.tile_side(0), limit // self.multiple_of * self.multiple_of)


@dataclass(frozen=True)
class ModelCaps:
    architecture: str  # spandrel's architecture name, e.g. "ESRGAN", "RealESRGAN Compact"
    scale: int  # native factor (x2plus reports 2: its pixel-unshuffle is internal)
    in_channels: int
    out_channels: int
    supports_fp16: bool
    supports_bf16: bool
    size: SizeRule
    tileable: bool  # False: spandrel advises against tiling (global context); start untiled
    tags: tuple[str, ...] = ()

    @classmethod
    def from_descriptor(cls, desc) -> ModelCaps:
        req = desc.size_requirements
        tiling = getattr(desc.tiling, "name", "SUPPORTED")
        return cls(
            architecture=desc.architecture.name,
            scale=int(desc.scale),
            in_channels=int(desc.input_channels),
            out_channels=int(desc.output_channels),
            supports_fp16=bool(desc.supports_half),
            supports_bf16=bool(desc.supports_bfloat16),
            size=SizeRule(int(req.minimum), int(req.multiple_of), bool(req.square)),
            tileable=tiling == "SUPPORTED",
            tags=tuple(desc.tags),
        )

    def unusable_reason(self) -> str | None:
        """Why the bank cannot serve this model as an RGB upscaler, or None."""
        if self.in_channels != 3 or self.out_channels != 3:
            return (
                f"{self.architecture} model has {self.in_channels} input /"
                f" {self.out_channels} output channels; only RGB (3/3) upscalers are supported"
            )
        if self.scale < 1:
            return f"{self.architecture} model reports scale {self.scale}"
        return None
