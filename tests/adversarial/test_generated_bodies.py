"""Generated bodies in every media type the API server accepts for writes: a guardrail written as docs/policy.md
recommends denies a privileged or hostPID pod however it is spelled — JSON or YAML object, YAML's other ways
of writing `true`, content-type parameters and letter case, strategic-merge, merge, apply and JSON patches —
and lets the same pod without the danger through. (tests/adversarial/test_bodies_policy.py sends hand-made
cases through a real gateway; this one covers the space of spellings at the policy's own reading.)"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.core.flow import Identity
from kubegate.plugins.policy import PolicySettings, Request, evaluate

CONDITION = (
    "request.patchType == 'json-patch' ? object.exists(op, op.path.startsWith('/spec')) : "
    "has(object.spec) && ((has(object.spec.hostPID) && object.spec.hostPID) || "
    "(has(object.spec.containers) && object.spec.containers.exists(c, has(c.securityContext) && "
    "has(c.securityContext.privileged) && c.securityContext.privileged)))"
)
POLICY = PolicySettings.model_validate(
    {
        "default": "allow",
        "rules": [
            {
                "name": "no-privileged",
                "match": {
                    "verbs": ["create", "update", "patch"],
                    "resources": ["pods"],
                    "condition": CONDITION,
                },
                "action": "deny",
            }
        ],
    }
)
ALICE = Identity(user="alice", groups=("developers",), method="static-tokens")
# goyaml.v2 (the API server's YAML reader) reads all of these as true.
YAML_TRUE = ["true", "True", "TRUE", "yes", "Yes", "on", "ON", "y", "Y"]
YAML_FALSE = ["false", "False", "no", "off", "n"]


@st.composite
def pods(draw):
    """(danger, pod as a dict, YAML spellings of its booleans)."""
    count = draw(st.integers(1, 3))
    danger = draw(st.sampled_from(["none", "privileged", "hostPID"]))
    privileged_at = draw(st.integers(0, count - 1))
    containers = []
    for index in range(count):
        container: dict = {"name": f"c{index}", "image": "busybox"}
        if danger == "privileged" and index == privileged_at:
            container["securityContext"] = {"privileged": True}
        elif draw(st.booleans()):
            container["securityContext"] = {"privileged": False, "runAsNonRoot": True}
        containers.append(container)
    spec: dict = {"containers": containers}
    if danger == "hostPID":
        spec["hostPID"] = True
    elif draw(st.booleans()):
        spec["hostPID"] = False
    labels = draw(st.dictionaries(st.sampled_from(["app", "tier", "spec"]), st.text("abc", max_size=3)))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": labels}, "spec": spec}
    return danger != "none", pod, draw(st.sampled_from(YAML_TRUE)), draw(st.sampled_from(YAML_FALSE))


def yaml_text(value, true: str, false: str, indent: str = "") -> str:
    """Block YAML written by hand, so booleans can be spelled every way goyaml.v2 accepts."""
    if isinstance(value, bool):
        return true if value else false
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for key, item in value.items():
            text = yaml_text(item, true, false, indent + "  ")
            nested = isinstance(item, dict | list) and item
            lines.append(f"{indent}{key}:" + (f"\n{text}" if nested else f" {text}"))
        return "\n".join(lines)
    lines = []
    for item in value:
        text = yaml_text(item, true, false, indent + "  ").lstrip()
        lines.append(f"{indent}- {text}")
    return "\n".join(lines)


def encodings(pod: dict, true: str, false: str) -> list[tuple[str, str, bytes]]:
    """(method, Content-Type, body) for every way to write this pod, or the change to it, to the API server."""
    spec = pod["spec"]
    yaml_body = yaml_text(pod, true, false).encode()
    ops = []
    for index, container in enumerate(spec["containers"]):
        if "securityContext" in container:
            path = f"/spec/containers/{index}/securityContext"
            ops.append({"op": "add", "path": path, "value": container["securityContext"]})
    if "hostPID" in spec:
        ops.append({"op": "replace", "path": "/spec/hostPID", "value": spec["hostPID"]})
    ops.append({"op": "add", "path": "/metadata/labels", "value": pod["metadata"]["labels"]})
    return [
        ("POST", "application/json", json.dumps(pod).encode()),
        ("POST", "Application/JSON; charset=utf-8", json.dumps(pod, indent=2).encode()),
        ("PUT", "application/json", json.dumps(pod, sort_keys=True).encode()),
        ("POST", "application/yaml", yaml_body),
        ("POST", "application/yaml; charset=utf-8", b"---\n" + yaml_body + b"\n"),
        ("PATCH", "application/strategic-merge-patch+json", json.dumps({"spec": spec}).encode()),
        ("PATCH", "application/merge-patch+json; charset=utf-8", json.dumps({"spec": spec}).encode()),
        ("PATCH", "application/apply-patch+yaml", yaml_body),
        ("PATCH", "application/json-patch+json", json.dumps(ops).encode()),
    ]


@settings(max_examples=150, deadline=None)
@given(pods())
def test_a_guardrail_holds_every_spelling_of_a_dangerous_pod(case):
    dangerous, pod, true, false = case
    for method, content_type, body in encodings(pod, true, false):
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
        request = Request(
            identity=ALICE, verb=verb, resource="pods", namespace="prod", name="" if verb == "create" else "p",
            body=body, method=method, content_type=content_type,
        )  # fmt: skip
        outcome = evaluate(POLICY, request)
        is_json_patch = content_type.startswith("application/json-patch")
        # A JSON patch touching /spec is judged by the condition's own json-patch branch (here: denied).
        expected = "deny" if dangerous or (is_json_patch and len(json.loads(body)) > 1) else "allow"
        assert outcome.action == expected, (method, content_type, body.decode(), outcome.trace)
        if expected == "allow":
            assert not outcome.condition_error, outcome.trace
