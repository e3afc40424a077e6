"""Drain, then stop: `hiresfix stop` lets running requests finish before Serve shuts down.

Ray 2.60's `serve shutdown` closes the HTTP proxies at once and cuts every running request
(tests/test_chaos.py recorded it). So stopping takes two steps:

1. A drain flag goes into Ray's GCS key-value store. Every ingress replica polls it (the Guard in
   deployments/guard.py, every `http.drain_poll_s`): while it is set, new POSTs get a 503 with
   Retry-After and `/health` a 503 (probes and load balancers look elsewhere), requests already
   admitted run on, and each replica writes how many it still holds.
2. When every running ingress replica has reported zero (or `timeout_s` passed), Serve is shut
   down and the flag and reports are removed, so the next deployment on this cluster starts open.

Nothing here runs per request: the flag is read off the request path, in a background task.
The flag carries its own end (`until`), so a drain whose stop command died does not last forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("hiresfix.drain")

NAMESPACE = b"hiresfix"
FLAG = b"drain/flag"
REPORTS = b"drain/in-flight/"  # + replica id


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


@dataclass(frozen=True)
class Flag:
    since: float  # time.time() when the drain began
    until: float  # after this the flag is ignored (a stop command that died)

    def active(self, now: float) -> bool:
        return self.since <= now < self.until


def read_flag() -> Flag | None:
    raw = _kv()._internal_kv_get(FLAG, namespace=NAMESPACE)
    return Flag(**json.loads(raw)) if raw else None


def _clear_reports() -> None:
    _kv()._internal_kv_del(REPORTS, del_by_prefix=True, namespace=NAMESPACE)


def _clear() -> None:
    _clear_reports()
    _kv()._internal_kv_del(FLAG, namespace=NAMESPACE)


# ------------------------------------------------------------------------- in the ingress replica
class DrainWatch:
    """One per ingress replica: polls the flag, and while draining reports `in_flight()`."""

    def __init__(self) -> None:
        self.draining = False
        self._task: asyncio.Task | None = None

    def start(self, in_flight: Callable[[], int], poll_s: Callable[[], float]) -> None:
        """Start polling, once, on the running loop; outside a Serve replica it does nothing
        (the Guard's in-process tests)."""
        if self._task is not None:
            return
        try:
            from ray import serve

            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self._task = asyncio.get_running_loop().create_future()  # never polls
            return
        self._task = asyncio.get_running_loop().create_task(self._poll(replica, in_flight, poll_s))

    async def _poll(self, replica: str, in_flight: Callable[[], int], poll_s) -> None:
        key = REPORTS + replica.encode()
        while True:
            try:
                flag = await asyncio.to_thread(read_flag)
                now = time.time()
                was, self.draining = self.draining, flag is not None and flag.active(now)
                if self.draining and not was:
                    log.warning("draining: new requests get a 503 until this replica stops")
                if self.draining:
                    report = json.dumps({"in_flight": in_flight(), "at": now}).encode()
                    await asyncio.to_thread(
                        _kv()._internal_kv_put, key, report, True, namespace=NAMESPACE
                    )
            except Exception as exc:  # the GCS is briefly away: keep the last state, retry
                log.info("drain flag not readable (%s); retrying", type(exc).__name__)
            await asyncio.sleep(poll_s())


# ----------------------------------------------------------------------------- the stop command
@dataclass
class DrainResult:
    seconds: float
    replicas: int  # ingress replicas that were running
    still_in_flight: int  # requests that had not finished when the wait ended (0: all drained)
    timed_out: bool

    def summary(self) -> str:
        if self.timed_out:
            return (
                f"drain timed out after {self.seconds:.1f} s with {self.still_in_flight} requests"
                f" still running on {self.replicas} ingress replicas"
            )
        return f"drained {self.replicas} ingress replicas in {self.seconds:.1f} s"


def _ingress_replicas() -> int:
    """Running ingress replicas over every app (each app of ours has one `Ingress` deployment)."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # no Serve on this cluster
        return 0
    return sum(
        app.deployments["Ingress"].replica_states.get("RUNNING", 0)
        for app in apps.values()
        if "Ingress" in app.deployments
    )


def _reports(since: float) -> list[int]:
    kv, out = _kv(), []
    for key in kv._internal_kv_list(REPORTS, namespace=NAMESPACE):
        raw = kv._internal_kv_get(key, namespace=NAMESPACE)
        report = json.loads(raw) if raw else None
        if report and report["at"] >= since:
            out.append(report["in_flight"])
    return out


def drain(timeout_s: float, poll_s: float = 0.5, say: Callable[[str], None] = print) -> DrainResult:
    """Set the flag and wait until every running ingress replica holds no request. Needs a Ray
    connection (`ray.init(address=...)`)."""
    kv = _kv()
    _clear_reports()  # an earlier drain's
    t0 = time.time()
    # The flag outlives the wait a little: replicas keep refusing while Serve shuts down.
    flag = Flag(since=t0, until=t0 + timeout_s + 60)
    kv._internal_kv_put(FLAG, json.dumps(flag.__dict__).encode(), True, namespace=NAMESPACE)
    last = None
    while True:
        replicas, reports = _ingress_replicas(), _reports(since=t0)
        holding = sum(reports)
        if (replicas, len(reports), holding) != last:
            say(f"{len(reports)}/{replicas} ingress replicas report {holding} requests running")
            last = replicas, len(reports), holding
        elapsed = time.time() - t0
        if len(reports) >= replicas and holding == 0:
            return DrainResult(elapsed, replicas, 0, False)
        if elapsed > timeout_s:
            return DrainResult(elapsed, replicas, holding, True)
        time.sleep(poll_s)


def undrain() -> None:
    """Open again (a drain that was only a rehearsal, or one that is to be called off)."""
    _clear()


def stop(timeout_s: float, say: Callable[[str], None] = print) -> DrainResult:
    """Drain, then shut Serve down on this cluster and remove the flag."""
    from ray import serve

    result = drain(timeout_s, say=say)
    say(result.summary())
    serve.shutdown()
    _clear()
    say("Serve is shut down")
    return result
