"""Documents no API server sends, from an upstream that lies or breaks: a `kind` that is not a string, a
WatchEvent without its object, containers or env that are not lists. Each is masked (as the resource's kind
where its own cannot be read; an unreadable list replaced whole) or withheld with a Status — never passed
in clear, never a crash of the response mid-body; and request bodies of any shape reach records masked or
as size and hash only."""

from __future__ import annotations

import base64
import json
import logging
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubegate.plugins.masking import JsonBody, Masking, MaskingSettings, WatchLines
from kubegate.plugins.masking.recorded import mask_body_for_record
from kubegate.plugins.masking.settings import PLUGIN_NAME

SECRET = "hunter2-plain"
SECRET_B64 = base64.b64encode(SECRET.encode()).decode()
MASKING = Masking(MaskingSettings())


def flow(resource: str, verb: str = "get") -> Any:
    return SimpleNamespace(attributes=SimpleNamespace(resource=resource, verb=verb), state={},
                           connection=SimpleNamespace(name="c"), request=SimpleNamespace(path="/x"))  # fmt: skip


def through_json(doc: Any, resource: str) -> bytes:
    body = JsonBody(MASKING, flow(resource), None)
    return body.feed(orjson.dumps(doc)) + body.end()


def through_watch(event: Any, resource: str) -> bytes:
    lines = WatchLines(MASKING, flow(resource, "watch"), None)
    return lines.feed(orjson.dumps(event) + b"\n") + lines.end()


POD_ENV = [{"name": "DB_PASSWORD", "value": SECRET}]


@pytest.mark.parametrize(
    ("doc", "resource"),
    [
        # A Secret whose kind is not a string is still the Secret the path asked for (before: kind 5 was no
        # Secret, and its data went out).
        ({"kind": 5, "apiVersion": "v1", "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": ["Secret"], "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": {"a": 1}, "stringData": {"password": SECRET}}, "secrets"),
        ({"kind": None, "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": 5, "items": [{"kind": "Secret", "data": {"password": SECRET_B64}}]}, "secrets"),
        # Containers and env that are not lists cannot be read entry by entry: they go whole.
        ({"kind": "Pod", "spec": {"containers": {"a": {"env": POD_ENV}}}}, "pods"),
        ({"kind": "Pod", "spec": {"containers": [{"name": "a", "env": {"x": POD_ENV[0]}}]}}, "pods"),
        ({"kind": "Pod", "spec": {"initContainers": 5, "containers": [{"env": POD_ENV}]}}, "pods"),
        (
            {
                "kind": "Deployment",
                "spec": {
                    "template": {"spec": {"containers": "x", "ephemeralContainers": [{"env": POD_ENV}]}}
                },
            },
            "deployments",
        ),
        # A client that knows what it asked for reads the document as that, whatever its shape says (the
        # Python client's read_namespaced_secret takes `data` from a list): a list, Table, watch event or
        # object of another kind on a Secret's or Pod's path is masked as one too (found by the property
        # test below: before, `{"items": [], "data": …}` went out in clear).
        ({"items": [], "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": "SecretList", "items": [], "stringData": {"password": SECRET}}, "secrets"),
        ({"kind": "List", "items": [], "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": "Table", "rows": [], "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": "WatchEvent", "type": "ADDED", "object": {}, "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": "ConfigMap", "data": {"password": SECRET_B64}}, "secrets"),
        ({"kind": "PodList", "items": [], "spec": {"containers": [{"name": "a", "env": POD_ENV}]}}, "pods"),
        ({"kind": "Status", "spec": {"containers": [{"name": "a", "env": POD_ENV}]}}, "pods"),
        # A WatchEvent without an object is read as an object itself.
        (
            {
                "kind": "WatchEvent",
                "type": "ADDED",
                "spec": {"template": {"spec": {"containers": [{"env": POD_ENV}]}}},
            },
            "deployments",
        ),
    ],
)
def test_shapes_no_api_server_sends_are_masked(doc, resource):
    for out in (through_json(doc, resource), through_watch(doc, resource)):
        assert SECRET.encode() not in out and SECRET_B64.encode() not in out, out
        assert orjson.loads(out.splitlines()[0])  # a JSON document: masked, or a Status


def test_a_masker_fault_withholds_the_response_with_a_status(monkeypatch, caplog):
    """Whatever goes wrong inside the masker, the response is withheld: a Status, one log line, no
    traceback reaching the client as a cut connection."""

    def broken(doc: Any, kind: str) -> bytes:
        raise RecursionError("deep")

    monkeypatch.setattr(MASKING, "mask_json", broken)
    with caplog.at_level(logging.WARNING, logger="kubegate.masking"):
        for out in (through_json({"kind": "Pod"}, "pods"), through_watch({"type": "ADDED"}, "pods")):
            status = json.loads(out)
            assert status["kind"] == "Status" and status["code"] == 502
            assert (
                "could not be masked (the masker could not read it (RecursionError: deep))"
                in status["message"]
            )
    assert all(record.exc_info is None for record in caplog.records)


