"""Which deployments of this app have a running replica, as the Serve controller sees them.

A request for a deployment with no running replica waits in Serve's router until one starts; when
its node is gone and no other node offers the resources it needs (`ray_actor_options.resources`),
that is never. So the ingress looks here first: an optional stage (the upscaler, the face pass) with
no running replica is skipped for its documented fallback at once (deployments/ingress.py), and
/health reports it. At most one controller call per `ttl_s` per ingress replica, never on a
request's path.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Snapshot:
    states: dict[str, str] = field(default_factory=dict)  # deployment -> HEALTHY, UNHEALTHY, ...
    running: dict[str, int] = field(default_factory=dict)  # deployment -> RUNNING replicas
    missing: dict[str, str] = field(default_factory=dict)  # deployment -> its app, not deployed
    at: float = float("-inf")

    def serves(self, deployment: str) -> bool:
        """False only when the controller says the deployment has no running replica and is not
        healthy (a replica died and none could start). A deployment scaled to zero on purpose is
        HEALTHY: a call waits and the autoscaler starts a replica. Unknown (or a failed read):
        True, Serve decides."""
        return self.running.get(deployment, 1) > 0 or self.states.get(deployment) == "HEALTHY"


class ReplicaWatch:
    def __init__(self, ttl_s: float, elsewhere: dict[str, str] | None = None):
        """`elsewhere`: deployment -> application, for stages of another app (a front door's:
        deployments/elsewhere.py); every other deployment is looked up in this replica's app."""
        self.ttl_s = ttl_s
        self.elsewhere = dict(elsewhere or {})
        self._last = Snapshot()
        self._refresh: asyncio.Task | None = None

    async def snapshot(self) -> Snapshot:
        """The latest snapshot at once; a stale one is refreshed in the background. A request
        never waits for the controller: under load that call takes up to a second, and the hires
        requests that waited for it lost every free SDXLBase slot to /generate requests sent
        after them (issue 11's load test: 0 of 26 served)."""
        stale = time.monotonic() - self._last.at >= self.ttl_s
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._read())
        return self._last

    async def fresh(self) -> Snapshot:
        """A snapshot read after this call (for /health, which reports it)."""
        if time.monotonic() - self._last.at < self.ttl_s:
            return self._last
        await self.snapshot()
        await asyncio.shield(self._refresh)
        return self._last

    async def has_replica(self, deployment: str) -> bool:
        return (await self.snapshot()).serves(deployment)

    async def missing_app(self) -> str | None:
        """A front door's other app (`stages_from`) when the controller says it is not deployed:
        calls to it would wait in Serve's router until request_timeout_s. The first call waits
        for one controller read, as a request then must not go out to nothing."""
        if not self.elsewhere:
            return None
        seen = await (self.fresh() if self._last.at == float("-inf") else self.snapshot())
        return next(iter(seen.missing.values()), None)

    async def _read(self) -> None:
        try:
            self._last = await asyncio.to_thread(_read, self.elsewhere)
        except Exception:  # noqa: BLE001 - no opinion until the next ttl; Serve decides meanwhile
            self._last = Snapshot(at=time.monotonic())


def _read(elsewhere: dict[str, str]) -> Snapshot:
    from ray import serve

    app = serve.get_replica_context().replica_id.deployment_id.app_name
    try:
        apps = serve.status().applications
        deployments = dict(apps[app].deployments)
    except Exception:  # the controller is briefly away: no opinion, retry at the next ttl
        return Snapshot(at=time.monotonic())
    missing = {}
    for name, other in elsewhere.items():
        if other not in apps:
            missing[name] = other
        elif name in apps[other].deployments:  # else unknown: Serve decides
            deployments[name] = apps[other].deployments[name]
    return Snapshot(
        states={name: d.status.value for name, d in deployments.items()},
        running={name: _serving(d.replica_states) for name, d in deployments.items()},
        missing=missing,
        at=time.monotonic(),
    )


def _serving(replica_states: dict) -> int:
    """Replicas that take requests, or will again in a moment: one UPDATING is reconfigured in
    place (a user_config change), which must not send its requests to the fallback."""
    return sum(replica_states.get(k, 0) for k in ("RUNNING", "PENDING_MIGRATION", "UPDATING"))
