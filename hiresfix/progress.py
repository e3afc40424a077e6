"""Progress of running /generate requests: what A1111's progress bar and ComfyUI's websocket show.

The ingress opens an entry with the request's plan (hiresfix/plan.py: steps per stage, in order),
the stages report steps as they run, and GET /progress/{request_id} reads it. Progress counts
denoising steps; the upscale and face passes count as one step each. A report for a later stage
means every earlier one is finished, so dropped or throttled reports never leave the bar behind.
Ray-free: the Progress deployment only wraps a ProgressBoard.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from hiresfix.schemas import ProgressInfo

MAX_PREVIEWS = 10  # GenerateRequest.previews' bound
PREVIEW_KEEP_S = 30.0  # a finished request's previews are read by then (a stream's last ones)


class ProgressSettings(BaseModel):
    """serve_config `args.progress`: how long the board remembers, and how hard stages may lean
    on it."""

    model_config = ConfigDict(extra="forbid")
    keep_s: float = Field(600.0, gt=0, description="How long a finished request stays readable.")
    max_entries: int = Field(
        10_000, ge=1, description="Most requests remembered; the oldest go first."
    )
    report_interval_s: float = Field(0.25, ge=0, description="A stage reports at most this often.")
    begin_timeout_s: float = Field(
        2.0,
        gt=0,
        description="The ingress waits this long to open an entry, then serves without one.",
    )
    read_timeout_s: float = Field(
        5.0, gt=0, description="GET /progress waits this long for the board."
    )
    skip_s: float = Field(
        10.0, ge=0, description="After the board failed to answer, requests skip it this long."
    )


@dataclass
class _Entry:
    plan: dict[str, int]
    started: float
    done: dict[str, int] = field(default_factory=dict)  # steps finished per stage
    stage: str | None = None
    state: str = "running"
    detail: str | None = None
    finished: float | None = None
    tag: str | None = None  # who started it, for A1111's caller-wide progress and interrupt
    signal: str | None = None  # "interrupt" or "skip", handed to the stage at its next report
    previews: list[bytes] = field(default_factory=list)  # PNGs, at most the request's `previews`


class ProgressBoard:
    """Thread-safe; keeps finished entries `keep_s` seconds and at most `max_entries` in all."""

    def __init__(
        self,
        keep_s: float = ProgressSettings.model_fields["keep_s"].default,
        max_entries: int = ProgressSettings.model_fields["max_entries"].default,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.keep_s, self.max_entries, self.clock = keep_s, max_entries, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def begin(self, request_id: str, plan: dict[str, int], tag: str | None = None) -> bool:
        """Open an entry; False when a running request already uses this id."""
        with self._lock:
            self._evict()
            old = self._entries.get(request_id)
            if old is not None and old.state == "running":
                return False
            self._entries.pop(request_id, None)
            self._entries[request_id] = _Entry(
                plan={k: max(1, v) for k, v in plan.items()}, started=self.clock(), tag=tag
            )
            return True

    def report(self, request_id: str, stage: str, steps_done: int) -> str | None:
        """Record a stage's steps; answers the signal waiting for it (a skip is handed over once,
        an interrupt stays: every later pass stops too)."""
        with self._lock:
            e = self._entries.get(request_id)
            if e is None or e.state != "running" or stage not in e.plan:
                return None  # unknown (never begun, or evicted) or already over: nothing to show
            for earlier in list(e.plan)[: list(e.plan).index(stage)]:
                e.done[earlier] = e.plan[earlier]
            e.done[stage] = max(e.done.get(stage, 0), min(steps_done, e.plan[stage]))
            e.stage = stage
            signal = e.signal
            if signal == "skip":
                e.signal = None
            return signal

    def show(self, request_id: str, png: bytes) -> None:
        """A stage's preview of the running pass: only the latest is kept."""
        with self._lock:
            e = self._entries.get(request_id)
            if e is not None and e.state == "running" and len(e.previews) < MAX_PREVIEWS:
                e.previews.append(png)

    def signal(self, tag: str, kind: str) -> list[str]:
        """A1111's interrupt / skip: flag every running request of `tag`; the stages stop early
        at their next report. Returns the ids flagged."""
        with self._lock:
            ids = [r for r, e in self._entries.items() if e.tag == tag and e.state == "running"]
            for r in ids:
                if self._entries[r].signal != "interrupt":  # an interrupt outranks a skip
                    self._entries[r].signal = kind
            return ids

    def current(self, tag: str, preview: bool = False) -> ProgressInfo | None:
        """The latest running request of `tag` (A1111's single 'current job'), or None."""
        with self._lock:
            ids = [r for r, e in self._entries.items() if e.tag == tag and e.state == "running"]
        return self.get(ids[-1], preview) if ids else None

    def end(self, request_id: str, state: str, detail: str | None = None) -> None:
        with self._lock:
            e = self._entries.get(request_id)
            if e is None or e.state != "running":
                return
            e.state, e.detail, e.finished = state, detail, self.clock()
            if state == "done":
                e.done = dict(e.plan)

    def get(self, request_id: str, preview: bool = False) -> ProgressInfo | None:
        """`preview`: with the latest preview, base64."""
        with self._lock:
            self._evict()
            e = self._entries.get(request_id)
            if e is None:
                return None
            total = sum(e.plan.values())
            fraction = sum(e.done.values()) / total
            if e.state == "running":
                fraction = min(fraction, 0.99)  # every step done, the answer still being encoded
            now = e.finished if e.finished is not None else self.clock()
            elapsed = now - e.started
            eta = (
                elapsed * (1 - fraction) / fraction
                if e.state == "running" and fraction > 0
                else None
            )
            return ProgressInfo(
                request_id=request_id,
                state=e.state,
                stage=e.stage,
                step=e.done.get(e.stage, 0) if e.stage else 0,
                stage_steps=e.plan.get(e.stage, 0) if e.stage else 0,
                progress=round(fraction, 4),
                elapsed_s=round(elapsed, 2),
                eta_s=None if eta is None else round(eta, 1),
                plan=dict(e.plan),
                detail=e.detail,
                signal=e.signal,
                previews=len(e.previews),
                preview=base64.b64encode(e.previews[-1]).decode()
                if preview and e.previews
                else None,
            )

    def previews(self, request_id: str, start: int = 0) -> list[bytes] | None:
        """The request's previews from the `start`-th on (OpenAI's partial images); None when the
        request is unknown."""
        with self._lock:
            e = self._entries.get(request_id)
            return None if e is None else e.previews[start:]

    def _evict(self) -> None:
        now = self.clock()
        for e in self._entries.values():  # previews are for watching a request run: drop them soon
            if e.finished is not None and e.previews and now - e.finished > PREVIEW_KEEP_S:
                e.previews = []
        for rid in [
            r
            for r, e in self._entries.items()
            if e.finished is not None and now - e.finished > self.keep_s
        ]:
            del self._entries[rid]
        while len(self._entries) > self.max_entries:  # oldest first, finished or not
            self._entries.popitem(last=False)
