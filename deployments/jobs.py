"""The job queue (POST /jobs/{kind}): one concern, the queue. It owns the job store
(hiresfix/jobs.py) and a worker loop that runs up to `jobs.concurrency` jobs at once by calling the
Ingress's `run_job` (deployments/jobs_routes.py: the synchronous route's code path, outside HTTP).

The job's id is its run's request id, so GET /progress/{id} follows it and a cancel reaches its
denoising loop as a client disconnect would: `DeploymentResponse.cancel()` cancels the Ingress's
task, which cancels the stage calls under it (deployments/cancel.py).

Runners renew a lease in the store every `heartbeat_s`. With Redis, a Jobs replica that dies loses
nothing: its successor (or a peer) finds the lapsed leases and requeues those jobs once when they
are seeded, else fails them with a retryable error. With the in-memory store the queue lives and
dies with this replica (/health says so). The Ingress routes reach this deployment through a
handle; it reaches the Ingress by name (a bound graph cannot have the cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import httpx
from ray import serve
from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from deployments import metrics
from hiresfix.jobs import (
    ENDED,
    JobRecord,
    JobSettings,
    callback_allowed,
    job_error,
    make_store,
    status_json,
)
from hiresfix.schemas import RequestError

log = logging.getLogger("hiresfix.jobs")

# The runner (an Ingress replica, or its node) went away, or could take no more: the run is lost,
# not failed. Requeued once when seeded (hiresfix/jobs.py `_lost`).
RUNNER_LOST = (
    RayActorError,
    ActorUnavailableError,
    NodeDiedError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    BackPressureError,
)
EWMA = 0.3  # weight of the newest run in the per-kind duration estimate (queued jobs' ETA)


def refusal(exc: RequestError) -> dict:
    """A RequestError as a plain value: exceptions crossing a handle arrive wrapped."""
    return {"refused": [exc.status, exc.field, exc.message, exc.retry_after_s]}


@serve.deployment(name="Jobs")
class Jobs:
    def __init__(self, settings: JobSettings):
        self.settings = JobSettings.model_validate(settings)
        self.store = make_store(self.settings)
        ctx = serve.get_replica_context()
        self.app_name = ctx.replica_id.deployment_id.app_name
        self.worker = f"{ctx.replica_id.unique_id}-{uuid.uuid4().hex[:6]}"
        self.tasks: dict[str, asyncio.Task] = {}
        self.responses: dict = {}  # job id -> the Ingress call's DeploymentResponse
        self.durations: dict[str, float] = {}  # per kind, for queued jobs' ETA
        self._ingress = None
        self._wake = asyncio.Event()
        self._store_down_logged = 0.0
        self._loop = asyncio.get_running_loop().create_task(self._work())
        log.info("jobs: %s store, worker %s", self.store.kind, self.worker)

    def check_health(self) -> None:
        """Serve restarts a replica whose worker loop died."""
        if self._loop.done():
            raise RuntimeError("the jobs worker loop stopped")

    # --- what the Ingress routes call (deployments/jobs_routes.py) ---
    async def submit(
        self, kind: str, body: str, owner: str | None, retry: bool, callback_url: str | None
    ) -> dict:
        rec = JobRecord(
            id=uuid.uuid4().hex,
            kind=kind,
            owner=owner or "",
            created_at=time.time(),
            retry=retry,
            callback_url=callback_url,
        )
        try:
            if callback_url is not None:
                callback_allowed(self.settings, callback_url)
            position = await asyncio.to_thread(self.store.submit, rec, body)
        except RequestError as exc:
            metrics.record_job(kind, "refused")
            return refusal(exc)
        metrics.record_job(kind, "submitted")
        self._wake.set()
        return {"id": rec.id, "state": "queued", "queue_position": position}

    async def get(self, job_id: str, owner: str | None) -> dict | None:
        """The job's record and result text (None: unknown, expired, or not the caller's)."""
        got = await asyncio.to_thread(self.store.get, job_id)
        if got is None or not _visible(got[0], owner):
            return None
        rec, position = got
        result = None
        if rec.state == "done":
            result = await asyncio.to_thread(self.store.result, job_id)
        return {
            "rec": rec.model_dump(),
            "position": position,
            "result": result,
            "eta_s": self._eta(rec, position),
        }

    async def list(self, owner: str | None) -> list[dict]:
        found = await asyncio.to_thread(self.store.list, owner, self.settings.list_limit)
        return [rec.summary(position) for rec, position in found]

    async def cancel(self, job_id: str, owner: str | None) -> dict | None:
        """Queued: it never runs. Running here: its run is cancelled now and this waits (briefly)
        until its stages have stopped, so its slot is free when the answer comes; running on
        another Jobs replica (Redis): that one stops it at its next heartbeat."""
        got = await asyncio.to_thread(self.store.get, job_id)
        if got is None or not _visible(got[0], owner):
            return None
        if got[0].state in ENDED:
            return {"rec": got[0].model_dump(), "ended_before": True}
        rec = await asyncio.to_thread(self.store.cancel, job_id)
        if rec is not None and rec.state == "cancelled":
            metrics.record_job(rec.kind, "cancelled")
        task = self.tasks.get(job_id)
        if task is not None:
            self._stop(job_id)
            await asyncio.wait([task], timeout=30)
        elif rec is not None and rec.state == "cancelled":
            self._notify(rec)  # a running job's own task notifies when it stops
        return {"rec": rec.model_dump() if rec else got[0].model_dump(), "ended_before": False}

    async def info(self) -> dict:
        """The `jobs` entry of /health."""
        try:
            info = await asyncio.to_thread(self.store.info)
        except Exception:  # noqa: BLE001 - Redis down: say so, do not fail /health
            log.warning("job store unavailable", exc_info=True)
            info = {"store": self.store.kind, "durable": self.store.durable, "error": "unreachable"}
        return {**info, "concurrency": self.settings.concurrency, "running_here": len(self.tasks)}

    # --- the worker loop ---
    async def _work(self) -> None:
        beat = 0.0
        while True:
            try:
                if time.monotonic() - beat >= self.settings.heartbeat_s:
                    beat = time.monotonic()
                    await self._beat()
                while len(self.tasks) < self.settings.concurrency:
                    rec = await asyncio.to_thread(self.store.claim, self.worker)
                    if rec is None:
                        break
                    self.tasks[rec.id] = asyncio.create_task(self._run(rec))
            except Exception:  # noqa: BLE001 - the store (Redis) is unreachable: keep trying
                if time.monotonic() - self._store_down_logged > 30:
                    self._store_down_logged = time.monotonic()
                    log.warning("job store unavailable; retrying", exc_info=True)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    async def _beat(self) -> None:
        """Renew our leases, stop what is no longer ours, recover what others lost, evict."""
        for job_id in await asyncio.to_thread(self.store.heartbeat, self.worker, list(self.tasks)):
            log.info("job %s was cancelled or taken over: stopping its run", job_id)
            self._stop(job_id)
        for rec in await asyncio.to_thread(self.store.reap):
            log.warning("job %s lost its runner: now %s", rec.id, rec.state)
            self._notify(rec)
        await asyncio.to_thread(self.store.evict)

    def _stop(self, job_id: str) -> None:
        response = self.responses.get(job_id)
        if response is not None:
            response.cancel()  # reaches the stages' denoising loops (deployments/cancel.py)
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()

    def _ingress_handle(self):
        if self._ingress is None:
            self._ingress = serve.get_deployment_handle("Ingress", app_name=self.app_name)
        return self._ingress

    async def _run(self, rec: JobRecord) -> None:
        t0, store, worker = time.monotonic(), self.store, self.worker
        waited = time.time() - rec.created_at  # a requeued job: since its first submission
        try:
            body = await asyncio.to_thread(store.body, rec.id)
            if body is None:
                return  # cancelled between claim and start
            response = self._ingress_handle().run_job.remote(rec.kind, body, rec.id, rec.attempts)
            self.responses[rec.id] = response
            try:
                out = await asyncio.wait_for(_awaited(response), self.settings.max_run_s)
            except TimeoutError:
                response.cancel()
                message = f"ran longer than jobs.max_run_s ({self.settings.max_run_s:g} s)"
                await asyncio.to_thread(
                    store.finish, rec.id, worker, "failed", None, job_error(rec.id, "job", message)
                )
                metrics.record_job(rec.kind, "failed")
                return
            if out["status"] == 200:
                await asyncio.to_thread(store.finish, rec.id, worker, "done", out["result"])
                self._learn(rec.kind, time.monotonic() - t0)
                metrics.record_job(rec.kind, "done", waited, time.monotonic() - t0)
            elif out["status"] == 503:  # a stage restarting or full: once more when seeded
                await asyncio.to_thread(store.release, rec.id, worker, out["error"], 503)
                metrics.record_job(rec.kind, "requeued")
            else:
                await asyncio.to_thread(
                    store.finish, rec.id, worker, "failed", None, out["error"], out["status"]
                )
                metrics.record_job(rec.kind, "failed")
        except asyncio.CancelledError:
            raise  # cancelled (the store says so already) or this replica is stopping
        except RUNNER_LOST as exc:
            log.warning("job %s: its Ingress runner was lost (%s)", rec.id, type(exc).__name__)
            await asyncio.to_thread(store.release, rec.id, worker)
            metrics.record_job(rec.kind, "requeued")
        except Exception:  # noqa: BLE001 - a bug: fail the job, keep the worker
            log.exception("job %s failed", rec.id)
            message = f"the service failed on this job; its log holds the detail under {rec.id}"
            await asyncio.to_thread(
                store.finish,
                rec.id,
                worker,
                "failed",
                None,
                job_error(rec.id, "body", message),
                500,
            )
            metrics.record_job(rec.kind, "failed")
        finally:
            self.tasks.pop(rec.id, None)
            self.responses.pop(rec.id, None)
            self._wake.set()  # a slot is free
            with contextlib.suppress(Exception):
                got = await asyncio.to_thread(store.get, rec.id)
                if got is not None:
                    self._notify(got[0])

    def _learn(self, kind: str, seconds: float) -> None:
        old = self.durations.get(kind)
        self.durations[kind] = seconds if old is None else (1 - EWMA) * old + EWMA * seconds

    def _eta(self, rec: JobRecord, position: int | None) -> float | None:
        """Queued: rough, from recent jobs of its kind (the running ones end first, then it waits
        its turn); running: the route reads the progress board instead."""
        avg = self.durations.get(rec.kind)
        if avg is None or position is None:
            return None
        return round(avg * (position // self.settings.concurrency + 2), 1)

    # --- callbacks ---
    def _notify(self, rec: JobRecord) -> None:
        if rec.callback_url and rec.state in ENDED and rec.callback is None:
            asyncio.get_running_loop().create_task(self._deliver(rec.id))

    async def _deliver(self, job_id: str) -> None:
        """POST the job's final status (GET /jobs/{id}'s body) to its callback_url; the outcome
        is kept on the job (`callback`)."""
        got = await asyncio.to_thread(self.store.get, job_id)
        if got is None or got[0].callback is not None:
            return
        rec, _ = got
        result = await asyncio.to_thread(self.store.result, job_id)
        progress = {"stage": None, "step": 0, "total_steps": 0}
        payload = status_json(rec, None, progress, result)
        outcome: dict = {"delivered": False}
        s = self.settings
        async with httpx.AsyncClient(timeout=s.callback_timeout_s, follow_redirects=False) as c:
            for attempt in range(1, s.callback_attempts + 1):
                try:
                    r = await c.post(
                        rec.callback_url,
                        content=payload,
                        headers={"content-type": "application/json", "x-hiresfix-job": job_id},
                    )
                    outcome = {"delivered": r.is_success, "status": r.status_code}
                except httpx.HTTPError as exc:
                    outcome = {"delivered": False, "error": type(exc).__name__}
                outcome["attempts"] = attempt
                if outcome["delivered"] or outcome.get("status", 500) < 500:
                    break  # delivered, or refused for good (4xx): no retry
                if attempt < s.callback_attempts:
                    await asyncio.sleep(1)
        log.info("job %s callback: %s", job_id, outcome)
        await asyncio.to_thread(self.store.set_callback, job_id, outcome)


def _visible(rec: JobRecord, owner: str | None) -> bool:
    """With API keys on, a caller sees only its own jobs (others' are 404, not 403)."""
    return owner is None or rec.owner == owner


async def _awaited(response):
    return await response
