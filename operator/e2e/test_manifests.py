"""The Helm chart, the operator's builders and the example ChatCluster, checked against schemas.

Helm 4 renders and lints the chart (helm-python-sdk); kubernetes-validate checks every rendered
object and every builder output against the Kubernetes 1.37 schemas in strict mode (unknown
fields are errors); the ChatCluster objects are checked against the CRD's own openAPIV3Schema.
"""

import os
import pathlib
import subprocess
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/confab-operator"
BINARY = os.environ.get("CONFAB_OPERATOR_BIN", str(ROOT / "target/debug/confab-operator"))
KUBERNETES = "1.37.0"

FULL_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/confab/confab-operator", "tag": "0.1.0", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "replicaCount": 3,
    "leaderElection": True,
    "logFormat": "text",
    "logLevel": "debug,kube=info",
    "metrics": {"port": 9090},
    "serviceAccount": {"create": True, "name": "confab-op", "annotations": {"example.com/role": "operator"}},
    "podAnnotations": {"example.com/team": "chat"},
    "podLabels": {"team": "chat"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "chat", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
    "demo": {"enabled": True, "name": "demo", "gatewayImage": "confab-gateway:dev", "replicas": 3,
             "jwtSecret": {"name": "auth", "key": "jwt"}, "postgresUrlSecret": {"name": "pg", "key": "url"},
             "managedRedis": True, "managedRabbitmq": True},
}


def crd() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all((ROOT / "crds/chatcluster.yaml").read_text()) if d)


def chatcluster_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate_object(obj: dict[str, Any]) -> None:
    """Kubernetes 1.37 strict schema for built-in kinds; the CRD's schema for ChatClusters."""
    if obj["kind"] == "ChatCluster":
        assert obj["apiVersion"] == "confab.dev/v1alpha1"
        jsonschema.validate({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}, chatcluster_schema())
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def rendered_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(CHART).render(values, name="confab", namespace="confab-system", is_install=True)
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [d for d in yaml.safe_load_all(text) if d]
    return objects


def test_validator_has_the_newest_kubernetes_schemas() -> None:
    assert kubernetes_validate.latest_version() == KUBERNETES


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "full"])
def test_chart_lints_without_errors_or_warnings(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace="confab-system", kube_version="v1.37.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "full"])
def test_every_rendered_object_is_valid_for_kubernetes(values: dict[str, Any]) -> None:
    objects = rendered_objects(values)
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    if values.get("demo", {}).get("enabled"):
        expected = sorted(expected + ["ChatCluster"])
    assert kinds == expected
    for obj in objects:
        validate_object(obj)


def test_full_values_reach_the_operator_deployment() -> None:
    deployment = next(o for o in rendered_objects(FULL_VALUES) if o["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert spec["serviceAccountName"] == "confab-op"
    container = spec["containers"][0]
    assert container["image"] == "registry.example.com/confab/confab-operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CONFAB_OPERATOR_METRICS_ADDR"] == "0.0.0.0:9090"
    assert env["CONFAB_OPERATOR_LOG_FORMAT"] == "text"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_rbac_is_least_privilege() -> None:
    objects = rendered_objects({})
    rules = next(o for o in objects if o["kind"] == "ClusterRole")["rules"]
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    # Gateway pods: listed for their connections, patched for their deletion cost; no more.
    pods = [r for r in rules if "pods" in r["resources"]]
    assert pods == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]}]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)
    resources = {res for r in rules for res in r["resources"]}
    assert {"chatclusters", "chatclusters/status", "chatclusters/finalizers", "events", "deployments",
            "statefulsets", "services", "configmaps", "poddisruptionbudgets", "horizontalpodautoscalers"} <= resources
    leases = next(o for o in objects if o["kind"] == "Role")["rules"]
    assert leases == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch", "update"]}]


def test_values_schema_refuses_bad_values() -> None:
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).render({"replicaCount": "two"}, name="confab", namespace="confab-system")
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).render({"unknownKey": 1}, name="confab", namespace="confab-system")


def test_chart_ships_the_generated_crd_byte_for_byte() -> None:
    assert (CHART / "crds/chatcluster.yaml").read_bytes() == (ROOT / "crds/chatcluster.yaml").read_bytes()
    assert [c["name"] for c in helm.Chart.load(CHART).crds] == ["crds/chatcluster.yaml"]


def test_crd_is_a_valid_custom_resource_definition() -> None:
    kubernetes_validate.validate(crd(), KUBERNETES, strict=True)


def test_every_builder_output_is_valid_for_kubernetes() -> None:
    dump = subprocess.run([BINARY, "dump-sample"], check=True, capture_output=True, text=True).stdout
    objects = [d for d in yaml.safe_load_all(dump) if d]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
                     "Service", "Service", "Service", "StatefulSet", "StatefulSet"]
    for obj in objects:
        validate_object(obj)
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "ChatCluster"


def test_example_chatcluster_matches_the_crd_schema() -> None:
    example = yaml.safe_load((ROOT / "examples/chatcluster.yaml").read_text())
    assert example["kind"] == "ChatCluster"
    validate_object(example)


def test_example_dev_dependencies_are_valid_for_kubernetes() -> None:
    objects = [d for d in yaml.safe_load_all((ROOT / "examples/dev-dependencies.yaml").read_text()) if d]
    assert sorted(o["kind"] for o in objects) == ["Secret", "Secret", "Service", "StatefulSet"]
    for obj in objects:
        validate_object(obj)


def test_crd_schema_refuses_a_malformed_chatcluster() -> None:
    example = yaml.safe_load((ROOT / "examples/chatcluster.yaml").read_text())
    example["spec"]["gateway"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(example)
    del example["spec"]["gateway"]
    with pytest.raises(jsonschema.ValidationError):
        validate_object(example)


def test_kubernetes_validate_refuses_unknown_fields_in_strict_mode() -> None:
    deployment = next(o for o in rendered_objects({}) if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment)
