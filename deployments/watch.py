"""Which deployments of this app have a running replica, as the Serve controller sees them.

A request for a deployment with no running replica waits in Serve's router until one starts; when
its node is gone and no other node offers the resources it needs (`ray_actor_options.resources`),
that is never. So the ingress looks here first: an optional stage (the upscaler, the face pass) with
no running replica is skipped for its documented fallback at once (deployments/ingress.py), and
/health reports it. One controller call per `ttl_s` per ingress replica, off the request's path
when fresh.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Snapshot:
    states: dict[str, str] = field(default_factory=dict)  # deployment -> HEALTHY, UNHEALTHY, ...
    running: dict[str, int] = field(default_factory=dict)  # deployment -> RUNNING replicas
    at: float = float("-inf")

    def serves(self, deployment: str) -> bool:
        """False only when the controller says the deployment has no running replica and is not
        healthy (a replica died and none could start). A deployment scaled to zero on purpose is
        HEALTHY: a call waits and the autoscaler starts a replica. Unknown (or a failed read):
        True, Serve decides."""
        return self.running.get(deployment, 1) > 0 or self.states.get(deployment) == "HEALTHY"


class ReplicaWatch:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._last = Snapshot()
        self._lock = asyncio.Lock()

    async def snapshot(self) -> Snapshot:
        if time.monotonic() - self._last.at < self.ttl_s:
            return self._last
        async with self._lock:  # one controller call for every request that found it stale
            if time.monotonic() - self._last.at >= self.ttl_s:
                self._last = await asyncio.to_thread(_read)
        return self._last

    async def has_replica(self, deployment: str) -> bool:
        return (await self.snapshot()).serves(deployment)


def _read() -> Snapshot:
    from ray import serve

    app = serve.get_replica_context().replica_id.deployment_id.app_name
    try:
        status = serve.status().applications[app]
    except Exception:  # the controller is briefly away: no opinion, retry at the next ttl
        return Snapshot(at=time.monotonic())
    return Snapshot(
        states={name: d.status.value for name, d in status.deployments.items()},
        running={
            name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()
        },
        at=time.monotonic(),
    )
