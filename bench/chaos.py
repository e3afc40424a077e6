"""Chaos for a running hiresfix cluster (issue 11, items 3 and 5): kill one replica of each
deployment while requests are in flight, redeploy a changed config and shut Serve down while
requests run, and print what the clients saw.

    python bench/chaos.py                       # its own Ray head + the test config, then tear down
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
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

APP = "hiresfix"
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
        lines = [
            f"== {self.name}",
            f"   killed: {', '.join(self.killed) or '-'}",
            f"   recovery (kill -> a fresh request succeeds): {rec}",
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
            (f"{tag}generate-256", "/generate", generate_body(256, 30), rid("mix")),
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


def shutdown_while_busy(c: Cluster) -> Outcome:
    """`serve.shutdown()` (what `serve shutdown` asks the controller for) while requests run.
    Expected: each running request finishes or gets a clean error status; none is cut mid-body."""
    from ray import serve

    out = Outcome("serve shutdown while requests run")
    with ThreadPoolExecutor(6) as pool:
        fut = busy_mix(c, pool)
        time.sleep(1.5)
        t0 = time.monotonic()
        serve.shutdown()
        out.notes.append(f"serve.shutdown() returned after {time.monotonic() - t0:.1f} s")
        out.answers = results(fut, timeout=300)
    return out


# --------------------------------------------------------------------------------------------- main
def start_cluster(tmp: Path, gfpgan: Path | None, weights: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.serve_harness import RayHead, ServeApp, snapshot_code

    if gfpgan is None:
        from tests.model_factories import build_random_gfpgan

        gfpgan = build_random_gfpgan(tmp / "gfpgan-random.safetensors")
    code = snapshot_code(tmp)
    head = RayHead.start(tmp, code=code)
    app = ServeApp(tmp, weights, gfpgan, ray_address=head.address, nolib=False, code=code)
    return head, app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="GCS address of a running cluster (else: start our own)")
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--only", nargs="*", choices=[*KILLS, "redeploy", "shutdown"])
    ap.add_argument("--gfpgan", type=Path, help="a GFPGAN file (else a random one is built)")
    ap.add_argument(
        "--weights", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "weights"
    )
    args = ap.parse_args(argv)
    wanted = args.only or [*KILLS, "redeploy", "shutdown"]
    head = app = None
    t_start = time.monotonic()
    tmpdir = tempfile.TemporaryDirectory(prefix="chaos-")
    try:
        if args.address is None:
            head, app = start_cluster(Path(tmpdir.name), args.gfpgan, args.weights)
            app.wait_ready()
            address, url = head.address, app.url
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
            elif name == "redeploy":
                if app is None:
                    print("redeploy: needs our own cluster (no --address)")
                    continue
                o = redeploy_while_busy(c, app.deploy, app.cfg)
            else:
                o = shutdown_while_busy(c)
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
        if head is not None:
            head.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
