"""The Kubernetes manifests in k8s/: every document validates against its schema (RayService
against KubeRay's CRD schema in ../shared/k8s, core objects against Kubernetes' own from
kubernetes-validate, strict: an unknown field fails), and they agree with serve_config.yaml and
with each other."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from tests import REPO

K8S = REPO / "k8s"
SCHEMA = REPO.parent / "shared" / "k8s" / "rayservice-v1.schema.json"
KUBERNETES = "1.33"  # the oldest Kubernetes these manifests target (KubeRay 1.4+ clusters)
# Custom resources whose schema is not Kubernetes' own: RayService is checked against KubeRay's
# (test_rayservice_validates_and_embeds_the_serve_config); PodMonitor against the fields used.
CUSTOM = {"RayService", "PodMonitor"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def rayservice() -> dict:
    (doc,) = by_kind("RayService")
    return doc


def cluster() -> dict:
    return rayservice()["spec"]["rayClusterConfig"]


def groups() -> list[dict]:
    return [cluster()["headGroupSpec"], *cluster()["workerGroupSpecs"]]


def serve_config() -> dict:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def rayservice_validator():
    assert SCHEMA.is_file(), f"KubeRay schema missing at {SCHEMA}: CI needs ../shared/k8s"
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def validate_core(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


# ----------------------------------------------------------------------------- schemas
@pytest.mark.parametrize(
    "name,doc",
    [(n, d) for n, d in documents() if d["kind"] not in CUSTOM],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_core_objects_validate_against_kubernetes_schemas(name, doc):
    validate_core(doc)


def test_every_document_is_checked():
    kinds = {d["kind"] for _, d in documents()}
    assert {
        "RayService",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "NetworkPolicy",
        "PodMonitor",
    } <= kinds, kinds
    # The Kustomization lists every manifest that is applied; the example Secrets and the
    # PodMonitor (it needs the Prometheus Operator) stay out.
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in listed), listed
    applied = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == applied - {"secrets.example.yaml", "podmonitor.yaml"}


def test_validation_can_fail():
    """Guard against validators that accept anything."""
    (pdb, *_) = by_kind("PodDisruptionBudget")
    bad = copy.deepcopy(pdb)
    bad["spec"]["maxUnavailabel"] = 1  # strict: an unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(bad)
    (deployment,) = by_kind("Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(bad)
    bad = copy.deepcopy(rayservice())
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        rayservice_validator().validate(bad)


def test_rayservice_validates_and_embeds_the_serve_config():
    manifest = rayservice()
    rayservice_validator().validate(manifest)
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == serve_config(), "serveConfigV2 drifted: run scripts/render_k8s.py"


def test_render_script_is_the_one_path(tmp_path):
    """scripts/render_k8s.py leaves an up-to-date manifest byte for byte as it is."""
    before = (K8S / "rayservice.yaml").read_text()
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (K8S / "rayservice.yaml").read_text() == before


# ----------------------------------------------------------------------------- what they say
def test_gcs_fault_tolerance_on_the_redis_we_ship():
    ft = cluster()["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    (redis,) = by_kind("Deployment")
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # Redis and the head read one password Secret.
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert ref["name"] in {s["metadata"]["name"] for s in by_kind("Secret")}
    # Workers wait for a restarted head longer than Ray's default 60 s.
    for group in cluster()["workerGroupSpecs"]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]) >= 120


def test_gpu_workers_fit_every_deployment_at_its_peak():
    spec = cluster()
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    for g in gpu_groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == g["rayStartParams"]["num-gpus"]
    deployments = serve_config()["applications"][0]["deployments"]
    peak = sum(
        d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1))
        * d["ray_actor_options"].get("num_gpus", 0)
        for d in deployments
    )
    room = sum(g["maxReplicas"] * float(g["rayStartParams"]["num-gpus"]) for g in gpu_groups)
    assert peak <= room, (peak, room)
    upscaler = next(d for d in deployments if d["name"] == "Upscaler")
    assert 0 < upscaler["ray_actor_options"]["num_gpus"] < 1, "the upscaler shares a GPU"


def test_every_container_has_requests_limits_and_probes():
    pods = [g["template"] for g in groups()] + [
        d["spec"]["template"] for d in by_kind("Deployment")
    ]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= res["requests"].keys() <= res["limits"].keys(), c["name"]
            assert c["readinessProbe"] and c["livenessProbe"], c["name"]


def test_worker_readiness_checks_the_serve_proxy_on_our_port():
    """KubeRay's default worker probe asks Serve's port 8000; ours is where http_options say."""
    port = serve_config()["http_options"]["port"]
    for group in cluster()["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        probe = " ".join(container["readinessProbe"]["exec"]["command"])
        assert f"localhost:{port}/-/healthz" in probe and "local_raylet_healthz" in probe


def test_scale_down_grace_covers_graceful_shutdown():
    longest = max(
        d.get("graceful_shutdown_timeout_s", 20)
        for d in serve_config()["applications"][0]["deployments"]
    )
    for group in cluster()["workerGroupSpecs"]:
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > longest
    # An upgrade (a new cluster) deletes the old one only after its requests could finish.
    spec = rayservice()["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    assert (
        spec["rayClusterDeletionDelaySeconds"] > serve_config()["http_options"]["request_timeout_s"]
    )


def test_pod_disruption_budgets_select_ray_pods():
    labels = [g["template"]["metadata"]["labels"] for g in cluster()["workerGroupSpecs"]]
    for pdb in by_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(selector <= lab.items() for lab in labels), pdb["metadata"]["name"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_volumes_are_claims_we_ship():
    claims = {c["metadata"]["name"] for c in by_kind("PersistentVolumeClaim")}
    pods = [g["template"] for g in groups()] + [
        d["spec"]["template"] for d in by_kind("Deployment")
    ]
    used = {
        v["persistentVolumeClaim"]["claimName"]
        for pod in pods
        for v in pod["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert {"hiresfix-models", "hiresfix-compile-cache", "hiresfix-redis-data"} <= used <= claims
    gpu = cluster()["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m for m in gpu["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True


def test_api_keys_come_from_a_secret_never_from_yaml():
    for group in groups():
        env = {e["name"]: e for c in group["template"]["spec"]["containers"] for e in c["env"]}
        assert env["HIRESFIX_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "hiresfix-api-keys"
    assert "hiresfix-api-keys" in {s["metadata"]["name"] for s in by_kind("Secret")}
    for name in ("serve_config.yaml", "serve_config.cpu.yaml"):
        cfg = yaml.safe_load((REPO / name).read_text())
        assert "HIRESFIX_API_KEYS" not in yaml.safe_dump(cfg["applications"])


def test_production_logs_are_json():
    assert serve_config()["logging_config"]["encoding"] == "JSON"


def test_pods_export_metrics_where_the_podmonitor_scrapes():
    (monitor,) = by_kind("PodMonitor")
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    for group in groups():
        pod = group["template"]
        assert selector <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert str(ports[port]) == group["rayStartParams"]["metrics-export-port"]
