"""Shared test setup: offline, single-threaded torch, real weights from ../shared, one Serve app per run."""

from __future__ import annotations

import os

# Before torch is imported anywhere: 2 threads on a busy 2-core box make tiny models 50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_weights_dir() -> Path:
    """The real RealESRGAN weights CI always has. Missing means a broken checkout: fail, never skip."""
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


@pytest.fixture(scope="session")
def service(tmp_path_factory, shared_weights, random_gfpgan):
    """The real Ray Serve app over HTTP, started once per run (ServeApp: .url, .log_tail())."""
    from tests.serve_harness import ServeApp

    app = ServeApp(tmp_path_factory.mktemp("serve"), shared_weights, random_gfpgan)
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()
