"""Async jobs: a bounded, expiring job store behind `POST /jobs/{kind}` (Ray-free).

A job is a synchronous route's body run later: queued -> running -> done | failed | cancelled. The
store holds each job's record, its body until it ends and its result (the synchronous route's JSON,
as text) until it expires. Two stores share one interface and one set of state transitions:

- `MemoryJobStore`: the embedded default, in the Jobs replica's memory. Nothing to run beside the
  cluster, and nothing survives that replica (`durable = False`; /health says so).
- `RedisJobStore`: state and results in Redis (`jobs.redis_url` or env HIRESFIX_REDIS_URL), so any
  replica may die: a running job's runner renews a lease, and a job whose lease ran out is requeued
  once when running it again gives the same answer (seeded), else failed with a retryable error.

Both are bounded by count (`max_jobs`, `max_queued`), bytes (`max_bytes`: bodies and results) and
age (`keep_s` after a job ends); the oldest ended jobs go first. Thread-safe and synchronous: the
Jobs deployment (deployments/jobs.py) calls them off its event loop.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hiresfix.schemas import ErrorResponse, ImageResponse, RequestError

REDIS_URL_ENV = "HIRESFIX_REDIS_URL"  # wins over jobs.redis_url: secrets stay out of YAML
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ENDED = ("done", "failed", "cancelled")
MAX_ATTEMPTS = 2  # a job whose runner was lost runs once more, when that is safe


def key_id(key: bytes | str) -> str:
    """The owner of a job when API keys are on: a fingerprint of the key, never the key."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(b"hiresfix-job-owner:" + raw).hexdigest()[:16]


class JobSettings(BaseModel):
    """serve_config `args.jobs`: the async job queue (POST /jobs/{kind})."""

    model_config = ConfigDict(extra="forbid")
    redis_url: str | None = Field(
        None,
        description="Keep jobs in this Redis (redis://, rediss://, unix://); null = in the Jobs"
        " replica's memory (lost on restart). Env HIRESFIX_REDIS_URL wins: put passwords there.",
    )
    key_prefix: str = Field(
        "hiresfix:jobs:", min_length=1, description="Redis key prefix: apps sharing a Redis differ."
    )
    concurrency: int = Field(2, ge=1, le=256, description="Jobs one Jobs replica runs at once.")
    max_jobs: int = Field(
        1000, ge=1, description="Jobs held in all (queued, running, ended); oldest ended go first."
    )
    max_queued: int = Field(
        200, ge=1, description="Jobs waiting to run; more are refused with a 503 and Retry-After."
    )
    max_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Bodies and results held, in bytes."
    )
    keep_s: float = Field(3600.0, gt=0, description="How long an ended job stays readable.")
    lease_s: float = Field(
        30.0,
        gt=0,
        description="A running job whose runner has not renewed its lease this long is lost:"
        " requeued once when seeded, else failed with a retryable error.",
    )
    heartbeat_s: float = Field(2.0, gt=0, description="How often runners renew their leases.")
    poll_s: float = Field(0.2, gt=0, description="How often an idle worker looks for work.")
    max_run_s: float = Field(3600.0, gt=0, description="A job running longer is stopped, failed.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a full queue's 503.")
    list_limit: int = Field(100, ge=1, le=10_000, description="Most jobs GET /jobs lists.")
    allow_callbacks: bool = Field(
        False, description="Accept `callback_url` (POSTed the job's status when it ends)."
    )
    callback_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a callback_url may name (exact host names, no wildcards).",
    )
    callback_timeout_s: float = Field(10.0, gt=0, description="Per callback attempt.")
    callback_attempts: int = Field(3, ge=1, le=10, description="Tries per callback, 1 s apart.")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("use a redis://, rediss:// or unix:// URL")
        return v

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> JobSettings:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError("jobs.lease_s must be at least twice jobs.heartbeat_s")
        if self.max_queued > self.max_jobs:
            raise ValueError("jobs.max_queued must not exceed jobs.max_jobs")
        if self.allow_callbacks and not self.callback_hosts:
            raise ValueError("jobs.allow_callbacks needs jobs.callback_hosts (an allow-list)")
        return self

    def effective_redis_url(self) -> str | None:
        return os.environ.get(REDIS_URL_ENV) or self.redis_url


