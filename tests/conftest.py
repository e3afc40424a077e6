"""Shared test setup: offline, single-threaded torch, real weights from ../shared, one Serve app
per run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import REPO, TEST_ENV

# Before torch is imported anywhere (conftest loads before any test module): offline, one thread,
# Ray without auth. Set, not defaulted: the tests' timings and offline guarantees assume these
# values.
os.environ.update(TEST_ENV)

# The tiny-SDXL fixtures (tiny_cache_dir, base_stage, refine_stage, ...) for every test module.
pytest_plugins = ["tests.sdxl_fixtures"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test, and every fixture built between tests, runs on one torch thread.

    OMP_NUM_THREADS=1 gives a fresh torch one thread; this also undoes a test or fixture that set
    more (test_sdxl_loading's num_threads=2). torch is never imported for it.
    """
    _pin_torch_threads()
    yield
    _pin_torch_threads()


def _pin_torch_threads() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def shared_weights_dir() -> Path:
    """The real RealESRGAN weights CI always has. Missing means a broken checkout: fail, never
    skip."""
    d = Path(os.environ.get("HIRESFIX_TEST_WEIGHTS", REPO.parent / "shared" / "weights"))
    if not (d / "realesr-animevideov3-x4.safetensors").is_file():
        pytest.fail(
            f"real upscaler weights not found in {d}: CI needs ../shared/weights "
            "(or set HIRESFIX_TEST_WEIGHTS)",
            pytrace=False,
        )
    return d


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    return shared_weights_dir()


@pytest.fixture(scope="session")
def random_gfpgan(tmp_path_factory) -> Path:
    from tests.model_factories import build_random_gfpgan

    return build_random_gfpgan(tmp_path_factory.mktemp("gfpgan") / "gfpgan-random.safetensors")


_RUNNING_SERVICE: list = []  # the session's service while it runs (stopped early: below)


@pytest.fixture(scope="session")
def service(tmp_path_factory, shared_weights, random_gfpgan):
    """The real Ray Serve app over HTTP, started once per run (ServeApp: .url, .log_tail())."""
    from tests.serve_harness import ServeApp

    app = ServeApp(tmp_path_factory.mktemp("serve"), shared_weights, random_gfpgan)
    _RUNNING_SERVICE.append(app)
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()  # a no-op when pytest_runtest_teardown stopped it


def pytest_collection_modifyitems(items):
    """The tests on the shared service first (in their usual order), so it can stop before the
    rest: idle, its 18 replicas take ~0.7 of this box's 2 cores, which the in-process tests and
    the clusters of their own (test_chaos, test_drain) lost for the whole run."""
    items.sort(key=lambda item: "service" not in item.fixturenames)  # stable


def pytest_runtest_teardown(item, nextitem):
    if _RUNNING_SERVICE and (nextitem is None or "service" not in nextitem.fixturenames):
        _RUNNING_SERVICE.pop().stop()
