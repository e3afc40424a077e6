"""Start the real Serve app once per test run: `serve run <config>` in a subprocess, HTTP to it.

The config is serve_config.cpu.yaml with test paths swapped in, plus models that provoke each
fallback for real: a missing file, a corrupt file, and injected OOM/error faults.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_test_config(tmp: Path, weights: Path, gfpgan: Path, port: int) -> dict:
    cfg = yaml.safe_load((REPO / "serve_config.cpu.yaml").read_text())
    cfg["http_options"]["port"] = port
    args = cfg["applications"][0]["args"]
    args["sdxl"]["cache_dir"] = str(tmp / "sdxl-cache")
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file" * 10)
    args["upscaler"].update(
        weights_dir=str(weights),
        default="realesr-animevideov3",
        tile_size=128,
        min_tile=32,
        models=[
            {"name": "realesr-animevideov3", "file": "realesr-animevideov3-x4.safetensors"},
            {"name": "missing", "file": "no-such-model.pth"},
            {"name": "corrupt", "file": str(corrupt)},
            {"name": "chaos-oom", "file": "realesr-animevideov3-x4.safetensors", "inject_fault": "oom_always"},
            {"name": "chaos-oom-recovers", "file": "realesr-animevideov3-x4.safetensors", "inject_fault": "oom"},
            {"name": "chaos-error", "file": "realesr-animevideov3-x4.safetensors", "inject_fault": "error"},
        ],
    )
    args["face"] = {
        "weights_dir": str(tmp),
        "device": "cpu",
        "min_face_size": 48,
        "models": [
            {"name": "gfpgan-random", "file": str(gfpgan)},
            {"name": "gfpgan-missing", "file": "no-such-face-model.pth"},
        ],
    }
    args["limits"] = {
        "max_side": 1024,
        "max_steps": 50,
        "max_input_pixels": 1024 * 1024,
        "max_input_bytes": 4 * 1024 * 1024,
        "max_output_side": 2048,
    }
    # A second copy of the app whose upscaler replica runs on an interpreter that really lacks
    # spandrel: the "library missing" fallback, provoked for real (no mock, no sys.modules trick).
    nolib = copy.deepcopy(cfg["applications"][0])
    nolib.update(name="nolib", route_prefix="/nolib")
    nolib["args"]["sdxl"]["cache_dir"] = str(tmp / "sdxl-cache-nolib")
    for d in nolib["deployments"]:
        if d["name"] == "Upscaler":
            d["ray_actor_options"]["runtime_env"] = {"py_executable": str(python_without(tmp, "spandrel"))}
    cfg["applications"].append(nolib)
    return cfg


def python_without(tmp: Path, library: str) -> Path:
    """A venv whose site-packages links every entry of this one except `library` (and its metadata)."""
    env = tmp / f"venv-without-{library}"
    if not env.exists():
        venv.create(env, with_pip=False, symlinks=True)
        ours = Path(sysconfig.get_paths()["purelib"])
        theirs = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
        for entry in ours.iterdir():
            name = entry.name.lower()
            if name == library or name.startswith(library + "-"):
                continue
            (theirs / entry.name).symlink_to(entry)
    return env / "bin" / "python"


class ServeApp:
    def __init__(self, tmp: Path, weights: Path, gfpgan: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "serve_test.yaml"
        self.config.write_text(yaml.safe_dump(make_test_config(tmp, weights, gfpgan, self.port)))
        self.log = tmp / "serve.log"
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        # A fresh local cluster: never attach to one someone else runs here, never their weights.
        env.pop("RAY_ADDRESS", None)
        env.pop("HIRESFIX_WEIGHTS_DIR", None)
        serve_bin = Path(sys.executable).with_name("serve")
        self.proc = subprocess.Popen(
            [str(serve_bin), "run", str(self.config)],
            cwd=REPO,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if all(self._healthy(prefix) for prefix in ("", "/nolib")):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        raise RuntimeError(f"service not ready after {timeout}s:\n{self.log_tail()}")

    def _healthy(self, prefix: str) -> bool:
        r = httpx.get(self.url + prefix + "/health", timeout=5)
        return r.status_code == 200 and r.json()["status"] == "ok"

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        # `serve run` ignores SIGINT when not interactive; SIGTERM shuts Serve and its local Ray down.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
