"""`kubegate policy check`: which rule decides a request, and why — without calling a cluster.

The request is given as a kubectl command line (the common verbs and built-in resource types, translated
the way kubectl would send them) or as a raw `METHOD /path?query`.
"""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import urlencode, urlsplit

from kubegate.core import bodies, protobuf
from kubegate.core.attributes import parse_request, path_unescape
from kubegate.core.flow import Identity

from .policy import Outcome, PolicySettings, Request, evaluate, request_from_attributes

# kubectl's short names → (plural, API group, version, namespaced)
RESOURCES: dict[str, tuple[str, str, str, bool]] = {}
for names, plural, group, version, namespaced in [
    (("pod", "pods", "po"), "pods", "", "v1", True),
    (("service", "services", "svc"), "services", "", "v1", True),
    (("secret", "secrets"), "secrets", "", "v1", True),
    (("configmap", "configmaps", "cm"), "configmaps", "", "v1", True),
    (("serviceaccount", "serviceaccounts", "sa"), "serviceaccounts", "", "v1", True),
    (("persistentvolumeclaim", "persistentvolumeclaims", "pvc"), "persistentvolumeclaims", "", "v1", True),
    (("event", "events", "ev"), "events", "", "v1", True),
    (("endpoints", "ep"), "endpoints", "", "v1", True),
    (("namespace", "namespaces", "ns"), "namespaces", "", "v1", False),
    (("node", "nodes", "no"), "nodes", "", "v1", False),
    (("persistentvolume", "persistentvolumes", "pv"), "persistentvolumes", "", "v1", False),
    (("deployment", "deployments", "deploy"), "deployments", "apps", "v1", True),
    (("statefulset", "statefulsets", "sts"), "statefulsets", "apps", "v1", True),
    (("daemonset", "daemonsets", "ds"), "daemonsets", "apps", "v1", True),
    (("replicaset", "replicasets", "rs"), "replicasets", "apps", "v1", True),
    (("job", "jobs"), "jobs", "batch", "v1", True),
    (("cronjob", "cronjobs", "cj"), "cronjobs", "batch", "v1", True),
    (("ingress", "ingresses", "ing"), "ingresses", "networking.k8s.io", "v1", True),
    (("networkpolicy", "networkpolicies", "netpol"), "networkpolicies", "networking.k8s.io", "v1", True),
    (("role", "roles"), "roles", "rbac.authorization.k8s.io", "v1", True),
    (("rolebinding", "rolebindings"), "rolebindings", "rbac.authorization.k8s.io", "v1", True),
    (("clusterrole", "clusterroles"), "clusterroles", "rbac.authorization.k8s.io", "v1", False),
    (("clusterrolebinding", "clusterrolebindings"), "clusterrolebindings", "rbac.authorization.k8s.io", "v1", False),
    (("customresourcedefinition", "customresourcedefinitions", "crd", "crds"), "customresourcedefinitions",
     "apiextensions.k8s.io", "v1", False),
]:  # fmt: skip
    for name in names:
        RESOURCES[name] = (plural, group, version, namespaced)

# kubectl verb → (HTTP method, API verb, subresource); the API verb is what parse_request derives again
VERBS = {
    "get": ("GET", "get", ""),
    "describe": ("GET", "get", ""),
    "delete": ("DELETE", "delete", ""),
    "edit": ("PATCH", "patch", ""),
    "patch": ("PATCH", "patch", ""),
    "label": ("PATCH", "patch", ""),
    "annotate": ("PATCH", "patch", ""),
    "scale": ("PATCH", "patch", "scale"),
    "exec": ("GET", "create", "exec"),
    "attach": ("GET", "create", "attach"),
    "logs": ("GET", "get", "log"),
    "port-forward": ("GET", "create", "portforward"),
    "cp": ("GET", "create", "exec"),
}
FLAGS_WITH_VALUE = {"-n", "--namespace", "-c", "--container", "-o", "--output", "-l", "--selector",
                    "--context", "--kubeconfig", "-f", "--filename", "--replicas", "--type", "-p", "--patch"}  # fmt: skip


class CheckError(Exception):
    """The command line cannot be turned into a request; the message says why."""


def request_from_kubectl(argv: list[str], default_namespace: str = "default") -> tuple[str, str, str]:
    """(HTTP method, path, query) of what `kubectl ARGV` sends for its main request."""
    args, command = argv, []
    if "--" in args:
        at = args.index("--")
        args, command = args[:at], args[at + 1 :]
    if args and args[0] == "kubectl":
        args = args[1:]
    if not args:
        raise CheckError("give a kubectl command, e.g. -- kubectl delete pod web -n prod")
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        raise CheckError(f"kubectl {verb} is not understood here; give the raw request (METHOD /path)")
    namespace, all_namespaces, positional = default_namespace, False, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-n", "--namespace"):
            namespace, i = rest[i + 1] if i + 1 < len(rest) else "", i + 2
            continue
        if arg.startswith("--namespace="):
            namespace = arg.split("=", 1)[1]
        elif arg in ("-A", "--all-namespaces"):
            all_namespaces = True
        elif arg in FLAGS_WITH_VALUE:
            i += 1
        elif not arg.startswith("-"):
            positional.append(arg)
        i += 1
    method, _, subresource = VERBS[verb]
    if verb in ("exec", "attach", "logs", "port-forward"):
        kind, name = "pods", positional[0] if positional else ""
        if "/" in name:
            kind, name = name.split("/", 1)
        positional = [kind, name]
    elif verb == "cp":
        remote = next((p for p in positional if ":" in p), "")
        pod = remote.split(":", 1)[0]
        if "/" in pod:
            namespace, pod = pod.split("/", 1)
        positional, command = ["pods", pod], ["tar", "cf", "-", remote.split(":", 1)[1] if remote else ""]
    if not positional:
        raise CheckError(f"kubectl {verb}: which resource?")
    kind, name = positional[0], positional[1] if len(positional) > 1 else ""
    if "/" in kind:
        kind, name = kind.split("/", 1)
    kind = kind.lower().split(".", 1)[0]
    if kind not in RESOURCES:
        raise CheckError(f"resource type {kind!r} is not known here; give the raw request (METHOD /path)")
    plural, group, version, namespaced = RESOURCES[kind]
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespaced and not all_namespaces:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}" + (f"/{name}" if name else "")
    if subresource:
        if not name:
            raise CheckError(f"kubectl {verb} needs a name")
        path += f"/{subresource}"
    query = ""
    if subresource in ("exec", "attach"):
        query = urlencode([("command", c) for c in command] + [("stdout", "true"), ("stderr", "true")])
    if verb == "delete" and not name:
        method = "DELETE"  # deletecollection
    return method, path, query


