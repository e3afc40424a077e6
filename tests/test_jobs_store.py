"""The job stores (hiresfix/jobs.py), Ray-free: the in-memory one and the Redis one against a real
redis-server started here. Both run every test, on a clock the test moves."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from pydantic import ValidationError

from hiresfix.jobs import (
    JobRecord,
    JobSettings,
    JobStatus,
    MemoryJobStore,
    RedisJobStore,
    callback_allowed,
    key_id,
    make_store,
    status_json,
)
from hiresfix.schemas import RequestError
from tests.redis_server import RedisServer


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def make(request, redis_server):
    """make(**settings) -> (store, clock); each Redis store gets a key prefix of its own."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"

    def build(**kw):
        clock = Clock()
        settings = JobSettings(**kw)
        if request.param == "memory":
            return MemoryJobStore(settings, clock=clock), clock
        settings = settings.model_copy(update={"key_prefix": prefix})
        return RedisJobStore(settings, url=redis_server.url, clock=clock), clock

    return build


def rec(clock: Clock, owner: str = "", retry: bool = True, kind: str = "generate") -> JobRecord:
    clock.t += 1  # creation times differ: newest-first listing is by time
    return JobRecord(id=uuid.uuid4().hex, kind=kind, owner=owner, created_at=clock(), retry=retry)


def body(n: int = 10) -> str:
    return json.dumps({"prompt": "x" * n})


def test_queue_order_positions_and_claim(make):
    store, clock = make()
    jobs = [rec(clock) for _ in range(3)]
    assert [store.submit(j, body()) for j in jobs] == [0, 1, 2]
    assert [store.get(j.id)[1] for j in jobs] == [0, 1, 2]
    first = store.claim("w1")
    assert first.id == jobs[0].id and first.state == "running" and first.attempts == 1
    assert first.worker == "w1" and first.started_at == clock()
    got, position = store.get(jobs[0].id)
    assert got.state == "running" and position is None
    assert [store.get(j.id)[1] for j in jobs[1:]] == [0, 1]  # the rest moved up
    assert store.body(jobs[1].id) == body()
    assert store.claim("w2").id == jobs[1].id
    assert store.claim("w2").id == jobs[2].id
    assert store.claim("w2") is None
    assert store.get("no-such-job") is None


def test_finish_keeps_the_result_text_and_drops_the_body(make):
    store, clock = make()
    job = rec(clock)
    store.submit(job, body(100))
    assert store.stats()["bytes"] == len(body(100))
    store.claim("w1")
    result = json.dumps({"image": "abc", "seed": 7})
    assert not store.finish(job.id, "other-worker", "done", result=result)  # not its job
    clock.t += 5
    assert store.finish(job.id, "w1", "done", result=result)
    got, _ = store.get(job.id)
    assert got.state == "done" and got.finished_at == clock() and got.worker is None
    assert store.result(job.id) == result
    assert store.body(job.id) is None
    assert store.stats()["bytes"] == len(result)
    assert not store.finish(job.id, "w1", "failed")  # an ended job stays as it ended


def test_failed_run_keeps_the_error_body(make):
    store, clock = make()
    job = rec(clock)
    store.submit(job, body())
    store.claim("w1")
    err = {"error": "prompt: bad", "detail": [{"field": "prompt", "message": "bad"}]}
    assert store.finish(job.id, "w1", "failed", error=err, error_status=422)
    got, _ = store.get(job.id)
    assert (got.state, got.error, got.error_status) == ("failed", err, 422)
    assert store.result(job.id) is None


def test_cancel_queued_never_runs_and_cancel_running_stops_its_worker(make):
    store, clock = make()
    a, b = rec(clock), rec(clock)
    store.submit(a, body())
    store.submit(b, body())
    assert store.claim("w1").id == a.id
    cancelled = store.cancel(b.id)  # queued
    assert cancelled.state == "cancelled" and cancelled.error["detail"][0]["field"] == "job"
    assert store.claim("w1") is None  # it never runs
    assert store.heartbeat("w1", [a.id]) == []
    assert store.cancel(a.id).state == "cancelled"  # running
    assert store.heartbeat("w1", [a.id]) == [a.id]  # its worker is told to stop it
    assert not store.finish(a.id, "w1", "done", result="{}")  # and cannot overwrite it
    assert store.get(a.id)[0].state == "cancelled"
    assert store.cancel(a.id).state == "cancelled"  # idempotent
    assert store.cancel("no-such-job") is None
    assert store.stats()["bytes"] == 0


