"""A real Redis server for the job store's tests: Debian's `redis-server` on a free port, no disk.

scripts/test installs it when it is missing; a machine without it fails these tests (never skips):
the Redis job store is only tested against the real thing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARY_ENV = "HIRESFIX_TEST_REDIS_SERVER"  # another redis-server binary, if not on PATH


def redis_binary() -> str:
    found = os.environ.get(BINARY_ENV) or shutil.which("redis-server")
    if not found:
        import pytest

        pytest.fail(
            "redis-server not found: the Redis job store is tested against a real server."
            " Install it (`apt-get install -y redis-server`; scripts/test does) or set"
            f" {BINARY_ENV}",
            pytrace=False,
        )
    return found


class RedisServer:
    """`redis-server` in the foreground; `url` is what HIRESFIX_REDIS_URL would be."""

    def __init__(self, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = tmp / f"redis-{self.port}.log"
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20) -> None:
        import redis

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log.read_text()[-2000:]}")
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server not up after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
