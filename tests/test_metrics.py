"""Metrics an operator graphs: our `hiresfix_*` series on Ray's real Prometheus endpoint, caused by
requests the test sends, and a Grafana dashboard that names only series that exist."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import (
    METRICS,
    SERVE_AUTOSCALING_BUILTINS,
    SERVE_BUILTINS,
    _reason,
    exported_names,
)
from tests import REPO
from tests.serve_harness import API_KEYS

DASHBOARD = REPO / "k8s" / "grafana-dashboard.json"
TINY = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 7}
# Ray's metrics agent exports what replicas recorded every few seconds (~9 s measured here).
EXPORT_WAIT_S = 90


# ----------------------------------------------------------------------------- Ray-free
def dashboard_series(dashboard: dict) -> dict[str, set[str]]:
    """Panel title -> the Prometheus series names its queries read."""
    out = {}
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            continue
        exprs = [t["expr"] for t in panel.get("targets", [])]
        out[panel["title"]] = {m for e in exprs for m in re.findall(r"\bray_[a-z0-9_]+\b", e)}
    return out


def known_series() -> set[str]:
    ours = set().union(*(exported_names(n) for n in METRICS))
    return ours | set(SERVE_BUILTINS) | set(SERVE_AUTOSCALING_BUILTINS)


def unknown_in(dashboard: dict) -> dict[str, set[str]]:
    known = known_series()
    return {
        title: names - known
        for title, names in dashboard_series(dashboard).items()
        if names - known or not names
    }


def test_metric_names_are_ours():
    assert METRICS and all(n.startswith("hiresfix_") for n in METRICS)
    for name, spec in METRICS.items():
        assert spec.kind in ("counter", "gauge", "histogram"), name
        assert not name.endswith("_total"), f"{name}: Ray adds _total to counters itself"
        assert not {"deployment", "replica", "application"} & set(spec.tags), "Serve's labels"


def test_dashboard_reads_only_series_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    assert unknown_in(dashboard) == {}, "panels reading undefined series (or none)"
    variables = " ".join(v.get("definition", "") for v in dashboard["templating"]["list"])
    assert set(re.findall(r"\bray_[a-z0-9_]+\b", variables)) <= known_series()
    used = set().union(*dashboard_series(dashboard).values())
    for name in METRICS:  # every metric we define has a panel
        assert exported_names(name) & used, f"no panel shows {name}"
    # The check can fail: a misspelt series is caught.
    bad = json.loads(DASHBOARD.read_text())
    bad["panels"][1]["targets"][0]["expr"] = "sum(rate(ray_hiresfix_fallback_total[5m]))"
    assert unknown_in(bad) == {bad["panels"][1]["title"]: {"ray_hiresfix_fallback_total"}}


def test_rejection_reasons_are_a_closed_set():
    # A client's made-up field name must not become a new series.
    assert _reason(422, "width") == "width"
    assert _reason(422, "hr_scale") == "hr_scale"  # A1111's field names
    assert _reason(413, "body") == "body"
    assert _reason(401, "authorization") == "authorization"
    assert _reason(422, f"no_such_field_{uuid.uuid4().hex}") == "other"


# ----------------------------------------------------------------------------- live
def scrape(service) -> list:
    text = httpx.get(service.metrics_url, timeout=10).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples, name: str, **labels: str) -> float:
    """Sum over every sample of `name` whose labels include `labels` (all replicas)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for(service, checks: dict, timeout: float = EXPORT_WAIT_S) -> list:
    """Poll the endpoint until every check (label -> predicate over the samples) holds."""
    deadline, samples = time.time() + timeout, []
    while time.time() < deadline:
        samples = scrape(service)
        if all(check(samples) for check in checks.values()):
            return samples
        time.sleep(2)
    failed = [label for label, check in checks.items() if not check(samples)]
    ours = sorted({f"{s.name}{s.labels}" for s in samples if "hiresfix_" in s.name})
    raise AssertionError(
        f"not seen within {timeout}s: {failed}\nhiresfix series:\n" + "\n".join(ours)
    )