def test_queue_and_count_bounds(make):
    store, clock = make(max_queued=2, max_jobs=3)
    jobs = [rec(clock) for _ in range(3)]
    store.submit(jobs[0], body())
    store.submit(jobs[1], body())
    with pytest.raises(RequestError) as full:
        store.submit(jobs[2], body())
    assert full.value.status == 503 and full.value.field == "job"
    assert full.value.retry_after_s == 5
    store.claim("w")
    store.submit(jobs[2], body())  # 3 held: 1 running, 2 queued
    with pytest.raises(RequestError):  # nothing ended to evict: still full
        store.submit(rec(clock), body())
    store.finish(jobs[0].id, "w", "done", result="{}")
    store.claim("w")  # the second one runs; the queue has room again
    fourth = rec(clock)
    store.submit(fourth, body())  # the oldest ended job made room
    assert store.get(jobs[0].id) is None
    assert store.get(fourth.id)[1] == 1


def test_byte_bounds_evict_oldest_results_and_refuse_what_cannot_fit(make):
    store, clock = make(max_bytes=2000)
    with pytest.raises(RequestError) as big:
        store.submit(rec(clock), body(3000))
    assert big.value.status == 413 and big.value.field == "body"
    ids = []
    for _ in range(3):
        job = rec(clock)
        store.submit(job, body())
        store.claim("w")
        clock.t += 1
        store.finish(job.id, "w", "done", result="r" * 600)
        ids.append(job.id)
    assert store.stats()["bytes"] == 1800
    job = rec(clock)
    store.submit(job, body(500))  # 1800 + ~512 > 2000: the oldest result goes
    assert store.get(ids[0]) is None and store.get(ids[1]) is not None
    store.claim("w")
    assert store.finish(job.id, "w", "done", result="r" * 3000)  # larger than the store
    got, _ = store.get(job.id)
    assert got.state == "failed" and got.error_status == 413
    assert "jobs.max_bytes" in got.error["detail"][0]["message"]
    assert store.result(job.id) is None


def test_ended_jobs_expire_after_keep_s_and_waiting_ones_never(make):
    store, clock = make(keep_s=60)
    done, waiting = rec(clock), rec(clock)
    store.submit(done, body())
    store.submit(waiting, body())
    store.claim("w")
    store.finish(done.id, "w", "done", result="{}")
    clock.t += 59
    assert store.get(done.id) is not None
    clock.t += 2
    assert store.get(done.id) is None
    assert store.get(waiting.id)[0].state == "queued"
    assert [r.id for r, _ in store.list(None, 10)] == [waiting.id]


def test_a_lost_runner_requeues_a_seeded_job_once_then_fails_it(make):
    store, clock = make(lease_s=10, heartbeat_s=2)
    seeded, unseeded, later = rec(clock), rec(clock, retry=False), rec(clock)
    for job in (seeded, unseeded, later):
        store.submit(job, body())
    store.claim("w1")
    store.claim("w1")
    clock.t += 8
    assert store.heartbeat("w1", [seeded.id]) == []  # renewed: seeded lives on
    clock.t += 5  # unseeded's lease ran out, seeded's not
    reaped = store.reap()
    assert [r.id for r in reaped] == [unseeded.id]
    lost, _ = store.get(unseeded.id)
    assert lost.state == "failed" and lost.error_status == 503
    assert "not seeded" in lost.error["detail"][0]["message"]
    clock.t += 20
    assert [r.id for r in store.reap()] == [seeded.id]
    again, position = store.get(seeded.id)
    assert again.state == "queued" and position == 0  # the front, ahead of `later`
    assert store.body(seeded.id) == body()
    assert store.claim("w2").id == seeded.id
    assert store.heartbeat("w1", [seeded.id]) == [seeded.id]  # the old runner must stop
    clock.t += 20
    store.reap()
    twice, _ = store.get(seeded.id)
    assert twice.state == "failed" and twice.attempts == 2
    assert "already ran 2 times" in twice.error["detail"][0]["message"]


def test_release_requeues_or_fails_with_the_runs_error(make):
    store, clock = make()
    job = rec(clock)
    store.submit(job, body())
    store.claim("w")
    assert store.release(job.id, "someone-else") is None
    assert store.release(job.id, "w").state == "queued"
    store.claim("w")
    err = {"error": "body: restarting", "detail": [{"field": "body", "message": "restarting"}]}
    after = store.release(job.id, "w", err, 503)
    assert (after.state, after.error, after.error_status) == ("failed", err, 503)