# --------------------------------------------------------------------------- what clients see
class JobAccepted(BaseModel):
    """202 from POST /jobs/{kind}; `Location` names GET /jobs/{id}."""

    id: str
    state: JobState
    queue_position: int | None = Field(
        None, description="Jobs ahead of this one (0 = next to run); null once it runs."
    )


class JobSummary(BaseModel):
    """One job in GET /jobs (newest first)."""

    id: str
    kind: str
    state: JobState
    queue_position: int | None = Field(None, description="Jobs ahead of it; null unless queued.")
    created_at: float = Field(..., description="Unix time.")
    started_at: float | None = None
    finished_at: float | None = None
    error_status: int | None = Field(
        None, description="When failed: the status the synchronous route would have answered."
    )


class JobStatus(JobSummary):
    """GET /jobs/{id}. `result` (last) is exactly what the synchronous route answers, once done."""

    stage: str | None = Field(None, description="The running stage (GET /progress/{id}).")
    step: int = Field(0, description="Steps done in the whole job (denoising; passes count one).")
    total_steps: int = Field(0, description="Steps the whole job runs.")
    eta_s: float | None = Field(
        None, description="Seconds until it ends: at the pace so far, or from recent jobs' times."
    )
    attempts: int = Field(0, description="Runs started (2: its first runner was lost).")
    error: ErrorResponse | None = Field(None, description="Why it failed or was cancelled.")
    callback: dict | None = Field(None, description="callback_url delivery: status or error.")
    result: ImageResponse | None = None


class JobList(BaseModel):
    jobs: list[JobSummary]


class JobRecord(BaseModel):
    """What a store keeps per job besides its body and result."""

    id: str
    kind: str
    state: JobState = "queued"
    owner: str = ""  # key_id of the caller's API key; "" when keys are off
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    retry: bool = False  # running it again gives the same answer (seeded)
    worker: str | None = None
    lease_until: float | None = None
    error: dict | None = None
    error_status: int | None = None
    callback_url: str | None = None
    callback: dict | None = None
    body_bytes: int = 0
    result_bytes: int = 0

    def summary(self, position: int | None) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "queue_position": position,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error_status": self.error_status,
        }


def job_error(job_id: str, field: str, message: str) -> dict:
    return ErrorResponse.of(field, message, job_id).model_dump()


def lost_error(rec: JobRecord) -> dict:
    why = (
        "it was not seeded, so running it again would give another picture"
        if not rec.retry
        else f"it already ran {rec.attempts} times"
    )
    return job_error(
        rec.id,
        "job",
        f"the replica running this job was lost and {why}: submit it again (retryable)",
    )


# --------------------------------------------------------------------- shared state transitions
def _claim(rec: JobRecord, worker: str, now: float, lease_s: float) -> None:
    rec.state, rec.worker, rec.lease_until = "running", worker, now + lease_s
    rec.started_at, rec.attempts = now, rec.attempts + 1


def _end(rec: JobRecord, state: str, now: float, error=None, status=None, nbytes=0) -> None:
    rec.state, rec.finished_at, rec.worker, rec.lease_until = state, now, None, None
    rec.error, rec.error_status, rec.result_bytes = error, status, nbytes


def _lost(rec: JobRecord, now: float, error: dict | None, status: int | None) -> bool:
    """The runner went away (or the run met a retryable failure): back to the queue's front once
    when safe (True), else failed with a retryable error."""
    if rec.retry and rec.attempts < MAX_ATTEMPTS:
        rec.state, rec.worker, rec.lease_until, rec.started_at = "queued", None, None, None
        return True
    _end(rec, "failed", now, error or lost_error(rec), status or 503)
    return False


def _full(settings: JobSettings, what: str) -> RequestError:
    return RequestError(
        "job",
        f"the job queue is full ({what}): retry in {settings.retry_after_s} s",
        503,
        settings.retry_after_s,
    )


def _check_body_fits(settings: JobSettings, nbytes: int) -> None:
    if nbytes > settings.max_bytes:
        raise RequestError(
            "body",
            f"{nbytes} bytes is more than the job store holds (jobs.max_bytes ="
            f" {settings.max_bytes}); use the synchronous route",
            413,
        )


