"""The pieces of a graceful stop and of stage-loss detection that need no cluster: the drain flag's
lifetime (deployments/drain.py) and when a stage counts as gone (deployments/watch.py). The real
thing runs in tests/test_chaos.py (SIGTERM while requests run; a lost node)."""

from __future__ import annotations

from deployments.drain import DrainResult, Flag
from deployments.watch import Snapshot


def test_a_drain_flag_ends_by_itself():
    flag = Flag(since=100.0, until=160.0)
    assert not flag.active(99.0) and flag.active(100.0) and flag.active(159.9)
    assert not flag.active(160.0)  # a stop command that died does not drain forever


def test_drain_result_says_what_happened():
    assert DrainResult(3.2, 2, 0, False).summary() == "drained 2 ingress replicas in 3.2 s"
    late = DrainResult(300.4, 1, 3, True).summary()
    assert "timed out" in late and "3 requests" in late


def test_a_stage_is_gone_only_with_no_running_replica_and_not_healthy():
    seen = Snapshot(
        states={"Upscaler": "UNHEALTHY", "RefineFace": "HEALTHY", "SDXLBase": "UPDATING"},
        running={"Upscaler": 0, "RefineFace": 0, "SDXLBase": 1},
    )
    assert not seen.serves("Upscaler")  # its node lost, no replacement can start
    assert seen.serves("RefineFace")  # scaled to zero on purpose: a call starts one
    assert seen.serves("SDXLBase")
    assert seen.serves("Unknown") and Snapshot().serves("Upscaler")  # no opinion: Serve decides


def test_a_replica_reconfigured_in_place_still_serves():
    from deployments.watch import _serving

    assert _serving({"UPDATING": 1}) == 1  # a user_config change: back in a moment
    assert _serving({"RUNNING": 1, "STOPPING": 1, "STARTING": 1}) == 1
    assert _serving({"STARTING": 1}) == 0  # may never be placed (its node is gone)


def test_a_request_never_waits_for_the_controller_read(monkeypatch):
    """ReplicaWatch answers from its last snapshot while a read is under way: a slow controller
    delays what /health reports, never a request (a blocked read here would hang the test)."""
    import asyncio
    import threading

    from deployments import watch

    release, reads = threading.Event(), []

    def slow_read(elsewhere: dict[str, str]) -> Snapshot:
        reads.append(elsewhere)
        assert release.wait(10), "the read was never released"
        return Snapshot(states={"Upscaler": "UNHEALTHY"}, running={"Upscaler": 0}, at=1e18)

    monkeypatch.setattr(watch, "_read", slow_read)

    async def scenario():
        w = watch.ReplicaWatch(ttl_s=1.0, elsewhere={"Upscaler": "main"})
        first = await asyncio.wait_for(w.has_replica("Upscaler"), 1.0)  # read still blocked
        again = await asyncio.wait_for(w.has_replica("Upscaler"), 1.0)
        fresh = asyncio.ensure_future(w.fresh())  # /health: waits for this read
        await asyncio.sleep(0.05)
        assert not fresh.done()
        release.set()
        seen = await asyncio.wait_for(fresh, 10)
        return first, again, seen, await w.has_replica("Upscaler")

    first, again, seen, after = asyncio.run(scenario())
    assert first and again  # no opinion yet: Serve decides
    assert reads == [{"Upscaler": "main"}]  # one controller call for all of them
    assert not seen.serves("Upscaler") and not after  # the read landed: the stage is gone


def test_serve_run_wrapper_takes_the_address_serve_run_would(monkeypatch):
    from deployments.serve_run import _pop_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _pop_address(["c.yaml", "--address", "local", "--x"]) == ("local", ["c.yaml", "--x"])
    assert _pop_address(["c.yaml", "--address=h:1"]) == ("h:1", ["c.yaml"])
    assert _pop_address(["c.yaml", "-a", "h:2"]) == ("h:2", ["c.yaml"])
    monkeypatch.setenv("RAY_ADDRESS", "h:3")
    assert _pop_address(["c.yaml"]) == ("h:3", ["c.yaml"])


def test_serve_run_wrapper_takes_its_ingress_mode(monkeypatch):
    """`--ingress haproxy` is ours (not `serve run`'s): it sets the local Ray's environment, and
    is refused for a running cluster, which has its own."""
    import subprocess
    import sys

    from deployments.serve_run import _pop_ingress

    assert _pop_ingress(["c.yaml", "--ingress", "haproxy", "--x"]) == ("haproxy", ["c.yaml", "--x"])
    assert _pop_ingress(["c.yaml", "--ingress=proxy"]) == ("proxy", ["c.yaml"])
    assert _pop_ingress(["c.yaml"]) == ("proxy", ["c.yaml"])
    for argv, says in (
        (["c.yaml", "--ingress", "nginx"], "--ingress must be one of proxy, haproxy, not 'nginx'"),
        (
            ["c.yaml", "--address", "10.0.0.5:6379", "--ingress", "haproxy"],
            "start it with RAY_SERVE_ENABLE_HA_PROXY=1",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "deployments.serve_run", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1 and says in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def test_a_front_door_to_an_app_that_is_not_deployed_knows_at_once(monkeypatch):
    """A front door (`stages_from`) reads its stages' replicas in their app (one controller call);
    when that app is not deployed the ingress answers a 503 naming it (deployments/ingress.py
    `_run`) instead of calls waiting in Serve's router until request_timeout_s. The controller's
    answer is stubbed here: what it says, not how Serve gets it, is under test."""
    import asyncio
    from types import SimpleNamespace as NS

    from ray import serve

    from deployments import watch

    def deployment(running: int):
        return NS(status=NS(value="HEALTHY"), replica_states={"RUNNING": running})

    apps = {"door": NS(deployments={"Ingress": deployment(1), "Jobs": deployment(1)})}
    monkeypatch.setattr(serve, "status", lambda: NS(applications=apps))
    me = NS(replica_id=NS(deployment_id=NS(app_name="door")))
    monkeypatch.setattr(serve, "get_replica_context", lambda: me)
    elsewhere = {"SDXLBase": "main", "Progress": "main"}

    assert asyncio.run(watch.ReplicaWatch(1.0, elsewhere).missing_app()) == "main"
    assert asyncio.run(watch.ReplicaWatch(1.0).missing_app()) is None  # stages of its own
    apps["main"] = NS(deployments={"SDXLBase": deployment(1), "Progress": deployment(0)})
    assert asyncio.run(watch.ReplicaWatch(1.0, elsewhere).missing_app()) is None
    seen = watch._read(elsewhere)
    assert seen.running == {"Ingress": 1, "Jobs": 1, "SDXLBase": 1, "Progress": 0}
    assert seen.serves("SDXLBase") and not seen.missing