# Any JSON a parser could hand the masker, with keys the walkers look for, so their type checks are reached.
KEYS = ["kind", "items", "object", "rows", "cells", "data", "stringData", "binaryData", "spec", "template",
        "jobTemplate", "containers", "initContainers", "ephemeralContainers", "env", "name", "value", "metadata",
        "annotations", "kubectl.kubernetes.io/last-applied-configuration", "type", "status", "token", "op",
        "path"]  # fmt: skip
KINDS = ["WatchEvent", "Secret", "Pod", "Table", "List", "PodList", "SecretList", "Deployment", "ConfigMap",
         "TokenRequest", "CronJob", "PodTemplate", "/spec/containers/0/env/0/value", "/data/x", "add"]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6), st.sampled_from(KINDS), st.just(SECRET), st.just(SECRET_B64),
)  # fmt: skip
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)
    ),
    max_leaves=30,
)
RESOURCES = st.sampled_from(["", "secrets", "pods", "configmaps", "deployments", "cronjobs", "widgets"])


@settings(max_examples=1500, suppress_health_check=list(HealthCheck), deadline=None)
@given(DOCUMENTS, RESOURCES)
def test_any_json_is_masked_or_withheld_never_a_crash(doc, resource):
    for out in (through_json(doc, resource), through_watch(doc, resource)):
        for line in out.splitlines():
            parsed = orjson.loads(line)
            if isinstance(parsed, dict) and parsed.get("kind") == "Status" and parsed.get("code") == 502:
                assert "masker could not read it" not in parsed["message"], parsed  # no shape breaks it
        first = orjson.loads(out.splitlines()[0])
        if resource == "secrets" and isinstance(first, dict) and isinstance(first.get("data"), dict):
            # Whatever its kind says, a document from a Secret's path has its data masked, every value.
            assert set(first["data"].values()) <= {MASKING.structure_rules.marker_b64}, first


def record_flow(resource: str, method: str, content_type: str) -> Any:
    return SimpleNamespace(
        attributes=SimpleNamespace(resource=resource, namespace="prod", name="db"),
        request=SimpleNamespace(method=method, path="/x", header=lambda key: content_type),
        connection=SimpleNamespace(name="c", state={PLUGIN_NAME: MASKING}),
        state={},
    )


@settings(max_examples=800, suppress_health_check=list(HealthCheck), deadline=None)
@given(
    DOCUMENTS,
    RESOURCES,
    st.sampled_from(
        [
            ("POST", "application/json"),
            ("PATCH", "application/json-patch+json"),
            ("PATCH", "application/merge-patch+json"),
            ("PATCH", "application/strategic-merge-patch+json"),
            ("PATCH", "application/apply-patch+yaml"),
            ("DELETE", "application/json"),
        ]
    ),
)
def test_request_bodies_of_any_shape_reach_records_masked_or_as_size_and_hash(doc, resource, request_kind):
    method, content_type = request_kind
    shown = mask_body_for_record(record_flow(resource, method, content_type), orjson.dumps(doc))
    assert isinstance(shown, str)
    assert "not masked" not in shown  # no shape makes the record masker fail


@pytest.mark.parametrize(
    ("ops", "resource", "shown"),
    [
        # env that is not a list, placed by a JSON patch: it cannot be read entry by entry, so it goes whole.
        ([{"op": "add", "path": "/spec/containers/0/env", "value": {"a": {"name": "PASSWORD", "value": SECRET}}}],
         "pods", "<masked by kubegate>"),
        ([{"op": "add", "path": "/spec/containers/0", "value": {"name": "a", "env": {"x": POD_ENV[0]}}}],
         "pods", None),
        # What holds no secret is still shown to reviewers and auditors.
        ([{"op": "replace", "path": "/spec/containers/0/image", "value": "nginx:1.27"}], "pods", "nginx:1.27"),
        ([{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "nginx:1.27"}],
         "deployments", "nginx:1.27"),
    ],
)  # fmt: skip
def test_json_patches_of_unreadable_shapes_reach_records_masked(ops, resource, shown):
    recorded = mask_body_for_record(
        record_flow(resource, "PATCH", "application/json-patch+json"), json.dumps(ops).encode()
    )
    assert SECRET not in recorded
    if shown is not None:
        assert json.loads(recorded)[0]["value"] == shown
