"""What an operator graphs: every hiresfix metric, defined here, recorded by the thin deployments.

Ray Serve's metrics API (`ray.serve.metrics`) exports them through each node's Prometheus endpoint
beside Serve's own `ray_serve_*` series. Ray prefixes every name with `ray_` and gives counters a
`_total` suffix, so `hiresfix_fallbacks` is scraped as `ray_hiresfix_fallbacks_total`
(`exported_names`). Serve adds the `deployment`, `replica` and `application` labels itself, and
fills `route` (the matched FastAPI route, e.g. `/generate`) from the request being served.

The facts come from the Ray-free code (an ImageBatch's timings, fallback and face outcome, an
UpscaleOutcome, a ModelInfo); recording them never fails a request (`_safe`). Metrics are made on
first use, inside the replica: made at import, they would miss Serve's labels.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hiresfix.metrics")

# Seconds: a tiny CPU pass takes 0.05 s, an SDXL hires pass on a CPU minutes.
LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]


METRICS: dict[str, Spec] = {
    "hiresfix_stage_seconds": Spec(
        "histogram",
        "Seconds per stage of an answered request (stage: base, refine, upscale, face, encode,"
        " decode, total); model: the upscaler that ran, for stage=upscale.",
        ("stage", "model", "route"),
    ),
    "hiresfix_images_generated": Spec(
        "counter", "Images generated (answered) by the SDXL base pass.", ("route",)
    ),
    "hiresfix_upscaled_megapixels": Spec(
        "counter",
        "Megapixels the upscaler produced, by the model that made them ('lanczos' included).",
        ("model",),
    ),
    "hiresfix_fallbacks": Spec(
        "counter",
        "Answers upscaled with LANCZOS instead of the neural model, by fallback_reason.",
        ("reason", "route"),
    ),
    "hiresfix_face_passes": Spec(
        "counter",
        "Face restoration passes by outcome: applied, or the reason code (no_face, out_of_memory,"
        " unavailable, ...).",
        ("outcome", "model", "route"),
    ),
    "hiresfix_cancellations": Spec(
        "counter",
        "Requests cancelled while their stages ran (client gone or request_timeout_s).",
        ("route",),
    ),
    "hiresfix_rejected_requests": Spec(
        "counter",
        "Requests answered 4xx or 503, by status and reason (the field the error names:"
        " authorization for 401/429, body for 413 and admission 503s, a request field for 422).",
        ("status", "reason", "route"),
    ),
    "hiresfix_jobs": Spec(
        "counter",
        "Async jobs (POST /jobs/{kind}) by event: submitted, refused (queue or store full),"
        " done, failed, cancelled, requeued (its runner was lost or a stage was full).",
        ("kind", "event"),
    ),
    "hiresfix_job_seconds": Spec(
        "histogram",
        "Seconds of a job that ended done, by phase: wait (submitted until its run began) and run.",
        ("kind", "phase"),
    ),
    # A histogram, not a gauge: Ray 2.60 drops a gauge that is not set again within two export
    # intervals, and a load happens once per replica start.
    "hiresfix_model_load_seconds": Spec(
        "histogram",
        "Seconds a replica took to load its models at start (stage: base, refine, upscale, face;"
        " model=all: every configured upscaler or face model at once).",
        ("stage", "model"),
    ),
    "hiresfix_warmup_seconds": Spec(
        "histogram",
        "Seconds a replica spent at start on one warm-up picture of a size (sdxl.warmup,"
        " upscaler.warmup; stage: base, refine, upscale; size: WxH the pass was given).",
        ("stage", "size"),
    ),
    "hiresfix_model_load_failures": Spec(
        "counter",
        "Configured models that did not load, by reason (weights_missing, error, ...).",
        ("stage", "model", "reason"),
    ),
    "hiresfix_gpu_memory_bytes": Spec(
        "gauge",
        "CUDA memory this replica holds (kind: allocated, reserved); absent without a GPU.",
        ("stage", "kind"),
    ),
}

# Serve's own series the dashboard (k8s/grafana-dashboard.json) uses, as scraped. All but the
# autoscaling one appear on any running app; that one only for deployments with autoscaling_config.
SERVE_BUILTINS = {
    "ray_serve_num_http_requests_total": "HTTP requests by route and code (proxy)",
    "ray_serve_num_http_error_requests_total": "HTTP answers >= 400 by route and code (proxy)",
    "ray_serve_http_request_latency_ms_bucket": "end-to-end latency at the proxy",
    "ray_serve_deployment_processing_latency_ms_bucket": "time in a replica per call",
    "ray_serve_replica_processing_queries": "calls running on each replica",
    "ray_serve_deployment_queued_queries": "calls waiting for a replica",
    "ray_serve_deployment_replica_healthy": "1 per healthy replica",
}
SERVE_AUTOSCALING_BUILTINS = {
    "ray_serve_autoscaling_target_replicas": "replicas the autoscaler wants, per deployment",
}


def exported_names(name: str) -> set[str]:
    """The Prometheus series names one of METRICS is scraped under."""
    full, kind = f"ray_{name}", METRICS[name].kind
    if kind == "counter":
        return {f"{full}_total"}
    if kind == "histogram":
        return {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
    return {full}


@functools.cache
def _metric(name: str):
    from ray.serve import metrics

    spec = METRICS[name]
    if spec.kind == "histogram":
        return metrics.Histogram(name, spec.description, LATENCY_BOUNDS, tag_keys=spec.tags)
    cls = metrics.Counter if spec.kind == "counter" else metrics.Gauge
    return cls(name, spec.description, tag_keys=spec.tags)


def _safe(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a metric must never fail or slow a request
            log.debug("metric not recorded: %s", fn.__name__, exc_info=True)

    return wrapper


def _tags(**tags: Any) -> dict[str, str]:
    # `route` is left out: Serve fills it from the request context (the matched route).
    return {k: "" if v is None else str(v) for k, v in tags.items()}


# ----------------------------------------------------------------------------- the ingress
@_safe
def record_answer(batch) -> None:
    """An answered request (an ImageBatch): its stage timings, images, fallback and face pass."""
    hist = _metric("hiresfix_stage_seconds")
    for stage, seconds in batch.timings.items():
        model = batch.upscaler_used if stage == "upscale" else None
        hist.observe(float(seconds), tags=_tags(stage=stage, model=model))
    generated = sum(s is not None for s in batch.seeds)
    if generated:
        _metric("hiresfix_images_generated").inc(generated, tags={})
    if batch.fallback_reason is not None:
        reason = getattr(batch.fallback_reason, "value", batch.fallback_reason)
        _metric("hiresfix_fallbacks").inc(tags=_tags(reason=reason))
    face = batch.face_restoration
    if face.applied or face.reason:  # a pass was asked for
        outcome = "applied" if face.applied else face.reason.split(":", 1)[0].strip()
        _metric("hiresfix_face_passes").inc(tags=_tags(outcome=outcome, model=face.model))


@_safe
def record_cancelled() -> None:
    _metric("hiresfix_cancellations").inc(tags={})


@_safe
def record_job(kind: str, event: str, wait_s: float | None = None, run_s: float | None = None):
    """One job event (deployments/jobs.py); a finished job also records its wait and run."""
    _metric("hiresfix_jobs").inc(tags=_tags(kind=kind, event=event))
    for phase, seconds in (("wait", wait_s), ("run", run_s)):
        if seconds is not None:
            _metric("hiresfix_job_seconds").observe(
                max(0.0, seconds), tags=_tags(kind=kind, phase=phase)
            )


@_safe
def record_rejection(status: int, field: str) -> None:
    """A 4xx or 503 answer; `field` is the one the error body names (bounded: see _reason)."""
    if status < 400 or status == 500 or status > 503:
        return
    _metric("hiresfix_rejected_requests").inc(
        tags=_tags(status=status, reason=_reason(status, field))
    )


def _reason(status: int, field: str) -> str:
    """The field as a label value, from a closed set: a client's unknown field name would grow the
    series without bound."""
    first = (field or "body").split(".", 1)[0]
    return first if first in _known_fields() else "other"


@functools.cache
def _known_fields() -> frozenset[str]:
    """Every field name (and alias) of the request models the routes read, plus the error fields
    that are no request field (headers, body, path)."""
    from pydantic import BaseModel

    from hiresfix import a1111, openai_api, schemas

    names = {"body", "authorization", "x-request-id", "request_id", "path", "method", "service"}
    for module in (schemas, a1111, openai_api):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseModel):
                for fname, f in obj.model_fields.items():
                    names.update(
                        n for n in (fname, f.alias, f.validation_alias) if isinstance(n, str)
                    )
    return frozenset(names)


# ----------------------------------------------------------------------------- the stages
@_safe
def record_upscaled(outcomes: Iterable) -> None:
    """UpscaleOutcomes of one upscaler call: megapixels by the model that made them."""
    counter = _metric("hiresfix_upscaled_megapixels")
    for o in outcomes:
        mp = o.picture.width * o.picture.height / 1e6
        counter.inc(mp, tags=_tags(model=o.upscaler_used))


@_safe
def record_load(stage: str, model: str, seconds: float) -> None:
    _metric("hiresfix_model_load_seconds").observe(seconds, tags=_tags(stage=stage, model=model))
    record_gpu_memory(stage)


@_safe
def record_warmup(stage: str, seconds: dict[str, float]) -> None:
    for size, s in seconds.items():
        log.info("%s warmed up at %s in %.2f s", stage, size, s)
        _metric("hiresfix_warmup_seconds").observe(s, tags=_tags(stage=stage, size=size))


@_safe
def record_load_failure(stage: str, model: str, reason: str) -> None:
    _metric("hiresfix_model_load_failures").inc(tags=_tags(stage=stage, model=model, reason=reason))


def record_model_infos(stage: str, infos: Iterable) -> None:
    """GET /models entries (ModelInfo) of the models a stage loaded: each unavailable one is a
    failure under its reason."""
    for m in infos:
        if not m.available:
            record_load_failure(stage, m.name, m.reason or "error")


class timed_load:
    """`with timed_load("base", name):` records the load's seconds, or a failure that re-raises."""

    def __init__(self, stage: str, model: str):
        self.stage, self.model = stage, model

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            record_load(self.stage, self.model, time.perf_counter() - self.t0)
        elif issubclass(exc_type, Exception):
            record_load_failure(self.stage, self.model, "error")
        return False