def declared_too_large(service, path: str) -> bytes:
    """POST headers declaring 50 MB and 1 KB of body; the answer's first bytes (the guard answers
    from Content-Length, before the body is sent)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * 1024 * 1024}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as s:
        s.sendall(head + b'{"image": "' + b"a" * 1000)
        return s.recv(64)


@pytest.mark.serve
def test_requests_show_up_on_the_prometheus_endpoint(service):
    app = {"application": "hiresfix"}
    before = scrape(service)

    def grew(name, by=1.0, **labels):
        start = value(before, name, **app, **labels)
        return lambda samples: value(samples, name, **app, **labels) >= start + by - 1e-6

    rid = f"metrics-{uuid.uuid4().hex[:12]}"
    # A fallback we provoke: a configured upscaler whose file is missing.
    r = httpx.post(
        f"{service.url}/generate",
        json={
            "prompt": "a lighthouse",
            **TINY,
            "num_images": 2,
            "hires_fix": True,
            "hires_scale": 1.5,
            "hires_steps": 1,
            "upscaler": "missing",
        },
        headers={"x-request-id": rid},
        timeout=300,
    )
    assert r.status_code == 200, r.text[:1000]
    assert r.json()["fallback_reason"] == "weights_missing"
    # A face pass whose model is not there: outcome weights_missing, the request succeeds.
    r = httpx.post(
        f"{service.url}/generate",
        json={
            "prompt": "a face",
            **TINY,
            "use_face_restoration": True,
            "face_model": "gfpgan-missing",
        },
        timeout=300,
    )
    assert r.status_code == 200 and not r.json()["face_restoration"]["applied"], r.text[:1000]
    # Rejections: a field out of bounds (422), a body over the limit (413), no API key (401).
    r = httpx.post(f"{service.url}/generate", json={"prompt": "x", "width": 99999}, timeout=30)
    assert r.status_code == 422, r.text[:500]
    assert declared_too_large(service, "/upscale").startswith(b"HTTP/1.1 413")
    r = httpx.post(f"{service.url}/nolib/generate", json={"prompt": "x", **TINY}, timeout=30)
    assert r.status_code == 401, r.text[:500]
    assert API_KEYS  # the nolib app has keys on: the 401 above is the guard's

    # An async job: submitted, then done, with its wait and run times.
    r = httpx.post(f"{service.url}/jobs/generate", json={"prompt": "a job", **TINY}, timeout=30)
    assert r.status_code == 202, r.text[:500]

    mp = 2 * 96 * 96 / 1e6  # two 64 px images at hires_scale 1.5, upscaled by LANCZOS
    samples = wait_for(
        service,
        {
            "fallback weights_missing": grew(
                "ray_hiresfix_fallbacks_total", reason="weights_missing", route="/generate"
            ),
            "images generated": grew("ray_hiresfix_images_generated_total", by=3),
            "upscaled megapixels": grew(
                "ray_hiresfix_upscaled_megapixels_total", by=mp, model="lanczos"
            ),
            "base latency": grew("ray_hiresfix_stage_seconds_count", by=2, stage="base"),
            "upscale latency": grew(
                "ray_hiresfix_stage_seconds_count", stage="upscale", model="lanczos"
            ),
            "encode latency": grew("ray_hiresfix_stage_seconds_count", by=2, stage="encode"),
            "face outcome": grew(
                "ray_hiresfix_face_passes_total", outcome="weights_missing", model="gfpgan-missing"
            ),
            "422 width": grew(
                "ray_hiresfix_rejected_requests_total",
                status="422",
                reason="width",
                route="/generate",
            ),
            "413 body": grew("ray_hiresfix_rejected_requests_total", status="413", reason="body"),
            "job submitted": grew("ray_hiresfix_jobs_total", kind="generate", event="submitted"),
            "job done": grew("ray_hiresfix_jobs_total", kind="generate", event="done"),
            "job run time": grew("ray_hiresfix_job_seconds_count", kind="generate", phase="run"),
            "job wait time": grew("ray_hiresfix_job_seconds_count", kind="generate", phase="wait"),
            "401 nolib": lambda s: (
                value(
                    s,
                    "ray_hiresfix_rejected_requests_total",
                    application="nolib",
                    status="401",
                    reason="authorization",
                )
                >= 1
            ),
        },
    )
    # Facts from start-up: each replica's load time, and the configured models that failed.
    for stage in ("base", "refine", "upscale", "face"):
        assert value(samples, "ray_hiresfix_model_load_seconds_count", stage=stage, **app) >= 1
        assert value(samples, "ray_hiresfix_model_load_seconds_sum", stage=stage, **app) > 0
    # sdxl.warmup (tests/serve_harness.py: 64x64): the base pass, and the hires pass at x2;
    # upscaler.warmup: one full 128 px tile.
    for stage, size in (("base", "64x64"), ("refine", "128x128"), ("upscale", "128x128")):
        warmed = value(samples, "ray_hiresfix_warmup_seconds_count", stage=stage, size=size, **app)
        assert warmed >= 1, (stage, size)
    for stage, model, reason in [
        ("upscale", "missing", "weights_missing"),
        ("face", "gfpgan-missing", "weights_missing"),
    ]:
        assert (
            value(
                samples,
                "ray_hiresfix_model_load_failures_total",
                stage=stage,
                model=model,
                reason=reason,
                **app,
            )
            >= 1
        ), (stage, model)
    assert (
        value(
            samples, "ray_hiresfix_model_load_failures_total", model="realesr-animevideov3", **app
        )
        == 0
    )
    # No GPU here: no GPU memory series (the gauge is only set where CUDA exists).
    assert value(samples, "ray_hiresfix_gpu_memory_bytes") == 0
    # Serve's own series the dashboard reads are there too (autoscaling ones need autoscaling).
    names = {s.name for s in samples}
    assert set(SERVE_BUILTINS) <= names, set(SERVE_BUILTINS) - names


@pytest.mark.serve
def test_stage_log_lines_carry_the_request_id(service):
    """A warning logged by model code inside a stage (the upscaler failing on purpose) goes out
    through Serve's logger, with the request's id on the line."""
    rid = f"logline-{uuid.uuid4().hex[:12]}"
    r = httpx.post(
        f"{service.url}/generate",
        json={
            "prompt": "a boat",
            **TINY,
            "hires_fix": True,
            "hires_scale": 1.5,
            "hires_steps": 1,
            "upscaler": "chaos-error",
        },
        headers={"x-request-id": rid},
        timeout=300,
    )
    assert r.status_code == 200 and r.json()["fallback_reason"] == "error", r.text[:500]
    deadline, lines = time.time() + 30, []
    while time.time() < deadline and not lines:
        lines = [ln for ln in service.log_tail(2_000_000).splitlines() if rid in ln]
        time.sleep(1)
    upscaler = [ln for ln in lines if "Upscaler" in ln and "chaos-error" in ln]
    assert upscaler, "no Upscaler line with the request id:\n" + "\n".join(lines[-20:])
