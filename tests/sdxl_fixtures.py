"""Shared fixtures for the SDXL tests: the tiny model is built once per session, loaded once.

Import the fixtures into a test module (`from tests.sdxl_fixtures import *`). pytest registers an
imported fixture once per module, so the built folder and the loaded pipelines are also cached here
at module level: every test module gets the very same objects.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download
os.environ["OMP_NUM_THREADS"] = "1"  # 2 threads on the 2-core CI box: 50x slower

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

from hiresfix.images import Picture  # noqa: E402
from hiresfix.schemas import GenerateRequest  # noqa: E402
from hiresfix.sdxl import (  # noqa: E402
    BaseStage,
    RefineStage,
    SDXLSettings,
    build_tiny_sdxl,
    load_base_pipeline,
    load_refine_pipeline,
)

_CACHE: dict = {}


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory):
    """A hiresfix cache_dir holding the built tiny base and refiner."""
    if "dir" not in _CACHE:
        root = tmp_path_factory.getbasetemp() / "hiresfix-sdxl-cache"
        build_tiny_sdxl(root / "tiny-sdxl")
        build_tiny_sdxl(root / "tiny-sdxl-refiner", refiner=True)
        _CACHE["dir"] = root
    return _CACHE["dir"]


@pytest.fixture(scope="session")
def tiny_settings(tiny_cache_dir) -> SDXLSettings:
    return SDXLSettings(source="tiny", cache_dir=str(tiny_cache_dir))


@pytest.fixture(scope="session")
def base_pipe(tiny_settings):
    if "base" not in _CACHE:
        _CACHE["base"] = load_base_pipeline(tiny_settings)
    return _CACHE["base"]


@pytest.fixture(scope="session")
def base_stage(base_pipe) -> BaseStage:
    return BaseStage(base_pipe)


@pytest.fixture(scope="session")
def refine_stage(tiny_settings, base_pipe) -> RefineStage:
    """Hires fix with the base weights as img2img (no separate refiner: A1111 hires fix)."""
    if "refine" not in _CACHE:
        _CACHE["refine"] = RefineStage(load_refine_pipeline(tiny_settings, base=base_pipe))
    return _CACHE["refine"]


@pytest.fixture(scope="session")
def refiner_stage(tiny_cache_dir) -> RefineStage:
    """The separate tiny SDXL refiner (refiner_source='tiny')."""
    if "refiner" not in _CACHE:
        s = SDXLSettings(source="tiny", cache_dir=str(tiny_cache_dir), refiner_source="tiny")
        _CACHE["refiner"] = RefineStage(load_refine_pipeline(s))
    return _CACHE["refiner"]


def make_req(**kw) -> GenerateRequest:
    """A small, fast request: 64 px, 4 steps, fixed seed."""
    base = dict(prompt="a photo of a cat", width=64, height=64, num_inference_steps=4, seed=1234)
    return GenerateRequest(**{**base, **kw})


def upscaled(batch, size=(128, 128)):
    """What the upscaler stage hands to RefineStage.hires (LANCZOS stands in for RealESRGAN)."""
    pics = [Picture.from_pil(p.to_pil().resize(size, Image.LANCZOS)) for p in batch.pictures]
    return dataclasses.replace(batch, pictures=pics, timings=dict(batch.timings))


def pixels(batch) -> np.ndarray:
    return np.stack([p.rgb for p in batch.pictures])


def assert_valid(batch, n, size):
    assert len(batch.pictures) == n
    for p in batch.pictures:
        assert p.size == size
        assert p.rgb.dtype == np.float32 and np.isfinite(p.rgb).all()
        assert p.rgb.std() > 0.01  # not a flat image


def same(a, b) -> bool:
    """Bit-identical pictures."""
    return np.array_equal(pixels(a), pixels(b))


__all__ = [
    "tiny_cache_dir", "tiny_settings", "base_pipe", "base_stage", "refine_stage", "refiner_stage",
    "make_req", "upscaled", "pixels", "assert_valid", "same",
]