GPU_SAMPLE_S = 5.0  # Ray drops a gauge not set again within 2 export intervals (20 s)
_gpu_sampled: set[str] = set()


@_safe
def record_gpu_memory(stage: str) -> None:
    """This replica's CUDA memory now, and every GPU_SAMPLE_S from a daemon thread, when torch is
    loaded and sees a GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    _sample_gpu(torch, stage)
    if stage not in _gpu_sampled:
        _gpu_sampled.add(stage)
        threading.Thread(
            target=_gpu_loop, args=(torch, stage), daemon=True, name="hiresfix-gpu-metrics"
        ).start()


def _gpu_loop(torch, stage: str) -> None:
    while True:
        time.sleep(GPU_SAMPLE_S)
        _sample_gpu(torch, stage)


@_safe
def _sample_gpu(torch, stage: str) -> None:
    gauge = _metric("hiresfix_gpu_memory_bytes")
    gauge.set(torch.cuda.memory_allocated(), tags=_tags(stage=stage, kind="allocated"))
    gauge.set(torch.cuda.memory_reserved(), tags=_tags(stage=stage, kind="reserved"))


# ----------------------------------------------------------------------------- logs
def use_serve_logging() -> None:
    """Send our `hiresfix.*` log lines through the replica's Serve logger handlers, so each carries
    the request id (and route, app) Serve's context filter adds, lands in the replica's log file,
    and is JSON where logging_config says `encoding: JSON`. Without this they go to the worker's
    plain stderr with none of that. Call in a deployment's __init__, after Serve set its logger up.
    """
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("hiresfix")
    if not serve_logger.handlers:
        return
    ours.handlers = list(serve_logger.handlers)
    ours.setLevel(serve_logger.level or logging.INFO)
    ours.propagate = False


def batch_request_ids() -> str:
    """In a @serve.batch method: the ids of the requests it holds, comma-joined. The batch runs in
    a task of its own, whose request context (what the log filter reads) names no request."""
    try:
        from ray.serve import context

        batch = context._get_serve_batch_request_context()  # private, hence guarded
        return ",".join(dict.fromkeys(c.request_id for c in batch if c.request_id))
    except Exception:  # noqa: BLE001 - a log detail, never a failure
        return ""


def with_request_ids(request_ids: str, fn: Callable) -> Callable:
    """`fn` for asyncio.to_thread with `request_ids` as the request context of its log lines; set
    inside the thread's own copy of the context, so it never leaks into the batch task."""

    def run(*args, **kwargs):
        if request_ids:
            try:
                from ray.serve import context

                context._set_request_context(request_id=request_ids)
            except Exception:  # noqa: BLE001
                pass
        return fn(*args, **kwargs)

    return run
