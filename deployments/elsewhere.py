"""A deployment of another application of the same Serve instance (`args.stages_from`).

A front-door app binds these instead of its own stages: its ingress calls that app's replicas, so
one set of models in GPU memory serves several route prefixes, each with its own limits, API keys
and job queue. Resolved inside the replica, lazily: the applications of one config deploy side by
side, so the other may not exist yet; a call then waits for its replicas like any other call.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle


@dataclass(frozen=True)
class Elsewhere:
    app: str
    deployment: str

    def handle(self) -> DeploymentHandle:
        from ray import serve

        return serve.get_deployment_handle(self.deployment, self.app, _check_exists=False)


def resolve(stage: DeploymentHandle | Elsewhere) -> DeploymentHandle:
    return stage.handle() if isinstance(stage, Elsewhere) else stage


def apps_of(*stages: DeploymentHandle | Elsewhere) -> dict[str, str]:
    """Deployment -> application, for the stages that live in another app (deployments/watch.py
    reads their replicas there)."""
    return {s.deployment: s.app for s in stages if isinstance(s, Elsewhere)}
