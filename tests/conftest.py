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


# scripts/test runs the suite on two pytest-xdist workers. A unit of work is a module (its
# module-scoped fixtures are built once), except that every module with tests on the shared
# service is one unit, so one worker starts the service once and runs those tests in a row. The
# other worker runs the in-process modules meanwhile (on the core the service leaves idle), and
# test_chaos's own cluster is queued last, so that it never runs beside the service's tests.
SERVICE_MODULES = {
    "test_a1111",
    "test_fuzz",
    "test_guard",
    "test_hostile",
    "test_img2img",
    "test_jobs",
    "test_load",
    "test_metrics",
    "test_openai",
    "test_service",
}
# Not sooner: started once the service was up, beside its tests, it made the run slower (777 s
# against 658 s) and a hires request in test_load's twice-capacity run waited past its 60 s.
LAST_MODULES = ("test_chaos",)


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(items):
    """The tests on the shared service first (in their usual order), so it can stop before the
    rest: idle, its replicas take ~0.6 of this box's 2 cores. test_chaos last (above)."""
    strays = {
        _module(i.nodeid)
        for i in items
        if "service" in i.fixturenames and _module(i.nodeid) not in SERVICE_MODULES
    }
    if strays:  # it would start a second service on the other worker
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(strays)} to SERVICE_MODULES")
    items.sort(
        key=lambda i: (
            0 if "service" in i.fixturenames else 2 if _module(i.nodeid) in LAST_MODULES else 1
        )
    )  # stable


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which would answer first
def pytest_xdist_make_scheduler(config, log):
    """Units as above, queued in collection order (not xdist's largest-first)."""
    from xdist.scheduler import LoadScopeScheduling

    class ServiceAsOneUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "service" if module in SERVICE_MODULES else module

    config.option.loadscopereorder = False
    return ServiceAsOneUnit(config, log)


def pytest_runtest_teardown(item, nextitem):
    if _RUNNING_SERVICE and (nextitem is None or "service" not in nextitem.fixturenames):
        _RUNNING_SERVICE.pop().stop()
