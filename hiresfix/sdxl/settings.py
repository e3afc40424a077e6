"""Where the SDXL weights come from and how they run. One model per process (a Ray replica)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hiresfix.runtime import DeviceSetting, DtypeSetting
from hiresfix.schemas import GenerateRequest

Source = Literal["tiny", "diffusers", "hub", "single_file"]


def _default_cache_dir() -> str:
    return os.environ.get("HIRESFIX_CACHE_DIR", ".cache/hiresfix")


class WarmupSettings(BaseModel):
    """What a replica draws once at start, before it takes requests (a replica is routed traffic
    only once its constructor returns): the first request of a size otherwise pays for cuDNN's
    autotuning, allocator growth and, with `compile`, the compile itself."""

    model_config = ConfigDict(extra="forbid")

    sizes: list[tuple[int, int]] = Field(
        default_factory=list,
        description="Base sizes [width, height] to warm (the sizes clients ask for); [] = none.",
    )
    hires_scale: float = Field(
        2.0, description="The refine replica warms its hires pass at each size times this."
    )
    steps: int = Field(2, ge=1, le=10, description="Denoising steps per warm-up picture.")

    def requests(self) -> list[GenerateRequest]:
        """The warm-up requests, as /generate would take them (sizes validated there too)."""
        return [
            GenerateRequest(
                prompt="warm-up",
                width=w,
                height=h,
                num_inference_steps=self.steps,
                hires_fix=True,
                hires_scale=self.hires_scale,
                denoising_strength=1.0,  # every step of the hires schedule runs
                seed=0,
            )
            for w, h in self.sizes
        ]

    @model_validator(mode="after")
    def _valid_sizes(self) -> WarmupSettings:
        self.requests()  # a size /generate would refuse fails the config, naming the field
        return self


class SDXLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Source = Field(
        "tiny",
        description=(
            "tiny: a small random SDXL built into cache_dir (tests, CPU demos); diffusers: a"
            " save_pretrained folder; hub: a Hub repo id read from the local HF cache"
            " (HF_HUB_OFFLINE=1 is honoured); single_file: one original-layout .safetensors"
            " (A1111/ComfyUI checkpoint)."
        ),
    )
    path: str | None = Field(
        None,
        description="Folder, hub id or .safetensors file; for tiny, where to build (optional).",
    )
    single_file_config: str | None = Field(
        None,
        description=(
            "single_file only: a diffusers SDXL folder or hub id giving the component configs"
            " and tokenizers. null = inferred by diffusers (needs that repo's configs in the HF"
            " cache)."
        ),
    )
    variant: str | None = Field(
        None,
        description="diffusers/hub: read the weight files of this variant, e.g. fp16 for"
        " *.fp16.safetensors (half the download of the SDXL repos). Also used for the refiner.",
    )
    cache_dir: str = Field(
        default_factory=_default_cache_dir,
        description=(
            "Where the tiny model is built (default: $HIRESFIX_CACHE_DIR or .cache/hiresfix)."
        ),
    )
    device: DeviceSetting = "auto"
    dtype: DtypeSetting = Field("auto", description="auto: fp16 on cuda, fp32 on cpu.")
    vae_path: str | None = Field(
        None, description="Optional replacement VAE (folder or hub id), e.g. an fp16-safe SDXL VAE."
    )
    vae_dtype: DtypeSetting = Field(
        "auto",
        description=(
            "The VAE's precision. auto: the model's, except for a VAE that overflows in fp16"
            " (force_upcast in its config, as the stock SDXL VAE) under fp16/bf16: then bf16 on a"
            " GPU that has it (fp32's range without an fp32 copy per call, and calls overlap:"
            " ComfyUI's default), else diffusers' fp32 upcast around each call, one call at a"
            " time. fp32/fp16/bf16: held in that precision, no per-call casting (fp16 with such"
            " a VAE can overflow into black pictures)."
        ),
    )
    vae_tiling: bool = Field(
        True, description="Decode/encode large images in tiles (bounded VRAM)."
    )
    compile: bool = Field(
        False, description="torch.compile the UNet (slow first request per size)."
    )
    warmup: WarmupSettings = Field(
        default_factory=WarmupSettings,
        description="Sizes each base and refine replica draws once at start (see WarmupSettings).",
    )
    refiner_source: Source | None = Field(
        None, description="null: refine with the base weights as img2img (shared, no extra memory)."
    )
    refiner_path: str | None = None
    refiner_single_file_config: str | None = None
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads for this process.")
    cpu_nice: int = Field(
        0,
        ge=0,
        le=19,
        description=(
            "Niceness of this model's process, raised to at least this (0 = unchanged). Ray starts"
            " every worker, the HTTP proxy and ingress too, at 15: on a dedicated CPU-only host 19"
            " lets the HTTP path answer refusals and /health first while inference fills every"
            " core; any other process at 0 (a client, Ray's own daemons) comes first."
        ),
    )

    @model_validator(mode="after")
    def _paths_given(self) -> SDXLSettings:
        if self.source != "tiny" and not self.path:
            raise ValueError(f"source={self.source!r} needs a path")
        if self.refiner_source not in (None, "tiny") and not self.refiner_path:
            raise ValueError(f"refiner_source={self.refiner_source!r} needs a refiner_path")
        return self
