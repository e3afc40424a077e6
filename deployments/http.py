"""HTTP plumbing of the ingress: the FastAPI app, 4xx errors that name the field, the body-size
guard, image/* answers and request ids. Routes and the stage chain live in deployments/ingress.py.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time.
import logging
import os
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from hiresfix import __version__

log = logging.getLogger("hiresfix.ingress")

api = FastAPI(
    title="hiresfix",
    version=__version__,
    description="SDXL with a RealESRGAN hires fix and face restoration, on Ray Serve.",
)


class BadRequest(Exception):
    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.message, self.status = field, message, status


def _field_errors(errors) -> list[dict]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        out.append({"field": ".".join(loc) or "body", "message": e.get("msg", ""), "type": e.get("type")})
    return out


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = _field_errors(exc.errors())
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return JSONResponse(status_code=422, content={"error": f"invalid request: {summary}", "detail": details})


@api.exception_handler(BadRequest)
async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
    detail = [{"field": exc.field, "message": exc.message}]
    return JSONResponse(status_code=exc.status, content={"error": f"{exc.field}: {exc.message}", "detail": detail})


@api.exception_handler(Exception)
async def _stage_failed(_: Request, exc: Exception) -> JSONResponse:
    # A full queue never gets here: Serve answers 503 with Retry-After itself (backpressure_config).
    log.exception("request failed")
    return JSONResponse(status_code=500, content={"error": f"generation failed: {exc.__class__.__name__}", "detail": str(exc)[-1000:]})


# Set by Ingress.__init__ from the profile's limits. An environment variable, not a module global:
# Serve ships the FastAPI app (and this middleware) to the replica by value, so the middleware's
# module globals are not the ones the Ingress class sees; the process environment is shared.
MAX_BODY_ENV = "HIRESFIX_MAX_BODY_BYTES"


class _BodySizeLimit:
    """Refuse an oversized body from its Content-Length, before it is read and parsed: a huge JSON
    body would otherwise sit in the ingress several times over (and could take the replica down).
    Plain ASGI, not @app.middleware, which would wrap every response body in an extra stream."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            limit = int(os.environ.get(MAX_BODY_ENV, "0"))
            length = dict(scope["headers"]).get(b"content-length", b"")
            if limit and length.isdigit() and int(length) > limit:
                response = JSONResponse(status_code=413, content={
                    "error": "request body too large",
                    "detail": [{"field": "body", "message": f"{int(length)} bytes; this deployment accepts at most"
                                f" {limit} (an image of up to max_input_bytes, base64-encoded, plus the other fields)"}]})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


api.add_middleware(_BodySizeLimit)

# `Accept: image/png` (or jpeg, webp, image/*): the answer is the file itself, its metadata in headers.
# No base64 (a third smaller) and no JSON to parse: what curl users and scripts want.
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
BINARY_DOC = {200: {"content": {t: {} for t in IMAGE_TYPES}, "description": (
    "With `Accept: image/png|image/jpeg|image/webp|image/*`: the image file itself (one image), and"
    " the rest of ImageResponse in headers: X-Upscaler-Used, X-Fallback-Reason, X-Seed and"
    " X-Hiresfix-Meta (all of it as JSON).")}}


def binary_format(request: Request, output_format: str) -> str | None:
    """The format to answer with as a bare file, or None for the JSON answer."""
    types = [t.split(";")[0].strip().lower() for t in request.headers.get("accept", "").split(",")]
    for t in types:
        if t in IMAGE_TYPES:
            return IMAGE_TYPES[t]
    return output_format if "image/*" in types else None


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(request: Request) -> str:
    """The client's X-Request-ID (to follow the request at GET /progress/{id}), else Ray's own id
    for this request (the one in Serve's access log), else a fresh one."""
    rid = request.headers.get("x-request-id")
    if rid is not None:
        if not _REQUEST_ID.match(rid):
            raise BadRequest("x-request-id", "use 1-128 characters from A-Z a-z 0-9 . _ : -", 400)
        return rid
    try:
        from ray.serve.context import _get_serve_request_context  # private, hence guarded

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # noqa: BLE001
        return uuid.uuid4().hex
