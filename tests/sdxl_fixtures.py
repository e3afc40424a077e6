"""The tiny-SDXL fixtures, a pytest plugin (conftest's `pytest_plugins`), and their helpers.

The tiny model is built once per session and each pipeline loaded once. Test modules use the
fixtures by name and import only the helpers (`from tests.sdxl_fixtures import make_req, ...`).
hiresfix.sdxl (torch, diffusers) is imported by the fixtures, not here: a run without SDXL tests
does not pay for it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from hiresfix.images import Picture
from hiresfix.schemas import GenerateRequest

if TYPE_CHECKING:
    from hiresfix.sdxl import BaseStage, RefineStage, SDXLSettings


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory):
    """A hiresfix cache_dir holding the built tiny base and refiner."""
    from hiresfix.sdxl import build_tiny_sdxl

    root = tmp_path_factory.getbasetemp() / "hiresfix-sdxl-cache"
    build_tiny_sdxl(root / "tiny-sdxl")
    build_tiny_sdxl(root / "tiny-sdxl-refiner", refiner=True)
    return root


@pytest.fixture(scope="session")
def tiny_settings(tiny_cache_dir) -> SDXLSettings:
    from hiresfix.sdxl import SDXLSettings

    return SDXLSettings(source="tiny", cache_dir=str(tiny_cache_dir))


@pytest.fixture(scope="session")
def base_pipe(tiny_settings):
    from hiresfix.sdxl import load_base_pipeline

    return load_base_pipeline(tiny_settings)


@pytest.fixture(scope="session")
def base_stage(base_pipe) -> BaseStage:
    from hiresfix.sdxl import BaseStage

    return BaseStage(base_pipe)


@pytest.fixture(scope="session")
def refine_stage(tiny_settings, base_pipe) -> RefineStage:
    """Hires fix with the base weights as img2img (no separate refiner: A1111 hires fix)."""
    from hiresfix.sdxl import RefineStage, load_refine_pipeline

    return RefineStage(load_refine_pipeline(tiny_settings, base=base_pipe))


@pytest.fixture(scope="session")
def refiner_stage(tiny_cache_dir) -> RefineStage:
    """The separate tiny SDXL refiner (refiner_source='tiny')."""
    from hiresfix.sdxl import RefineStage, SDXLSettings, load_refine_pipeline

    s = SDXLSettings(source="tiny", cache_dir=str(tiny_cache_dir), refiner_source="tiny")
    return RefineStage(load_refine_pipeline(s))


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
