"""The ingress's front door, as plain ASGI before any body is read: API keys (401), the per-key
concurrency limit (429), the body-size limit (413) and the replica's admission bound (503).

Refusing here costs no body read and no JSON parse, so a flood of large or unauthenticated requests
is answered in milliseconds and never sits in the replica's memory. Plain ASGI rather than
@app.middleware, which would wrap every response body in an extra stream.

Settings travel through the process environment: Serve ships the FastAPI app (and this middleware)
to the replica by value, so module globals set by Ingress.__init__ are not the ones this middleware
sees; the environment is the replica's own. API keys come from HIRESFIX_API_KEYS only (a Kubernetes
Secret in production), never from YAML, and never appear in a log line or an answer.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
import re
import uuid
from collections import Counter

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deployments.drain import DrainWatch
from deployments.metrics import record_rejection
from hiresfix.images import PNG_COMPRESS_LEVEL
from hiresfix.jobs import key_id
from hiresfix.openai_api import is_openai_path, openai_error
from hiresfix.schemas import ErrorResponse

API_KEYS_ENV = "HIRESFIX_API_KEYS"  # comma-separated; unset or empty = no authentication
GUARD_ENV = "HIRESFIX_GUARD"  # GuardSettings as JSON, written by Ingress.__init__
OPEN_PATHS = ("/health",)  # probes
# OpenAI `response_format: url` links: the unguessable id is the permission, as OpenAI's links
# are (an <img src> sends no Authorization header).
OPEN_PREFIXES = ("/v1/images/results/",)
KEY_ID_STATE = "hiresfix_key_id"  # scope["state"] key: the caller's API key fingerprint
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


class HttpSettings(BaseModel):
    """serve_config `args.http`: the ingress's front door."""

    model_config = ConfigDict(extra="forbid")
    docs_public: bool = Field(True, description="/docs and /openapi.json without an API key.")
    max_requests_per_key: int | None = Field(
        None, ge=1, description="Requests one API key may have running at once (429 beyond)."
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        description="POST requests one ingress replica holds at once; beyond it a 503 with"
        " Retry-After answers at once (set below the Ingress's max_ongoing_requests).",
    )
    retry_after_s: int = Field(
        5, ge=1, description="Retry-After of the 503s and 429s answered here."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A POST body must arrive whole within this long (408 after)."
    )
    max_uploading: int = Field(
        128,
        ge=1,
        description="POST bodies one ingress replica reads at once, before admission: stalled"
        " uploads (slow-loris) wait out body_timeout_s here, never in an admission slot.",
    )
    png_compress_level: int = Field(
        PNG_COMPRESS_LEVEL,
        ge=0,
        le=9,
        description="PNG answers' compression, lossless at every level: 1 (default) is zlib 1 with"
        " the run-length strategy, ~5x faster to encode than Pillow's default 6 for photos 0-1%"
        " larger; 2-9 are zlib's levels (9: smallest files, ~25x slower than 1; 0: stored).",
    )
    drain_poll_s: float = Field(
        0.5,
        gt=0,
        description="How often each ingress replica looks for `hiresfix stop`'s drain flag (and,"
        " while draining, reports the requests it still holds).",
    )


class GuardSettings(HttpSettings):
    max_body_bytes: int = 0  # from the profile's limits; 0 = unlimited


@functools.cache
def _parse(raw: str) -> GuardSettings:
    return GuardSettings.model_validate(json.loads(raw))


def guard_settings() -> GuardSettings:
    """This replica's settings, parsed once per value of the variable."""
    return _parse(os.environ.get(GUARD_ENV, "{}"))


REQUEST_ID = re.compile(r"^[A-Za-z0-9._:()-]{1,128}$")  # an X-Request-ID; A1111 ids are task(...)


def serve_request_id() -> str:
    """Ray's own id for the request being served (the one in Serve's access log), else a fresh
    one."""
    try:
        from ray.serve.context import _get_serve_request_context  # private, hence guarded

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # noqa: BLE001
        return uuid.uuid4().hex


class Refusal:
    """A refusal in our ErrorResponse shape, or in OpenAI's when the path it answers is under /v1/
    (the same rule as deployments/http.py's error_shape_for). It carries a request id like every
    other error: the client's valid X-Request-ID, else Serve's."""

    def __init__(self, status: int, field: str, message: str, summary: str, headers=None):
        self.status_code, self._field, self._message = status, field, message
        self._summary, self._headers = summary, headers or {}

    async def __call__(self, scope, receive, send):
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if REQUEST_ID.match(sent) else serve_request_id()
        headers = {**self._headers, "x-request-id": rid}
        if is_openai_path(scope.get("path", ""), scope.get("root_path", "")):
            status, body = openai_error(self.status_code, self._field, self._message)
        else:
            status = self.status_code
            body = ErrorResponse.of(self._field, self._message, rid, self._summary).model_dump()
        answer = JSONResponse(status_code=status, content=body, headers=headers)
        record_rejection(status, self._field)  # hiresfix_rejected_requests
        return await answer(scope, receive, send)


def error_response(status: int, field: str, message: str, summary: str, headers=None) -> Refusal:
    return Refusal(status, field, message, summary, headers)