def _result_too_large(job_id: str, settings: JobSettings, nbytes: int) -> dict:
    return job_error(
        job_id,
        "body",
        f"the result ({nbytes} bytes) is more than the job store holds (jobs.max_bytes ="
        f" {settings.max_bytes}): ask for fewer or smaller images, or use the synchronous route",
    )


class JobStore(ABC):
    """The interface deployments/jobs.py uses. Times are Unix seconds from `clock`."""

    kind: str
    durable: bool

    def __init__(self, settings: JobSettings, clock: Callable[[], float] = time.time):
        self.settings, self.clock = settings, clock

    @abstractmethod
    def submit(self, rec: JobRecord, body: str) -> int:
        """Queue the job at the back; its queue position. Raises RequestError 503 when full,
        413 when the body alone exceeds max_bytes."""

    @abstractmethod
    def get(self, job_id: str) -> tuple[JobRecord, int | None] | None:
        """The record and, while queued, its queue position (None when unknown or expired)."""

    @abstractmethod
    def body(self, job_id: str) -> str | None: ...

    @abstractmethod
    def result(self, job_id: str) -> str | None: ...

    @abstractmethod
    def list(self, owner: str | None, limit: int) -> list[tuple[JobRecord, int | None]]:
        """Newest first; `owner` None = every job."""

    @abstractmethod
    def claim(self, worker: str) -> JobRecord | None:
        """The job at the queue's front, now running on `worker` under a lease."""

    @abstractmethod
    def heartbeat(self, worker: str, job_ids: list[str]) -> list[str]:
        """Renew the leases of `worker`'s running jobs; the ids that are no longer running on it
        (cancelled, or given to another worker after its lease ran out): stop those."""

    @abstractmethod
    def finish(
        self,
        job_id: str,
        worker: str,
        state: str,
        result: str | None = None,
        error: dict | None = None,
        error_status: int | None = None,
    ) -> bool:
        """Record the end of a run; False (nothing changed) when the job is no longer running on
        `worker`, e.g. it was cancelled meanwhile."""

    @abstractmethod
    def release(
        self, job_id: str, worker: str, error: dict | None = None, status: int | None = None
    ) -> JobRecord | None:
        """`worker` lost its run (the ingress replica died, a stage was restarting): requeue it
        once when safe, else fail it. The record after, or None when it was not running there."""

    @abstractmethod
    def cancel(self, job_id: str) -> JobRecord | None:
        """Queued or running -> cancelled (a queued job never runs; the worker running one sees it
        at its next heartbeat). The record after; an ended job is returned unchanged."""

    @abstractmethod
    def set_callback(self, job_id: str, outcome: dict) -> None: ...

    @abstractmethod
    def reap(self) -> list[JobRecord]:
        """Running jobs whose lease ran out: requeued or failed (see `release`)."""

    @abstractmethod
    def evict(self) -> None:
        """Drop ended jobs past keep_s, then the oldest ended ones while over a bound."""

    @abstractmethod
    def stats(self) -> dict: ...

    def info(self) -> dict:
        """The `jobs` entry of /health."""
        survives = (
            "jobs survive the loss of any replica (state and results in Redis)"
            if self.durable
            else "jobs live in the Jobs replica's memory: they do not survive its restart"
            " (set jobs.redis_url or HIRESFIX_REDIS_URL to keep them)"
        )
        return {"store": self.kind, "durable": self.durable, "note": survives, **self.stats()}


