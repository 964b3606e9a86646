"""The operator binary against the API emulator in the situations a platform engineer meets:
a refused child, a bad stored spec, autoscaling turned on, placement and ingress, a rotated
Secret, a paused cluster, steady state, and a namespace-scoped install. Every request the
binary makes is checked against the chart's RBAC."""

import asyncio
import contextlib
import os
import pathlib
import tempfile
from typing import Any, AsyncIterator

import aiohttp
import kmock
import pytest

import kube_emulator
from rbac_check import ungranted
from test_manifests import EXPECTED_RULES, rendered_objects, validate_object
from test_operator_binary import BINARY, eventually, free_port

CC_PATH = "confab.dev/v1alpha1/chatclusters"


class Cluster:
    """An emulator with Secrets seeded, the operator binary running against it, and helpers."""

    def __init__(self, emulator: kube_emulator.StampingEmulator, http: aiohttp.ClientSession, log: pathlib.Path):
        self.emulator, self.http, self.log_path = emulator, http, log

    def get(self, path: str, name: str, ns: str = "chat") -> dict[str, Any] | None:
        return self.emulator.current(kmock.resource(path), ns, name)

    def status(self, name: str = "demo", ns: str = "chat") -> dict[str, Any]:
        return (self.get(CC_PATH, name, ns) or {}).get("status") or {}

    def condition(self, type_: str, name: str = "demo") -> dict[str, Any]:
        return next(c for c in self.status(name)["conditions"] if c["type"] == type_)

    def deployment(self, name: str = "demo-gateway") -> dict[str, Any]:
        return self.get("apps/v1/deployments", name) or {}

    async def create(self, name: str, spec: dict[str, Any], ns: str = "chat") -> None:
        body = {"apiVersion": "confab.dev/v1alpha1", "kind": "ChatCluster", "metadata": {"name": name}, "spec": spec}
        async with self.http.post(f"/apis/confab.dev/v1alpha1/namespaces/{ns}/chatclusters", json=body) as resp:
            assert resp.status in (200, 201), await resp.text()

    async def merge(self, api_path: str, patch: dict[str, Any]) -> None:
        async with self.http.patch(api_path, json=patch, headers={"Content-Type": "application/merge-patch+json"}) as resp:
            assert resp.status == 200, await resp.text()

    async def patch_cc(self, patch: dict[str, Any], name: str = "demo") -> None:
        await self.merge(f"/apis/confab.dev/v1alpha1/namespaces/chat/chatclusters/{name}", patch)

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        return list(self.emulator.log)

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [o.raw for (res, _, _), o in self.emulator.objects.items()
                if res == kmock.resource("events.k8s.io/v1/events") and not o.deleted and o.raw.get("reason") == reason]


def secret(name: str, key: str, value: str, ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "data": {key: value}}


@contextlib.asynccontextmanager
async def running_operator(namespaces: list[str], extra_env: dict[str, str] | None = None) -> AsyncIterator[Cluster]:
    assert pathlib.Path(BINARY).exists(), f"build the operator first: {BINARY}"
    emulator, server = await kube_emulator.start()
    operator = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        log = tmp / "operator.log"
        try:
            for ns in namespaces:
                emulator.seed("v1/secrets", secret("confab-auth", "jwt-secret", "c2VjcmV0", ns))
                emulator.seed("v1/secrets", secret("confab-postgres", "url", "cG9zdGdyZXM6Ly9h", ns))
            kubeconfig = tmp / "kubeconfig"
            kube_emulator.write_kubeconfig(kubeconfig, server)
            env = dict(os.environ, KUBECONFIG=str(kubeconfig), POD_NAME="confab-operator-0", POD_NAMESPACE="confab-system",
                       CONFAB_OPERATOR_METRICS_ADDR=f"127.0.0.1:{free_port()}", RUST_LOG="info,kube=warn",
                       CONFAB_OPERATOR_LOG_FORMAT="text", CONFAB_OPERATOR_LEADER_ELECTION="false", **(extra_env or {}))
            with open(log, "wb") as out:
                operator = await asyncio.create_subprocess_exec(BINARY, stdout=out, stderr=out, env=env)
                async with aiohttp.ClientSession(base_url=str(server.url)) as http:
                    yield Cluster(emulator, http, log)
        except BaseException:
            print(log.read_text(errors="replace")[-8000:] if log.exists() else "no operator log")
            raise
        finally:
            if operator is not None and operator.returncode is None:
                operator.kill()
                await operator.wait()
            await kube_emulator.stop(emulator, server)


