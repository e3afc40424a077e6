"""Chaos for a running hiresfix cluster (issues 11 and 12): kill one replica of each deployment
while requests are in flight, redeploy a changed config, drive autoscaling up and down, lose the
node that holds the upscaler and let a new one join, stop Serve while requests run; and print what
the clients saw, with the timings.

    python bench/chaos.py       # its own cluster (a head + an `upscaler` node), then tear down
    python bench/chaos.py --address 127.0.0.1:6379 --url http://127.0.0.1:7860 --only upscaler

Replicas are killed as a node loss would kill them: `ray.kill(actor, no_restart=True)`; the Serve
controller then starts a new one. Per scenario it prints the status codes seen, the fallback reasons
seen, the seconds from the kill until a fresh request of that kind succeeds again ("recovery"), and
every problem: a 500, a cut answer (connection reset, incomplete body), an error body that names a
Python exception or a file, a 503 without Retry-After.

The scenarios are importable (tests/test_chaos.py asserts on them). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

APP = "hiresfix"
REPO = Path(__file__).resolve().parents[1]
UPSCALER_MODEL = "realesr-animevideov3"  # the test config's default neural model
FACE_MODEL = "gfpgan-random"  # the test config's face model (random GFPGAN: seconds per face)
# What an error body must never carry: exception names, traces, file paths, Ray internals.
LEAKS = (
    "Traceback",
    'File "',
    "/work/",
    ".py",
    "Error",
    "Exception",
    "ActorDied",
    "RayServe",
    "ray.",
)


# ---------------------------------------------------------------------------------------- requests
@dataclass
class Answer:
    label: str
    status: int | None  # None: no HTTP answer (the connection was cut or the client timed out)
    seconds: float
    body: dict | None = None  # parsed JSON, when the answer was JSON
    text: str = ""  # the body as text (first 2000 characters), whatever it was
    headers: dict = field(default_factory=dict)
    cut: str | None = None  # transport failure, incomplete body, or a hang

    @property
    def fallback_reason(self) -> str | None:
        return (self.body or {}).get("fallback_reason")

    def short(self) -> str:
        extra = self.cut or self.fallback_reason or ""
        face = (self.body or {}).get("face_restoration") or {}
        if face.get("reason") or face.get("applied"):
            extra += f" face_restoration={face}"
        if self.status and self.status != 200:
            extra = (self.body or {}).get("error") or self.text[:120]
        return f"{self.label}: {self.status} in {self.seconds:.1f}s {extra}".rstrip()


def png_b64(size: int, picture: str = "astronaut") -> str:
    from PIL import Image
    from skimage import data

    im = Image.fromarray(getattr(data, picture)()).convert("RGB").resize((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def send(
    url: str, label: str, path: str, body: dict, rid: str | None = None, timeout=180
) -> Answer:
    """One POST; never raises. A transport error, an incomplete body or a timeout is `cut`."""
    headers = {"x-request-id": rid} if rid else {}
    t0 = time.monotonic()
    try:
        r = httpx.post(url + path, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        return Answer(label, None, time.monotonic() - t0, cut=f"timeout ({type(exc).__name__})")
    except httpx.HTTPError as exc:  # RemoteProtocolError, ReadError, ConnectError, ...
        return Answer(label, None, time.monotonic() - t0, cut=type(exc).__name__)
    answer = Answer(label, r.status_code, time.monotonic() - t0, text=r.text[:2000])
    answer.headers = {k.lower(): v for k, v in r.headers.items()}
    if "json" in r.headers.get("content-type", ""):
        try:
            answer.body = r.json()
        except ValueError:
            answer.cut = "incomplete JSON body"
    if r.status_code == 200 and answer.body is None and answer.cut is None:
        answer.cut = "200 without a JSON body"
    return answer


def problems(answers: list[Answer]) -> list[str]:
    """What no answer may ever be: cut, a bare 500, a 503 that does not say when to retry, or an
    error body that shows Python internals or lacks the service's error shape."""
    out = []
    for a in answers:
        if a.cut:
            out.append(f"{a.label}: cut ({a.cut}) after {a.seconds:.1f}s")
            continue
        if a.status == 200:
            continue
        if a.status is not None and a.status >= 500 and a.status != 503:
            out.append(f"{a.label}: {a.status} {a.text[:300]!r}")
        if a.status == 503 and "retry-after" not in a.headers:
            out.append(f"{a.label}: 503 without Retry-After {a.text[:200]!r}")
        leaks = [w for w in LEAKS if w in a.text]
        if leaks:
            out.append(f"{a.label}: {a.status} body shows {leaks}: {a.text[:300]!r}")
        b = a.body or {}
        if not (isinstance(b.get("error"), str) and isinstance(b.get("detail"), list)):
            out.append(f"{a.label}: {a.status} body not in the error shape: {a.text[:200]!r}")
        elif a.status >= 500 and not b.get("request_id"):
            out.append(f"{a.label}: {a.status} error body without a request_id: {a.text[:200]!r}")
    return out