def _keys() -> list[bytes]:
    return [k.strip().encode() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]


def _authorised(header: bytes, keys: list[bytes]) -> bytes | None:
    """The matching key, or None. Compares against every key in constant time."""
    scheme, _, token = header.partition(b" ")
    token = token.strip() if scheme.lower() == b"bearer" else b""
    match = None
    for key in keys:
        if hmac.compare_digest(token, key):
            match = key
    return match


def _too_large(detail: str, limit: int) -> Refusal:
    return error_response(
        413,
        "body",
        f"{detail}; this deployment accepts at most {limit} (an image of up to max_input_bytes,"
        " base64-encoded, plus the other fields)",
        "request body too large",
    )


async def _read_body(receive, limit: int, timeout_s: float):
    """Read the whole body here, within `timeout_s` and `limit` bytes, and hand it to the app from
    memory: (receive, None), or (receive, the 408/413 refusal) without reading on."""
    messages, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break  # the client went away: the app sees that
                size += len(message.get("body", b""))
                if limit and size > limit:
                    return receive, _too_large(f"more than {limit} bytes sent", limit)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        return receive, error_response(
            408,
            "body",
            f"the request body did not arrive within {timeout_s:g} s: send it whole, faster",
            "request body timeout",
        )

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay, None


class Guard:
    def __init__(self, app):
        self.app = app
        self._in_flight = 0  # admitted: bodies read, in the app
        self._uploading = 0  # bodies being read
        self._per_key: Counter[bytes] = Counter()
        self.drain = DrainWatch()  # `hiresfix stop` (deployments/drain.py)

    def settings(self) -> GuardSettings:
        return guard_settings()

    async def __call__(self, scope, receive, send):
        # Serve sends the lifespan scope at replica start: the drain watch starts with the replica.
        self.drain.start(
            lambda: self._in_flight + self._uploading, lambda: self.settings().drain_poll_s
        )
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, path = self.settings(), scope.get("path", "")
        root = scope.get("root_path", "")  # an app under a route_prefix sees its own paths
        if root and path.startswith(root):
            path = path[len(root) :]
        headers = dict(scope["headers"])
        wait = {"retry-after": str(s.retry_after_s)}
        key = None
        keys = _keys()
        public = (
            path in OPEN_PATHS
            or path.startswith(OPEN_PREFIXES)
            or (s.docs_public and path in DOC_PATHS)
        )
        if keys and not public:
            key = _authorised(headers.get(b"authorization", b""), keys)
            if key is None:
                refusal = error_response(
                    401,
                    "authorization",
                    "send 'Authorization: Bearer <API key>' with a key this service accepts",
                    "missing or invalid API key",
                    {"www-authenticate": "Bearer"},
                )
                return await refusal(scope, receive, send)
            # Whose request this is, for the routes that keep per-caller state (GET /jobs): a
            # fingerprint, never the key. A fresh dict: the scope's `state` may be shared.
            scope["state"] = {**(scope.get("state") or {}), KEY_ID_STATE: key_id(key)}
        if self.drain.draining and (path in OPEN_PATHS or scope.get("method") == "POST"):
            # Admitted requests run on; new work and probes are told to go elsewhere.
            return await self._busy(s, None)(scope, receive, send)
        if scope.get("method") != "POST":  # only POST bodies are read by the routes
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if s.max_body_bytes and length.isdigit() and int(length) > s.max_body_bytes:
            return await _too_large(f"{int(length)} bytes", s.max_body_bytes)(scope, receive, send)
        if (
            key is not None
            and s.max_requests_per_key
            and self._per_key[key] >= s.max_requests_per_key
        ):
            refusal = error_response(
                429,
                "authorization",
                f"this API key already has {s.max_requests_per_key} requests running: wait for one",
                "too many concurrent requests for this key",
                wait,
            )
            return await refusal(scope, receive, send)
        if self._uploading >= s.max_uploading:
            return await self._busy(s, f"{s.max_uploading} uploads")(scope, receive, send)
        if key is not None:
            self._per_key[key] += 1
        try:
            self._uploading += 1
            try:
                receive, refusal = await _read_body(receive, s.max_body_bytes, s.body_timeout_s)
            finally:
                self._uploading -= 1
            if refusal is not None:
                return await refusal(scope, receive, send)
            if self._in_flight >= s.max_in_flight:
                return await self._busy(s, f"{s.max_in_flight} requests")(scope, receive, send)
            self._in_flight += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                self._in_flight -= 1
        finally:
            if key is not None:
                self._per_key[key] -= 1
                if not self._per_key[key]:
                    del self._per_key[key]

    @staticmethod
    def _busy(s: GuardSettings, what: str | None) -> Refusal:
        """503: this replica is full (`what` it holds), or draining before a stop (None)."""
        if what is None:
            field, message = "service", "this replica is shutting down (draining)"
        else:
            field, message = "body", f"this replica is already serving {what}"
        return error_response(
            503,
            field,
            f"{message}: retry in {s.retry_after_s} s",
            "service unavailable",
            {"retry-after": str(s.retry_after_s), "x-should-retry": "true"},
        )