SPEC: dict[str, Any] = {
    "gateway": {
        "image": "confab-gateway:1", "replicas": 4,
        "trustedProxies": ["10.0.0.10"],
        "pod": {
            "nodeSelector": {"pool": "chat"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "chat", "effect": "NoSchedule"}],
            "priorityClassName": "chat-critical",
            "imagePullSecrets": [{"name": "registry"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        },
        "ingress": {"className": "nginx", "host": "chat.example.com", "tlsSecretName": "chat-tls",
                    "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"}},
    },
    "auth": {"jwtSecretRef": {"name": "confab-auth", "key": "jwt-secret"}},
    "postgres": {"urlSecretRef": {"name": "confab-postgres", "key": "url"}},
    "redis": {"managed": {"storage": "1Gi", "pod": {"priorityClassName": "backends", "nodeSelector": {"pool": "data"}}}},
    "limits": {"connectsPerSecond": 20, "connectBurst": 100, "maxConnectionsPerAddress": 50},
}

async def wait_reconciled(c: Cluster, generation: int, what: str) -> None:
    await eventually(what, lambda: any(co.get("observedGeneration") == generation for co in c.status().get("conditions", []))
                     and c.status().get("phase") is not None, timeout=30)


@pytest.mark.asyncio
async def test_the_operator_in_the_situations_a_platform_engineer_meets() -> None:
    async with running_operator(["chat"]) as c:
        await c.create("demo", SPEC)
        await eventually("status of generation 1", lambda: c.status().get("observedGeneration") == 1)
        assert c.condition("Degraded")["status"] == "False", c.status()

        # Pod overrides render into the Deployment and the StatefulSet; the default spread stays.
        pod = c.deployment()["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "chat"} and pod["priorityClassName"] == "chat-critical"
        assert pod["tolerations"][0]["key"] == "dedicated" and pod["imagePullSecrets"] == [{"name": "registry"}]
        assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert [t["topologyKey"] for t in pod["topologySpreadConstraints"]] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        assert pod["containers"][0]["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
        redis = c.get("apps/v1/statefulsets", "demo-redis")["spec"]["template"]["spec"]
        assert redis["priorityClassName"] == "backends" and redis["nodeSelector"] == {"pool": "data"}
        assert redis["containers"][0]["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}, "backend default"

        # The Ingress ends TLS for the host, with WebSocket timeouts; trusted proxies and connect
        # limits reach the gateway config.
        ingress = await eventually("the Ingress", lambda: c.get("networking.k8s.io/v1/ingresses", "demo-gateway"))
        validate_object(ingress)
        assert ingress["spec"]["tls"] == [{"hosts": ["chat.example.com"], "secretName": "chat-tls"}]
        assert ingress["spec"]["ingressClassName"] == "nginx"
        assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": "demo-gateway", "port": {"name": "http"}}
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
        assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
        config = c.get("v1/configmaps", "demo-gateway")["data"]
        assert config["CONFAB_TRUSTED_PROXIES"] == "10.0.0.10"
        assert (config["CONFAB_CONNECTS_PER_SECOND"], config["CONFAB_CONNECT_BURST"], config["CONFAB_MAX_CONNECTIONS_PER_ADDRESS"]) == ("20", "100", "50")

        # Steady state: absent children (RabbitMQ, HPA) are looked up once, never deleted.
        for poke in range(3):
            await c.patch_cc({"metadata": {"annotations": {"example.com/poke": str(poke)}}})
            await asyncio.sleep(0.6)
        deletes = [(m, p) for m, p, _ in c.requests() if m == "DELETE"]
        assert deletes == [], deletes
        lookups = [p for m, p, _ in c.requests() if m == "GET" and p.endswith(("/statefulsets/demo-rabbitmq", "/horizontalpodautoscalers/demo-gateway"))]
        assert sorted(lookups) == ["/apis/apps/v1/namespaces/chat/statefulsets/demo-rabbitmq",
                                   "/apis/autoscaling/v2/namespaces/chat/horizontalpodautoscalers/demo-gateway"], lookups

        # Rotating a Secret changes the pod template's Secret hash (the next resync or change).
        def secret_hash() -> str:
            return c.deployment()["spec"]["template"]["metadata"]["annotations"]["confab.dev/secret-hash"]
        before = secret_hash()
        await c.merge("/api/v1/namespaces/chat/secrets/confab-postgres", {"data": {"url": "cG9zdGdyZXM6Ly9i"}})
        await c.patch_cc({"metadata": {"annotations": {"example.com/poke": "rotated"}}})
        await eventually("a new Secret hash on the pod template", lambda: secret_hash() != before)

        # Turning autoscaling on keeps the 4 replicas (handed to the HPA, not reset to 1).
        await c.patch_cc({"spec": {"gateway": {"autoscaling": {"minReplicas": 2, "maxReplicas": 10}}}})
        await eventually("the HPA", lambda: c.get("autoscaling/v2/horizontalpodautoscalers", "demo-gateway"))
        await wait_reconciled(c, 2, "generation 2")
        for poke in range(2):
            await c.patch_cc({"metadata": {"annotations": {"example.com/poke": f"hpa-{poke}"}}})
            await asyncio.sleep(0.6)
        deployment = c.deployment()
        assert deployment["spec"]["replicas"] == 4, deployment["spec"]
        owners = [e["manager"] for e in deployment["metadata"]["managedFields"]]
        assert owners == ["confab-operator-handover-to-hpa"], owners
        assert c.status()["observedGeneration"] == 2

        # A refused StatefulSet (storage is immutable) does not hold back a new gateway image.
        await c.patch_cc({"spec": {"gateway": {"image": "confab-gateway:2"}, "redis": {"managed": {"storage": "5Gi"}}}})
        await eventually("the new image rolled out", lambda: c.deployment()["spec"]["template"]["spec"]["containers"][0]["image"] == "confab-gateway:2")
        await eventually("Degraded ApplyFailed", lambda: c.condition("Degraded")["reason"] == "ApplyFailed")
        degraded = c.condition("Degraded")
        assert degraded["status"] == "True" and degraded["observedGeneration"] == 3, degraded
        assert degraded["message"].startswith('the API server refused StatefulSet demo-redis: StatefulSet.apps "demo-redis" is invalid'), degraded
        assert c.status()["phase"] == "Degraded"
        assert c.status()["observedGeneration"] == 2, "generation 3 is not fully applied"
        assert c.get("apps/v1/statefulsets", "demo-redis")["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
        # The event follows the status patch.
        warnings = await eventually("a Warning event ApplyFailed", lambda: c.events("ApplyFailed"))
        assert warnings and warnings[0]["type"] == "Warning" and "StatefulSet demo-redis" in warnings[0]["note"], warnings

        # Put right, the generation is observed again.
        await c.patch_cc({"spec": {"redis": {"managed": {"storage": "1Gi"}}}})
        await eventually("generation 4 observed", lambda: c.status().get("observedGeneration") == 4)
        assert c.condition("Degraded")["status"] == "False"

        # A paused cluster is left alone: a spec change is not applied, nothing is written.
        await c.patch_cc({"metadata": {"annotations": {"confab.dev/paused": "true"}}})
        await eventually("phase Paused", lambda: c.status().get("phase") == "Paused")
        await eventually("the Paused event", lambda: c.events("Paused"))
        mark = len(c.requests())
        await c.patch_cc({"spec": {"gateway": {"image": "confab-gateway:3"}}})
        await asyncio.sleep(2)
        writes = [(m, p) for m, p, _ in c.requests()[mark:] if m in ("PATCH", "POST", "PUT", "DELETE")
                  and "/chatclusters/" not in p]
        assert writes == [], writes
        assert c.deployment()["spec"]["template"]["spec"]["containers"][0]["image"] == "confab-gateway:2"
        assert c.condition("Progressing")["reason"] == "Paused"
        await c.patch_cc({"metadata": {"annotations": {"confab.dev/paused": None}}})
        await eventually("unpaused: the image rolls", lambda: c.deployment()["spec"]["template"]["spec"]["containers"][0]["image"] == "confab-gateway:3")

        # replicas: -1 stored past admission (this emulator runs no schema checks) gives a status.
        await c.patch_cc({"spec": {"gateway": {"autoscaling": None, "replicas": -1}}})
        await eventually("InvalidSpec", lambda: c.condition("Degraded")["reason"] == "InvalidSpec")
        assert "spec.gateway.replicas is -1: set it to 0 or more" in c.condition("Degraded")["message"]
        assert c.status()["phase"] == "Degraded"

        # Everything the operator asked for, the chart's (cluster-wide) RBAC grants.
        assert ungranted(c.requests(), {None: EXPECTED_RULES}) == []


@pytest.mark.asyncio
async def test_a_namespace_scoped_operator_only_touches_its_namespaces() -> None:
    async with running_operator(["chat", "other"], {"CONFAB_OPERATOR_WATCH_NAMESPACES": "chat"}) as c:
        spec = {"gateway": {"image": "confab-gateway:1"}, "auth": SPEC["auth"], "postgres": SPEC["postgres"]}
        await c.create("demo", spec, ns="chat")
        await c.create("demo", spec, ns="other")
        await eventually("the watched cluster reconciled", lambda: c.status().get("observedGeneration") == 1)
        assert c.deployment()["spec"]["replicas"] == 1, "the minimal spec: one gateway"
        await asyncio.sleep(2)
        assert c.get("apps/v1/deployments", "demo-gateway", ns="other") is None
        assert c.status(ns="other") == {}, "the other namespace's ChatCluster is not touched"
        outside = [(m, p) for m, p, _ in c.requests() if "/namespaces/chat/" not in p]
        assert outside == [], f"requests outside namespace chat: {outside}"
        # The Role the chart renders for watchNamespaces=[chat] grants every one of them.
        roles = [o for o in rendered_objects({"watchNamespaces": ["chat"]}) if o["kind"] == "Role"]
        rules = {o["metadata"]["namespace"]: o["rules"] for o in roles if not o["metadata"]["name"].endswith("leader-election")}
        assert rules == {"chat": EXPECTED_RULES}
        assert ungranted(c.requests(), rules) == []
        assert ungranted([("GET", "/apis/apps/v1/deployments", {})], rules) != [], "the check can fail"