# ------------------------------------------------------------------------------ in memory
class MemoryJobStore(JobStore):
    kind, durable = "memory", False

    def __init__(self, settings: JobSettings, clock: Callable[[], float] = time.time):
        super().__init__(settings, clock)
        self._lock = threading.RLock()
        self._recs: dict[str, JobRecord] = {}  # insertion order = creation order
        self._bodies: dict[str, str] = {}
        self._results: dict[str, str] = {}
        self._queue: list[str] = []  # front first
        self._bytes = 0

    def submit(self, rec: JobRecord, body: str) -> int:
        s, nbytes = self.settings, len(body.encode())
        _check_body_fits(s, nbytes)
        with self._lock:
            self._evict(extra_jobs=1, extra_bytes=nbytes)
            if len(self._queue) >= s.max_queued:
                raise _full(s, f"{len(self._queue)} jobs waiting")
            if len(self._recs) >= s.max_jobs or self._bytes + nbytes > s.max_bytes:
                raise _full(s, "the store holds as many jobs or bytes as it may")
            rec.body_bytes = nbytes
            self._recs[rec.id], self._bodies[rec.id] = rec, body
            self._queue.append(rec.id)
            self._bytes += nbytes
            return len(self._queue) - 1

    def get(self, job_id: str) -> tuple[JobRecord, int | None] | None:
        with self._lock:
            self._evict()
            rec = self._recs.get(job_id)
            if rec is None:
                return None
            return rec.model_copy(), self._position(rec)

    def _position(self, rec: JobRecord) -> int | None:
        return self._queue.index(rec.id) if rec.state == "queued" else None

    def body(self, job_id: str) -> str | None:
        with self._lock:
            return self._bodies.get(job_id)

    def result(self, job_id: str) -> str | None:
        with self._lock:
            return self._results.get(job_id)

    def list(self, owner: str | None, limit: int) -> list[tuple[JobRecord, int | None]]:
        with self._lock:
            self._evict()
            out = []
            for rec in reversed(self._recs.values()):
                if owner is None or rec.owner == owner:
                    out.append((rec.model_copy(), self._position(rec)))
                    if len(out) >= limit:
                        break
            return out

    def claim(self, worker: str) -> JobRecord | None:
        with self._lock:
            if not self._queue:
                return None
            rec = self._recs[self._queue.pop(0)]
            _claim(rec, worker, self.clock(), self.settings.lease_s)
            return rec.model_copy()

    def heartbeat(self, worker: str, job_ids: list[str]) -> list[str]:
        gone = []
        with self._lock:
            until = self.clock() + self.settings.lease_s
            for job_id in job_ids:
                rec = self._recs.get(job_id)
                if rec is None or rec.state != "running" or rec.worker != worker:
                    gone.append(job_id)
                else:
                    rec.lease_until = until
        return gone

    def finish(self, job_id, worker, state, result=None, error=None, error_status=None) -> bool:
        with self._lock:
            rec = self._recs.get(job_id)
            if rec is None or rec.state != "running" or rec.worker != worker:
                return False
            nbytes = len(result.encode()) if result is not None else 0
            if nbytes > self.settings.max_bytes:
                error, error_status = _result_too_large(job_id, self.settings, nbytes), 413
                state, result, nbytes = "failed", None, 0
            self._drop_body(rec)
            _end(rec, state, self.clock(), error, error_status, nbytes)
            if result is not None:
                self._results[job_id] = result
                self._bytes += nbytes
            self._evict()
            return True

    def release(self, job_id, worker, error=None, status=None) -> JobRecord | None:
        with self._lock:
            rec = self._recs.get(job_id)
            if rec is None or rec.state != "running" or rec.worker != worker:
                return None
            self._lose(rec, error, status)
            return rec.model_copy()

    def _lose(self, rec: JobRecord, error, status) -> None:
        if _lost(rec, self.clock(), error, status):
            self._queue.insert(0, rec.id)
        else:
            self._drop_body(rec)

    def cancel(self, job_id: str) -> JobRecord | None:
        with self._lock:
            rec = self._recs.get(job_id)
            if rec is None:
                return None
            if rec.state in ("queued", "running"):
                if rec.state == "queued":
                    self._queue.remove(job_id)
                self._drop_body(rec)
                _end(rec, "cancelled", self.clock(), job_error(job_id, "job", "cancelled"), None)
            return rec.model_copy()

    def set_callback(self, job_id: str, outcome: dict) -> None:
        with self._lock:
            rec = self._recs.get(job_id)
            if rec is not None:
                rec.callback = outcome

    def reap(self) -> list[JobRecord]:
        out = []
        with self._lock:
            now = self.clock()
            for rec in list(self._recs.values()):
                if rec.state == "running" and rec.lease_until is not None and rec.lease_until < now:
                    self._lose(rec, None, None)
                    out.append(rec.model_copy())
        return out

    def evict(self) -> None:
        with self._lock:
            self._evict()

    def _evict(self, extra_jobs: int = 0, extra_bytes: int = 0) -> None:
        s, now = self.settings, self.clock()
        ended = [r for r in self._recs.values() if r.state in ENDED]
        ended.sort(key=lambda r: r.finished_at or 0)
        for rec in ended:
            over = (
                len(self._recs) + extra_jobs > s.max_jobs or self._bytes + extra_bytes > s.max_bytes
            )
            if not over and now - (rec.finished_at or now) <= s.keep_s:
                break  # the rest ended later still
            self._delete(rec)

    def _drop_body(self, rec: JobRecord) -> None:
        if self._bodies.pop(rec.id, None) is not None:
            self._bytes -= rec.body_bytes
        rec.body_bytes = 0

    def _delete(self, rec: JobRecord) -> None:
        self._drop_body(rec)
        if self._results.pop(rec.id, None) is not None:
            self._bytes -= rec.result_bytes
        self._recs.pop(rec.id, None)

    def stats(self) -> dict:
        with self._lock:
            states: dict[str, int] = {}
            for rec in self._recs.values():
                states[rec.state] = states.get(rec.state, 0) + 1
            return {"jobs": states, "bytes": self._bytes}


