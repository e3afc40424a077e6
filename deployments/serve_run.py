"""`serve run` that stops gracefully: `python -m deployments.serve_run CONFIG [serve run options]`
(what scripts/serve and scripts/demo run).

Plain `serve run` answers Ctrl-C (and `serve shutdown` any time) by shutting Serve down at once,
which in Ray 2.60 cuts every running request. Here SIGINT and SIGTERM first drain every ingress
(deployments/drain.py: running requests finish, new ones get a 503 with Retry-After), then hand over
to `serve run`'s own Ctrl-C path, which shuts Serve down and stops the local Ray it started. The
drain runs in a thread of this process, already connected to the cluster `serve run` started or
joined.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def main(argv: list[str]) -> None:
    from ray.serve.scripts import cli

    timeout_s = float(os.environ.get("HIRESFIX_STOP_TIMEOUT", "300"))

    started, drained = threading.Event(), threading.Event()

    def drain_then_interrupt() -> None:
        import ray

        try:
            if ray.is_initialized():  # else Serve never started: nothing to drain
                from deployments import drain

                print("stopping: draining running requests first", flush=True)
                drain.stop(timeout_s, say=lambda line: print(line, flush=True))
        finally:
            drained.set()
            os.kill(os.getpid(), signal.SIGINT)  # back to on_signal, in the main thread

    def on_signal(signum, frame):
        if drained.is_set():  # serve run's own Ctrl-C path: Serve down, its local Ray stopped
            raise KeyboardInterrupt
        # The drain calls Ray: not from a signal handler, which may run inside a Ray call of the
        # main thread (a re-entrant call aborts the process). A thread does it, then interrupts.
        # Signals meanwhile (a second Ctrl-C) do not cut it.
        if not started.is_set():
            started.set()
            threading.Thread(
                target=drain_then_interrupt, name="hiresfix-drain", daemon=True
            ).start()

    # Ray first, then our handlers: connecting installs Ray's own SIGTERM handlers (a bare
    # sys.exit, and a C++ one that aborts the process 3 s later), which would cut the drain.
    import ray

    address, argv = _pop_address(argv)
    ray.init(address=address, namespace="serve")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cli(["run", *argv], prog_name="serve")  # uses this connection


def _pop_address(argv: list[str]) -> tuple[str | None, list[str]]:
    """`serve run`'s --address/-a (default: $RAY_ADDRESS, else a new local Ray), and the rest."""
    rest, address = [], os.environ.get("RAY_ADDRESS") or None
    it = iter(argv)
    for arg in it:
        if arg in ("--address", "-a"):
            address = next(it, address)
        elif arg.startswith("--address="):
            address = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return address, rest


if __name__ == "__main__":
    main(sys.argv[1:])
