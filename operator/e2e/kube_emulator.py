"""A Kubernetes API emulator for the operator binary: kmock's, plus what a controller needs.

kmock's KubernetesEmulator stores objects and serves list/watch/get/create/patch/delete, but it
does not stamp ``uid``/``resourceVersion``/``generation``/``creationTimestamp``, cannot create
through a server-side apply PATCH, treats every PATCH as a JSON merge, does not separate the
status subresource and has no delete-collection. This subclass adds exactly those.
"""

import asyncio
import datetime
import itertools
import json
import uuid
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml

# Every resource the operator lists, watches or writes, with its kind and namespacing.
RESOURCES: dict[str, tuple[str, bool]] = {
    "confab.dev/v1alpha1/chatclusters": ("ChatCluster", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/services": ("Service", True),
    "v1/secrets": ("Secret", True),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True),
    "v1/pods": ("Pod", True),
    "apps/v1/deployments": ("Deployment", True),
    "apps/v1/statefulsets": ("StatefulSet", True),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True),
    "networking.k8s.io/v1/ingresses": ("Ingress", True),
    "events.k8s.io/v1/events": ("Event", True),
    "coordination.k8s.io/v1/leases": ("Lease", True),
}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _label_match(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@attrs.define(kw_only=True)
class StampingEmulator(kmock.KubernetesEmulator):
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _rv: int = attrs.field(default=0, init=False)
    collection_deletes: list[Any] = attrs.field(factory=list, init=False)
    # Every request but the tests' own (aiohttp), as (method, path, query parameters).
    log: list[tuple[str, str, dict[str, str]]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced) in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, subresources={"status"},
                verbs={"get", "list", "watch", "create", "patch", "delete"},
            )

    def _next_rv(self) -> str:
        self._rv = next(self._versions)
        return str(self._rv)

    def current(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def seed(self, path: str, obj: dict[str, Any]) -> None:
        """Stores an object as if it had been created (for fixtures such as Secrets)."""
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("resourceVersion", self._next_rv())
        meta.setdefault("creationTimestamp", _now())
        self.objects[kmock.resource(path), meta.get("namespace"), meta["name"]] = obj

    async def _handle(self, request: kmock.Request) -> Any:
        if "aiohttp" not in request.headers.get("User-Agent", ""):
            self.log.append((str(request.method.value), request.url.path, dict(request.params)))
        if request.resource is not None and request.method == kmock.method.DELETE and request.name is None:
            async with self._lock:
                return aiohttp.web.json_response(self._delete_collection(request))
        if request.resource is not None:
            prepared = self._prepare(request)
            if prepared is not request:
                # kmock matches reactions to requests by identity among those it recorded.
                self._requests[:] = [prepared if r is request else r for r in self._requests]
                request = prepared
        try:
            return await super()._handle(request)
        except kmock.KubernetesObjectNotFoundError:
            # The API server's reason, which clients (kube's get_opt) test for.
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message=f"{request.resource} {request.name!r} not found")

    def _prepare(self, request: kmock.Request) -> kmock.Request:
        content_type = request.headers.get("Content-Type", "")
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.resource.plural == "deployments" and "apply-patch" in content_type:
                self._apply_replicas(None, request.data, request.params)
            meta.setdefault("namespace", request.namespace)
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_rv()
            meta["generation"] = 1
            meta["creationTimestamp"] = _now()
            return request

        if request.action == kmock.action.UPDATE and request.name is not None:
            current = self.current(request.resource, request.namespace, request.name)
            data = request.data

            if "json-patch" in content_type:
                if current is None:
                    raise kmock.KubernetesObjectNotFoundError()
                try:
                    # As in the API server's JSON patch, testing a missing member for null passes.
                    ops = [op for op in data if not (op.get("op") == "test" and op.get("value") is None
                                                     and jsonpointer.resolve_pointer(current, op["path"], None) is None)]
                    patched = jsonpatch.apply_patch(current, ops)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e))
                data = patched

            if not isinstance(data, dict):
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="patch body is not an object")

            if current is not None and request.resource.plural == "statefulsets" and request.subresource is None:
                self._refuse_statefulset_change(current, data, request.name)

            if current is None:
                if "apply-patch" not in content_type:
                    raise kmock.KubernetesObjectNotFoundError()
                # Server-side apply creates what does not exist yet.
                data.setdefault("metadata", {})
                data["metadata"].update({"name": request.name, "namespace": request.namespace})
                request = attrs.evolve(request, action=kmock.action.CREATE, data=data)
                return self._prepare(request)

            if request.resource.plural == "deployments" and "apply-patch" in content_type and request.subresource is None:
                self._apply_replicas(current, data, request.params)
            meta = data.setdefault("metadata", {})
            if request.subresource == "status":
                # The status subresource changes status only.
                data = {"status": data.get("status"), "metadata": {}}
                meta = data["metadata"]
            else:
                data.pop("status", None) if request.resource.plural == "chatclusters" else None
                if "spec" in data:
                    merged = json.loads(json.dumps(current.get("spec", {})))
                    if "json-patch" in content_type:
                        merged = data["spec"]
                    else:
                        merged = kmock._internal.dicts.patch_dict(merged, data["spec"])
                    if merged != current.get("spec"):
                        meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1
                for immutable in ("uid", "creationTimestamp", "name", "namespace"):
                    meta.pop(immutable, None)
            meta["resourceVersion"] = self._next_rv()
            return attrs.evolve(request, data=data)
        return request

    @staticmethod
    def _refuse_statefulset_change(current: dict[str, Any], data: dict[str, Any], name: str) -> None:
        """As the API server: a StatefulSet's volume claim templates never change."""
        new = (data.get("spec") or {}).get("volumeClaimTemplates")
        if new is not None and new != (current.get("spec") or {}).get("volumeClaimTemplates"):
            raise kmock.KubernetesError(
                status=422, reason="Invalid",
                message=(f'StatefulSet.apps "{name}" is invalid: spec: Forbidden: updates to statefulset spec for '
                         "fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', "
                         "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"))

    @staticmethod
    def _apply_replicas(current: dict[str, Any] | None, data: dict[str, Any], params: Any) -> None:
        """Server-side apply's field ownership, for a Deployment's spec.replicas only: an apply
        that sets it owns it (force takes it from others; without force a different value held
        by another manager is a conflict); an apply that leaves out a field it owned releases it,
        and a field nobody owns any more is removed, so the API server defaults it to 1 again.
        Ownership shows in metadata.managedFields as the API server records it."""
        manager = params.get("fieldManager", "")
        force = params.get("force") == "true"
        fields = ((current or {}).get("metadata") or {}).get("managedFields") or []
        owners = {e["manager"] for e in fields if "f:replicas" in (e.get("fieldsV1") or {}).get("f:spec", {})}
        live = ((current or {}).get("spec") or {}).get("replicas")
        spec = data.setdefault("spec", {})
        if "replicas" in spec:
            changed = spec["replicas"] != live
            if changed and (owners - {manager}) and not force:
                raise kmock.KubernetesError(status=409, reason="Conflict",
                                            message=f"Apply failed with 1 conflict: conflict with {sorted(owners - {manager})}: .spec.replicas")
            owners = {manager} if changed else owners | {manager}
        elif manager in owners:
            owners.discard(manager)
            if not owners:
                spec["replicas"] = 1
        elif current is None:
            spec["replicas"] = 1
        data.setdefault("metadata", {})["managedFields"] = [
            {"manager": m, "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}} for m in sorted(owners)]

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        items = [i for i in listing["items"] if not selector or _label_match(i, selector)]
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _delete_collection(self, request: kmock.Request) -> dict[str, Any]:
        selector = request.params.get("labelSelector", "")
        deleted = []
        for (resource, namespace, name), obj in list(self.objects.items()):
            if resource == request.resource and namespace == request.namespace and not obj.deleted:
                if _label_match(obj.raw, selector):
                    deleted.append(obj.raw)
                    obj.delete()
        self.collection_deletes.append((request.resource, request.namespace, selector))
        return {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": deleted}


def write_kubeconfig(path: Any, server: kmock.Server) -> None:
    """A kubeconfig for the emulator, no credentials, default namespace confab-system."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "nobody", "namespace": "confab-system"}}],
    }))


async def start(port: int = 0) -> tuple[StampingEmulator, kmock.Server]:
    """Starts the emulator on 127.0.0.1 and returns it with its server (call ``stop``)."""
    emulator = StampingEmulator()
    await emulator.__aenter__()
    server = kmock.Server(emulator, port=port)
    await server.__aenter__()
    return emulator, server


async def stop(emulator: StampingEmulator, server: kmock.Server) -> None:
    await server.__aexit__(None, None, None)
    await emulator.__aexit__(None, None, None)


if __name__ == "__main__":
    async def _main() -> None:
        emulator, server = await start(8001)
        print(f"emulating the Kubernetes API on {server.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(_main())