# ------------------------------------------------------------------------------ in Redis
class RedisJobStore(JobStore):
    """Keys under `key_prefix`: job:<id> (hash: rec, body, result), queue (list, front first),
    running (zset: lease deadline), ended (zset: end time), all (zset: creation time),
    owner:<key id> (zset: creation time), bytes (counter). Every change of one job is a
    WATCH/MULTI transaction on its hash, so several Jobs replicas can share one Redis."""

    kind, durable = "redis", True

    def __init__(
        self,
        settings: JobSettings,
        url: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        import redis  # only where Redis is configured

        super().__init__(settings, clock)
        url = url or settings.effective_redis_url()
        if url is None:
            raise ValueError("RedisJobStore needs a URL (jobs.redis_url or HIRESFIX_REDIS_URL)")
        self.r = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5
        )
        self.p = settings.key_prefix
        self._watch_error = redis.WatchError

    # key names
    def _job(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    def _owner(self, owner: str) -> str:
        return f"{self.p}owner:{owner}"

    def _k(self, name: str) -> str:
        return self.p + name

    def _read(self, pipe, job_id: str) -> JobRecord | None:
        raw = pipe.hget(self._job(job_id), "rec")
        return None if raw is None else JobRecord.model_validate_json(raw)

    def _tx(self, job_id: str, change: Callable, *also: str):
        """Run `change(pipe, rec)` under WATCH of the job's hash (and `also`), retried on a
        conflict. `change` reads with pipe.*, calls pipe.multi(), then queues its writes."""
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._job(job_id), *also)
                    out = change(pipe, self._read(pipe, job_id))
                    if not pipe.explicit_transaction:
                        pipe.multi()  # nothing to write: EXEC still ends the WATCH
                    pipe.execute()
                    return out
                except self._watch_error:
                    continue

    def submit(self, rec: JobRecord, body: str) -> int:
        s, nbytes = self.settings, len(body.encode())
        _check_body_fits(s, nbytes)
        self._evict(extra_jobs=1, extra_bytes=nbytes)
        rec.body_bytes = nbytes
        queue, alljobs, total = self._k("queue"), self._k("all"), self._k("bytes")
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(queue, alljobs, total)
                    waiting = pipe.llen(queue)
                    if waiting >= s.max_queued:
                        raise _full(s, f"{waiting} jobs waiting")
                    held, used = pipe.zcard(alljobs), int(pipe.get(total) or 0)
                    if held >= s.max_jobs or used + nbytes > s.max_bytes:
                        raise _full(s, "the store holds as many jobs or bytes as it may")
                    pipe.multi()
                    pipe.hset(
                        self._job(rec.id), mapping={"rec": rec.model_dump_json(), "body": body}
                    )
                    pipe.rpush(queue, rec.id)
                    pipe.zadd(alljobs, {rec.id: rec.created_at})
                    pipe.zadd(self._owner(rec.owner), {rec.id: rec.created_at})
                    pipe.incrby(total, nbytes)
                    pipe.execute()
                    return waiting
                except self._watch_error:
                    continue

    def get(self, job_id: str) -> tuple[JobRecord, int | None] | None:
        self._evict()
        rec = self._read(self.r, job_id)
        if rec is None:
            return None
        return rec, self._position(rec)

    def _position(self, rec: JobRecord) -> int | None:
        if rec.state != "queued":
            return None
        return self.r.lpos(self._k("queue"), rec.id)

    def body(self, job_id: str) -> str | None:
        return self.r.hget(self._job(job_id), "body")

    def result(self, job_id: str) -> str | None:
        return self.r.hget(self._job(job_id), "result")

    def list(self, owner: str | None, limit: int) -> list[tuple[JobRecord, int | None]]:
        self._evict()
        index = self._k("all") if owner is None else self._owner(owner)
        ids = self.r.zrevrange(index, 0, limit - 1)
        if not ids:
            return []
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self._job(job_id), "rec")
            raws = pipe.execute()
        recs = [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]
        return [(rec, self._position(rec)) for rec in recs]

    def claim(self, worker: str) -> JobRecord | None:
        queue = self._k("queue")
        while True:
            job_id = self.r.lindex(queue, 0)
            if job_id is None:
                return None

            def change(pipe, rec, job_id=job_id):
                if pipe.lindex(queue, 0) != job_id:
                    return "moved"  # another worker took it first: look again
                pipe.multi()
                pipe.lpop(queue)
                if rec is None or rec.state != "queued":
                    return None  # evicted or cancelled under us: just drop the id
                _claim(rec, worker, self.clock(), self.settings.lease_s)
                pipe.hset(self._job(job_id), "rec", rec.model_dump_json())
                pipe.zadd(self._k("running"), {job_id: rec.lease_until})
                return rec

            out = self._tx(job_id, change, queue)
            if isinstance(out, JobRecord):
                return out

    def heartbeat(self, worker: str, job_ids: list[str]) -> list[str]:
        gone = []
        for job_id in job_ids:

            def change(pipe, rec, job_id=job_id):
                if rec is None or rec.state != "running" or rec.worker != worker:
                    return False
                rec.lease_until = self.clock() + self.settings.lease_s
                pipe.multi()
                pipe.hset(self._job(job_id), "rec", rec.model_dump_json())
                pipe.zadd(self._k("running"), {job_id: rec.lease_until})
                return True

            if not self._tx(job_id, change):
                gone.append(job_id)
        return gone

    def finish(self, job_id, worker, state, result=None, error=None, error_status=None) -> bool:
        nbytes = len(result.encode()) if result is not None else 0
        if nbytes > self.settings.max_bytes:
            state, result = "failed", None
            error, error_status = _result_too_large(job_id, self.settings, nbytes), 413
            nbytes = 0

        def change(pipe, rec):
            if rec is None or rec.state != "running" or rec.worker != worker:
                return False
            freed = rec.body_bytes
            rec.body_bytes = 0
            _end(rec, state, self.clock(), error, error_status, nbytes)
            pipe.multi()
            self._write_end(pipe, rec, freed)
            if result is not None:
                pipe.hset(self._job(job_id), "result", result)
                pipe.incrby(self._k("bytes"), nbytes)
            return True

        done = self._tx(job_id, change)
        if done:
            self._evict()
        return done

    def _write_end(self, pipe, rec: JobRecord, freed: int) -> None:
        pipe.hset(self._job(rec.id), "rec", rec.model_dump_json())
        pipe.hdel(self._job(rec.id), "body")
        pipe.decrby(self._k("bytes"), freed)
        pipe.zrem(self._k("running"), rec.id)
        pipe.lrem(self._k("queue"), 0, rec.id)
        pipe.zadd(self._k("ended"), {rec.id: rec.finished_at})

    def release(self, job_id, worker, error=None, status=None) -> JobRecord | None:
        def change(pipe, rec):
            if rec is None or rec.state != "running" or rec.worker != worker:
                return None
            self._lose(pipe, rec, error, status)
            return rec

        return self._tx(job_id, change)

    def _lose(self, pipe, rec: JobRecord, error, status) -> None:
        freed = rec.body_bytes
        again = _lost(rec, self.clock(), error, status)
        pipe.multi()
        if again:
            pipe.hset(self._job(rec.id), "rec", rec.model_dump_json())
            pipe.zrem(self._k("running"), rec.id)
            pipe.lpush(self._k("queue"), rec.id)  # the front: it waited its turn already
        else:
            rec.body_bytes = 0
            self._write_end(pipe, rec, freed)

    def cancel(self, job_id: str) -> JobRecord | None:
        def change(pipe, rec):
            if rec is None or rec.state in ENDED:
                return rec
            freed = rec.body_bytes
            rec.body_bytes = 0
            _end(rec, "cancelled", self.clock(), job_error(job_id, "job", "cancelled"), None)
            pipe.multi()
            self._write_end(pipe, rec, freed)
            return rec

        return self._tx(job_id, change)

    def set_callback(self, job_id: str, outcome: dict) -> None:
        def change(pipe, rec):
            if rec is None:
                return
            rec.callback = outcome
            pipe.multi()
            pipe.hset(self._job(job_id), "rec", rec.model_dump_json())

        self._tx(job_id, change)

    def reap(self) -> list[JobRecord]:
        out = []
        for job_id in self.r.zrangebyscore(self._k("running"), "-inf", self.clock()):

            def change(pipe, rec, job_id=job_id):
                if rec is None or rec.state != "running":
                    pipe.multi()
                    pipe.zrem(self._k("running"), job_id)
                    return None
                if rec.lease_until is not None and rec.lease_until >= self.clock():
                    return None  # renewed meanwhile
                self._lose(pipe, rec, None, None)
                return rec

            rec = self._tx(job_id, change)
            if rec is not None:
                out.append(rec)
        return out

    def evict(self) -> None:
        self._evict()

    def _evict(self, extra_jobs: int = 0, extra_bytes: int = 0) -> None:
        s = self.settings
        ended, alljobs, total = self._k("ended"), self._k("all"), self._k("bytes")
        # Age first: everything that ended before the cut-off.
        for job_id in self.r.zrangebyscore(ended, "-inf", self.clock() - s.keep_s):
            self._delete(job_id)
        # Then the oldest ended jobs while a bound is exceeded.
        while (
            self.r.zcard(alljobs) + extra_jobs > s.max_jobs
            or int(self.r.get(total) or 0) + extra_bytes > s.max_bytes
        ):
            oldest = self.r.zrange(ended, 0, 0)
            if not oldest:
                return
            self._delete(oldest[0])

    def _delete(self, job_id: str) -> None:
        def change(pipe, rec):
            pipe.multi()
            pipe.zrem(self._k("ended"), job_id)
            if rec is None:
                pipe.zrem(self._k("all"), job_id)
                return
            if rec.state not in ENDED:
                return  # requeued or running again: not ours to drop
            pipe.delete(self._job(job_id))
            pipe.zrem(self._k("all"), job_id)
            pipe.zrem(self._owner(rec.owner), job_id)
            pipe.decrby(self._k("bytes"), rec.body_bytes + rec.result_bytes)

        self._tx(job_id, change)

    def stats(self) -> dict:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.llen(self._k("queue"))
            pipe.zcard(self._k("running"))
            pipe.zcard(self._k("ended"))
            pipe.get(self._k("bytes"))
            queued, running, ended, used = pipe.execute()
        return {
            "jobs": {"queued": queued, "running": running, "ended": ended},
            "bytes": int(used or 0),
        }


