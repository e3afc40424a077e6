"""Progress of /generate requests: one small deployment holds the board, stages report to it.

One replica (serve_config.yaml), so every ingress replica reads what every stage replica wrote.
Stages report fire-and-forget and at most every `report_interval_s`; the ingress waits at most
`begin_timeout_s` to open an entry. A lost report only delays the bar, and a failing Progress
replica never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from hiresfix.progress import ProgressBoard, ProgressSettings
from hiresfix.schemas import ProgressInfo, RequestError

log = logging.getLogger("hiresfix.progress")


@serve.deployment(name="Progress")
class Progress:
    def __init__(self, settings: ProgressSettings):
        self.board = ProgressBoard(keep_s=settings.keep_s, max_entries=settings.max_entries)

    def begin(self, request_id: str, plan: dict[str, int]) -> bool:
        return self.board.begin(request_id, plan)

    def report(self, request_id: str, stage: str, steps_done: int) -> None:
        self.board.report(request_id, stage, steps_done)

    def end(self, request_id: str, state: str, detail: str | None = None) -> None:
        self.board.end(request_id, state, detail)

    def get(self, request_id: str) -> ProgressInfo | None:
        return self.board.get(request_id)


class Tracker:
    """The ingress's side: opens and closes a request's entry, reads it for GET /progress."""

    def __init__(self, handle: DeploymentHandle, settings: ProgressSettings):
        self.handle, self.settings = handle, settings
        self._skip_until = 0.0

    @contextlib.asynccontextmanager
    async def track(self, request_id: str, plan: dict[str, int]) -> AsyncIterator[None]:
        """Open the entry (409 when a running request holds the id) and close it with the outcome.
        A board that does not answer is skipped for skip_s: losing it costs requests nothing."""
        if time.monotonic() < self._skip_until:
            yield
            return
        try:
            fresh = await asyncio.wait_for(
                self.handle.begin.remote(request_id, plan), timeout=self.settings.begin_timeout_s
            )
        except Exception:  # noqa: BLE001 - no progress bar is no reason to refuse the work
            log.warning(
                "progress board unavailable; requests skip it for %g s", self.settings.skip_s
            )
            self._skip_until = time.monotonic() + self.settings.skip_s
            yield
            return
        if not fresh:
            raise RequestError(
                "x-request-id",
                f"{request_id!r} belongs to a request that is still running: send a new id",
                409,
            )
        try:
            yield
        except asyncio.CancelledError:
            self._end(request_id, "cancelled", "the client went away or request_timeout_s passed")
            raise
        except RequestError as exc:
            self._end(request_id, "failed", exc.message)
            raise
        except Exception:
            self._end(
                request_id, "failed", "a stage failed; see the service log for this request id"
            )
            raise
        self._end(request_id, "done")

    async def read(self, request_id: str) -> ProgressInfo:
        try:
            info = await asyncio.wait_for(
                self.handle.get.remote(request_id), timeout=self.settings.read_timeout_s
            )
        except Exception:  # noqa: BLE001
            log.warning("progress read failed for %s", request_id, exc_info=True)
            raise RequestError(
                "request_id",
                "progress is unavailable right now; requests themselves are"
                " unaffected: try again shortly",
                503,
            ) from None
        if info is None:
            raise RequestError(
                "request_id",
                f"no /generate request {request_id!r} is running or ended in the"
                f" last {self.settings.keep_s:g} s; send your own X-Request-ID header with"
                " /generate to follow it",
                404,
            )
        return info

    def _end(self, request_id: str, state: str, detail: str | None = None) -> None:
        try:
            self.handle.end.remote(request_id, state, detail)  # fire and forget
        except Exception:  # noqa: BLE001
            log.warning("progress end not recorded for %s", request_id, exc_info=True)


class Reporter:
    """A stage replica's side: reports from the event loop or, throttled, from a worker thread."""

    def __init__(self, handle: DeploymentHandle | None, min_interval_s: float):
        self.handle, self.min_interval_s = handle, min_interval_s

    def mark(self, request_id: str | None, stage: str, steps_done: int = 0) -> None:
        """Call on the replica's event loop."""
        if self.handle is None or request_id is None:
            return
        try:
            self.handle.report.remote(request_id, stage, steps_done)  # not awaited: fire and forget
        except Exception:  # noqa: BLE001 - progress must never fail a request
            log.debug("progress report failed", exc_info=True)

    def stepper(self, request_id: str | None, stage: str) -> Callable[[int], None]:
        """A per-step callback for a worker thread: hops to the event loop, throttled."""
        loop, last = asyncio.get_running_loop(), [0.0]

        def on_step(steps_done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= self.min_interval_s:
                last[0] = now
                loop.call_soon_threadsafe(self.mark, request_id, stage, steps_done)

        return on_step
