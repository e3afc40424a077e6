"""Load the SDXL base and refine pipelines from SDXLSettings, failing at start-up, not per request.

`from_pretrained` (folder, hub id, the built tiny model) and `from_single_file` are the only ways
in. Every failure becomes a ModelLoadError that names the file, folder or hub id and says what to
do.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants as hf_constants
from safetensors import safe_open

from hiresfix.runtime import AUTO_ON_GPU, pick_device, pick_dtype, torch_dtype, yield_cpu
from hiresfix.sdxl.generate import same_modules
from hiresfix.sdxl.settings import SDXLSettings
from hiresfix.sdxl.single_file import OPEN_CLIP_BASE, OPEN_CLIP_REFINER, UNET
from hiresfix.sdxl.tiny import build_tiny_sdxl


class ModelLoadError(RuntimeError):
    """The configured weights cannot be loaded; raised while the replica starts."""


def load_base_pipeline(s: SDXLSettings) -> StableDiffusionXLPipeline:
    device, dtype = resolve_device_dtype(s)
    _configure_cpu(s)
    return _load(
        StableDiffusionXLPipeline, s.source, s.path, s.single_file_config, s, device, dtype, "base"
    )


def load_refine_pipeline(s: SDXLSettings, base: StableDiffusionXLPipeline | None = None):
    """The img2img pipeline for the second pass. Without a separate refiner it is the base model's
    own modules (no copy, no extra memory), as A1111's hires fix does."""
    if s.refiner_source is None:
        base = base if base is not None else load_base_pipeline(s)
        return same_modules(base, StableDiffusionXLImg2ImgPipeline, base.scheduler)
    device, dtype = resolve_device_dtype(s)
    _configure_cpu(s)
    return _load(
        StableDiffusionXLImg2ImgPipeline,
        s.refiner_source,
        s.refiner_path,
        s.refiner_single_file_config,
        s,
        device,
        dtype,
        "refiner",
    )


def _configure_cpu(s: SDXLSettings) -> None:
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    yield_cpu(s.cpu_nice)


def resolve_device_dtype(s: SDXLSettings) -> tuple[torch.device, torch.dtype]:
    try:
        device = pick_device(s.device)
    except RuntimeError as exc:
        raise ModelLoadError(str(exc)) from exc
    dtype, _ = pick_dtype(s.dtype, device, AUTO_ON_GPU["sdxl"])  # SDXL runs in every precision
    return device, dtype


def _load(cls, source, path, sf_config, s: SDXLSettings, device, dtype, role: str):
    refiner = role == "refiner"
    where = path
    try:
        # An explicit vae_dtype is the VAE's precision from the file on: an fp32 VAE under an
        # fp16/bf16 model keeps its own weights rather than half-precision copies cast back up.
        # (diffusers' per-component dtype; from_single_file takes one dtype, so there _prepare
        # casts afterwards, as it does for "auto", which needs the loaded VAE's config.)
        vae_dtype = dtype if s.vae_dtype == "auto" else torch_dtype(s.vae_dtype)
        kwargs = {"dtype": dtype if vae_dtype == dtype else {"default": dtype, "vae": vae_dtype}}
        if s.vae_path:
            kwargs["vae"] = _load_vae(s.vae_path, vae_dtype)
        if source == "tiny":
            folder = (
                Path(path)
                if path
                else Path(s.cache_dir) / ("tiny-sdxl-refiner" if refiner else "tiny-sdxl")
            )
            where = str(folder)
            build_tiny_sdxl(folder, refiner=refiner)
            pipe = cls.from_pretrained(folder, local_files_only=True, **kwargs)
        elif source == "diffusers":
            _check_folder(path)
            pipe = cls.from_pretrained(path, local_files_only=True, variant=s.variant, **kwargs)
        elif source == "hub":
            pipe = _from_hub(cls, path, {**kwargs, "variant": s.variant})
        elif source == "single_file":
            _check_single_file(path, refiner)
            pipe = cls.from_single_file(
                path,
                config=sf_config,
                local_files_only=hf_constants.HF_HUB_OFFLINE,
                **{**kwargs, "dtype": dtype},
            )
        else:
            raise ModelLoadError(f"unknown SDXL source {source!r}")
        _check_complete(pipe, where)
        return _prepare(pipe, s, device)
    except ModelLoadError:
        raise
    except Exception as exc:
        hint = ""
        if source == "single_file" and not sf_config:
            hint = (
                "; without single_file_config diffusers needs the matching stabilityai SDXL"
                " configs in the HF cache: set single_file_config to a diffusers SDXL folder or"
                " cached hub id"
            )
        raise ModelLoadError(
            f"could not load the SDXL {role} ({source}) from {where}:"
            f" {type(exc).__name__}: {exc}{hint}"
        ) from exc