def make_store(settings: JobSettings, clock: Callable[[], float] = time.time) -> JobStore:
    if settings.effective_redis_url():
        return RedisJobStore(settings, clock=clock)
    return MemoryJobStore(settings, clock=clock)


def status_json(rec: JobRecord, position: int | None, progress: dict, result: str | None) -> str:
    """GET /jobs/{id}'s body. The result is spliced in as the text the store holds: exactly the
    synchronous route's JSON, never parsed and re-encoded (megabytes of base64)."""
    status = JobStatus(
        **rec.summary(position),
        attempts=rec.attempts,
        error=rec.error,
        callback=rec.callback,
        **progress,
    )
    text = status.model_dump_json()
    if result is None:
        return text
    assert text.endswith('"result":null}')
    return text[: -len("null}")] + result + "}"


def callback_allowed(settings: JobSettings, url: str) -> None:
    """Raises RequestError naming callback_url unless callbacks are on and it names an allowed
    host over http(s)."""
    if not settings.allow_callbacks:
        raise RequestError("callback_url", "callbacks are off in this deployment (jobs)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("callback_url", "use an http:// or https:// URL")
    if parts.hostname not in settings.callback_hosts:
        raise RequestError(
            "callback_url", f"host {parts.hostname!r} is not in this deployment's allow-list"
        )
