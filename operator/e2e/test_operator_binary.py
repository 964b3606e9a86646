"""The confab-operator binary against the Kubernetes API emulator, as a cluster would run it."""

import asyncio
import os
import pathlib
import signal
import socket
import tempfile
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import pytest
import yaml

import kube_emulator
from rbac_check import ungranted
from test_manifests import EXPECTED_RULES, LEASE_RULES

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = os.environ.get("CONFAB_OPERATOR_BIN", str(ROOT / "target/debug/confab-operator"))
CC = kmock.resource("confab.dev/v1alpha1/chatclusters")
NS = "chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(what: str, check: Any, timeout: float = 30.0) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what` otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (KeyError, IndexError, TypeError):
            pass
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what} (last seen: {last!r})")


def get(emulator: kube_emulator.StampingEmulator, path: str, name: str, ns: str | None = NS) -> dict[str, Any] | None:
    return emulator.current(kmock.resource(path), ns, name)


# What each stand-in gateway pod's /metrics answers: OpenTelemetry-style pages (HELP/TYPE,
# scope labels, escaped label values) and one page of garbage.
GATEWAY_PAGES = {
    "demo-gateway-7d9f-a": (
        "# HELP confab_connections Open client connections on this gateway\n"
        "# TYPE confab_connections gauge\n"
        'confab_connections{otel_scope_name="confab-gateway",transport="socketio"} 9000\n'
        'confab_connections{otel_scope_name="confab-gateway",transport="ws"} 3000\n'
        "# TYPE confab_draining gauge\n"
        'confab_draining{otel_scope_name="confab-gateway"} 0\n'
        'target_info{service_name="confab-gateway",note="a \\"quoted\\" value"} 1\n'
    ),
    "demo-gateway-7d9f-b": (
        "# TYPE confab_connections gauge\n"
        'confab_connections{otel_scope_name="confab-gateway",transport="ws"} 2500\n'
        'confab_draining{otel_scope_name="confab-gateway"} 0\n'
    ),
    "demo-gateway-7d9f-c": "<html><body>502 Bad Gateway</body></html>",
}


async def serve_gateway_pages() -> tuple[list[aiohttp.web.AppRunner], dict[str, int]]:
    """One local HTTP server per stand-in pod; the pods' `http` port points at it."""
    runners, ports = [], {}
    for name, page in GATEWAY_PAGES.items():
        app = aiohttp.web.Application()
        async def metrics(_request: aiohttp.web.Request, page: str = page) -> aiohttp.web.Response:
            return aiohttp.web.Response(text=page)

        app.router.add_get("/metrics", metrics)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports[name] = runner.addresses[0][1]
    return runners, ports


