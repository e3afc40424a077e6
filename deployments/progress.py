"""Progress of /generate requests: one small deployment holds the board, stages report to it.

One replica (serve_config.yaml), so every ingress replica reads what every stage replica wrote.
Stages report fire-and-forget and at most every `report_interval_s`; the ingress waits at most
`begin_timeout_s` to open an entry. A lost report only delays the bar, and a failing Progress
replica never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from hiresfix.openai_api import OpenAISettings, ResultStore
from hiresfix.progress import ProgressBoard, ProgressSettings
from hiresfix.schemas import ProgressInfo, RequestError

log = logging.getLogger("hiresfix.progress")


@serve.deployment(name="Progress")
class Progress:
    def __init__(self, settings: ProgressSettings, results: OpenAISettings | None = None):
        self.board = ProgressBoard(keep_s=settings.keep_s, max_entries=settings.max_entries)
        # The files behind OpenAI `response_format: url` links (hiresfix/openai_api.py): here,
        # in the one replica every ingress replica reads, not in any one ingress's memory.
        self.results = ResultStore(results or OpenAISettings())

    def put_results(self, files: list[tuple[bytes, str]]) -> list[str] | None:
        return self.results.put(files)

    def get_result(self, result_id: str) -> tuple[bytes, str, float] | None:
        return self.results.get(result_id)

    def begin(self, request_id: str, plan: dict[str, int], tag: str | None = None) -> bool:
        return self.board.begin(request_id, plan, tag)

    def report(self, request_id: str, stage: str, steps_done: int) -> str | None:
        return self.board.report(request_id, stage, steps_done)

    def signal(self, tag: str, kind: str) -> list[str]:
        return self.board.signal(tag, kind)

    def show(self, request_id: str, png: bytes) -> None:
        self.board.show(request_id, png)

    def previews(self, request_id: str, start: int = 0) -> list[bytes] | None:
        return self.board.previews(request_id, start)

    def current(self, tag: str, preview: bool = False) -> ProgressInfo | None:
        return self.board.current(tag, preview)

    def end(self, request_id: str, state: str, detail: str | None = None) -> None:
        self.board.end(request_id, state, detail)

    def get(self, request_id: str, preview: bool = False) -> ProgressInfo | None:
        return self.board.get(request_id, preview)


class Tracker:
    """The ingress's side: opens and closes a request's entry, reads it for GET /progress."""

    def __init__(self, handle: DeploymentHandle, settings: ProgressSettings):
        self.handle, self.settings = handle, settings
        self._skip_until = 0.0

    @contextlib.asynccontextmanager
    async def track(
        self, request_id: str, plan: dict[str, int], tag: str | None = None
    ) -> AsyncIterator[None]:
        """Open the entry (409 when a running request holds the id) and close it with the outcome.
        A board that does not answer is skipped for skip_s: losing it costs requests nothing.
        `tag` groups a caller's requests (A1111's progress and interrupt)."""
        if time.monotonic() < self._skip_until:
            yield
            return
        try:
            fresh = await asyncio.wait_for(
                self.handle.begin.remote(request_id, plan, tag),
                timeout=self.settings.begin_timeout_s,
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

    async def read(self, request_id: str, preview: bool = False) -> ProgressInfo:
        try:
            info = await asyncio.wait_for(
                self.handle.get.remote(request_id, preview), timeout=self.settings.read_timeout_s
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

    async def current(self, tag: str, preview: bool = False) -> ProgressInfo | None:
        """A1111's progress: the caller's latest running request (None when idle)."""
        return await self._ask(self.handle.current.remote(tag, preview), "progress")

    async def signal(self, tag: str, kind: str) -> list[str]:
        """A1111's interrupt / skip of the caller's running requests: the ids flagged."""
        return await self._ask(self.handle.signal.remote(tag, kind), kind)

    async def _ask(self, response, what: str):
        try:
            return await asyncio.wait_for(response, timeout=self.settings.read_timeout_s)
        except Exception:  # noqa: BLE001
            log.warning("progress board did not answer a %s call", what, exc_info=True)
            raise RequestError(
                "body", f"{what} is unavailable right now: try again shortly", 503
            ) from None

    def _end(self, request_id: str, state: str, detail: str | None = None) -> None:
        try:
            # Fire and forget, outside this request's context: Serve cancels a cancelled
            # request's child calls that are still being routed, and "cancelled" is sent exactly
            # then (the board showed such a request running until keep_s ran out).
            contextvars.Context().run(self.handle.end.remote, request_id, state, detail)
        except Exception:  # noqa: BLE001
            log.warning("progress end not recorded for %s", request_id, exc_info=True)


class Reporter:
    """A stage replica's side: reports from the event loop or, throttled, from a worker thread."""

    def __init__(self, handle: DeploymentHandle | None, min_interval_s: float):
        self.handle, self.min_interval_s = handle, min_interval_s
        # Signals (A1111 interrupt / skip) the board answered to our reports, per request id;
        # bounded: an entry of a request that ended is simply pushed out.
        self.signals: OrderedDict[str, str] = OrderedDict()
        self._listening: set[asyncio.Task] = set()

    def mark(self, request_id: str | None, stage: str, steps_done: int = 0) -> None:
        """Call on the replica's event loop."""
        if self.handle is None or request_id is None:
            return
        try:
            response = self.handle.report.remote(request_id, stage, steps_done)
        except Exception:  # noqa: BLE001 - progress must never fail a request
            log.debug("progress report failed", exc_info=True)
            return
        # Not awaited by the stage: its answer (a signal, usually none) is read in the background.
        task = asyncio.ensure_future(self._listen(response, request_id))
        self._listening.add(task)
        task.add_done_callback(self._listening.discard)

    async def _listen(self, response, request_id: str) -> None:
        try:
            signal = await asyncio.wait_for(response, timeout=5.0)
        except Exception:  # noqa: BLE001 - a lost answer only delays an interrupt
            return
        if signal:
            self.signals[request_id] = signal
            while len(self.signals) > 1000:
                self.signals.popitem(last=False)

    def show(self, request_id: str, png: bytes) -> None:
        """A preview for the board; call on the replica's event loop. Fire and forget."""
        try:
            self.handle.show.remote(request_id, png)
        except Exception:  # noqa: BLE001 - progress must never fail a request
            log.debug("preview not sent", exc_info=True)

    def stepper(
        self,
        request_id: str | None,
        stage: str,
        preview_at: frozenset[int] = frozenset(),
        render: Callable[[Any], bytes] | None = None,
    ) -> Callable[[int, Any], bool]:
        """A per-step callback for a worker thread: hops to the event loop, throttled. Answers
        True once an interrupt or skip reached this replica: the pass stops early. After the
        steps in `preview_at` it also sends `render(latents)` (a preview PNG) to the board."""
        loop, last = asyncio.get_running_loop(), [0.0]
        previews = self.handle is not None and request_id is not None and render is not None

        def on_step(steps_done: int, latents: Any = None) -> bool:
            now = time.monotonic()
            if previews and latents is not None and steps_done in preview_at:
                try:
                    png = render(latents)  # in this worker thread: the event loop stays free
                except Exception:  # noqa: BLE001 - a preview must never fail a request
                    log.warning("preview of %s failed", request_id, exc_info=True)
                else:
                    loop.call_soon_threadsafe(self.show, request_id, png)
            if now - last[0] >= self.min_interval_s:
                last[0] = now
                loop.call_soon_threadsafe(self.mark, request_id, stage, steps_done)
            signal = self.signals.get(request_id) if request_id is not None else None
            if signal == "skip":  # handed over once: it stops this pass only
                self.signals.pop(request_id, None)
            return signal is not None

        return on_step
