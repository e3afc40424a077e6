"""HAProxy mode (README "Serving overhead"): Ray Serve's HAProxy on the usual port in front of the
ingress replicas' own HTTP servers, instead of Serve's Python proxy (RAY_SERVE_ENABLE_HA_PROXY=1,
experimental in Ray 2.60). What the Python proxy did for us must still happen there: the whole
graph answers on the usual port, refusals keep our error bodies, a client that goes away cancels
its generation, and a stop leaves no HAProxy process behind. Each app gets ports
of its own (ServeApp), so this cluster never meets another run's HAProxy on this box."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_harness import ServeApp, _session_pids
from tests.test_service import TINY, ok, post


@pytest.fixture(scope="module")
def ha_service(tmp_path_factory, shared_weights, random_gfpgan):
    app = ServeApp(  # scripts/serve CONFIG --address local --ingress haproxy
        tmp_path_factory.mktemp("serve-haproxy"),
        shared_weights,
        random_gfpgan,
        nolib=False,
        ingress="haproxy",
        launcher="scripts/serve",
    )
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


def _haproxies(app: ServeApp) -> list[int]:
    """HAProxy processes of the app's cluster (its `serve run` session)."""
    found = []
    for pid in _session_pids(app.proc.pid):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"/haproxy"):
            found.append(pid)
    return found


def test_haproxy_serves_the_usual_port(ha_service):
    assert _haproxies(ha_service), "no HAProxy in the cluster: the flag did not reach Serve"
    # The whole graph through it: base, upscaler, refine, with the answer's fields intact.
    body = ok(post(ha_service, "/generate", {"prompt": "a lighthouse", **TINY, "hires_fix": True}))
    assert (body["width"], body["height"]) == (128, 128)
    assert body["upscaler_used"] == "realesr-animevideov3", body.get("fallback_reason")
    r = httpx.post(
        ha_service.url + "/upscale",
        json={"image": "A" * 64, "scale": 2},
        headers={"accept": "image/png"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["detail"][0]["field"] == "image", r.text
    r = httpx.post(
        ha_service.url + "/generate",
        json={"prompt": "x", "width": 65},
        timeout=30,
    )
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "width", r.text
    assert "Traceback" not in r.text


def test_a_client_that_leaves_cancels_its_generation(ha_service):
    """On the replica's own HTTP server (what HAProxy forwards to), as through the Python proxy.
    Through HAProxy itself it is best effort: Ray's HAProxy config sometimes notices a client's
    close only when the answer comes (its log: `CD--` after the whole generation; README
    "Serving overhead"), so the test talks to the replica's port."""
    replica = ha_service.replica_url()
    slow = {"prompt": "a busy street", "width": 384, "height": 384, "num_inference_steps": 50}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(replica + "/generate", json={**slow, "seed": 9}, timeout=3)
    # The generation's thread stopped at its next denoising step instead of running on.
    deadline = time.time() + 30
    while "generate cancelled by the client or its timeout" not in ha_service.log_tail(200_000):
        assert time.time() < deadline, ha_service.log_tail()
        time.sleep(0.5)
    assert ok(post(ha_service, "/generate", {"prompt": "after", **TINY}))["width"] == 64


def test_a_stop_leaves_no_haproxy_behind(ha_service):
    """SIGTERM to scripts/serve: the graceful stop (drain, then Serve's shutdown, which stops
    HAProxy) ends with nothing of the cluster left running, HAProxy included."""
    assert _haproxies(ha_service)
    ha_service.proc.send_signal(signal.SIGTERM)
    assert ha_service.proc.wait(120) == 0, ha_service.log_tail()
    deadline = time.time() + 10
    while _haproxies(ha_service) and time.time() < deadline:
        time.sleep(0.5)
    assert not _haproxies(ha_service), "HAProxy outlived the stop"