def _load_vae(vae_path: str, dtype) -> AutoencoderKL:
    try:
        if os.path.isdir(vae_path):
            # A VAE folder, or a whole pipeline folder whose vae/ is meant.
            sub = "vae" if os.path.isfile(os.path.join(vae_path, "vae", "config.json")) else None
            _check_folder(os.path.join(vae_path, sub or ""), index="config.json")
            return AutoencoderKL.from_pretrained(
                vae_path, subfolder=sub, dtype=dtype, local_files_only=True
            )
        if os.path.exists(vae_path):
            raise ModelLoadError(
                f"vae_path {vae_path} is a file; give a diffusers VAE folder or a hub id"
            )
        if vae_path.startswith(("/", ".", "~")) or vae_path.count("/") != 1:  # a path, not org/name
            raise ModelLoadError(f"vae_path {vae_path} does not exist (nor is it a hub id)")
        return _from_hub(AutoencoderKL, vae_path, {"dtype": dtype})
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the VAE from {vae_path}: {type(exc).__name__}: {exc}"
        ) from exc


def _from_hub(cls, repo_id: str, kwargs: dict):
    # The local HF cache first; the network only when it is allowed and the cache lacks the model.
    try:
        return cls.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except Exception as exc:  # not cached (or a broken cache entry)
        if hf_constants.HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"hub model {repo_id!r} could not be loaded from the local HF cache"
                f" ({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1: download it there first"
                f" (`hf download {repo_id}`). {type(exc).__name__}: {exc}"
            ) from exc
    return cls.from_pretrained(repo_id, **kwargs)


def _check_folder(path: str | None, index: str = "model_index.json") -> None:
    """A diffusers folder exists and its safetensors files have readable headers (cheap: the
    header only), so that a truncated or foreign file is named here rather than deep in
    diffusers."""
    folder = Path(path or "")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a folder")
    if not (folder / index).is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder: {folder / index} is missing"
        )
    for file in sorted(folder.rglob("*.safetensors")):
        _safetensors_keys(file)


def _check_single_file(path: str | None, refiner: bool) -> None:
    file = Path(path or "")
    if not file.is_file():
        raise ModelLoadError(f"SDXL checkpoint file {file} does not exist or is not a file")
    if file.suffix != ".safetensors":
        return  # pickled .ckpt: diffusers reads it; errors still name the file
    keys = _safetensors_keys(file)
    # The OpenCLIP encoder's place tells base (embedders.1) from refiner (embedders.0) and both
    # from SD 1.x/2.x files (cond_stage_model.*).
    text_key = OPEN_CLIP_REFINER if refiner else OPEN_CLIP_BASE
    if not any(k.startswith(UNET) for k in keys) or not any(k.startswith(text_key) for k in keys):
        kind = "SDXL refiner" if refiner else "SDXL base"
        raise ModelLoadError(
            f"{file} is not an original-layout {kind} checkpoint (no {UNET}* or text encoder"
            f" {text_key} weights among its {len(keys)} tensors)"
        )


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:
        raise ModelLoadError(
            f"weights file {file} is unreadable: {type(exc).__name__}: {exc}"
        ) from exc


def _check_complete(pipe, where) -> None:
    # diffusers only warns when a weights file lacks tensors the model needs and leaves them
    # uninitialised ("meta"): a wrong or partial file would otherwise surface at the first request.
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            missing = [n for n, p in module.named_parameters() if p.is_meta]
            if missing:
                source = Path(where) / name if Path(where).is_dir() else where
                raise ModelLoadError(
                    f"{source}: the {name} weights do not match its config ({len(missing)} tensors"
                    f" missing, e.g. {missing[0]}): wrong or incomplete weights file"
                )


def _prepare(pipe, s: SDXLSettings, device: torch.device):
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    _set_vae_dtype(pipe.vae, s, device, pipe.unet.dtype)
    if s.vae_tiling:
        pipe.vae.enable_tiling()  # only splits images larger than the VAE's sample size
    if s.compile:
        # In place: the module stays a UNet2DConditionModel, so the refine pipeline and
        # the per-request pipelines share the compiled one.
        pipe.unet.compile()
    return pipe


def _set_vae_dtype(vae, s: SDXLSettings, device: torch.device, model_dtype: torch.dtype) -> None:
    dtype = _vae_dtype(s.vae_dtype, vae, device, model_dtype)
    if dtype is None:
        return  # the model's precision, with diffusers' own handling
    vae.to(dtype)
    # Held in `dtype` for good: diffusers' fp32 upcast around each call (and the lock it needs,
    # generate._vae_guard) is off.
    vae.register_to_config(force_upcast=False)
    if not getattr(vae, "_hiresfix_casts_inputs", False):
        # The pipelines hand the VAE images (encode) and latents (decode) in the UNet's dtype.
        for first in (vae.encoder, vae.post_quant_conv or vae.decoder):
            first.register_forward_pre_hook(_to_own_dtype)
        vae._hiresfix_casts_inputs = True


def _vae_dtype(setting, vae, device: torch.device, model_dtype: torch.dtype):
    if setting != "auto":
        return torch_dtype(setting)
    if model_dtype == torch.float32 or not getattr(vae.config, "force_upcast", False):
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _to_own_dtype(module, args):
    x, *rest = args
    dtype = next(module.parameters()).dtype
    return None if x.dtype == dtype else (x.to(dtype), *rest)
