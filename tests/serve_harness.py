"""Start the real Serve app once per test run: `serve run <config>` in a subprocess, HTTP to it.

The config is serve_config.cpu.yaml with test paths swapped in, plus models that provoke each
fallback for real: a missing file, a corrupt file, and injected OOM/error faults.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import os
import re
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

from deployments.guard import API_KEYS_ENV
from deployments.serve_run import INGRESS_ENV
from tests import REPO, TEST_ENV
from tests.redis_server import RedisServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_test_config(
    tmp: Path,
    weights: Path,
    gfpgan: Path,
    port: int,
    *,
    nolib: bool = True,
    redis_url: str | None = None,
) -> dict:
    """`nolib=False` leaves out the second ("library missing", API-keys) app: half the replicas,
    for a cluster that only needs the main app (tests/test_chaos.py)."""
    cfg = yaml.safe_load((REPO / "serve_config.cpu.yaml").read_text())
    cfg["http_options"]["port"] = port
    args = cfg["applications"][0]["args"]
    # One tiny-SDXL folder for every app: the first replica builds it, the others wait on its
    # lock and load it (hiresfix/sdxl/tiny.py), instead of six builds at once on two cores.
    args["sdxl"]["cache_dir"] = str(tmp / "sdxl-cache")
    # Each SDXL replica draws one small picture at start (tests/test_metrics.py sees it).
    args["sdxl"]["warmup"] = {"sizes": [[64, 64]], "steps": 1}
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file" * 10)
    args["upscaler"].update(
        weights_dir=str(weights),
        default="realesr-animevideov3",
        tile_size=128,
        min_tile=32,
        warmup=True,  # tests/test_metrics.py sees it
        models=[
            {"name": "realesr-animevideov3", "file": "realesr-animevideov3-x4.safetensors"},
            {"name": "missing", "file": "no-such-model.pth"},
            {"name": "corrupt", "file": str(corrupt)},
            {
                "name": "chaos-oom",
                "file": "realesr-animevideov3-x4.safetensors",
                "inject_fault": "oom_always",
            },
            {
                "name": "chaos-oom-recovers",
                "file": "realesr-animevideov3-x4.safetensors",
                "inject_fault": "oom",
            },
            {
                "name": "chaos-error",
                "file": "realesr-animevideov3-x4.safetensors",
                "inject_fault": "error",
            },
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
    args["jobs"] = dict(TEST_JOBS)  # in memory; callbacks to this machine (tests/test_jobs.py)
    # The SDXL stages batch compatible requests (tests/test_service.py), as serve_config.yaml does.
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] in ("SDXLBase", "RefineFace"):
            d["user_config"] = dict(TEST_SDXL_BATCHING)
    if not nolib:
        return cfg
    # A second copy of the app whose upscaler replica runs on an interpreter that really lacks
    # spandrel: the "library missing" fallback, provoked for real (no mock, no sys.modules trick).
    # Its ingress has API keys on (HIRESFIX_API_KEYS in that replica's environment, as a pod gets
    # it from a Secret), with a per-key limit of 1 running request.
    nolib = copy.deepcopy(cfg["applications"][0])
    nolib.update(name="nolib", route_prefix="/nolib")
    nolib["args"]["http"] = {
        **nolib["args"].get("http", {}),
        "docs_public": False,
        "max_requests_per_key": 1,
    }
    # Its job queue lives in a real Redis (ServeApp starts one): the Jobs replica may be killed.
    nolib["args"]["jobs"] = {**TEST_JOBS, "redis_url": redis_url, "key_prefix": "nolib:"}
    # OpenAI url links that expire within a test (tests/test_openai.py).
    nolib["args"]["openai"] = {"results_ttl_s": NOLIB_RESULTS_TTL_S, "results_max_images": 8}
    for d in nolib["deployments"]:
        if d["name"] == "Upscaler":
            d["ray_actor_options"]["runtime_env"] = {
                "py_executable": str(python_without(tmp / "venv-without-spandrel", "spandrel"))
            }
        if d["name"] == "Ingress":
            d["ray_actor_options"]["runtime_env"] = {"env_vars": {API_KEYS_ENV: ",".join(API_KEYS)}}
    cfg["applications"].append(nolib)
    cfg["applications"].append(fuzz_app(cfg["applications"][0], tmp))
    return cfg


# The "fuzz" app's request limits (tests/test_fuzz.py): small enough that the largest request the
# fuzzer can make valid (a 128 px base, 4 steps, 4 images, hires fix to 256 px, face pass) costs
# seconds on a CPU, so big generated values turn into fast 422/413 answers.
FUZZ_LIMITS = {
    "max_side": 128,
    "max_steps": 4,
    "max_output_side": 256,
    "max_input_pixels": 128 * 128,
    "max_input_bytes": 256 * 1024,
}


TEST_SDXL_BATCHING = {"max_batch_size": 2, "batch_wait_timeout_s": 0.05}

# Jobs (POST /jobs/{kind}) one at a time, so a second job waits; a lost runner's lease lapses
# in seconds (tests/test_jobs.py kills a Jobs replica).
TEST_JOBS = {
    "concurrency": 1,
    "lease_s": 4,
    "heartbeat_s": 1,
    "allow_callbacks": True,
    "callback_hosts": ["127.0.0.1"],
    "callback_timeout_s": 5,
}

FUZZ_BODY_TIMEOUT_S = 5  # stalled uploads to /fuzz get their 408 quickly (tests/test_hostile.py)


def fuzz_app(main: dict, tmp: Path) -> dict:
    """A front door at /fuzz to the main app's stages (`stages_from`: no model of its own) with
    FUZZ_LIMITS, offering the one real upscaler and the one real face model: the same OpenAPI
    document, a cheap largest valid request."""
    app = copy.deepcopy(main)
    app.update(name="fuzz", route_prefix="/fuzz")
    args = app["args"]
    offer = {
        "upscalers": [args["upscaler"]["models"][0]["name"]],
        "face_models": [args["face"]["models"][0]["name"]],
    }
    for own in ("sdxl", "upscaler", "face"):  # the main app's (AppArgs refuses them here)
        del args[own]
    args["openai"] = {k: v for k, v in args["openai"].items() if not k.startswith("results_")}
    args.update(stages_from=main["name"], offer=offer, limits=dict(FUZZ_LIMITS))
    args["http"] = {**args.get("http", {}), "body_timeout_s": FUZZ_BODY_TIMEOUT_S}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", "Jobs")]
    return app


API_KEYS = ("test-key-one", "test-key-two")  # the "nolib" app's keys
NOLIB_RESULTS_TTL_S = 3  # the "nolib" app's openai.results_ttl_s


def python_without(env: Path, *dists: str) -> Path:
    """A venv at `env` whose site-packages links every entry of this one except the files of the
    distributions `dists` (their packages and metadata): "library missing" for real, no import
    hook. A folder they share with a kept distribution (a namespace such as google/) is split one
    level down. bench/device/check_here.sh builds the GPU machine's Python with it."""
    if not env.exists():
        norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
        drop = {norm(n) for n in dists}
        hidden, kept = set(), set()  # (top-level entry, the next part) of their files
        for d in importlib.metadata.distributions():
            parts = {Path(f).parts[:2] for f in d.files or []}
            (hidden if norm(d.metadata["Name"] or "") in drop else kept).update(parts)
        gone = {top for top, *_ in hidden}
        shared = gone & {top for top, *_ in kept}
        venv.create(env, with_pip=False, symlinks=True)
        ours = Path(sysconfig.get_paths()["purelib"])
        theirs = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
        for entry in ours.iterdir():
            if entry.name in shared:
                (theirs / entry.name).mkdir()
                for sub in entry.iterdir():
                    if (entry.name, sub.name) not in hidden:
                        (theirs / entry.name / sub.name).symlink_to(sub)
            elif entry.name not in gone:
                (theirs / entry.name).symlink_to(entry)
    return env / "bin" / "python"


