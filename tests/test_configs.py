"""Serve configs validate against Ray's own schema and ours (the k8s/ manifests: test_k8s.py)."""

from __future__ import annotations

import copy

import pydantic
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.graph import AppArgs
from tests import REPO

CONFIGS = ["serve_config.yaml", "serve_config.cpu.yaml"]


def load(name):
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_serve_config_validates_with_rays_schema(name):
    cfg = ServeDeploySchema.model_validate(load(name))
    app = cfg.applications[0]
    assert app.import_path == "deployments.graph:build_app"
    AppArgs.model_validate(app.args)  # our own args schema, extra keys forbidden
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Ingress", "SDXLBase", "Upscaler", "RefineFace", "Progress", "Jobs"}
    for d in deps.values():
        assert d.max_queued_requests and d.max_queued_requests > 0, f"{d.name}: unbounded queue"
        # A full queue answers 503 from Ray itself (our exception handler never sees it): only
        # backpressure_config puts the README's Retry-After on it.
        assert d.backpressure_config.retry_after_s, f"{d.name}: 503 without Retry-After"
    assert cfg.http_options.request_timeout_s, (
        "without a request timeout a stuck stage hangs clients"
    )


def test_cpu_profile_asks_for_no_gpu_and_listens_locally():
    cfg = load("serve_config.cpu.yaml")
    assert cfg["http_options"]["host"] == "127.0.0.1" and cfg["http_options"]["port"] == 7860
    for d in cfg["applications"][0]["deployments"]:
        assert d.get("ray_actor_options", {}).get("num_gpus", 0) == 0, d["name"]
    args = cfg["applications"][0]["args"]
    assert args["sdxl"]["source"] == "tiny" and args["upscaler"]["device"] == "cpu"


def test_gpu_profile_shares_a_gpu_and_autoscales_the_upscaler():
    deps = {d["name"]: d for d in load("serve_config.yaml")["applications"][0]["deployments"]}
    up = deps["Upscaler"]
    assert 0 < up["ray_actor_options"]["num_gpus"] < 1
    assert up["autoscaling_config"]["max_replicas"] > up["autoscaling_config"]["min_replicas"]
    total = sum(
        deps[n]["ray_actor_options"].get("num_gpus", 0)
        for n in ("SDXLBase", "Upscaler", "RefineFace")
    )
    assert total <= 1.0, "one copy of the graph must fit one GPU"
    args = load("serve_config.yaml")["applications"][0]["args"]
    assert args["upscaler"]["gpu_memory_fraction"] <= up["ray_actor_options"]["num_gpus"]
    assert args["upscaler"]["default"] == "RealESRGAN_x2plus"


def test_schema_validation_can_fail():
    """Guard against a validator that accepts anything (k8s/: tests/test_k8s.py)."""
    bad_cfg = load("serve_config.yaml")
    bad_cfg["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
    with pytest.raises(pydantic.ValidationError, match="max_ongoing_requests"):
        ServeDeploySchema.model_validate(bad_cfg)
    bad_args = copy.deepcopy(load("serve_config.yaml")["applications"][0]["args"])
    bad_args["upscaler"]["tile_sise"] = 256
    with pytest.raises(pydantic.ValidationError, match="tile_sise"):
        AppArgs.model_validate(bad_args)


@pytest.mark.parametrize("name", CONFIGS)
def test_ingress_refuses_before_serve_queues(name):
    # The ingress answers its own JSON 503 at http.max_in_flight: Serve's plain-text 503 (its
    # queue full) must be out of reach, so max_ongoing_requests sits above the ingress bound.
    app = load(name)["applications"][0]
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    assert ingress["max_ongoing_requests"] > AppArgs.model_validate(app["args"]).http.max_in_flight


def test_the_graph_imports_without_the_model_code():
    """`serve run`, each app's build on the controller and every redeploy import the graph: with
    torch and diffusers in it that took ~17 s of CPU each on 2 cores (3.7 s without). The model
    code loads in the model replicas only."""
    import subprocess
    import sys

    heavy = ("torch", "diffusers", "transformers", "spandrel", "cv2")
    script = f"import sys, deployments.graph; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def _deployments_of(args: dict) -> list[str]:
    from ray.serve._private.build_app import build_app as serve_build  # what `serve run` does

    from deployments.graph import build_app

    return sorted(d.name for d in serve_build(build_app(args), name="app").deployments)


def test_a_front_door_starts_no_stage_of_its_own():
    """`stages_from`: an Ingress and its Jobs queue calling another app's stages and board."""
    door = {"stages_from": "hiresfix", "offer": {"upscalers": ["RealESRGAN_x2plus"]}}
    assert _deployments_of(door) == ["Ingress", "Jobs"]
    full = load("serve_config.yaml")["applications"][0]["args"]
    assert _deployments_of(full) == [
        "Ingress",
        "Jobs",
        "Progress",
        "RefineFace",
        "SDXLBase",
        "Upscaler",
    ]
    # Settings that would be silently ignored are refused, naming what to change.
    with pytest.raises(pydantic.ValidationError, match=r"leave out \['face', 'sdxl'\]"):
        AppArgs.model_validate({**door, "sdxl": {}, "face": {}})
    board = {**door, "progress": {"keep_s": 5, "skip_s": 1}, "openai": {"results_ttl_s": 5}}
    with pytest.raises(pydantic.ValidationError, match=r"\['progress.keep_s', 'openai.results_"):
        AppArgs.model_validate(board)
    AppArgs.model_validate({**door, "progress": {"skip_s": 1}})  # the ingress's own side
    with pytest.raises(pydantic.ValidationError, match="offer is for an app with stages_from"):
        AppArgs.model_validate({**full, "offer": {"upscalers": []}})
