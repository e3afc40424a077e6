"""Cancelling a request stops its model thread at the next step (deployments/cancel.py, no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.cancel import run_cancellable


def test_cancel_stops_the_worker_thread_and_holds_the_slot_until_then():
    steps = []

    def work(on_step):
        for i in range(200):
            time.sleep(0.01)
            steps.append(i)
            on_step(i, 999 - i)
        return "finished"

    async def main():
        task = asyncio.ensure_future(run_cancellable(work, "test"))
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped_at = len(steps)
        await asyncio.sleep(0.2)
        return stopped_at

    stopped_at = asyncio.run(main())
    assert 3 <= stopped_at < 60  # stopped soon after the cancel...
    assert len(steps) == stopped_at  # ...and the thread was already done when the cancel returned


def test_uncancelled_work_returns_its_result_and_errors_propagate():
    assert asyncio.run(run_cancellable(lambda on_step: (on_step(0, 1), 42)[1], "ok")) == 42

    def boom(on_step):
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        asyncio.run(run_cancellable(boom, "boom"))