def guess_content_type(method: str, body: bytes | None) -> str:
    """The Content-Type kubectl would have sent `body` with, for a `--body` file given without one:
    protobuf by its magic; for PATCH a JSON patch (a list) or a strategic merge patch (kubectl's default);
    otherwise JSON or YAML by the first character."""
    if body is None:
        return ""
    if body.startswith(protobuf.MAGIC):
        return bodies.PROTOBUF
    text = body.lstrip()
    if method == "PATCH":
        return (
            "application/json-patch+json"
            if text.startswith(b"[")
            else "application/strategic-merge-patch+json"
        )
    return bodies.JSON if text.startswith(b"{") else bodies.YAML


def build_request(identity: Identity, argv: list[str], body: bytes | None, content_type: str = "") -> Request:
    if argv and argv[0].upper() in ("GET", "POST", "PUT", "PATCH", "DELETE") and len(argv) == 2:
        parts = urlsplit(argv[1])
        method, path, query = argv[0].upper(), parts.path, parts.query
        if not path.startswith("/"):
            raise CheckError(
                "a raw request is METHOD /path[?query], e.g. DELETE /api/v1/namespaces/prod/pods/web"
            )
    else:
        method, path, query = request_from_kubectl(argv)
    try:
        # Read as the gateway reads a live request (Go's rules); what it would refuse is reported.
        attrs = parse_request(method, path_unescape(path), query)
    except ValueError as exc:
        raise CheckError(f"the gateway would refuse this request: {exc}") from None
    req = request_from_attributes(identity, attrs, path + (f"?{query}" if query else ""), attrs.command, body)
    req.method = method
    req.content_type = content_type or guess_content_type(method, body)
    return req


def describe(req: Request, outcome: Outcome) -> list[str]:
    who = req.identity
    what = f"{req.verb} {req.resource or req.path}"
    if req.name:
        what += f" {req.name!r}"
    if req.namespace:
        what += f" in namespace {req.namespace}"
    if req.command:
        what += f" running {shlex.join(req.command)}"
    if req.creates:
        what += " — may create the object: rules for create judge it too"
    lines = [
        f"request:  {what} ({req.path})",
        f"as:       {who.user} (groups: {', '.join(who.groups) or 'none'}; method: {who.method or '-'})",
        "rules:",
        *(f"  {line}" for line in outcome.trace),
    ]
    rule = outcome.rule
    if outcome.action == "approve" and rule is not None and rule.approval is not None:
        a = rule.approval
        scope = "this request only" if a.scope == "once" else f"a {a.window_seconds} s window"
        lines.append(
            f"decision: approve by rule {rule.name} — {a.min_approvals} approval(s) from "
            f"{', '.join(a.reviewer_groups)}; waits up to {a.ttl_seconds} s; grants {scope}"
        )
    elif rule is not None:
        message = outcome.condition_error or rule.message
        lines.append(f"decision: {outcome.action} by rule {rule.name}" + (f": {message}" if message else ""))
    else:
        lines.append(f"decision: {outcome.action} (the connection's default)")
    if outcome.condition_error and outcome.action == "approve":
        lines.append(f"because:  {outcome.condition_error}")
    for entry in outcome.dry_run:
        lines.append(f"dry run:  rule {entry['rule']} would {entry['action']} (recorded, not enforced)")
    return lines


def check(
    settings: PolicySettings,
    identity: Identity,
    argv: list[str],
    body: bytes | None,
    content_type: str = "",
) -> dict[str, Any]:
    """Which rule decides the request and why. `body` is the `--body` file; `content_type` how it is
    encoded ("" → guessed, see `guess_content_type`)."""
    req = build_request(identity, argv, body, content_type)
    outcome = evaluate(settings, req)
    return {
        "request": {
            "verb": req.verb,
            "resource": req.resource,
            "namespace": req.namespace,
            "name": req.name,
            "path": req.path,
            "command": req.command,
            # may create its object without the verb create: rules for create judge it too
            "creates": req.creates,
        },
        "decision": outcome.action,
        "as_verb": outcome.as_verb,
        "rule": outcome.rule.name if outcome.rule else None,
        "dry_run": outcome.dry_run,
        "trace": outcome.trace,
        "condition_error": outcome.condition_error,
        "text": describe(req, outcome),
    }
