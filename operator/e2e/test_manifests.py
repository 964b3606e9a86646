"""The Helm chart, the operator's builders and the example ChatCluster, checked against schemas.

Helm 4 renders and lints the chart (helm-python-sdk); kubernetes-validate checks every rendered
object and every builder output against the Kubernetes 1.37 schemas in strict mode (unknown
fields are errors); the ChatCluster objects are checked against the CRD's own openAPIV3Schema.
"""

import json
import os
import pathlib
import re
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


# The part of the Prometheus operator's ServiceMonitor schema (monitoring.coreos.com/v1) the chart
# uses, closed to unknown fields like kubernetes-validate's strict mode (which knows only built-in kinds).
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False, "properties": {
                                "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                "regex": {"type": "string"}, "targetLabel": {"type": "string"},
                                "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]}}}}}}},
            },
        },
    },
}


def validate_object(obj: dict[str, Any]) -> None:
    """Kubernetes 1.37 strict schema for built-in kinds; the CRD's schema for ChatClusters."""
    if obj["kind"] == "ServiceMonitor":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
    elif obj["kind"] == "ChatCluster":
        assert obj["apiVersion"] == "confab.dev/v1alpha1"
        jsonschema.validate({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}, chatcluster_schema())
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def render(values: dict[str, Any], api_versions: list[str] | None = None) -> dict[str, str]:
    """Renders offline; `api_versions` are the extra APIs the cluster serves (helm --api-versions)."""
    chart = helm.Chart.load(CHART)
    if api_versions is None:
        return chart.render(values, name="confab", namespace="confab-system", is_install=True)
    # helm-python-sdk 0.2.2's render() does not expose --api-versions; its native call takes it.
    from helm_python import _native

    opts = {"name": "confab", "namespace": "confab-system", "is_install": True, "api_versions": api_versions}
    return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))


def rendered_objects(values: dict[str, Any], api_versions: list[str] | None = None) -> list[dict[str, Any]]:
    manifests = render(values, api_versions)
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


def test_the_minimal_chatcluster_matches_the_crd_schema() -> None:
    validate_object({"apiVersion": "confab.dev/v1alpha1", "kind": "ChatCluster", "metadata": {"name": "chat"},
                     "spec": {"gateway": {"image": "confab-gateway:dev"},
                              "auth": {"jwtSecretRef": {"name": "a", "key": "k"}},
                              "postgres": {"urlSecretRef": {"name": "p", "key": "url"}}}})


def test_the_crd_refuses_negative_replicas() -> None:
    example = yaml.safe_load((ROOT / "examples/chatcluster.yaml").read_text())
    example["spec"]["gateway"]["replicas"] = -1
    with pytest.raises(jsonschema.ValidationError):
        validate_object(example)


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


