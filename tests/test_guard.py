"""The ingress's front door (deployments/guard.py): API keys, per-key concurrency, body size and
admission. In-process against a small ASGI app, then for real against the "nolib" app of the
running service, whose ingress has API keys on."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

from deployments.guard import API_KEYS_ENV, GUARD_ENV, Guard, GuardSettings
from tests.serve_harness import API_KEYS

KEYS = ("alpha-key", "beta-key")


def make_app(gate: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/work")
    async def work(request: Request) -> dict:
        await request.body()
        if gate is not None:
            await gate.wait()
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_middleware(Guard)
    return app


@pytest.fixture
def guarded(monkeypatch):
    def configure(keys=KEYS, **settings):
        monkeypatch.setenv(API_KEYS_ENV, ",".join(keys))
        monkeypatch.setenv(GUARD_ENV, GuardSettings(**settings).model_dump_json())

    return configure


def post_scope(content_length: bytes | None = None) -> dict:
    """A raw ASGI POST /work, for clients httpx cannot play (a body that stalls)."""
    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", content_length))
    return {
        "type": "http", "method": "POST", "path": "/work", "raw_path": b"/work", "root_path": "",
        "query_string": b"", "scheme": "http", "http_version": "1.1", "server": ("t", 80),
        "client": ("c", 1), "headers": headers,
    }  # fmt: skip


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.anyio
async def test_api_keys_are_required_except_for_health(guarded):
    guarded()
    async with client(make_app()) as c:
        basic = {"authorization": f"Basic {KEYS[0]}"}
        for headers in ({}, bearer("wrong"), {"authorization": KEYS[0]}, basic):
            r = await c.post("/work", json={}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            body = r.json()
            assert body["detail"][0]["field"] == "authorization" and KEYS[0] not in r.text
        for key in KEYS:
            assert (await c.post("/work", json={}, headers=bearer(key))).status_code == 200
        assert (await c.get("/health")).status_code == 200


@pytest.mark.anyio
async def test_docs_follow_the_setting(guarded):
    app = make_app()
    guarded(docs_public=False)
    async with client(app) as c:
        assert (await c.get("/openapi.json")).status_code == 401
        assert (await c.get("/openapi.json", headers=bearer(KEYS[1]))).status_code == 200
    guarded(docs_public=True)
    async with client(app) as c:
        assert (await c.get("/openapi.json")).status_code == 200


@pytest.mark.anyio
async def test_no_keys_configured_means_open(guarded):
    guarded(keys=())
    async with client(make_app()) as c:
        assert (await c.post("/work", json={})).status_code == 200


@pytest.mark.anyio
async def test_per_key_limit_answers_429_and_frees_the_slot(guarded):
    guarded(max_requests_per_key=1, retry_after_s=3)
    gate = asyncio.Event()
    async with client(make_app(gate)) as c:
        first = asyncio.create_task(c.post("/work", json={}, headers=bearer(KEYS[0])))
        await asyncio.sleep(0.05)
        second = await c.post("/work", json={}, headers=bearer(KEYS[0]))
        assert second.status_code == 429 and second.headers["retry-after"] == "3"
        other_key = asyncio.create_task(c.post("/work", json={}, headers=bearer(KEYS[1])))
        await asyncio.sleep(0.05)
        gate.set()
        assert (await first).status_code == 200 and (await other_key).status_code == 200
        assert (await c.post("/work", json={}, headers=bearer(KEYS[0]))).status_code == 200


@pytest.mark.anyio
async def test_admission_bound_answers_503_at_once(guarded):
    guarded(keys=(), max_in_flight=2, retry_after_s=7)
    gate = asyncio.Event()
    async with client(make_app(gate)) as c:
        held = [asyncio.create_task(c.post("/work", json={})) for _ in range(2)]
        await asyncio.sleep(0.05)
        r = await c.post("/work", json={})
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.headers["x-should-retry"] == "true" and r.json()["detail"][0]["field"] == "body"
        assert (await c.get("/health")).status_code == 200  # GETs are not admission-counted
        gate.set()
        assert [(await t).status_code for t in held] == [200, 200]


@pytest.mark.anyio
async def test_body_size_is_refused_from_content_length(guarded):
    guarded(keys=(), max_body_bytes=1000)
    async with client(make_app()) as c:
        r = await c.post("/work", content=b"x" * 1001, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body"


@pytest.mark.anyio
async def test_draining_refuses_new_work_and_probes_but_lets_admitted_requests_finish(guarded):
    """`hiresfix stop` sets the drain flag (deployments/drain.py); the Guard of each replica then
    answers new POSTs and /health with a 503 while the requests it holds run on."""
    guarded(keys=(), retry_after_s=4)
    gate = asyncio.Event()
    guard = Guard(make_app(gate))
    async with client(guard) as c:
        running = asyncio.create_task(c.post("/work", json={}))
        await asyncio.sleep(0.05)
        guard.drain.draining = True  # what the replica's drain watch sets when the flag appears
        for r in (
            await c.post("/work", json={}, headers={"x-request-id": "late-1"}),
            await c.get("/health"),
        ):
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "4" and r.headers["x-should-retry"] == "true"
            body = r.json()
            assert body["detail"][0]["field"] == "service" and "draining" in body["error"] + r.text
            assert body["request_id"] == r.headers["x-request-id"]
        assert r.json()["request_id"] != "late-1"  # /health sent none: Serve's or a fresh id
        assert (await c.get("/openapi.json")).status_code == 200  # other GETs still answer
        gate.set()
        assert (await running).status_code == 200  # admitted before the drain: it finishes
        guard.drain.draining = False
        assert (await c.post("/work", json={})).status_code == 200


@pytest.mark.anyio
async def test_refusals_carry_the_clients_request_id(guarded):
    guarded()
    async with client(make_app()) as c:
        r = await c.post("/work", json={}, headers={"x-request-id": "mine-7"})
        assert r.status_code == 401
        assert r.json()["request_id"] == "mine-7" and r.headers["x-request-id"] == "mine-7"
        r = await c.post("/work", json={}, headers={"x-request-id": "bad id!"})
        assert r.json()["request_id"] and r.json()["request_id"] != "bad id!"


@pytest.mark.anyio
async def test_stalled_upload_times_out_without_holding_an_admission_slot(guarded):
    guarded(keys=(), max_in_flight=1, body_timeout_s=0.5)
    app, sent, answer = make_app(), [], []

    async def stalled():  # five bytes of the body, then nothing
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"pro', "more_body": True}
        await asyncio.Event().wait()

    async def record(message):
        answer.append(message)

    slow = asyncio.create_task(app(post_scope(b"100"), stalled, record))
    await asyncio.sleep(0.1)
    async with client(app) as c:  # the one admission slot is free for a real client
        assert (await c.post("/work", json={})).status_code == 200
    await asyncio.wait_for(slow, 5)
    assert answer[0]["status"] == 408
    assert b'"field":"body"' in answer[1]["body"]


@pytest.mark.anyio
async def test_uploads_have_their_own_bound(guarded):
    guarded(keys=(), max_uploading=1, body_timeout_s=5)
    gate = asyncio.Event()

    async def held():
        await gate.wait()
        return {"type": "http.request", "body": b"{}", "more_body": False}

    app, answer = make_app(), []

    async def record(message):
        answer.append(message)

    uploading = asyncio.create_task(app(post_scope(), held, record))
    await asyncio.sleep(0.05)
    async with client(app) as c:
        r = await c.post("/work", json={})
        assert r.status_code == 503 and "uploads" in r.json()["detail"][0]["message"]
    gate.set()
    await asyncio.wait_for(uploading, 5)
    assert answer[0]["status"] == 200


@pytest.mark.serve
def test_service_checks_api_keys(service):
    url = service.url + "/nolib"
    body = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"][0]["field"] == "authorization"
    bad = httpx.post(url + "/generate", json=body, headers=bearer("nope"), timeout=60)
    assert bad.status_code == 401 and "nope" not in bad.text
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # probes stay open
    assert httpx.get(url + "/openapi.json", timeout=30).status_code == 401  # docs_public: false
    good = httpx.post(url + "/generate", json=body, headers=bearer(API_KEYS[1]), timeout=120)
    assert good.status_code == 200 and good.json()["width"] == 64
    # The main app has no keys configured: open, as the CPU demo is.
    assert httpx.post(service.url + "/generate", json=body, timeout=120).status_code == 200
