"""Async jobs over real HTTP against the running app (tests/serve_harness.py: the main app keeps
jobs in memory and runs one at a time; the "nolib" app, API keys on, keeps them in a real Redis).

Every result is compared with what the synchronous route answers for the same seeded body, by
decoding the pictures. The last test kills the "nolib" app's Jobs replica under a running job.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from tests.serve_harness import API_KEYS

pytestmark = pytest.mark.serve

ENDED = ("done", "failed", "cancelled")
TINY = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 4}
SLOW = {"prompt": "a busy street", "width": 384, "height": 384, "num_inference_steps": 50}
KEY = {"authorization": f"Bearer {API_KEYS[0]}"}
OTHER_KEY = {"authorization": f"Bearer {API_KEYS[1]}"}
CANCELLED_LOG = "generate cancelled by the client or its timeout"


def submit(service, kind, body, prefix="", headers=None, params=None) -> httpx.Response:
    return httpx.post(
        f"{service.url}{prefix}/jobs/{kind}", json=body, headers=headers, params=params, timeout=60
    )


def accepted(r: httpx.Response) -> dict:
    assert r.status_code == 202, r.text[:2000]
    body = r.json()
    assert set(body) == {"id", "state", "queue_position"} and body["state"] == "queued"
    assert r.headers["location"].endswith(f"/jobs/{body['id']}")
    return body


def status(service, job_id, prefix="", headers=None) -> httpx.Response:
    return httpx.get(f"{service.url}{prefix}/jobs/{job_id}", headers=headers, timeout=60)


def wait(service, job_id, until=ENDED, prefix="", headers=None, timeout=120, min_step=0) -> dict:
    """Poll GET /jobs/{id} until its state is in `until` (a 503 while the queue restarts is
    retried, as a client would)."""
    deadline = time.time() + timeout
    while True:
        r = status(service, job_id, prefix, headers)
        assert r.status_code in (200, 503), r.text[:2000]
        if r.status_code == 200:
            job = r.json()
            if job["state"] in until and job["step"] >= min_step:
                return job
            assert job["state"] not in ENDED or job["state"] in until, job
        assert time.time() < deadline, f"job {job_id} not {until} after {timeout}s: {r.text[:500]}"
        time.sleep(0.2)


def sync(service, path, body, prefix="", headers=None) -> dict:
    r = httpx.post(f"{service.url}{prefix}{path}", json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text[:2000]
    return r.json()


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def same_answer(job_result: dict, answer: dict) -> None:
    """The job's result is the synchronous route's answer: same fields, same pictures, same
    metadata; only timings and the request id may differ."""
    assert set(job_result) == set(answer)
    for key in answer:
        if key in ("timings", "request_id", "image", "images"):
            continue
        assert job_result[key] == answer[key], key
    assert len(job_result["images"]) == len(answer["images"])
    for a, b in zip(
        [job_result["image"], *job_result["images"]], [answer["image"], *answer["images"]]
    ):
        assert np.array_equal(pixels(a), pixels(b))


def png_b64(size: int) -> str:
    im = Image.fromarray(data.astronaut()).resize((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def log_count(service, text: str) -> int:
    return service.log_tail(5_000_000).count(text)


# ---------------------------------------------------------------- results
def test_generate_job_answers_what_generate_answers(service):
    body = {**TINY, "seed": 4321, "num_images": 2}
    job = accepted(submit(service, "generate", body))
    done = wait(service, job["id"])
    assert done["state"] == "done", done
    assert done["error"] is None and done["attempts"] == 1 and done["queue_position"] is None
    assert done["step"] == done["total_steps"] == 4 and done["stage"] is None
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    result = done["result"]
    assert result["request_id"] == job["id"]  # the job id is its run's request id
    same_answer(result, sync(service, "/generate", body))
    assert result["seeds"] == [4321, 4322] and pixels(result["image"]).shape == (64, 64, 3)
    # GET /progress/{id} followed the job under its id.
    progress = httpx.get(f"{service.url}/progress/{job['id']}", timeout=30).json()
    assert progress["state"] == "done" and progress["plan"] == {"base": 4}


def test_upscale_and_img2img_jobs_answer_what_their_routes_answer(service):
    up = {"image": png_b64(48), "scale": 2}
    img2img = {"image": png_b64(64), "prompt": "an astronaut", "strength": 0.6, "seed": 7}
    img2img["num_inference_steps"] = 6
    jobs = {
        "upscale": accepted(submit(service, "upscale", up)),
        "img2img": accepted(submit(service, "img2img", img2img)),
    }
    up_done = wait(service, jobs["upscale"]["id"])
    assert up_done["state"] == "done", up_done
    same_answer(up_done["result"], sync(service, "/upscale", up))
    assert pixels(up_done["result"]["image"]).shape == (96, 96, 3)
    assert up_done["result"]["upscaler_used"] == "realesr-animevideov3"
    i2i_done = wait(service, jobs["img2img"]["id"])
    assert i2i_done["state"] == "done", i2i_done
    same_answer(i2i_done["result"], sync(service, "/img2img", img2img))


def test_a_failing_job_carries_the_error_the_route_would_answer(service):
    """What the body alone shows is refused at once, as the route would; what the run finds fails
    the job with the body the route would have answered."""
    r = submit(service, "generate", {**TINY, "width": 2048, "height": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "width", r.text
    r = submit(service, "generate", {**TINY, "upscaler": "no-such-model"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "upscaler", r.text
    r = submit(service, "upscale", {"image": "not base64 at all", "scale": 2})
    assert r.status_code == 400 and r.json()["detail"][0]["field"] == "image", r.text
    r = submit(service, "generate", {**TINY, "stray": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "stray", r.text
    # img2img: a size that only the decoded image gives is checked by the run (as /img2img does
    # it): the job fails with the body /img2img answers.
    wide = Image.fromarray(data.astronaut()).resize((1104, 64))
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "x", "seed": 1}
    job = accepted(submit(service, "img2img", body))
    failed = wait(service, job["id"])
    answer = httpx.post(f"{service.url}/img2img", json=body, timeout=60)
    assert answer.status_code == 422, answer.text
    assert failed["state"] == "failed" and failed["error_status"] == 422, failed
    assert failed["error"]["detail"] == answer.json()["detail"]
    assert failed["error"]["request_id"] == job["id"] and failed["result"] is None


# ---------------------------------------------------------------- queue and cancel
def test_cancel_a_queued_job_and_a_running_one(service):
    slow = accepted(submit(service, "generate", {**SLOW, "seed": 9}))
    running = wait(service, slow["id"], until=("running",), min_step=1, timeout=60)
    assert running["stage"] == "base" and running["total_steps"] == 50
    assert 0 < running["step"] < 50 and running["eta_s"] is not None
    waiting = accepted(submit(service, "generate", {**TINY, "seed": 1}))
    assert waiting["queue_position"] == 0  # one job runs at a time in the test config
    job = status(service, waiting["id"]).json()
    assert job["state"] == "queued" and job["queue_position"] == 0

    r = httpx.delete(f"{service.url}/jobs/{waiting['id']}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    gone = status(service, waiting["id"]).json()
    assert gone["state"] == "cancelled" and gone["started_at"] is None  # it never ran
    assert httpx.get(f"{service.url}/progress/{waiting['id']}", timeout=30).status_code == 404

    before = log_count(service, CANCELLED_LOG)
    t0 = time.time()
    r = httpx.delete(f"{service.url}/jobs/{slow['id']}", timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert time.time() - t0 < 30
    # Its denoising loop stopped at the next step (deployments/cancel.py logs it).
    deadline = time.time() + 30
    while log_count(service, CANCELLED_LOG) <= before:
        assert time.time() < deadline, service.log_tail()
        time.sleep(0.3)
    # The board hears of it from the ingress a moment after the log line (bounded wait).
    deadline = time.time() + 30
    while (progress := httpx.get(f"{service.url}/progress/{slow['id']}", timeout=30).json())[
        "state"
    ] == "running" and time.time() < deadline:
        time.sleep(0.3)
    assert progress["state"] == "cancelled" and progress["step"] < 50
    job = status(service, slow["id"]).json()
    assert job["state"] == "cancelled" and job["result"] is None

    # The slot is free: the next job runs at once.
    after = accepted(submit(service, "generate", {**TINY, "seed": 2}))
    assert wait(service, after["id"], timeout=60)["state"] == "done"
    assert httpx.delete(f"{service.url}/jobs/{slow['id']}", timeout=30).status_code == 200
    r = httpx.delete(f"{service.url}/jobs/{after['id']}", timeout=30)
    assert r.status_code == 409 and r.json()["detail"][0]["field"] == "job_id", r.text


def test_list_and_unknown_jobs(service):
    ids = [accepted(submit(service, "generate", {**TINY, "seed": s}))["id"] for s in (11, 12)]
    listed = httpx.get(f"{service.url}/jobs", timeout=30)
    assert listed.status_code == 200, listed.text
    jobs = listed.json()["jobs"]
    order = [j["id"] for j in jobs]
    assert order.index(ids[1]) < order.index(ids[0])  # newest first
    assert {"id", "kind", "state", "queue_position", "created_at"} <= set(jobs[0])
    assert "result" not in jobs[0]
    for job_id in ids:
        wait(service, job_id)
    for method, path, field in (
        ("GET", "/jobs/no-such-job", "job_id"),
        ("DELETE", "/jobs/no-such-job", "job_id"),
        ("POST", "/jobs/no-such-kind", "kind"),
    ):
        r = httpx.request(method, service.url + path, json=TINY, timeout=30)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["detail"][0]["field"] == field and r.json()["error"]
    doc = httpx.get(f"{service.url}/openapi.json", timeout=30).json()["paths"]
    assert set(doc["/jobs/generate"]["post"]["responses"]) >= {"202", "422", "503"}
    assert set(doc["/jobs/{job_id}"]["delete"]["responses"]) >= {"200", "404", "409"}


def test_health_says_whether_jobs_survive_a_restart(service):
    memory = httpx.get(f"{service.url}/health", timeout=30).json()
    assert memory["jobs"]["store"] == "memory" and memory["jobs"]["durable"] is False
    assert "do not survive" in memory["jobs"]["note"]
    assert memory["deployments"]["Jobs"]["state"] == "HEALTHY"
    redis = httpx.get(f"{service.url}/nolib/health", timeout=30).json()
    assert redis["jobs"]["store"] == "redis" and redis["jobs"]["durable"] is True


# ---------------------------------------------------------------- API keys and callbacks
def test_with_api_keys_a_caller_sees_only_its_own_jobs(service):
    mine = accepted(submit(service, "generate", {**TINY, "seed": 5}, "/nolib", KEY))
    theirs = accepted(submit(service, "generate", {**TINY, "seed": 6}, "/nolib", OTHER_KEY))
    listed = httpx.get(f"{service.url}/nolib/jobs", headers=KEY, timeout=30).json()["jobs"]
    ids = {j["id"] for j in listed}
    assert mine["id"] in ids and theirs["id"] not in ids
    assert status(service, theirs["id"], "/nolib", KEY).status_code == 404
    r = httpx.delete(f"{service.url}/nolib/jobs/{theirs['id']}", headers=KEY, timeout=30)
    assert r.status_code == 404
    assert status(service, mine["id"], "/nolib").status_code == 401  # no key at all
    assert wait(service, theirs["id"], prefix="/nolib", headers=OTHER_KEY)["state"] == "done"
    done = wait(service, mine["id"], prefix="/nolib", headers=KEY)
    assert done["state"] == "done"
    same_answer(done["result"], sync(service, "/generate", {**TINY, "seed": 5}, "/nolib", KEY))


class Receiver:
    """A real HTTP server on this machine that records the callbacks POSTed to it."""

    def __init__(self):
        self.calls: list[tuple[str, dict, bytes]] = []
        received = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                received.append((self.path, dict(self.headers), data))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.calls) < n:
            assert time.time() < deadline, f"{len(self.calls)} callbacks, wanted {n}"
            time.sleep(0.2)


def test_callback_is_posted_when_the_job_ends(service):
    hook = Receiver()
    try:
        body = {**TINY, "seed": 77}
        job = accepted(submit(service, "generate", body, params={"callback_url": hook.url + "/a"}))
        hook.wait(1)
        path, headers, raw = hook.calls[0]
        assert path == "/a" and headers["x-hiresfix-job"] == job["id"]
        posted = json.loads(raw)
        assert posted["id"] == job["id"] and posted["state"] == "done"
        same_answer(posted["result"], sync(service, "/generate", body))
        deadline = time.time() + 10
        while status(service, job["id"]).json()["callback"] is None:
            assert time.time() < deadline
            time.sleep(0.2)
        assert status(service, job["id"]).json()["callback"] == {
            "delivered": True,
            "status": 204,
            "attempts": 1,
        }
        # A cancelled job calls back too.
        slow = accepted(
            submit(service, "generate", {**SLOW, "seed": 3}, params={"callback_url": hook.url})
        )
        wait(service, slow["id"], until=("running",), timeout=60)
        assert httpx.delete(f"{service.url}/jobs/{slow['id']}", timeout=60).status_code == 200
        hook.wait(2)
        assert json.loads(hook.calls[1][2])["state"] == "cancelled"
    finally:
        hook.server.shutdown()
    # Only allowed hosts, and never on the app whose config does not allow it.
    r = submit(service, "generate", TINY, params={"callback_url": "http://example.com/x"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "callback_url", r.text


# ---------------------------------------------------------------- the queue's replica dies
def test_a_killed_jobs_replica_loses_no_job_when_redis_keeps_them(service):
    """The "nolib" app's Jobs replica is killed as a node loss would kill it while one job runs
    and another waits: Serve starts a new replica, which finds both in Redis: the running one's
    lease lapses and it is requeued (seeded), the waiting one runs; both answer what /generate
    answers."""
    import ray

    running_body = {**SLOW, "num_inference_steps": 40, "seed": 31}
    waiting_body = {**TINY, "seed": 32}
    ray.init(address=service.gcs_address(), namespace="serve", log_to_driver=False)
    try:
        names = [
            actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::nolib#Jobs#")
        ]
        assert len(names) == 1, names
        a = accepted(submit(service, "generate", running_body, "/nolib", KEY))
        wait(service, a["id"], until=("running",), prefix="/nolib", headers=KEY, min_step=1)
        b = accepted(submit(service, "generate", waiting_body, "/nolib", KEY))
        t0 = time.time()
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    finally:
        ray.shutdown()
    done_a = wait(service, a["id"], prefix="/nolib", headers=KEY, timeout=120)
    done_b = wait(service, b["id"], prefix="/nolib", headers=KEY, timeout=120)
    assert done_a["state"] == "done" and done_b["state"] == "done", (done_a, done_b)
    print(f"both jobs done {time.time() - t0:.1f} s after the kill")
    # The running job's lease lapsed and it ran again (seeded); the waiting one ran once.
    assert done_a["attempts"] == 2 and done_b["attempts"] == 1, (done_a, done_b)
    same_answer(done_a["result"], sync(service, "/generate", running_body, "/nolib", KEY))
    same_answer(done_b["result"], sync(service, "/generate", waiting_body, "/nolib", KEY))
    health = httpx.get(f"{service.url}/nolib/health", timeout=30).json()
    assert health["jobs"]["store"] == "redis"
