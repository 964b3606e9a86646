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

            if current is None:
                if "apply-patch" not in content_type:
                    raise kmock.KubernetesObjectNotFoundError()
                # Server-side apply creates what does not exist yet.
                data.setdefault("metadata", {})
                data["metadata"].update({"name": request.name, "namespace": request.namespace})
                request = attrs.evolve(request, action=kmock.action.CREATE, data=data)
                return self._prepare(request)

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