# Every grant the operator has, and nothing else (the README says what each is for).
EXPECTED_RULES = [
    {"apiGroups": ["confab.dev"], "resources": ["chatclusters"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["confab.dev"], "resources": ["chatclusters/status"], "verbs": ["patch"]},
    {"apiGroups": ["confab.dev"], "resources": ["chatclusters/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "create", "patch", "get", "delete"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list", "watch", "create", "patch", "get"]},
    {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["list", "watch", "create", "patch", "get", "delete"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["list", "watch", "create", "patch"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["list", "watch", "create", "patch", "get", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"],
     "verbs": ["list", "watch", "create", "patch", "get", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["deletecollection"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
LEASE_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]}]


def test_rbac_is_least_privilege() -> None:
    objects = rendered_objects({})
    [cluster_role] = [o for o in objects if o["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == EXPECTED_RULES
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in cluster_role["rules"])
    [leases] = [o for o in objects if o["kind"] == "Role"]
    assert leases["metadata"]["namespace"] == "confab-system"
    assert leases["rules"] == LEASE_RULES


WATCH_TWO = {"watchNamespaces": ["chat", "team-b"]}


@pytest.mark.parametrize("values", [WATCH_TWO, {**FULL_VALUES, **WATCH_TWO}], ids=["scoped", "scoped-full"])
def test_a_namespace_scoped_install_grants_only_in_its_namespaces(values: dict[str, Any]) -> None:
    objects = rendered_objects(values)
    assert [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")] == [], "nothing cluster-wide"
    roles = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("-operator")}
    assert sorted(roles) == ["chat", "team-b"]
    for role in roles.values():
        assert role["rules"] == EXPECTED_RULES
    bindings = {o["metadata"]["namespace"]: o for o in objects
                if o["kind"] == "RoleBinding" and not o["metadata"]["name"].endswith("leader-election")}
    assert sorted(bindings) == ["chat", "team-b"]
    for binding in bindings.values():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": roles["chat"]["metadata"]["name"]}
        assert binding["subjects"][0]["namespace"] == "confab-system"
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CONFAB_OPERATOR_WATCH_NAMESPACES"] == "chat,team-b"
    for obj in objects:
        validate_object(obj)
    report = helm.lint(CHART, values, strict=True, namespace="confab-system", kube_version="v1.37.0")
    assert report["errors"] == [], report


def test_a_cluster_wide_install_watches_every_namespace() -> None:
    deployment = next(o for o in rendered_objects({}) if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CONFAB_OPERATOR_WATCH_NAMESPACES"] == ""


def test_values_schema_refuses_several_replicas_without_leader_election() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError):
        chart.render({"replicaCount": 2, "leaderElection": False}, name="confab", namespace="confab-system")
    one = chart.render({"replicaCount": 1, "leaderElection": False}, name="confab", namespace="confab-system")
    assert any("kind: Deployment" in text for text in one.values())
    with pytest.raises(helm.HelmError):
        chart.render({"watchNamespaces": ["Not_A_Namespace"]}, name="confab", namespace="confab-system")


def notes(values: dict[str, Any]) -> str:
    return next(text for path, text in render(values).items() if path.endswith("NOTES.txt"))


def test_notes_point_only_at_what_the_chart_installs_and_their_chatcluster_is_valid() -> None:
    text = notes({})
    assert "examples/" not in text
    assert not re.search(r"-f\s+(?!-)\S+\.ya?ml", text), "NOTES must not apply files outside the chart"
    block = text.split("<<'YAML'\n", 1)[1].split("\n     YAML", 1)[0]
    chatcluster = yaml.safe_load("\n".join(line[5:] for line in block.splitlines()))
    assert chatcluster["kind"] == "ChatCluster"
    assert set(chatcluster["spec"]) == {"gateway", "auth", "postgres"}, "the minimal spec"
    validate_object(chatcluster)
    assert "watching every namespace" in text
    assert "watching namespaces chat, team-b" in notes(WATCH_TWO)


ADAPTER_ON = {"prometheusAdapter": {"rules": {"enabled": True, "namespace": "monitoring"}}}


def test_the_prometheus_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    assert [o for o in rendered_objects({}) if o["kind"] == "ConfigMap"] == [], "off by default"
    [cm] = [o for o in rendered_objects(ADAPTER_ON) if o["kind"] == "ConfigMap"]
    validate_object(cm)
    assert cm["metadata"]["namespace"] == "monitoring"
    [rule] = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    dump = subprocess.run([BINARY, "dump-sample"], check=True, capture_output=True, text=True).stdout
    hpa = next(d for d in yaml.safe_load_all(dump) if d and d["kind"] == "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] == "confab_connections"
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["metricsQuery"].startswith("sum(<<.Series>>"), "summed over transports"
    # The ServiceMonitor gives the series the pod and namespace labels the rule maps.
    monitor = next(o for o in rendered_objects(MONITORING_ON, PROMETHEUS_OPERATOR) if o["kind"] == "ServiceMonitor")
    targets = {r.get("targetLabel") for r in monitor["spec"]["endpoints"][0]["relabelings"]}
    assert {"pod", "namespace"} <= targets
    assert "prometheus-adapter" in notes(ADAPTER_ON)
    report = helm.lint(CHART, ADAPTER_ON, strict=True, namespace="confab-system", kube_version="v1.37.0")
    assert report["errors"] == [], report


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
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "PodDisruptionBudget", "Service",
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


MONITORING_ON: dict[str, Any] = {
    "gatewayMonitoring": {
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"enabled": True, "labels": {"team": "chat"}},
    }
}
PROMETHEUS_OPERATOR = ["monitoring.coreos.com/v1/ServiceMonitor"]


def test_chart_lints_with_gateway_monitoring_on() -> None:
    report = helm.lint(CHART, MONITORING_ON, strict=True, namespace="confab-system", kube_version="v1.37.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_service_monitor_is_rendered_only_where_the_prometheus_operator_crd_is_served() -> None:
    without = sorted(o["kind"] for o in rendered_objects(MONITORING_ON))
    assert "ServiceMonitor" not in without
    objects = rendered_objects(MONITORING_ON, PROMETHEUS_OPERATOR)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    assert sorted(o["kind"] for o in objects if o["kind"] != "ServiceMonitor") == without
    for obj in objects:
        validate_object(obj)
    off = rendered_objects({}, PROMETHEUS_OPERATOR)
    assert [o for o in off if o["kind"] in ("ServiceMonitor", "ConfigMap")] == [], "off by default"


def test_service_monitor_scrapes_each_gateway_pod_once_on_the_http_port() -> None:
    monitor = next(o for o in rendered_objects(MONITORING_ON, PROMETHEUS_OPERATOR) if o["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    [endpoint] = spec["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "15s")
    # Against what the operator's builders actually create for a ChatCluster.
    dump = subprocess.run([BINARY, "dump-sample"], check=True, capture_output=True, text=True).stdout
    services = [d for d in yaml.safe_load_all(dump) if d and d["kind"] == "Service"]
    selected = [s for s in services
                if all(s["metadata"]["labels"].get(k) == v for k, v in spec["selector"]["matchLabels"].items())]
    assert len(selected) == 2, "the gateway's load-balanced and headless Services"
    for service in selected:
        assert "http" in [p["name"] for p in service["spec"]["ports"]]
    [keep] = [r for r in endpoint["relabelings"] if r.get("action") == "keep"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_service_name"]
    kept = [s["metadata"]["name"] for s in selected if re.fullmatch(keep["regex"], s["metadata"]["name"])]
    assert len(kept) == 1 and kept[0].endswith("-gateway-headless"), kept
    headless = next(s for s in selected if s["metadata"]["name"] == kept[0])
    assert headless["spec"]["publishNotReadyAddresses"] is True, "draining pods are scraped too"


GATEWAY_METRICS = {
    "confab_connections", "confab_connects_total", "confab_disconnects_total", "confab_reconnects_total",
    "confab_messages_received_total", "confab_messages_sent_total", "confab_messages_persisted_total",
    "confab_delivery_duration_seconds", "confab_ack_duration_seconds", "confab_fanout_size",
    "confab_send_queue_depth", "confab_send_queue_rejected_total", "confab_send_queue_closes_total",
    "confab_rate_limited_total", "confab_auth_failures_total", "confab_backend_duration_seconds",
    "confab_backend_errors_total", "confab_draining",
}


def test_grafana_dashboard_ships_as_a_labelled_config_map_using_only_gateway_metrics() -> None:
    [cm] = [o for o in rendered_objects(MONITORING_ON) if o["kind"] == "ConfigMap"]
    validate_object(cm)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "chat"
    dashboard = json.loads(cm["data"]["confab-gateway.json"])
    assert dashboard == json.loads((CHART / "dashboards/confab-gateway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"confab_[a-z_]+", e)}
    assert used <= GATEWAY_METRICS, used - GATEWAY_METRICS
    assert used == GATEWAY_METRICS, f"every gateway metric has a chart; missing {GATEWAY_METRICS - used}"
    assert "sum(confab_connections" in " ".join(exprs), "connections summed over transports"
