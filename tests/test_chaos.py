"""Chaos (issue 11, items 3 and 5): replicas die mid-request, a config redeploy and a Serve shutdown
while requests run. On a cluster of its own (never the shared `service` fixture): a Ray head on
free ports, the test config without the "nolib" app, its code copied once (a replica restarted
mid-test must import the code the app was deployed with, not a file someone edited meanwhile).

The scenarios live in bench/chaos.py (which prints the same figures outside pytest); here every
answer is checked: no 500, no cut answer, no error body naming a Python exception or a file, a
503 always with Retry-After and the service's error shape. Each prints its recovery time.
"""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_weights, random_gfpgan):
    from tests.serve_harness import RayHead, ServeApp, snapshot_code

    tmp = tmp_path_factory.mktemp("chaos")
    code = snapshot_code(tmp)
    head = RayHead.start(tmp, code=code)
    try:
        app = ServeApp(
            tmp, shared_weights, random_gfpgan, ray_address=head.address, nolib=False, code=code
        )
        app.wait_ready(timeout=240)
        yield chaos.Cluster(app.url, head.address), app
    finally:
        import ray

        ray.shutdown()
        head.stop()


def show(outcome: chaos.Outcome) -> None:
    print("\n" + outcome.report())


def in_flight(outcome: chaos.Outcome, label: str) -> chaos.Answer:
    return next(a for a in outcome.answers if a.label == label)


def test_progress_dies_and_no_request_notices(cluster):
    c, _ = cluster
    o = chaos.progress_killed(c)
    show(o)
    assert not o.problems()
    assert not o.notes, o.notes  # the kill really came while the first request ran its base stage
    assert [a.status for a in o.answers] == [200] * 5, o.report()
    assert o.recovery_s is not None, "GET /progress never answered again"


def test_upscaler_dies_and_requests_in_flight_get_lanczos(cluster):
    c, _ = cluster
    o = chaos.upscaler_killed(c)
    show(o)
    assert not o.problems()
    for a in o.answers:
        assert a.status == 200, a.short()
        assert a.body["upscaler_used"] == "lanczos"
        assert a.body["fallback_reason"] == "upscaler_unavailable"
        assert (a.body["width"], a.body["height"]) == (768, 768)
    assert o.recovery_s is not None, "the upscaler never came back"


def test_refine_dies_face_pass_degrades_and_hires_is_a_retryable_503(cluster):
    c, _ = cluster
    o = chaos.refine_killed(c)
    show(o)
    assert not o.problems()
    assert not o.notes, o.notes
    face, hires = in_flight(o, "face"), in_flight(o, "hires")
    assert face.status == 200, face.short()
    info = face.body["face_restoration"]
    assert info["applied"] is False and "unavailable" in info["reason"], info
    assert hires.status == 503, hires.short()
    assert hires.headers["retry-after"] and hires.headers["x-should-retry"] == "true"
    assert hires.body["request_id"]
    assert o.recovery_s is not None, "the refine stage never came back"


def test_base_dies_requests_on_it_get_a_retryable_503_and_it_comes_back(cluster):
    c, _ = cluster
    o = chaos.base_killed(c)
    show(o)
    assert not o.problems()
    assert not o.notes, o.notes
    for a in o.answers:
        assert a.status == 503, a.short()
        assert a.headers["x-should-retry"] == "true" and int(a.headers["retry-after"]) >= 1
        assert a.body["request_id"].startswith("chaos-base-")  # the client's own X-Request-ID
    assert o.recovery_s is not None, "SDXLBase never came back"
    print(f"SDXLBase: {o.recovery_s:.1f} s from the kill to a /generate answered 200")


def test_ingress_dies_the_proxy_answers_and_a_new_ingress_serves(cluster):
    """Our exception handlers die with the ingress replica: the request it held is answered by
    Ray's HTTP proxy. This records what that is (issue 11 asks; README table) and checks it is
    not a cut connection, and that a new ingress replica serves again."""
    c, _ = cluster
    o = chaos.ingress_killed(c)
    show(o)
    hires = in_flight(o, "hires")
    assert hires.cut is None, hires.short()
    print(f"the proxy's answer for a request whose ingress died: {hires.status} {hires.text!r}")
    assert hires.status in (500, 502, 503), hires.short()
    assert "Traceback" not in hires.text and 'File "' not in hires.text
    assert o.recovery_s is not None, "no new ingress replica served"
    assert not problems_except_proxy(o, hires)


def problems_except_proxy(o: chaos.Outcome, proxy_answer: chaos.Answer) -> list[str]:
    return [p for p in o.problems() if not p.startswith(f"{proxy_answer.label}:")]


def test_config_redeploy_while_requests_run_cuts_none(cluster):
    """Ingress and RefineFace replaced, the Upscaler reconfigured, while 8 requests run. Without
    graceful_shutdown_timeout_s on the Ingress (Serve's default: 20 s) the old ingress replica was
    killed while a face request it held waited for the new RefineFace replica: the proxy's 500."""
    c, app = cluster
    o = chaos.redeploy_while_busy(c, app.deploy, app.cfg)
    show(o)
    assert not o.problems()
    for a in o.answers:
        assert a.status in (200, 503), a.short()
        if a.status == 503:
            assert a.headers["retry-after"], a.short()
    assert o.recovery_s is not None, "Ingress and RefineFace were not replaced, or do not serve"


@pytest.mark.xfail(
    strict=True,
    reason="Ray 2.60: serve.shutdown() (what `serve shutdown -y` runs, via the dashboard) kills the"
    " HTTP proxy at once; every in-flight request is cut (RemoteProtocolError, no response) about"
    " 1 s after the call, before any replica drains. Strict: this test fails once Ray drains.",
)
def test_serve_shutdown_while_requests_run_cuts_none(cluster):
    """Last: it ends Serve on this cluster."""
    c, _ = cluster
    o = chaos.shutdown_while_busy(c)
    show(o)
    assert not o.problems()