def test_list_is_newest_first_per_owner_and_bounded(make):
    store, clock = make()
    mine = [rec(clock, owner=key_id("key-a")) for _ in range(3)]
    theirs = rec(clock, owner=key_id("key-b"))
    for job in (*mine, theirs):
        store.submit(job, body())
    assert [r.id for r, _ in store.list(key_id("key-a"), 10)] == [j.id for j in mine[::-1]]
    assert [r.id for r, _ in store.list(key_id("key-b"), 10)] == [theirs.id]
    assert [r.id for r, _ in store.list(None, 2)] == [theirs.id, mine[2].id]
    assert [p for _, p in store.list(key_id("key-a"), 10)] == [2, 1, 0]
    assert key_id("key-a") != key_id("key-b") and "key-a" not in key_id("key-a")


def test_callback_outcome_is_kept(make):
    store, clock = make()
    job = rec(clock)
    store.submit(job, body())
    store.set_callback(job.id, {"delivered": True, "status": 200})
    assert store.get(job.id)[0].callback == {"delivered": True, "status": 200}


def test_redis_store_is_shared_and_a_job_is_claimed_once(redis_server):
    """Two replicas' stores on one Redis: one sees the other's jobs, and racing workers never
    run the same job twice."""
    settings = JobSettings(key_prefix=f"race:{uuid.uuid4().hex[:8]}:")
    a = RedisJobStore(settings, url=redis_server.url)
    b = RedisJobStore(settings, url=redis_server.url)
    clock = Clock(a.clock())
    ids = []
    for _ in range(40):
        job = rec(clock)
        a.submit(job, body())
        ids.append(job.id)
    assert b.get(ids[5])[1] == 5
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(store, name):
        while (job := store.claim(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(s, f"w{i}")) for i, s in enumerate([a, b] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert a.info()["durable"] is True and a.info()["jobs"]["running"] == 40


def test_settings_are_validated_and_the_env_url_wins(monkeypatch, redis_server):
    with pytest.raises(ValidationError, match="extra"):
        JobSettings(unknown=1)
    with pytest.raises(ValidationError, match="heartbeat"):
        JobSettings(lease_s=3, heartbeat_s=2)
    with pytest.raises(ValidationError, match="redis://"):
        JobSettings(redis_url="http://localhost:6379")
    with pytest.raises(ValidationError, match="allow-list"):
        JobSettings(allow_callbacks=True)
    with pytest.raises(ValidationError, match="max_queued"):
        JobSettings(max_jobs=5, max_queued=10)
    monkeypatch.delenv("HIRESFIX_REDIS_URL", raising=False)
    memory = make_store(JobSettings())
    assert isinstance(memory, MemoryJobStore) and memory.info()["durable"] is False
    assert "do not survive" in memory.info()["note"]
    monkeypatch.setenv("HIRESFIX_REDIS_URL", redis_server.url)
    assert isinstance(make_store(JobSettings()), RedisJobStore)


def test_status_json_carries_the_result_text_unchanged():
    r = JobRecord(id="j1", kind="generate", state="done", created_at=1.0, finished_at=2.0)
    result = '{"image":"QUJD","images":["QUJD"],"width":8,"height":8,"seed":1}'
    text = status_json(r, None, {"stage": None, "step": 4, "total_steps": 4}, result)
    parsed = json.loads(text)
    assert parsed["result"] == json.loads(result)
    assert text.endswith(result + "}")
    JobStatus.model_validate_json(text)  # the documented shape
    assert json.loads(status_json(r, None, {}, None))["result"] is None


def test_callback_urls_need_the_switch_and_an_allowed_host():
    off = JobSettings()
    with pytest.raises(RequestError, match="callbacks are off"):
        callback_allowed(off, "http://127.0.0.1:9/x")
    on = JobSettings(allow_callbacks=True, callback_hosts=["127.0.0.1"])
    callback_allowed(on, "http://127.0.0.1:9/x")
    for bad in ("ftp://127.0.0.1/x", "http:///x", "http://169.254.169.254/latest"):
        with pytest.raises(RequestError) as e:
            callback_allowed(on, bad)
        assert e.value.field == "callback_url"
