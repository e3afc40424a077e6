"""Run blocking model code off a replica's event loop, and stop it when its request is cancelled.

Serve cancels a request's asyncio task when the client disconnects or request_timeout_s fires, but
a thread cannot be killed: without this the denoising loop ran to the end while Serve had already
freed the slot, so max_ongoing_requests no longer bounded the work really running (on a GPU: OOM).
The model code calls `on_step` once per denoising step; after a cancel it raises there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("hiresfix.serve")


class RequestCancelled(Exception):
    """Raised inside the worker thread at the next step after the request was cancelled."""


async def run_cancellable(
    work: Callable[[Callable[..., bool]], T],
    what: str,
    progress: Callable[[int, Any], bool | None] | None = None,
) -> T:
    """`progress(steps_done, latents)` is called from the worker thread after each step; when it
    answers True (an A1111 interrupt or skip), the model code stops early and keeps what it has."""
    return await _until_stopped(lambda on_step: asyncio.to_thread(work, on_step), what, progress)


async def run_batched(
    submit: Callable[[Callable[..., bool]], Awaitable[T]],
    what: str,
    progress: Callable[[int, Any], bool | None] | None = None,
) -> T:
    """The same for a job that shares one model call with other requests' (`submit(on_step)`
    awaits a @serve.batch method). After a cancel its on_step raises at the next step, which drops
    only this job from the call; the slot is kept until the shared call ends, since the call
    still computes this job's rows."""
    return await _until_stopped(submit, what, progress)


async def _until_stopped(
    start: Callable[[Callable[..., bool]], Awaitable[T]],
    what: str,
    progress: Callable[[int, Any], bool | None] | None,
) -> T:
    stop = threading.Event()
    steps = [0]

    def on_step(step: int, _timestep: int, latents: Any = None) -> bool:
        steps[0] = step + 1
        early = progress(steps[0], latents) if progress is not None else False
        if stop.is_set():
            raise RequestCancelled(f"{what} cancelled at step {steps[0]}")
        return bool(early)

    task = asyncio.ensure_future(start(on_step))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        # Keep the replica slot until the work has really stopped (alone: one step away).
        await asyncio.wait([task])
        log.warning(
            "%s cancelled by the client or its timeout; stopped after step %d", what, steps[0]
        )
        raise
