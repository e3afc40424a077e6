"""Async jobs on the ingress: `POST /jobs/{kind}` (generate, upscale, img2img: the body is exactly
the synchronous route's), `GET /jobs/{id}`, `DELETE /jobs/{id}`, `GET /jobs`. The queue itself is
the Jobs deployment (deployments/jobs.py) and the store hiresfix/jobs.py; these routes only check,
hand over and read back. `run_job` is the Jobs deployment's way in: the synchronous route's code
path for a validated body, outside HTTP, with the job id as the request id (so GET /progress/{id}
follows the job, and a cancel reaches its denoising loop like a client disconnect would).
`Ingress` inherits this mixin (Ray Serve's @serve.ingress finds routes through the MRO).
"""

# No `from __future__ import annotations`: FastAPI must see real types on the route methods.
import asyncio
import contextlib
import logging
import time

from fastapi import Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from deployments.guard import KEY_ID_STATE
from deployments.http import RETRYABLE, api, error_docs, json_answer, unavailable
from hiresfix.jobs import JobAccepted, JobList, JobRecord, JobStatus, status_json
from hiresfix.limits import check_models
from hiresfix.plan import steps_of, upscale_plan
from hiresfix.schemas import (
    ErrorResponse,
    GenerateRequest,
    Img2ImgRequest,
    RequestError,
    UpscaleRequest,
)

log = logging.getLogger("hiresfix.ingress")

SCHEMAS: dict[str, type[BaseModel]] = {
    "generate": GenerateRequest,
    "upscale": UpscaleRequest,
    "img2img": Img2ImgRequest,
}


def _docs(*codes: int, **described: str) -> dict:
    """error_docs with a jobs-specific description where the generic one would mislead."""
    docs = error_docs(*codes)
    for code, text in described.items():
        docs[int(code.lstrip("_"))]["description"] = text
    return docs


FULL = (
    "At capacity: the job queue is full (jobs.max_queued, jobs.max_jobs, jobs.max_bytes), or"
    " the queue is restarting; retry after Retry-After seconds."
)
SUBMIT_ERRORS = _docs(
    400,
    401,
    408,
    413,
    422,
    429,
    500,
    503,
    _413="The body, or the image in it, is larger than this deployment (or its job store) takes.",
    _503=FULL,
)
NO_JOB = "No such job: never submitted, expired (jobs.keep_s), or another API key's."
STATUS_ERRORS = _docs(401, 404, 500, 503, _404=NO_JOB, _503=FULL)
CANCEL_ERRORS = _docs(
    401, 404, 409, 500, 503, _404=NO_JOB, _409="The job already ended (done or failed)."
)
LIST_ERRORS = _docs(401, 500, 503, _503=FULL)
CALLBACK = Query(
    None,
    max_length=2048,
    description="POSTed GET /jobs/{id}'s answer when the job ends (only where jobs.allow_callbacks"
    " is on, to a host in jobs.callback_hosts).",
)