def gateway_pod(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"app.kubernetes.io/name": "confab-gateway", "app.kubernetes.io/instance": "demo"}},
        "spec": {"containers": [{"name": "gateway", "image": "confab-gateway:dev",
                                 "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


async def scenario(tmp: pathlib.Path) -> None:
    emulator, server = await kube_emulator.start()
    operator = None
    runners, ports = await serve_gateway_pages()
    try:
        for name, port in ports.items():
            emulator.seed("v1/pods", gateway_pod(name, port))
        for name, key in [("confab-auth", "jwt-secret"), ("confab-postgres", "url")]:
            emulator.seed("v1/secrets", {
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": NS}, "data": {key: "c2VjcmV0"},
            })
        kubeconfig = tmp / "kubeconfig"
        kube_emulator.write_kubeconfig(kubeconfig, server)
        metrics_port = free_port()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), POD_NAME="confab-operator-0", POD_NAMESPACE="confab-system",
                   CONFAB_OPERATOR_METRICS_ADDR=f"127.0.0.1:{metrics_port}", RUST_LOG="info,kube=warn",
                   CONFAB_OPERATOR_LOG_FORMAT="text")
        log = open(tmp / "operator.log", "wb")
        operator = await asyncio.create_subprocess_exec(BINARY, stdout=log, stderr=log, env=env)

        # Leader election: the lease is created and held by this replica.
        lease = await eventually("the leader lease", lambda: get(emulator, "coordination.k8s.io/v1/leases", "confab-operator", "confab-system"))
        await eventually("this replica to hold the lease", lambda: get(emulator, "coordination.k8s.io/v1/leases", "confab-operator", "confab-system")["spec"].get("holderIdentity") == "confab-operator-0")

        example = yaml.safe_load((ROOT / "examples/chatcluster.yaml").read_text())
        async with aiohttp.ClientSession(base_url=str(server.url)) as http:
            async with http.post(f"/apis/confab.dev/v1alpha1/namespaces/{NS}/chatclusters", json=example) as resp:
                assert resp.status in (200, 201), await resp.text()
            cc = get(emulator, "confab.dev/v1alpha1/chatclusters", "demo")
            uid = cc["metadata"]["uid"]

            await eventually("the finalizer", lambda: get(emulator, "confab.dev/v1alpha1/chatclusters", "demo")["metadata"].get("finalizers") == ["confab.dev/cleanup"])

            children = [
                ("v1/configmaps", "demo-gateway"), ("apps/v1/deployments", "demo-gateway"),
                ("v1/services", "demo-gateway"), ("v1/services", "demo-gateway-headless"),
                ("policy/v1/poddisruptionbudgets", "demo-gateway"),
                ("apps/v1/statefulsets", "demo-redis"), ("v1/services", "demo-redis"),
                ("apps/v1/statefulsets", "demo-rabbitmq"), ("v1/services", "demo-rabbitmq"),
            ]
            for path, name in children:
                child = await eventually(f"{path} {name}", lambda: get(emulator, path, name))
                owners = child["metadata"].get("ownerReferences") or []
                assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [("ChatCluster", "demo", uid, True)], (path, name, owners)
                assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "confab-operator"
            assert get(emulator, "autoscaling/v2/horizontalpodautoscalers", "demo-gateway") is None, "no autoscaling asked"

            deployment = get(emulator, "apps/v1/deployments", "demo-gateway")
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            assert container["image"] == "confab-gateway:dev"
            assert deployment["spec"]["replicas"] == 3
            config = get(emulator, "v1/configmaps", "demo-gateway")["data"]
            assert config["CONFAB_REDIS_URL"] == "redis://demo-redis:6379"

            def status() -> dict[str, Any]:
                return get(emulator, "confab.dev/v1alpha1/chatclusters", "demo").get("status") or {}

            await eventually("status with observedGeneration 1", lambda: status().get("observedGeneration") == 1)
            assert status()["phase"] in ("Ready", "Progressing"), status()
            types = {c["type"]: c["status"] for c in status()["conditions"]}
            assert types == {"Ready": "False", "Progressing": "True", "Degraded": "False"}, types

            # Connection-draining rollout: the pods' /metrics were read; the page of garbage
            # leaves its pod unknown (not 0).
            assert status()["connections"] == 9000 + 3000 + 2500, status()
            assert status()["rollout"] == {"updatedReplicas": 0, "podsDrainingAtOnce": 2, "connectionsPerPod": 12000,
                                           "drainingPods": 0, "podsWithoutCounts": 1}, status()
            progressing = next(c for c in status()["conditions"] if c["type"] == "Progressing")
            assert progressing["message"].startswith("rolling: 0 of 3 pods on the current revision, 2 draining at once"), progressing
            # 500 reconnects/s × 60 s ÷ 12 000 connections on the fullest pod = 2 pods at once.
            assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2, "maxUnavailable": 0}}, deployment["spec"]["strategy"]
            pod_spec = deployment["spec"]["template"]["spec"]
            assert pod_spec["terminationGracePeriodSeconds"] == 75
            assert container["lifecycle"]["preStop"] == {"exec": {"command": ["/usr/local/bin/confab-gateway", "drain", "--wait"]}}
            assert config["CONFAB_DRAIN_SECONDS"] == "60"
            assert config["CONFAB_DRAIN_ANNOTATION_FILE"] == "/etc/confab/podinfo/annotations"
            podinfo = next(v for v in pod_spec["volumes"] if v["name"] == "podinfo")
            assert podinfo["downwardAPI"]["items"] == [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]

            def costs() -> dict[str, str | None]:
                return {name: (get(emulator, "v1/pods", name)["metadata"].get("annotations") or {})
                        .get("controller.kubernetes.io/pod-deletion-cost") for name in GATEWAY_PAGES}

            await eventually("deletion costs on the pods", lambda: costs()["demo-gateway-7d9f-b"] is not None)
            assert costs() == {"demo-gateway-7d9f-a": "12000", "demo-gateway-7d9f-b": "2500", "demo-gateway-7d9f-c": None}, costs()

            # The pods come up: the Deployment's and StatefulSets' status change wakes the
            # operator through its watches, and the cluster turns Ready.
            for path, name, body in [
                ("apps/v1/statefulsets", "demo-redis", {"replicas": 1, "readyReplicas": 1}),
                ("apps/v1/statefulsets", "demo-rabbitmq", {"replicas": 1, "readyReplicas": 1}),
                ("apps/v1/deployments", "demo-gateway", {"observedGeneration": 1, "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}),
            ]:
                async with http.patch(f"/apis/{path.replace('v1/', 'v1/namespaces/' + NS + '/', 1) if path.startswith('apps') else path}/{name}/status",
                                      json={"status": body}, headers={"Content-Type": "application/merge-patch+json"}) as resp:
                    assert resp.status == 200, await resp.text()
            await eventually("phase Ready", lambda: status().get("phase") == "Ready")
            assert status()["readyReplicas"] == 3

            # A spec change is a new generation, observed in status.
            async with http.patch(f"/apis/confab.dev/v1alpha1/namespaces/{NS}/chatclusters/demo",
                                  json={"spec": {"gateway": {"replicas": 4}}},
                                  headers={"Content-Type": "application/merge-patch+json"}) as resp:
                assert resp.status == 200, await resp.text()
            await eventually("observedGeneration 2", lambda: status().get("observedGeneration") == 2)
            await eventually("the Deployment scaled to 4", lambda: get(emulator, "apps/v1/deployments", "demo-gateway")["spec"]["replicas"] == 4)

            # Events were recorded against the ChatCluster.
            events = [o.raw for (res, ns, _), o in emulator.objects.items()
                      if res == kmock.resource("events.k8s.io/v1/events") and not o.deleted]
            reasons = {e["reason"] for e in events if e["regarding"]["name"] == "demo"}
            assert {"Applied", "Ready"} <= reasons, reasons

            # Metrics and health are served.
            async with aiohttp.ClientSession() as plain:
                async with plain.get(f"http://127.0.0.1:{metrics_port}/healthz") as resp:
                    assert resp.status == 200
                async with plain.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    text = await resp.text()
            assert "confab_operator_reconciles_total" in text and "confab_operator_reconcile_duration_seconds_bucket" in text, text
            assert "confab_operator_leader 1" in text, text
            assert 'confab_operator_fleet_errors_total{error="parse"}' in text, text
            assert "confab_operator_deletion_cost_patches_total 2" in text, text

            # Deletion runs the finalizer: volume claims are deleted, then the object goes.
            async with http.delete(f"/apis/confab.dev/v1alpha1/namespaces/{NS}/chatclusters/demo") as resp:
                assert resp.status == 200, await resp.text()
            await eventually("the ChatCluster to be gone", lambda: get(emulator, "confab.dev/v1alpha1/chatclusters", "demo") is None)
            assert any("app.kubernetes.io/instance=demo" in sel for (_, ns, sel) in emulator.collection_deletes), emulator.collection_deletes

        # SIGTERM stops the operator cleanly and releases the lease.
        operator.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(operator.wait(), timeout=20)
        assert code == 0, f"operator exited with {code}"
        released = get(emulator, "coordination.k8s.io/v1/leases", "confab-operator", "confab-system")
        assert not released["spec"].get("holderIdentity"), released
        # Everything it asked for, leader lease included, the chart's RBAC grants.
        assert ungranted(emulator.log, {None: EXPECTED_RULES, "confab-system": LEASE_RULES}) == []
        assert any("/leases" in path for _, path, _ in emulator.log)
    except BaseException:
        print((tmp / "operator.log").read_text(errors="replace")[-6000:] if (tmp / "operator.log").exists() else "no operator log")
        raise
    finally:
        if operator is not None and operator.returncode is None:
            operator.kill()
            await operator.wait()
        await kube_emulator.stop(emulator, server)
        for runner in runners:
            await runner.cleanup()


def test_operator_binary_reconciles_a_chatcluster_end_to_end() -> None:
    assert pathlib.Path(BINARY).exists(), f"build the operator first: {BINARY}"
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(pathlib.Path(tmp)))