class RayHead:
    """A Ray head of our own on free ports, for tests that need its address (to find and kill
    replicas, redeploy, shut Serve down). `ray start --head --block` in its own session: stop()
    ends that process group only; `ray stop` would end every Ray on the machine, others' too."""

    def __init__(
        self,
        tmp: Path,
        num_cpus: int = 2,
        code: Path = REPO,
        join: str | None = None,
        resources: dict[str, float] | None = None,
        system_config: dict | None = None,
    ):
        """`join`: a worker node of the cluster at that address instead of a head; `resources`:
        the custom resources the node offers (stages placed by `ray_actor_options.resources`);
        `system_config`: the head's Ray settings (e.g. how fast a lost node is declared dead)."""
        self.code = code  # where replicas import deployments/ and hiresfix/ from (snapshot_code)
        ports = _free_ports(9)
        self.port = ports[0]
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{ports[7]}/metrics"  # Ray's Prometheus endpoint
        self.log = tmp / f"ray-head-{self.port}.log"
        lo = _free_port_range(200)
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={ports[0]}",
            f"--node-manager-port={ports[1]}",
            f"--object-manager-port={ports[2]}",
            f"--ray-client-server-port={ports[3]}",
            f"--dashboard-agent-listen-port={ports[4]}",
            f"--dashboard-agent-grpc-port={ports[5]}",
            f"--runtime-env-agent-port={ports[6]}",
            f"--metrics-export-port={ports[7]}",
            f"--dashboard-port={ports[8]}",  # not started, but its port is still checked
            f"--min-worker-port={lo}",
            f"--max-worker-port={lo + 199}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if system_config:
            cmd.append(f"--system-config={json.dumps(system_config)}")
        if join is not None:  # a worker: no GCS, client server or dashboard of its own
            self.address = join
            drop = ("--head", "--port=", "--ray-client-server-port=", "--dashboard-port=")
            drop += ("--include-dashboard=",)
            cmd = [a for a in cmd if not a.startswith(drop)] + [f"--address={join}"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=code,
            env=_serve_env(PYTHONPATH=str(code)),  # replicas import deployments.graph
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def start(cls, tmp: Path, code: Path = REPO, tries: int = 3, **kw) -> RayHead:
        """A started head (or, with `join=`, worker node). On a loaded 2-core box the raylet
        sometimes gives up waiting for its agents (~20 s, "Timed out waiting for file
        ...dashboard_agent_listen_port"): try again."""
        for attempt in range(tries):
            head = cls(tmp, code=code, **kw)
            try:
                head.wait_ready()
                return head
            except RuntimeError:
                head.stop()
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.proc.returncode}):\n{self.log_tail()}")
            if b"Ray runtime started" in self.log.read_bytes():  # head and worker alike
                return
            time.sleep(0.5)
        raise RuntimeError(f"Ray head not up after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def lose(self) -> None:
        """The node is lost, as a machine that dies would be: SIGKILL to every process of it."""
        for pid in _session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM to the head's process group (`ray start --block` then stops its raylet, GCS
        and workers), then SIGKILL to whatever is left of its session (workers run in process
        groups of their own, in the head's session)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        # `ray start` recorded this head as the machine's current cluster: a later plain `serve run`
        # (scripts/demo) or `ray.init()` would try to join the dead head. Leave no such pointer.
        current = Path("/tmp/ray/ray_current_cluster")
        try:
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()
        except OSError:
            pass


def _session_pids(sid: int) -> list[int]:
    """Every process in session `sid` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def snapshot_code(tmp: Path) -> Path:
    """A copy of the service's code (deployments/, hiresfix/) for a cluster whose replicas restart
    during the test: a restarted replica imports the code on disk and unpickles its deployment by
    name, so an edit in the working tree meanwhile (a renamed function) would stop it starting. As
    in production, the cluster runs one fixed version of the code."""
    import shutil

    dest = tmp / "code"
    for pkg in ("deployments", "hiresfix"):
        shutil.copytree(
            REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )
    return dest


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(n: int, lo: int = 20000, hi: int = 60000) -> int:
    """The start of n consecutive ports none of which is bound now (for Ray's worker ports)."""
    import random

    for _ in range(50):
        start = random.randrange(lo, hi - n)
        try:
            for p in range(start, start + n, 7):  # a sample: cheap, and clashes are rare
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
    raise RuntimeError("no free port range")


def _serve_env(**extra: str) -> dict:
    env = {**os.environ, **TEST_ENV, **extra}
    # A fresh local cluster: never attach to one someone else runs here, never their weights.
    env.pop("RAY_ADDRESS", None)
    env.pop("HIRESFIX_WEIGHTS_DIR", None)
    return env


# `serve run` on a local Ray whose Prometheus endpoint is on a port we chose (argv[1]): `serve run`
# has no flag for it, and starts Ray itself only when nothing in its process did (ray.init's
# `_metrics_export_port`; `ray start --metrics-export-port` is the same for a RayHead).
SERVE_RUN_WITH_METRICS_PORT = """
import sys
import ray
from ray.serve.scripts import cli
ray.init(address="local", namespace="serve", _metrics_export_port=int(sys.argv[1]))
print("HIRESFIX_TEST_GCS=" + ray.get_runtime_context().gcs_address, flush=True)
cli(["run", *sys.argv[2:]])
"""


class ServeApp:
    """`serve run <config>` on a local Ray of its own; or, with `ray_address`, the config submitted
    to that cluster (`serve run --non-blocking --address`), which then owns the app: deploy()
    submits a changed config (a redeploy), stop() leaves the cluster to its owner."""

    def __init__(
        self,
        tmp: Path,
        weights: Path,
        gfpgan: Path,
        *,
        ray_address: str | None = None,
        nolib: bool = True,
        edit=None,
        code: Path = REPO,
        ingress: str = "proxy",
        launcher: str = "serve run",
    ):
        """`ingress`: what fronts the ingress replicas: "proxy" (Serve's Python proxy), "haproxy"
        (what `scripts/serve --ingress haproxy` starts), or "direct" (Serve's direct ingress: the
        proxy and each replica's own port). `launcher="scripts/serve"`: the product's own
        launcher on a local Ray, as a user runs it (no known metrics port or cluster address
        then; stop() is its graceful SIGTERM)."""
        env, serve_args = {}, []
        if ingress != "proxy":
            # Ports of its own, not Ray's fixed defaults (30000+ and 40000+ for the replicas' HTTP
            # and gRPC, 8500/9500 for the fallback proxy behind HAProxy, 9101 and 8404 for
            # HAProxy's metrics and stats), which another run on this box may hold.
            self.replica_port = _free_port_range(16)
            grpc = _free_port_range(16)  # each replica opens a gRPC port beside its HTTP one
            env = {
                "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # a 2-core box
                # A stopping replica keeps its own port open this long for HAProxy to notice
                # (30 s by default): our drain has already emptied it, and the suite waits.
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.replica_port),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.replica_port + 15),
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
                "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 15),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            }
            if ingress == "direct":
                env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            elif launcher == "scripts/serve":
                serve_args = ["--ingress", ingress]  # the flag comes from the launcher
            else:
                env.update(INGRESS_ENV[ingress])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()  # Ray's Prometheus endpoint (local cluster only)
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.ray_address, self.code, self.launcher = ray_address, code, launcher
        self.prefixes = ("", "/nolib", "/fuzz") if nolib else ("",)
        self.config = tmp / "serve_test.yaml"
        # The "nolib" app keeps its jobs in a real Redis (tests/test_jobs.py).
        self.redis = RedisServer(tmp) if nolib else None
        redis_url = self.redis.url if self.redis else None
        cfg = make_test_config(tmp, weights, gfpgan, self.port, nolib=nolib, redis_url=redis_url)
        if edit is not None:
            edit(cfg)  # a test's own changes (replica counts, limits, ...)
        self.cfg = cfg
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = tmp / "serve.log"
        serve_bin = Path(sys.executable).with_name("serve")
        cmd = [str(serve_bin), "run", str(self.config)]
        if ray_address is not None:
            cmd[2:2] = ["--non-blocking", "--address", ray_address]
        else:  # "local": a fresh cluster. Without it `serve run` joins any `ray start` head on
            # this machine (RayHead, another engineer's run) and redeploys that cluster's apps.
            # Started by SERVE_RUN_WITH_METRICS_PORT's ray.init, so its metrics port is known.
            cmd = [sys.executable, "-c", SERVE_RUN_WITH_METRICS_PORT, str(self.metrics_port)]
            cmd.append(str(self.config))
        if launcher == "scripts/serve":
            assert ray_address is None, "scripts/serve here starts a local Ray"
            cmd = [str(code / "scripts" / "serve"), str(self.config), "--address", "local"]
            cmd += serve_args
        self.proc = subprocess.Popen(
            cmd,
            cwd=code,  # Ray puts the driver's directory on every replica's sys.path
            env=_serve_env(**env),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def deploy(self, cfg: dict, timeout: float = 60) -> None:
        """Submit a changed config to the running cluster, as `serve deploy` would (no dashboard
        needed): Serve rolls the changed deployments while requests keep running."""
        assert self.ray_address is not None, "deploy() needs ServeApp(ray_address=...)"
        self.cfg = cfg
        self.config.write_text(yaml.safe_dump(cfg))
        serve_bin = Path(sys.executable).with_name("serve")
        done = subprocess.run(
            [
                str(serve_bin),
                "run",
                "--non-blocking",
                "--address",
                self.ray_address,
                str(self.config),
            ],
            cwd=self.code,
            env=_serve_env(),
            capture_output=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"redeploy failed:\n{done.stdout[-3000:]!r}\n{done.stderr[-3000:]!r}"
            )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            rc = self.proc.poll()
            if rc is not None and (self.ray_address is None or rc != 0):
                raise RuntimeError(f"serve run exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if all(self._healthy(prefix) for prefix in self.prefixes):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        raise RuntimeError(f"service not ready after {timeout}s:\n{self.log_tail()}")

    def _healthy(self, prefix: str) -> bool:
        r = httpx.get(self.url + prefix + "/health", timeout=5)
        return r.status_code == 200 and r.json()["status"] == "ok"

    def replica_url(self, path: str = "/health", timeout: float = 60) -> str:
        """Direct or HAProxy mode: an ingress replica's own HTTP server, the first of the
        cluster's replica ports that answers GET `path` (each app's replica has a port of its
        own: /health finds the service's)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for port in range(self.replica_port, self.replica_port + 16):
                url = f"http://127.0.0.1:{port}"
                try:
                    if httpx.get(url + path, timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    continue
            time.sleep(1)
        raise RuntimeError(f"no ingress replica answers on ports {self.replica_port}+")

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def gcs_address(self, timeout: float = 10) -> str:
        """The local cluster's address, for ray.init from a test (to find and kill replicas)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("HIRESFIX_TEST_GCS="):
                    return line.split("=", 1)[1].strip()
            time.sleep(0.2)
        raise RuntimeError("the serve process never printed its cluster's address")

    def stop(self) -> None:
        try:
            self._stop_serve()
        finally:
            if self.redis is not None:
                self.redis.stop()

    def _stop_serve(self) -> None:
        if self.ray_address is not None:  # the cluster's owner (RayHead.stop) ends it
            return
        # `serve run` ignores SIGINT when not interactive; SIGTERM shuts Serve and its local Ray
        # down. scripts/serve: SIGTERM to it alone, as a user's Ctrl-C or systemd would (its
        # group holds Ray's own processes, which must outlive the drain).
        if self.proc.poll() is None:
            if self.launcher == "scripts/serve":
                self.proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120 if self.launcher == "scripts/serve" else 60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # What outlived it in its session: Ray workers run in process groups of their own, and
        # the HAProxy a worker starts (HAProxy mode) is orphaned when Ray stops without Serve's
        # graceful shutdown. It would hold its port and CPU for the rest of the suite.
        for pid in _session_pids(self.proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
