"""The test package. TEST_ENV is the one place the tests' process environment is written down:
conftest applies it before anything imports torch, and serve_harness hands it to `serve run`."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEST_ENV = {
    "HF_HUB_OFFLINE": "1",  # nothing may download
    "OMP_NUM_THREADS": "1",  # 2 threads on a busy 2-core box make tiny models 50x slower
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 token auth: local clusters without a token
    "RAY_USAGE_STATS_ENABLED": "0",
}
