"""Configuration of the neural upscaler: which weight files, where, and how to run them.

Plain pydantic (no torch, no Ray), so a profile YAML validates before any model is touched.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hiresfix.runtime import DeviceSetting, DtypeSetting
from hiresfix.weights import Sha256, WeightsFolder, check_model_names


class UpscalerModelSpec(BaseModel):
    """One configured upscaler. The architecture and scale are read from the file, never
    declared."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ..., min_length=1, description="Name clients use (`upscaler` field, GET /models)."
    )
    file: str = Field(
        ..., min_length=1, description="Weight file, relative to weights_dir or absolute."
    )
    sha256: Sha256 | None = Field(
        None,
        description="Checked at load; a mismatch makes the model unavailable (weights_missing).",
    )
    url: str | None = Field(
        None, description="Official release URL, used by the `weights` command."
    )
    tile_size: int | None = Field(
        None,
        ge=8,
        description=(
            "This model's tile side, overriding the bank's tile_size. Memory per tile depends on"
            " the network (RealESRGAN_x2plus runs its body at half resolution, so its tiles can be"
            " larger than x4plus's for the same memory), and on a GPU fewer, larger tiles are"
            " faster, since a small tile's forward is bound by kernel launches"
            " (figures: bench/results/upscaler-notes.md)."
        ),
    )
    inject_fault: Literal["oom", "oom_always", "error"] | None = Field(
        None,
        description=(
            "Chaos testing (docs/chaos.md): make this model fail inside a real replica, to check"
            " the fallbacks end to end. 'oom': every forward on a tile larger than min_tile raises"
            " torch.OutOfMemoryError (the tile-halving retry then succeeds). 'oom_always': every"
            " forward does (halving down to min_tile, then LANCZOS with out_of_memory). 'error':"
            " every forward raises RuntimeError (LANCZOS with error). null (the default) in"
            " production."
        ),
    )


class UpscalerSettings(WeightsFolder):
    """How the upscaler bank loads and runs its models."""

    model_config = ConfigDict(extra="forbid")

    models: list[UpscalerModelSpec] = Field(default_factory=list)
    default: str | None = Field(
        None, description="Default model name; null = the first configured."
    )
    device: DeviceSetting = "auto"
    dtype: DtypeSetting = Field(
        "auto",
        description=(
            "auto = fp16 (else bf16) on GPU when the model supports it; on a CPU bf16 where it has"
            " native bf16 (AVX512-BF16, AMX: ~2x fp32's speed, 52-54 dB from fp32 output), else"
            " fp32."
        ),
    )
    tile_size: int = Field(
        512,
        ge=8,
        description=(
            "Largest model input tile side (source px); bounds the memory of one forward pass."
            " GPU: 512 or more (see the model's own tile_size). CPU: smaller tiles (about 192) are"
            " faster, as activations stay in cache (figures: bench/results/upscaler-notes.md)."
        ),
    )
    tile_overlap: int = Field(
        32, ge=0, description="Overlap between neighbouring tiles (source px)."
    )
    min_tile: int = Field(64, ge=8, description="OOM retries halve the tile down to this side.")
    tile_batch: int = Field(
        4,
        ge=1,
        description=(
            "Most tiles per forward pass, shared across requests. A pass never holds more input"
            " pixels than one tile_size x tile_size tile, so memory is bounded by tile_size alone:"
            " small tiles (small images) batch, full-size tiles run one at a time. Sharing a pass"
            " never changes a job's output bits (hiresfix/upscale/tiling.py)."
        ),
    )
    max_native_megapixels: float = Field(
        300.0,
        gt=0.0,
        description=(
            "Host-memory bound: most output pixels at the model's native scale (alpha counted as a"
            " second plane) held at once, 12 bytes each. Concurrent jobs beyond it run in turn; one"
            " job above it alone (a x4 model asked for 8192 px is 268 MP) falls back to LANCZOS"
            " with out_of_memory before anything is allocated."
        ),
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch; null = OMP_NUM_THREADS when set (Ray sets 1 for a"
        " replica without num_cpus), else all usable cores.",
    )
    cpu_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Niceness of the upscaler's process (0 = unchanged); see sdxl.cpu_nice.",
    )
    beyond_native: Literal["resample", "repeat"] = Field(
        "resample",
        description=(
            "Scale beyond the model's native factor: resample its output, or run it again."
        ),
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Run the nets on NHWC activations. auto = on a CPU (oneDNN then skips re-laying"
            " NCHW around every conv: 14-20% faster, same numbers to float rounding), off on a GPU"
            " until measured there (bench/gpu_upscale.py --channels-last)."
        ),
    )
    warmup: bool = Field(
        False,
        description="Run the default model once over one full tile at replica start, before it"
        " takes requests: the first request then does not pay for kernel loading and autotuning.",
    )
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=(
            "torch.cuda.set_per_process_memory_fraction; Ray fractional GPUs are only a label."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> UpscalerSettings:
        check_model_names("upscaler", [m.name for m in self.models], self.default)
        if self.min_tile > self.tile_size:
            raise ValueError(
                f"min_tile ({self.min_tile}) must not exceed tile_size ({self.tile_size})"
            )
        for m in self.models:
            if m.tile_size is not None and m.tile_size < self.min_tile:
                raise ValueError(
                    f"model {m.name!r}: tile_size ({m.tile_size}) is below min_tile"
                    f" ({self.min_tile})"
                )
        return self