# ------------------------------------------------------------------------------------------ cluster
class Cluster:
    """The test process's view of the cluster: find and kill replicas, read progress."""

    def __init__(self, url: str, address: str):
        import ray

        self.url, self.address = url, address
        if not ray.is_initialized():
            ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)

    def replicas(self, deployment: str) -> list[str]:
        import ray

        prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
        return sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)
        )

    def nodes_of(self, deployments: tuple[str, ...]) -> dict[str, set[str]]:
        """The ids of the nodes each deployment's live replicas run on (from the GCS: no
        dashboard needed)."""
        import ray

        out: dict[str, set[str]] = {d: set() for d in deployments}
        for actor in ray._private.state.state.actor_table(None).values():
            parts = (actor.get("Name") or "").split("#")
            if actor.get("State") == "ALIVE" and len(parts) == 3 and parts[1] in out:
                if parts[0] == f"SERVE_REPLICA::{APP}":
                    out[parts[1]].add(actor["Address"]["NodeID"])
        return out

    def nodes_with(self, resource: str) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]}

    def kill(self, deployment: str) -> tuple[list[str], float]:
        """Kill every replica of `deployment` (one in the test config), as a node loss would."""
        import ray

        names = self.replicas(deployment)
        assert names, f"no running {deployment} replica to kill"
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        return names, time.monotonic()

    def progress(self, rid: str) -> dict | None:
        try:
            r = httpx.get(f"{self.url}/progress/{rid}", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def wait_stage(self, rid: str, stage: str, timeout: float = 60, min_step: int = 0) -> bool:
        """Until request `rid` is in `stage` (GET /progress): the moment to kill that stage."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.progress(rid)
            if p and p["state"] != "running":
                return False  # finished before we got there
            if p and p["stage"] == stage and p["step"] >= min_step:
                return True
            time.sleep(0.1)
        return False

    def healthy(self) -> bool:
        try:
            r = httpx.get(self.url + "/health", timeout=10)
            return r.status_code == 200 and r.json()["status"] == "ok"
        except (httpx.HTTPError, ValueError, KeyError):
            return False


def recovery(
    probe, since: float, timeout: float = 150, pause: float = 0.5
) -> tuple[float | None, list]:
    """Seconds from `since` until `probe()` returns (True, answer); None after `timeout`. Also every
    answer the probe saw meanwhile (what clients get while the replica restarts)."""
    seen = []
    deadline = since + timeout
    while time.monotonic() < deadline:
        ok, answer = probe()
        if answer is not None:
            seen.append(answer)
        if ok:
            return time.monotonic() - since, seen
        time.sleep(pause)
    return None, seen


def generate_probe(c: Cluster):
    """A recovery probe: does a small /generate succeed now?"""

    def probe():
        a = send(
            c.url, "probe-generate", "/generate", generate_body(64, 2), rid("probe"), timeout=60
        )
        return a.status == 200, a

    return probe


def rid(tag: str) -> str:
    return f"chaos-{tag}-{uuid.uuid4().hex[:8]}"


def generate_body(size: int = 128, steps: int = 10, **extra) -> dict:
    return {
        "prompt": "a lighthouse",
        "width": size,
        "height": size,
        "seed": 7,
        "num_inference_steps": steps,
        **extra,
    }


def hires_body(size: int = 128, steps: int = 6, hires_steps: int = 40) -> dict:
    return generate_body(
        size, steps, hires_fix=True, hires_scale=2, hires_steps=hires_steps, denoising_strength=0.6
    )


def launch(pool: ThreadPoolExecutor, url: str, jobs: list[tuple]) -> list[Future]:
    return [pool.submit(send, url, *job) for job in jobs]


def results(futures: list[Future], timeout: float = 240) -> list[Answer]:
    return [f.result(timeout=timeout) for f in futures]


# ---------------------------------------------------------------------------------------- scenarios
@dataclass
class Outcome:
    name: str
    killed: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)  # the requests in flight at the kill
    during: list[Answer] = field(default_factory=list)  # probes between the kill and recovery
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # a scenario's own measurements (seconds)

    def statuses(self) -> dict:
        out: dict[str, int] = {}
        for a in self.answers + self.during:
            k = str(a.status) if a.status is not None else f"cut:{a.cut}"
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items()))

    def fallbacks(self) -> dict:
        out: dict[str, int] = {}
        for a in self.answers + self.during:
            if a.fallback_reason:
                out[a.fallback_reason] = out.get(a.fallback_reason, 0) + 1
        return out

    def problems(self) -> list[str]:
        return problems(self.answers + self.during)

    def report(self) -> str:
        rec = f"{self.recovery_s:.1f} s" if self.recovery_s is not None else "NOT within the bound"
        lines = [f"== {self.name}", f"   killed: {', '.join(self.killed) or '-'}"]
        if self.killed or self.recovery_s is not None:  # a stop has nothing to recover
            lines.append(f"   recovery (kill -> a fresh request succeeds): {rec}")
        lines += [
            f"   status codes (in flight + probes): {self.statuses()}",
            f"   fallback reasons seen: {self.fallbacks() or '-'}",
        ]
        lines += [f"   in flight  {a.short()}" for a in self.answers]
        lines += [f"   probe      {a.short()}" for a in self.during if a.status != 200]
        lines += [f"   note: {n}" for n in self.notes]
        lines += [f"   PROBLEM: {p}" for p in self.problems()]
        return "\n".join(lines)


def upscaler_killed(c: Cluster) -> Outcome:
    """Three /upscale requests of 384 px (seconds of RealESRGAN on CPU) in flight; the Upscaler
    replica dies. Expected: all 200, LANCZOS, fallback_reason upscaler_unavailable."""
    out = Outcome("Upscaler killed mid-request")
    img = png_b64(384)
    with ThreadPoolExecutor(4) as pool:
        fut = launch(
            pool,
            c.url,
            [(f"upscale-{i}", "/upscale", {"image": img, "scale": 2}) for i in range(3)],
        )
        time.sleep(1.5)  # decoded and batched on the upscaler: ~10 s of work there
        out.killed, t_kill = c.kill("Upscaler")
        out.answers = results(fut)
    small = png_b64(64)

    def probe():
        a = send(c.url, "probe-upscale", "/upscale", {"image": small, "scale": 2}, timeout=60)
        return a.status == 200 and (a.body or {}).get("upscaler_used") == UPSCALER_MODEL, a

    out.recovery_s, out.during = recovery(probe, t_kill)
    return out


def progress_killed(c: Cluster) -> Outcome:
    """/generate requests with their own X-Request-ID in flight; the Progress replica dies.
    Expected: every request 200, as if nothing happened; GET /progress answers again later."""
    out = Outcome("Progress killed mid-request")
    ids = [rid("progress") for _ in range(3)]
    with ThreadPoolExecutor(6) as pool:
        fut = launch(
            pool,
            c.url,
            [(f"generate-{i}", "/generate", generate_body(256, 30), r) for i, r in enumerate(ids)],
        )
        if not c.wait_stage(ids[0], "base", min_step=1):
            out.notes.append("the first request was not seen in its base stage")
        out.killed, t_kill = c.kill("Progress")
        # Requests that start while the board is gone.
        fut += launch(
            pool,
            c.url,
            [
                (f"generate-after-{i}", "/generate", generate_body(128, 6), rid("after"))
                for i in range(2)
            ],
        )
        out.answers = results(fut)

    def probe():
        r = rid("probe")
        a = send(c.url, "probe-generate", "/generate", generate_body(64, 2), r, timeout=60)
        return a.status == 200 and c.progress(r) is not None, a

    out.recovery_s, out.during = recovery(probe, t_kill, pause=1.0)
    return out


def refine_killed(c: Cluster) -> Outcome:
    """A face pass (/upscale of the astronaut with the random GFPGAN, seconds per face) and a hires
    refine (/generate with hires_fix) run on the RefineFace replica; it dies. Expected: the face
    request 200 with the unrestored image and face_restoration saying so; the hires one a 503 with
    Retry-After."""
    out = Outcome("RefineFace killed mid-request (face pass + hires refine)")
    face = {
        "image": png_b64(256),
        "scale": 1,
        "use_face_restoration": True,
        "face_model": FACE_MODEL,
    }
    hid = rid("hires")
    with ThreadPoolExecutor(4) as pool:
        fut = launch(pool, c.url, [("face", "/upscale", face)])
        time.sleep(0.3)
        fut += launch(pool, c.url, [("hires", "/generate", hires_body(), hid)])
        if not c.wait_stage(hid, "hires", min_step=1):
            out.notes.append("the hires request was not seen in its hires stage")
        out.killed, t_kill = c.kill("RefineFace")
        out.answers = results(fut)

    def probe():
        a = send(c.url, "probe-hires", "/generate", hires_body(64, 2, 2), rid("probe"), timeout=60)
        return a.status == 200, a

    out.recovery_s, out.during = recovery(probe, t_kill)
    return out


def base_killed(c: Cluster) -> Outcome:
    """Two /generate requests (256 px, 40 steps) running on the SDXLBase replica; it dies.
    Expected: 503 with Retry-After (retryable), never a 500; Serve restarts the replica."""
    out = Outcome("SDXLBase killed mid-request")
    ids = [rid("base") for _ in range(2)]
    with ThreadPoolExecutor(4) as pool:
        fut = launch(
            pool,
            c.url,
            [(f"generate-{i}", "/generate", generate_body(256, 40), r) for i, r in enumerate(ids)],
        )
        if not c.wait_stage(ids[-1], "base", min_step=1):
            out.notes.append("the second request was not seen in its base stage")
        out.killed, t_kill = c.kill("SDXLBase")
        out.answers = results(fut)

    out.recovery_s, out.during = recovery(generate_probe(c), t_kill)
    return out


def ingress_killed(c: Cluster) -> Outcome:
    """A hires /generate and an /upscale in flight when the Ingress replica dies: what Ray's HTTP
    proxy answers for them (the ingress cannot: it is gone)."""
    out = Outcome("Ingress killed mid-request (what Ray's proxy answers)")
    hid = rid("ingress")
    with ThreadPoolExecutor(4) as pool:
        fut = launch(
            pool,
            c.url,
            [
                ("hires", "/generate", hires_body(), hid),
                ("upscale", "/upscale", {"image": png_b64(384), "scale": 2}),
            ],
        )
        if not c.wait_stage(hid, "hires"):
            out.notes.append("the hires request was not seen in its hires stage")
        out.killed, t_kill = c.kill("Ingress")
        out.answers = results(fut)

    out.recovery_s, out.during = recovery(generate_probe(c), t_kill)
    return out


KILLS = {
    "progress": progress_killed,
    "upscaler": upscaler_killed,
    "refine": refine_killed,
    "base": base_killed,
    "ingress": ingress_killed,
}


def busy_mix(c: Cluster, pool: ThreadPoolExecutor, tag: str = "") -> list[Future]:
    """A bit of every kind of work, for the redeploy and shutdown scenarios."""
    return launch(
        pool,
        c.url,
        [
            (f"{tag}upscale-384", "/upscale", {"image": png_b64(384), "scale": 2}),
            (f"{tag}generate-192", "/generate", generate_body(192, 20), rid("mix")),
            (f"{tag}hires", "/generate", hires_body(128, 6, 20), rid("mix")),
            (
                f"{tag}face",
                "/upscale",
                {
                    "image": png_b64(256),
                    "scale": 1,
                    "use_face_restoration": True,
                    "face_model": FACE_MODEL,
                },
            ),
        ],
    )


ROLLED = ("Ingress", "RefineFace")  # the deployments redeploy_while_busy replaces


def redeploy_while_busy(c: Cluster, deploy, cfg: dict) -> Outcome:
    """`deploy(new_cfg)` (`serve run --non-blocking --address`: what `serve deploy` submits) while
    requests run. The new config changes the face and health settings (the RefineFace and Ingress
    replicas are replaced: old ones drain, new ones start) and the Upscaler's user_config
    (reconfigured in place). A wave of requests before the submission, one right after it.
    Expected: each answer 200, or 503 with Retry-After; none cut; both deployments replaced."""
    import copy

    out = Outcome("config redeploy (Ingress + RefineFace replaced) while requests run")
    new = copy.deepcopy(cfg)
    app = new["applications"][0]
    app["args"]["face"]["min_face_size"] = app["args"]["face"].get("min_face_size", 48) + 1
    health = app["args"].setdefault("health", {})
    health["model_info_ttl_s"] = health.get("model_info_ttl_s", 30.0) + 1
    for d in app["deployments"]:
        if d["name"] == "Upscaler":
            d["user_config"] = {**d.get("user_config", {}), "batch_wait_timeout_s": 0.02}
    before = {name: c.replicas(name) for name in ROLLED}
    with ThreadPoolExecutor(10) as pool:
        fut = busy_mix(c, pool)
        time.sleep(1.5)
        t0 = time.monotonic()
        deploy(new)
        out.notes.append(f"redeploy submitted in {time.monotonic() - t0:.1f} s")
        fut += busy_mix(c, pool, "after-")
        out.answers = results(fut, timeout=400)

    def probe():
        rolled = all(c.replicas(n) and not set(c.replicas(n)) & set(before[n]) for n in ROLLED)
        ok = rolled and c.healthy()
        a = send(
            c.url, "probe-generate", "/generate", generate_body(64, 2), rid("probe"), timeout=60
        )
        return ok and a.status == 200, a

    out.recovery_s, out.during = recovery(probe, t0, timeout=240, pause=1.0)
    return out


# ------------------------------------------------------------------ scale out, lose a node, rejoin
UPSCALER_RESOURCE = "upscaler"  # the custom resource a node offers to host Upscaler replicas
# The head's: every other deployment (ingress included) runs there, so a batch crosses nodes and
# losing the upscaler's node loses nothing else.
MAIN_RESOURCE = "main"
# How soon the head declares a silent node dead (Ray's defaults: ~15-60 s, longer on a loaded box);
# until then a request routed to a replica on it is retried by Serve's router.
NODE_DEATH = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 4,
}
# What autoscaled() drives up and down: the stage that autoscales on its own (serve_config.yaml).
# SDXLBase autoscales there too, by the same Serve mechanism; here it stays at one replica, as a
# second one would start in every scenario that runs two generations (a tiny-SDXL replica costs
# ~12 s of this 2-core box's CPU each time) and slow all of them down.
SCALED = ("Upscaler",)


def multi_node_config(cfg: dict) -> None:
    """The test config for a head plus upscaler node(s): the Upscaler runs only where a node offers
    the `upscaler` resource, every other deployment only where one offers `main` (as a GPU cluster
    places stages by node group); the Upscaler autoscales 1..2 with short delays."""
    for d in cfg["applications"][0]["deployments"]:
        resource = {UPSCALER_RESOURCE: 1} if d["name"] == "Upscaler" else {MAIN_RESOURCE: 0.01}
        d.setdefault("ray_actor_options", {})["resources"] = resource
        if d["name"] not in SCALED:
            continue
        d.pop("num_replicas", None)
        d["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": 2,
            # 3: the autoscaling scenario's seven clients scale it out; the two or three
            # upscales of the other scenarios do not (each second replica costs seconds of CPU).
            "target_ongoing_requests": 3,
            "upscale_delay_s": 1,
            "downscale_delay_s": 8,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        }


class Timeline:
    """Running replicas of some deployments over time, sampled from serve.status() in a thread."""

    def __init__(self, names: tuple[str, ...], every: float = 0.5):
        import threading

        self.names, self.every, self.t0 = names, every, time.monotonic()
        self.rows: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                deps = serve.status().applications[APP].deployments
                now = {n: deps[n].replica_states.get("RUNNING", 0) for n in self.names}
            except Exception:  # noqa: BLE001 - the controller busy for a moment: next sample
                now = None
            if now is not None and (not self.rows or self.rows[-1][1] != now):
                self.rows.append((time.monotonic() - self.t0, now))
            self._stop.wait(self.every)

    def now(self, name: str) -> int:
        return self.rows[-1][1][name] if self.rows else 0

    def first(self, name: str, pred, after: float = 0.0) -> float | None:
        """Seconds (since the start) of the first sample after `after` where pred(count) holds."""
        return next((t for t, row in self.rows if t >= after and pred(row[name])), None)

    def table(self) -> list[str]:
        head = "   t (s)  " + "  ".join(f"{n:>9}" for n in self.names)
        return [head] + [
            f"   {t:6.1f}  " + "  ".join(f"{row[n]:>9}" for n in self.names) for t, row in self.rows
        ]


def autoscaled(c: Cluster, up_timeout: float = 240, down_timeout: float = 120) -> Outcome:
    """Load until the Upscaler runs 2 replicas, then a trickle (one client) until it is back at
    1: every answer 200 (or 503 with Retry-After), none cut, scale-down drains the replica it
    stops (the trickle's requests land on it too). Hires clients beside the /upscale ones: batches
    on their way base -> upscaler -> refine cross the scaling too. up_timeout: a second Upscaler
    and SDXLBase together took 128 s to run on a slow day of the 2-core box (40 s on a quick
    one)."""
    import threading

    out = Outcome(f"autoscaling: load scales {' and '.join(SCALED)} 1 -> 2 -> 1")
    heavy, trickle = threading.Event(), threading.Event()
    # 128 px: five clients (and two hires ones) keep the Upscaler above its target of 3 ongoing
    # requests (multi_node_config), and a request stays well inside its timeout while a replica
    # loads beside it (256 px: up to 92 s).
    upscale = {"image": png_b64(128), "scale": 2, "upscaler": UPSCALER_MODEL}

    def client(label: str, path: str, body: dict, until: threading.Event) -> list[Answer]:
        seen = []
        while not until.is_set():
            seen.append(send(c.url, label, path, body, timeout=120))
        return seen

    with Timeline(SCALED) as tl, ThreadPoolExecutor(10) as pool:
        futs = [pool.submit(client, f"up-{i}", "/upscale", upscale, heavy) for i in range(5)]
        futs += [
            pool.submit(client, f"hires-{i}", "/generate", hires_body(64, 2, 2), heavy)
            for i in range(2)
        ]
        futs.append(pool.submit(client, "trickle", "/upscale", upscale, trickle))
        deadline = time.monotonic() + up_timeout
        while time.monotonic() < deadline and not all(tl.now(n) >= 2 for n in SCALED):
            time.sleep(0.5)
        time.sleep(3)  # a few requests on both replicas
        heavy.set()
        t_quiet = time.monotonic() - tl.t0
        deadline = time.monotonic() + down_timeout
        while time.monotonic() < deadline and not all(tl.now(n) == 1 for n in SCALED):
            time.sleep(0.5)
        trickle.set()
        for f in futs:
            out.during += f.result(timeout=180)
    for name in SCALED:
        up = tl.first(name, lambda n: n >= 2)
        down = tl.first(name, lambda n: n <= 1, after=t_quiet)
        out.notes.append(
            f"{name}: 2 replicas {up:.1f} s after the load began; back to 1 replica "
            f"{down - t_quiet:.1f} s after it stopped"
            if up is not None and down is not None
            else f"{name}: scaled up at {up}, down at {down} (s; None = not within the bound)"
        )
    out.notes.append(f"{len(out.during)} requests answered during the run: {out.statuses()}")
    out.notes += ["timeline (RUNNING replicas):", *tl.table()]
    for n in SCALED:
        out.figures[n] = (tl.first(n, lambda k: k >= 2), tl.first(n, lambda k: k <= 1, t_quiet))
    return out


def node_lost(c: Cluster, lose, rejoin, timeout: float = 180) -> Outcome:
    """The node holding every Upscaler replica is lost (`lose()`: SIGKILL to all its processes)
    while hires requests run, and no other node offers the `upscaler` resource. Expected: every
    answer 200 (LANCZOS, `fallback_reason: upscaler_unavailable` once the upscaler is gone),
    /health says the upscaler is unavailable; after `rejoin()` starts a node with the resource,
    the neural path comes back without a restart. Prints detection and recovery times."""
    out = Outcome("the upscaler's node is lost, then a new one joins")
    hires = {**hires_body(96, 4, 4), "upscaler": UPSCALER_MODEL}

    def probe_fallback():
        a = send(c.url, "hires-after-loss", "/generate", hires, timeout=120)
        return a.status == 200 and a.fallback_reason == "upscaler_unavailable", a

    def probe_health_down():
        try:
            h = httpx.get(c.url + "/health", timeout=30).json()
        except (httpx.HTTPError, ValueError):
            return False, None
        return h.get("realesrgan_available") is False, None

    with ThreadPoolExecutor(4) as pool:
        fut = launch(pool, c.url, [(f"in-flight-{i}", "/generate", hires) for i in range(3)])
        time.sleep(1.0)
        t0 = time.monotonic()
        lose()
        out.killed.append("the upscaler node (every process SIGKILLed)")
        health = pool.submit(recovery, probe_health_down, t0, timeout)
        detect_s, seen = recovery(probe_fallback, t0, timeout=timeout)
        health_s, _ = health.result(timeout=timeout + 30)
        out.answers = results(fut, timeout=timeout)
    out.during += seen
    out.notes.append(
        f"a fresh hires request falls back {detect_s:.1f} s after the loss"
        if detect_s is not None
        else "hires requests never fell back within the bound"
    )
    out.notes.append(
        f"/health reports the upscaler unavailable {health_s:.1f} s after the loss"
        if health_s is not None
        else "/health never reported the upscaler unavailable"
    )
    out.figures.update(detect_s=detect_s, health_s=health_s)

    t1 = time.monotonic()
    rejoin()
    joined = time.monotonic() - t1
    out.notes.append(f"a new node with the `{UPSCALER_RESOURCE}` resource joined in {joined:.1f} s")

    def probe_neural():
        a = send(c.url, "hires-after-rejoin", "/generate", hires, timeout=120)
        return a.status == 200 and a.body.get("upscaler_used") == UPSCALER_MODEL, a

    out.recovery_s, seen = recovery(probe_neural, t1, timeout=timeout, pause=1.0)
    out.during += seen
    return out


def stop_while_busy(c: Cluster, config: Path | None = None) -> Outcome:
    """A graceful stop while requests run. With `config`: SIGTERM to `scripts/serve config`
    attached to the cluster (what stops `scripts/demo`), which runs `hiresfix stop`; without it:
    `hiresfix stop` itself. Plain `serve shutdown` cuts every running request in Ray 2.60 (the
    proxies close at once); the drain must not. Expected: each request admitted before the stop
    answers 200; each sent while it drains gets a 503 with Retry-After at once; none is cut;
    Serve is gone afterwards and the drain flag is cleared."""
    import signal

    if config is None:
        name, cmd = "hiresfix stop", [sys.executable, "-m", "hiresfix.cli", "stop"]
        cmd += ["--address", c.address, "--timeout", "240"]
    else:
        name, cmd = "SIGTERM to scripts/serve", [str(REPO / "scripts" / "serve"), str(config)]
        cmd += ["--address", c.address]
    out = Outcome(f"{name} (drain, then serve shutdown) while requests run")
    env = {**os.environ, "HIRESFIX_STOP_TIMEOUT": "240"}
    with ThreadPoolExecutor(8) as pool:
        if config is not None:  # attached: `serve run` resubmits the running config (no change)
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
            )
            time.sleep(5)
        fut = busy_mix(c, pool)
        time.sleep(1.5)
        t0 = time.monotonic()
        if config is None:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
            )
        else:
            proc.send_signal(signal.SIGTERM)
        lines = []
        for line in proc.stdout:
            lines.append(re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip()))  # no colour codes
            draining = "requests running" in line and " 0 requests running" not in line
            if draining and not out.during:  # the replicas draining, requests still running
                out.during = [
                    send(
                        c.url, f"while-draining-{i}", "/generate", generate_body(64, 2), timeout=30
                    )
                    for i in range(2)
                ]
        rc = proc.wait(timeout=60)
        out.notes.append(f"{name} exited {rc} after {time.monotonic() - t0:.1f} s")
        if rc == 0:
            out.notes += [f"  {line}" for line in lines if "drain" in line or "running" in line]
        else:  # everything it said, to see why
            out.notes += [f"  {line}" for line in lines[-60:]]
        out.answers = results(fut, timeout=300)
    return out


# --------------------------------------------------------------------------------------------- main
OWN_CLUSTER = ("redeploy", "autoscale", "node")  # scenarios that need the cluster we started


class OwnCluster:
    """A head offering `main`, a node offering `upscaler`, and the test config deployed on them
    (multi_node_config). lose_worker()/rejoin() play the node loss; stop() ends every node."""

    def __init__(self, tmp: Path, gfpgan: Path | None, weights: Path):
        sys.path.insert(0, str(REPO))
        from tests.serve_harness import RayHead, ServeApp, snapshot_code

        if gfpgan is None:
            from tests.model_factories import build_random_gfpgan

            gfpgan = build_random_gfpgan(tmp / "gfpgan-random.safetensors")
        self.tmp, self.code = tmp, snapshot_code(tmp)
        self.nodes = [
            RayHead.start(
                tmp, code=self.code, resources={MAIN_RESOURCE: 1}, system_config=NODE_DEATH
            )
        ]
        self.head = self.nodes[0]
        self.rejoin()
        self.app = ServeApp(
            tmp,
            weights,
            gfpgan,
            ray_address=self.head.address,
            nolib=False,
            code=self.code,
            edit=multi_node_config,
        )

    def rejoin(self) -> None:
        """A (new) worker node offering the `upscaler` resource joins."""
        from tests.serve_harness import RayHead

        worker = RayHead.start(
            self.tmp, code=self.code, join=self.head.address, resources={UPSCALER_RESOURCE: 2}
        )
        self.nodes.append(worker)

    def lose_worker(self) -> None:
        self.nodes[-1].lose()

    def stop(self) -> None:
        # Side by side: each node's stop waits up to 10 s for its `ray start` to exit.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="GCS address of a running cluster (else: start our own)")
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--only", nargs="*", choices=[*KILLS, *OWN_CLUSTER, "stop"])
    ap.add_argument("--gfpgan", type=Path, help="a GFPGAN file (else a random one is built)")
    ap.add_argument(
        "--weights", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "weights"
    )
    args = ap.parse_args(argv)
    wanted = args.only or [*KILLS, *OWN_CLUSTER, "stop"]
    own = app = None
    t_start = time.monotonic()
    tmpdir = tempfile.TemporaryDirectory(prefix="chaos-")
    try:
        if args.address is None:
            own = OwnCluster(Path(tmpdir.name), args.gfpgan, args.weights)
            app = own.app
            app.wait_ready()
            address, url = own.head.address, app.url
            print(
                f"cluster up in {time.monotonic() - t_start:.0f} s ({address}, {url})", flush=True
            )
        else:
            address, url = args.address, args.url
        c = Cluster(url, address)
        outcomes = []
        for name in wanted:
            if name in KILLS:
                o = KILLS[name](c)
            elif name in OWN_CLUSTER and own is None:
                print(f"{name}: needs our own cluster (no --address)")
                continue
            elif name == "redeploy":
                o = redeploy_while_busy(c, app.deploy, app.cfg)
            elif name == "autoscale":
                o = autoscaled(c)
            elif name == "node":
                o = node_lost(c, own.lose_worker, own.rejoin)
            else:
                o = stop_while_busy(c, app.config if app is not None else None)
            outcomes.append(o)
            print(o.report(), flush=True)
        print("\n== summary")
        print(f"   {'scenario':<60} {'recovery s':>10}  problems")
        for o in outcomes:
            rec = f"{o.recovery_s:.1f}" if o.recovery_s is not None else "-"
            print(f"   {o.name:<60} {rec:>10}  {len(o.problems())}")
        print(
            json.dumps(
                {
                    o.name: {
                        "recovery_s": o.recovery_s,
                        "statuses": o.statuses(),
                        "fallbacks": o.fallbacks(),
                    }
                    for o in outcomes
                }
            )
        )
        return 1 if any(o.problems() for o in outcomes) else 0
    finally:
        if own is not None:
            own.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
