"""HTTP plumbing of the ingress: the FastAPI app, 4xx errors that name the field, the body-size
guard, image/* answers and request ids. Routes and the stage chain live in deployments/ingress.py.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time.
import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.guard import REQUEST_ID, Guard, guard_settings, serve_request_id
from deployments.metrics import record_rejection
from hiresfix import __version__
from hiresfix.openai_api import is_openai_path, openai_error
from hiresfix.schemas import ErrorResponse, FieldError, ImageResponse, RequestError

log = logging.getLogger("hiresfix.ingress")

api = FastAPI(
    title="hiresfix",
    version=__version__,
    description="SDXL with a RealESRGAN hires fix and face restoration, on Ray Serve.",
)


def error_body(
    field: str, message: str, request_id: str | None = None, summary: str | None = None
) -> dict:
    return ErrorResponse.of(field, message, request_id, summary).model_dump()


def error_shape_for(
    request: Request,
    status: int,
    field: str,
    message: str,
    *,
    summary: str | None = None,
    details: list[FieldError] | None = None,
    headers: dict | None = None,
    code: str | None = None,
) -> JSONResponse:
    """Every error answer, in the shape its path's clients read: OpenAI's under /v1/
    (hiresfix/openai_api.py: a 422 is OpenAI's 400 there), ErrorResponse everywhere else."""
    rid = _rid(request)
    if is_openai_path(request.scope.get("path", ""), request.scope.get("root_path", "")):
        if details and len(details) > 1:
            message = "; ".join(f"{d.field}: {d.message}" for d in details)
        status, body = openai_error(status, field, message, code)
        headers = {**(headers or {}), **({"x-request-id": rid} if rid else {})}
    else:
        body = ErrorResponse(
            error=summary or f"{field}: {message}",
            detail=details or [FieldError(field=field, message=message)],
            request_id=rid,
        ).model_dump()
    record_rejection(status, field)  # hiresfix_rejected_requests (deployments/metrics.py)
    return JSONResponse(status_code=status, content=body, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # loc is ("body", character offset): not a field
            why = (e.get("ctx") or {}).get("error", "")
            pos = e["loc"][-1] if e.get("loc") else "?"
            details.append(FieldError(field="body", message=f"not valid JSON: {why} at {pos}"))
            continue
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        message = e.get("msg", "")
        if not loc and e.get("type") == "model_attributes_type" and not _json_type(request):
            # FastAPI reads a body as JSON only when it is declared so: say that, not "dict".
            sent = request.headers.get("content-type") or "no Content-Type"
            message = f"send a JSON object with Content-Type: application/json (got {sent})"
        details.append(FieldError(field=".".join(loc) or "body", message=message))
    summary = "; ".join(f"{d.field}: {d.message}" for d in details)
    first = details[0] if details else FieldError(field="body", message="invalid request")
    return error_shape_for(
        request,
        422,
        first.field,
        first.message,
        summary=f"invalid request: {summary}",
        details=details,
    )


def _json_type(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = None
    if exc.status in (429, 503):  # nothing wrong with the request: the same one later will do
        wait = max(1, math.ceil(exc.retry_after_s or guard_settings().retry_after_s))
        headers = {"retry-after": str(wait), "x-should-retry": "true"}
    return error_shape_for(
        request,
        exc.status,
        exc.field,
        exc.message,
        headers=headers,
        code=getattr(exc, "code", None),
    )


# Starlette's own refusals (no route 404, wrong method 405, a body FastAPI cannot parse 400: not
# UTF-8, nested too deep, an integer beyond Python's digit limit) in our shape, not {"detail": str}.
_HTTP_FIELDS = {404: "path", 405: "method"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    field = _HTTP_FIELDS.get(exc.status_code, "body")
    message = exc.detail if isinstance(exc.detail, str) else "the request was refused"
    if exc.status_code == 400 and field == "body":
        message = "the body could not be parsed: send a UTF-8 JSON object"
    return error_shape_for(
        request, exc.status_code, field, message, summary=message, headers=exc.headers
    )


# Failures a retry can fix: a full queue somewhere in the graph, or a stage replica (or its node)
# that died or is restarting. Answered 503 with Retry-After, like the proxy's own backpressure.
# STAGE_GONE is the replica-or-node part: an optional stage falls back instead
# (deployments/ingress.py).
STAGE_GONE = (
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RayActorError,
    ActorUnavailableError,
    NodeDiedError,
)
RETRYABLE = (BackPressureError, *STAGE_GONE)


def unavailable(exc: BaseException) -> RequestError:
    """The 503 a retryable failure answers. The ingress raises it itself: Serve installs its own
    plain-text handlers for BackPressureError and DeploymentUnavailableError on the app at replica
    start, over any of ours."""
    return RequestError(
        "body",
        "the service is at capacity or a stage is restarting",
        503,
        getattr(exc, "retry_after_s", None),
    )


async def _retryable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("request %s: a stage is unavailable or full: %s", _rid(request), exc)
    return await _request_error(request, unavailable(exc))


# A backstop for Ray errors raised outside the stage chain. Registered per class, not under
# Exception: Starlette re-raises whatever reaches its catch-all handler after answering.
for _cls in RETRYABLE:
    api.add_exception_handler(_cls, _retryable)


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    # The detail goes to the log under the request id, never to the client (no exception names,
    # traces or paths); SDK clients are told not to retry.
    rid = _rid(request)
    log.error("request %s failed", rid, exc_info=exc)
    return error_shape_for(
        request,
        500,
        "body",
        f"the service failed on this request; its log holds the detail under request id {rid}",
        summary="internal error",
        headers={"x-should-retry": "false"},
    )


api.add_middleware(Guard)  # API keys, body size, admission: before any body is read

# `Accept: image/png` (or jpeg, webp, image/*): the answer is the file itself, its metadata in
# headers.
# No base64 (a third smaller) and no JSON to parse: what curl users and scripts want.
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
BINARY_DOC = {
    200: {
        "content": {t: {} for t in IMAGE_TYPES},
        "description": (
            "With `Accept: image/png|image/jpeg|image/webp|image/*`: the image file itself (one"
            " image), and the rest of ImageResponse in headers: X-Upscaler-Used,"
            " X-Fallback-Reason, X-Seed and X-Hiresfix-Meta (all of it as JSON)."
        ),
    }
}

# Every error status a route can answer, for the OpenAPI document: all share ErrorResponse.
_ERRORS = {
    400: "An undecodable image, or a malformed X-Request-ID header.",
    401: "API keys are on (HIRESFIX_API_KEYS) and no valid `Authorization: Bearer` key was sent.",
    404: "No such request id.",
    406: "`Accept: image/*` for more than one image.",
    408: "The request body did not arrive whole within http.body_timeout_s.",
    409: "The X-Request-ID belongs to a request that is still running.",
    413: "The body (Content-Length) or the image is larger than this deployment accepts.",
    422: "A field is missing, malformed or outside this deployment's limits: `detail` names it.",
    429: "This API key already runs its maximum of concurrent requests; see Retry-After.",
    500: "A bug: the log holds the detail under `request_id`. Sent with x-should-retry: false.",
    503: "At capacity, a stage is restarting, or the service is draining before a stop"
    " (`hiresfix stop`): retry after Retry-After seconds.",
}


def error_docs(*codes: int, binary: bool = False) -> dict:
    """`responses=` for a route: its error statuses (and the image/* answer where it has one)."""
    docs = {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}
    return {**BINARY_DOC, **docs} if binary else docs


def binary_format(request: Request, output_format: str) -> str | None:
    """The format to answer with as a bare file, or None for the JSON answer."""
    types = [t.split(";")[0].strip().lower() for t in request.headers.get("accept", "").split(",")]
    for t in types:
        if t in IMAGE_TYPES:
            return IMAGE_TYPES[t]
    return output_format if "image/*" in types else None


def json_answer(body: BaseModel) -> Response:
    """Serialised once by pydantic's Rust encoder: FastAPI's generic path would re-validate and walk
    megabytes of base64 again."""
    return Response(body.model_dump_json(), media_type="application/json")


def image_answer(body: ImageResponse, data: bytes) -> Response:
    """The file itself; the rest of the answer in headers (latin-1 only: ensure_ascii escapes the
    rest)."""
    meta = json.dumps(
        body.model_dump(mode="json", exclude={"image", "images"}), separators=(",", ":")
    )
    headers = {"x-hiresfix-meta": meta}
    reason = body.fallback_reason and body.fallback_reason.value
    for name, value in (
        ("x-upscaler-used", body.upscaler_used),
        ("x-seed", body.seed),
        ("x-fallback-reason", reason),
    ):
        if value is not None:
            headers[name] = str(value).encode("ascii", "replace").decode()
    return Response(data, media_type=f"image/{body.output_format}", headers=headers)


def _rid(request: Request) -> str | None:
    """The request's id for an error body; never raises (the error may be about the id itself)."""
    rid = request.headers.get("x-request-id")
    if rid is not None and REQUEST_ID.match(rid):
        return rid
    try:
        return request_id(request)
    except RequestError:
        return None


def request_id(request: Request, given: str | None = None, field: str = "body") -> str:
    """The id the body `given` in `field` (A1111's force_task_id), else the client's X-Request-ID
    (to follow the request at GET /progress/{id}), else Ray's own id for this request (the one in
    Serve's access log). The body's wins: Serve's proxy fills X-Request-ID in itself when the
    client sends none."""
    for rid, name in ((given, field), (request.headers.get("x-request-id"), "x-request-id")):
        if rid is not None:
            if not REQUEST_ID.match(rid):
                raise RequestError(name, "use 1-128 characters from A-Z a-z 0-9 . _ : - ( )", 400)
            return rid
    return serve_request_id()
