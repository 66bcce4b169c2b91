"""Masked values in representations beside the object itself (red team, masking2): the last-applied
annotation kubectl writes without a namespace, pod templates kept elsewhere (ControllerRevisions), the API
server's own refusal messages, and response headers. Each test fails on the code before its fix."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from kubegate.plugins.masking import JsonBody, Masking, MaskingSettings, WatchLines
from kubegate.plugins.masking.objects import LAST_APPLIED

MARKER = "<masked by kubegate>"
ENV_VALUE = "s3cr3t-env-value-not-in-any-secret"  # no known value, no detector: only the name rules see it
HOOK = "https://hooks.example.invalid/T0k3nInTheUrlPath"
RULE = {"namespaces": "prod", "names": "app-*", "keys": ["*_URL"]}


def flow(resource: str, verb: str = "get") -> Any:
    return SimpleNamespace(attributes=SimpleNamespace(resource=resource, verb=verb), state={},
                           connection=SimpleNamespace(name="c"), request=SimpleNamespace(path="/x"))  # fmt: skip


def served(masking: Masking, doc: Any, resource: str) -> str:
    body = JsonBody(masking, flow(resource), None)
    return (body.feed(orjson.dumps(doc)) + body.end()).decode()


# -- the last-applied annotation ----------------------------------------------------------------------------


def configmap(applied_meta: dict[str, Any]) -> dict[str, Any]:
    # `kubectl create configmap app-hooks --from-literal=SLACK_URL=… --save-config` in a context whose namespace
    # is prod: create_configmap.go sets Namespace only with EnforceNamespace (-n), so the annotation has none.
    applied = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"SLACK_URL": HOOK, "MODE": "fast"},
               "metadata": {"creationTimestamp": None, **applied_meta}}  # fmt: skip
    return {"kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": "app-hooks", "namespace": "prod",
                         "annotations": {LAST_APPLIED: json.dumps(applied, separators=(",", ":")) + "\n"}},
            "data": {"SLACK_URL": HOOK, "MODE": "fast"}}  # fmt: skip


@pytest.mark.parametrize(
    "applied_meta",
    [{"name": "app-hooks"}, {}, {"name": "other", "namespace": "staging"}],
    ids=["no-namespace", "no-metadata-names", "names-that-differ"],
)
def test_configmap_keys_in_the_last_applied_annotation_match_the_enclosing_object(applied_meta):
    """The annotation is masked as the object it says it is and as the ConfigMap it is on: either reading
    matching a `configmap_keys` rule masks the key."""
    masking = Masking(MaskingSettings(configmap_keys=[RULE]))
    for resource, doc in [
        ("configmaps", configmap(applied_meta)),
        ("configmaps", {"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {},
                        "items": [{k: v for k, v in configmap(applied_meta).items() if k != "kind"}]}),
        # `?includeObject=Metadata` / `kubectl get --show-managed-fields -o metadata`: no data, the annotation
        ("configmaps", {**configmap(applied_meta), "kind": "PartialObjectMetadata", "data": None}),
    ]:  # fmt: skip
        out = json.loads(served(masking, doc, resource))
        obj = out["items"][0] if "items" in out else out
        assert HOOK not in json.dumps(out)
        applied = json.loads(obj["metadata"]["annotations"][LAST_APPLIED])
        assert applied["data"] == {"SLACK_URL": MARKER, "MODE": "fast"}  # the other key is kept
        assert applied["metadata"] == {"creationTimestamp": None, **applied_meta}  # what it says is kept


def test_last_applied_of_another_namespace_or_name_is_not_masked_by_the_rule():
    masking = Masking(MaskingSettings(configmap_keys=[RULE]))
    doc = configmap({"name": "app-hooks"})
    doc["metadata"]["namespace"] = "staging"
    out = json.loads(served(masking, doc, "configmaps"))
    assert out["data"]["SLACK_URL"] == HOOK
    assert json.loads(out["metadata"]["annotations"][LAST_APPLIED])["data"]["SLACK_URL"] == HOOK


# -- env lists outside the pod templates the masker knows ------------------------------------------------------

TEMPLATE = {"metadata": {"labels": {"app": "db"}},
            "spec": {"containers": [{"name": "db", "image": "postgres",
                                     "env": [{"name": "DB_PASSWORD", "value": ENV_VALUE},
                                             {"name": "PGDATA", "value": "/var/lib/pg"}]}]}}  # fmt: skip
# What the StatefulSet and DaemonSet controllers store (history.go / controller_history.go: the template as a
# strategic-merge patch, `$patch: replace`); `kubectl rollout history statefulset/db --revision=1` prints it.
REVISION = {"kind": "ControllerRevision", "apiVersion": "apps/v1",
            "metadata": {"name": "db-7d9f8b6c5", "namespace": "prod"}, "revision": 1,
            "data": {"spec": {"template": {"$patch": "replace", **TEMPLATE}}}}  # fmt: skip
CUSTOM = {"kind": "Workflow", "apiVersion": "argoproj.io/v1alpha1", "metadata": {"name": "w", "namespace": "prod"},
          "spec": {"templates": [{"name": "main", "container": {"image": "x", "env": TEMPLATE["spec"][
              "containers"][0]["env"]}}]}}  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "doc"),
    [
        ("controllerrevisions", REVISION),
        ("controllerrevisions", {"kind": "ControllerRevisionList", "apiVersion": "apps/v1", "metadata": {},
                                 "items": [{k: v for k, v in REVISION.items() if k != "kind"}]}),
        ("controllerrevisions", {"type": "ADDED", "object": REVISION}),
        ("workflows", CUSTOM),
        # a pod template the masker reads (counted twice: as its own kind and the path's) beside one it does not
        ("deployments", {"kind": "Rollout", "metadata": {"name": "r"}, "spec": {
            "template": TEMPLATE, "canary": {"analysis": {"env": TEMPLATE["spec"]["containers"][0]["env"]}}}}),
        # the last-applied annotation of a custom resource
        ("workflows", {**CUSTOM, "spec": {}, "metadata": {"name": "w", "annotations": {
            LAST_APPLIED: json.dumps(CUSTOM)}}}),
    ],
)  # fmt: skip
def test_env_values_are_masked_by_name_in_any_env_list(resource, doc):
    masking = Masking(MaskingSettings())
    out = served(masking, json.loads(json.dumps(doc)), resource)
    assert ENV_VALUE not in out
    assert "/var/lib/pg" in out  # only values of secret-looking names
    if doc.get("type") is None:
        return
    watch = WatchLines(masking, flow(resource, "watch"), None)
    assert ENV_VALUE not in (watch.feed(orjson.dumps(doc) + b"\n") + watch.end()).decode()
