"""Progress of /generate requests: one small deployment holds the board, stages report to it.

One replica (serve_config.yaml), so every ingress replica reads what every stage replica wrote.
Stages report fire-and-forget and at most a few times a second: a lost report only delays the bar,
and a failing Progress replica never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from hiresfix.progress import ProgressBoard
from hiresfix.schemas import ProgressInfo

log = logging.getLogger("hiresfix.progress")


@serve.deployment(name="Progress")
class Progress:
    def __init__(self, keep_s: float = 600.0):
        self.board = ProgressBoard(keep_s=keep_s)

    def begin(self, request_id: str, plan: dict[str, int]) -> bool:
        return self.board.begin(request_id, plan)

    def report(self, request_id: str, stage: str, steps_done: int) -> None:
        self.board.report(request_id, stage, steps_done)

    def end(self, request_id: str, state: str, detail: str | None = None) -> None:
        self.board.end(request_id, state, detail)

    def get(self, request_id: str) -> ProgressInfo | None:
        return self.board.get(request_id)


class Reporter:
    """A stage replica's side: reports from the event loop or, throttled, from a denoising thread."""

    def __init__(self, handle: DeploymentHandle | None, min_interval_s: float = 0.25):
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
