"""Which API requests an RBAC rule set does not allow (the requests as the emulator logs them)."""

import re
from typing import Any

# /api/v1/... or /apis/<group>/<version>/..., optionally namespaced, with name and subresource.
_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")


def verb_of(method: str, name: str | None, params: dict[str, str]) -> str:
    if method == "GET":
        return "get" if name else ("watch" if params.get("watch") in ("true", "1") else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update",
            "DELETE": "delete" if name else "deletecollection"}[method]


def ungranted(requests: list[tuple[str, str, dict[str, str]]], rules_by_ns: dict[str | None, list[dict[str, Any]]]) -> list[str]:
    """Requests no rule allows; `rules_by_ns[None]` are cluster-wide rules."""
    refused = []
    for method, path, params in requests:
        match = _PATH.match(path)
        if not match:
            refused.append(f"{method} {path} (not a resource path)")
            continue
        group, ns, res, name, sub = match.group("group") or "", match.group("ns"), match.group("res"), match.group("name"), match.group("sub")
        resource = f"{res}/{sub}" if sub else res
        verb = verb_of(method, name, params)
        # An apply that creates needs create as well as patch.
        verbs = {verb, "create"} if verb == "patch" and not sub and params.get("fieldManager") and "force" in params else {verb}
        rules = rules_by_ns.get(None, []) + (rules_by_ns.get(ns, []) if ns else [])
        for v in verbs:
            if not any(group in r["apiGroups"] and resource in r["resources"] and v in r["verbs"] for r in rules):
                refused.append(f"{v} {group or 'core'}/{resource} in {ns or 'all namespaces'} ({method} {path})")
    return refused


