"""Configuration of the neural upscaler: which weight files, where, and how to run them.

Plain pydantic (no torch, no Ray), so a profile YAML validates before any model is touched.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hiresfix.weights import WEIGHTS_DIR_ENV, check_model_names


class UpscalerModelSpec(BaseModel):
    """One configured upscaler. The architecture and scale are read from the file, never declared."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="Name clients use (`upscaler` field, GET /models).")
    file: str = Field(..., min_length=1, description="Weight file, relative to weights_dir or absolute.")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Checked at load; a mismatch makes the model unavailable (weights_missing).",
    )
    url: str | None = Field(None, description="Official release URL, used by the `weights` command.")
    tile_size: int | None = Field(
        None,
        ge=8,
        description=(
            "This model's tile side, overriding the bank's tile_size. Memory per tile depends on the"
            " network (RealESRGAN_x2plus runs its body at half resolution: an 800 px tile costs about"
            " what a 512 px x4plus tile does), and on a GPU fewer, larger tiles are faster, since a"
            " small tile's forward is bound by kernel launches (H100, x2plus, 768 -> 1536 fp16:"
            " 0.150 s at 512, 0.088 s as one tile; bench/gpu_upscale.py)."
        ),
    )
    inject_fault: Literal["oom", "oom_always", "error"] | None = Field(
        None,
        description=(
            "Chaos testing only. 'oom': forward raises torch.OutOfMemoryError for tiles larger than"
            " min_tile (exercises the halving retry, which then succeeds). 'oom_always': every forward"
            " runs out of memory (halving down to min_tile, then the LANCZOS fallback)."
            " 'error': forward raises RuntimeError."
        ),
    )


class UpscalerSettings(BaseModel):
    """How the upscaler bank loads and runs its models.

    `weights_dir`: the environment variable HIRESFIX_WEIGHTS_DIR, when set and non-empty, overrides
    whatever the profile says (it is applied by a validator, so every construction path, including
    `model_validate` of a YAML profile, honours it). That lets one profile serve a laptop and a pod
    whose weights are mounted elsewhere.
    """

    model_config = ConfigDict(extra="forbid")

    weights_dir: str = "weights"
    models: list[UpscalerModelSpec] = Field(default_factory=list)
    default: str | None = Field(None, description="Default model name; null = the first configured.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto = fp16 (else bf16) on GPU when the model supports it, fp32 on CPU."
    )
    tile_size: int = Field(
        512,
        ge=8,
        description=(
            "Largest model input tile side (source px); bounds the memory of one forward pass."
            " GPU: 512 or more (see the model's own tile_size). CPU: ~192 is fastest, as activations"
            " stay in cache (figures: README, 'Upscaler benchmarks'; bench/upscale_bench.py)."
        ),
    )
    tile_overlap: int = Field(32, ge=0, description="Overlap between neighbouring tiles (source px).")
    min_tile: int = Field(64, ge=8, description="OOM retries halve the tile down to this side.")
    tile_batch: int = Field(
        4,
        ge=1,
        description=(
            "Most tiles per forward pass, shared across requests. A pass never holds more input"
            " pixels than one tile_size x tile_size tile, so memory is bounded by tile_size alone:"
            " small tiles (small images) batch, full-size tiles run one at a time. Sharing a pass never"
            " changes a job's output bits (hiresfix/upscale/tiling.py)."
        ),
    )
    max_native_megapixels: float = Field(
        300.0,
        gt=0.0,
        description=(
            "Host-memory bound: most output pixels at the model's native scale (alpha counted as a"
            " second plane) held at once, 12 bytes each. Concurrent jobs beyond it run in turn; one job"
            " above it alone (a x4 model asked for 8192 px is 268 MP) falls back to LANCZOS with"
            " out_of_memory before anything is allocated."
        ),
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; null = all cores.")
    beyond_native: Literal["resample", "repeat"] = Field(
        "resample",
        description="Scale beyond the model's native factor: resample its output, or run it again.",
    )
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="torch.cuda.set_per_process_memory_fraction; Ray fractional GPUs are only a label.",
    )

    @model_validator(mode="before")
    @classmethod
    def _weights_dir_from_env(cls, data):
        env = os.environ.get(WEIGHTS_DIR_ENV)
        if env and isinstance(data, dict):
            data = {**data, "weights_dir": env}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "UpscalerSettings":
        check_model_names("upscaler", [m.name for m in self.models], self.default)
        if self.min_tile > self.tile_size:
            raise ValueError(f"min_tile ({self.min_tile}) must not exceed tile_size ({self.tile_size})")
        for m in self.models:
            if m.tile_size is not None and m.tile_size < self.min_tile:
                raise ValueError(f"model {m.name!r}: tile_size ({m.tile_size}) is below min_tile ({self.min_tile})")
        return self