class JobsRoutes:
    """Mixed into the Ingress (deployments/ingress.py), which sets `self.jobs`."""

    @api.post(
        "/jobs/generate", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS
    )
    async def jobs_generate(
        self, req: GenerateRequest, request: Request, callback_url: str | None = CALLBACK
    ) -> Response:
        """POST /generate, run later: 202 at once; follow it at the `Location` (GET /jobs/{id})."""
        check_models(req, self.upscaler_names, self.face_names)
        self.limits.check_generate(req)
        return await self._submit_job("generate", req, request, callback_url)

    @api.post("/jobs/upscale", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS)
    async def jobs_upscale(
        self, req: UpscaleRequest, request: Request, callback_url: str | None = CALLBACK
    ) -> Response:
        """POST /upscale, run later."""
        check_models(req, self.upscaler_names, self.face_names)
        pic = await asyncio.to_thread(self._decode_field, req.image, "image")
        self.limits.upscale_size(req, pic.width, pic.height)
        return await self._submit_job("upscale", req, request, callback_url)

    @api.post("/jobs/img2img", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS)
    async def jobs_img2img(
        self, req: Img2ImgRequest, request: Request, callback_url: str | None = CALLBACK
    ) -> Response:
        """POST /img2img, run later."""
        check_models(req, self.upscaler_names, self.face_names)
        pic, _ = await asyncio.gather(
            asyncio.to_thread(self._decode_field, req.image, "image"),
            asyncio.to_thread(self._decode_field, req.mask, "mask"),
        )
        req.output_size(pic.width, pic.height)  # names the field; the run checks the rest
        return await self._submit_job("img2img", req, request, callback_url)

    @api.get("/jobs/{job_id}", response_model=JobStatus, responses=STATUS_ERRORS)
    async def job_status(self, job_id: str, request: Request) -> Response:
        """Where the job is; `result` is the synchronous route's answer once it is done."""
        out = await self._jobs_call("get", job_id, _owner(request))
        if out is None:
            raise _no_job(job_id)
        rec = JobRecord.model_validate(out["rec"])
        progress = await self._job_progress(rec)
        if progress.get("eta_s") is None and out["eta_s"] is not None:
            progress["eta_s"] = out["eta_s"]
        body = status_json(rec, out["position"], progress, out["result"])
        return Response(body, media_type="application/json")

    @api.delete("/jobs/{job_id}", response_model=JobStatus, responses=CANCEL_ERRORS)
    async def job_cancel(self, job_id: str, request: Request) -> Response:
        """Cancel it wherever it is: a queued job never runs; a running one stops at its next
        denoising step, and its slot is free when this answers."""
        out = await self._jobs_call("cancel", job_id, _owner(request))
        if out is None:
            raise _no_job(job_id)
        rec = JobRecord.model_validate(out["rec"])
        if out["ended_before"] and rec.state != "cancelled":
            raise RequestError("job_id", f"job {job_id} already ended ({rec.state})", 409)
        progress = await self._job_progress(rec)
        return Response(status_json(rec, None, progress, None), media_type="application/json")

    @api.get("/jobs", response_model=JobList, responses=LIST_ERRORS)
    async def jobs_list(self, request: Request) -> Response:
        """Recent jobs, newest first (jobs.list_limit); with API keys on, the caller's own."""
        return json_answer(JobList(jobs=await self._jobs_call("list", _owner(request))))

    # After the kinds above: any other kind is a 404 naming it (not the 405 that GET and DELETE
    # /jobs/{job_id} would make it). Out of the OpenAPI document, like any unknown path.
    @api.post("/jobs/{kind}", include_in_schema=False)
    async def jobs_unknown_kind(self, kind: str) -> Response:
        kinds = ", ".join(SCHEMAS)
        raise RequestError("kind", f"no job kind {kind!r}: POST /jobs/ one of {kinds}", 404)

    # --- the Jobs deployment's way in ---
    async def run_job(self, kind: str, body: str, job_id: str, attempt: int = 1) -> dict:
        """Run one job as its synchronous route would: {"status": 200, "result": the route's JSON
        text} or {"status": 4xx/5xx, "error": ErrorResponse}. Cancelling this call cancels the
        run (the stages stop at their next step)."""
        t0 = time.perf_counter()
        try:
            if attempt > 1:  # the lost first run may still hold the progress entry
                await self._forget_progress(job_id)
            req = SCHEMAS[kind].model_validate_json(body)
            rid = job_id
            if kind == "generate":
                batch = await self._generate(req, job_id)
            elif kind == "img2img":
                batch = await self._img2img(req, job_id, t0)
            else:  # /upscale answers request_id null; the job's progress entry still opens
                rid = None
                async with self.tracker.track(job_id, steps_of(upscale_plan(req, (0, 0)))):
                    batch = await self._upscale(req, t0)
            answer = await self._encode(batch, req.output_format, t0, rid)
            return {"status": 200, "result": answer.model_dump_json()}
        except RequestError as exc:
            return _failed(job_id, exc)
        except RETRYABLE as exc:
            return _failed(job_id, unavailable(exc))
        except Exception:  # noqa: BLE001 - the log has it; the job says where to look
            log.exception("job %s failed", job_id)
            message = f"the service failed on this job; its log holds the detail under {job_id}"
            return _failed(job_id, RequestError("body", message, 500))

    # --- helpers ---
    async def _submit_job(
        self, kind: str, req: BaseModel, request: Request, callback_url: str | None
    ) -> Response:
        retry = kind == "upscale" or getattr(req, "seed", None) is not None  # same answer again
        out = await self._jobs_call(
            "submit", kind, req.model_dump_json(), _owner(request), retry, callback_url
        )
        if "refused" in out:
            status, field, message, retry_after = out["refused"]
            raise RequestError(field, message, status, retry_after)
        accepted = JobAccepted(**out)
        location = f"{request.scope.get('root_path', '')}/jobs/{accepted.id}"
        return Response(
            accepted.model_dump_json(),
            status_code=202,
            media_type="application/json",
            headers={"location": location},
        )

    async def _jobs_call(self, method: str, *args):
        """A call to the Jobs deployment; while it restarts, a retryable 503."""
        try:
            return await getattr(self.jobs, method).remote(*args)
        except RETRYABLE as exc:
            log.warning("the job queue is unavailable: %s", exc)
            raise unavailable(exc) from exc

    async def _job_progress(self, rec: JobRecord) -> dict:
        """stage, step, total_steps and eta_s from the progress board (GET /progress/{id})."""
        if rec.state == "queued":
            return {}
        try:
            info = await self.tracker.read(rec.id)
        except RequestError:  # not begun yet, expired, or the board is unavailable
            return {}
        total = sum(info.plan.values())
        running = rec.state == "running"
        return {
            "stage": info.stage if running else None,
            "step": total if rec.state == "done" else round(info.progress * total),
            "total_steps": total,
            "eta_s": info.eta_s if running else None,
        }

    async def _jobs_health(self) -> dict | None:
        """/health's `jobs` entry: the store, whether jobs survive a restart, counts."""
        if self.jobs is None:
            return None
        try:
            timeout = self.health_settings.model_info_timeout_s
            return await asyncio.wait_for(self.jobs.info.remote(), timeout)
        except Exception:  # noqa: BLE001 - /health must answer
            return {"info_error": "no answer from the job queue"}

    async def _forget_progress(self, job_id: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.tracker.handle.end.remote(job_id, "failed", "its runner was lost; rerun"),
                self.tracker.settings.begin_timeout_s,
            )


def _owner(request: Request) -> str | None:
    """The caller's API key fingerprint (deployments/guard.py), None with keys off."""
    return (request.scope.get("state") or {}).get(KEY_ID_STATE)


def _no_job(job_id: str) -> RequestError:
    return RequestError("job_id", f"no job {job_id!r}: {NO_JOB[len('No such job: ') :]}", 404)


def _failed(job_id: str, exc: RequestError) -> dict:
    body = ErrorResponse.of(exc.field, exc.message, job_id).model_dump()
    return {"status": exc.status, "error": body}
