"""What reaches records, without a network: request bodies of every shape (objects, Lists, JSON / merge /
strategic-merge / apply patches; JSON, YAML, protobuf) and exec command lines, masked by
`mask_body_for_record`, `mask_command_for_record` and `mask_query_for_record`. Each test sends the body
or command an attacker would use to get a value into a record in clear."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.plugins.masking import (
    PLUGIN_NAME,
    Masking,
    MaskingSettings,
    mask_body_for_record,
    mask_command_for_record,
    mask_query_for_record,
)
from kubegate.plugins.masking.records import mask_command, mask_command_query, pointer_segments

MARKER = "<masked by kubegate>"
CLEAR = "Zm9vYmFyLXMzY3JldA"  # what each body tries to get through; no pattern or known value matches it
KNOWN = "hunter2-prod-s3cret"  # a value the connection learned from its Secrets


def masking(**settings_: Any) -> Masking:
    m = Masking(MaskingSettings.model_validate(settings_))
    m.set_known({KNOWN})
    return m


def flow(
    resource: str = "secrets",
    *,
    method: str = "PATCH",
    content_type: str = "application/json",
    namespace: str = "prod",
    name: str = "db",
    masked: Masking | None = None,
) -> Any:
    headers = {"content-type": content_type}
    return SimpleNamespace(
        attributes=SimpleNamespace(resource=resource, namespace=namespace, name=name),
        request=SimpleNamespace(method=method, header=lambda key: headers.get(key.lower(), "")),
        connection=SimpleNamespace(name="c", state={PLUGIN_NAME: masked or masking()}),
        state={},
    )


def record(body: Any, resource: str = "secrets", **kwargs: Any) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return mask_body_for_record(flow(resource, **kwargs), raw)


JSON_PATCH = "application/json-patch+json"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"


# -- JSON patch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "add", "path": "/data/x", "value": CLEAR}],
        [{"op": "replace", "path": "/data", "value": {"x": CLEAR, "y": CLEAR}}],
        [{"op": "add", "path": "/stringData/pw", "value": CLEAR}],
        [{"op": "test", "path": "/data/pw", "value": CLEAR}],  # an oracle: the guess itself is the secret
        [{"op": "add", "path": "/data", "value": CLEAR}],  # not a map: the API server refuses, the record stays
        [{"op": "add", "path": "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration",
          "value": json.dumps({"kind": "ConfigMap", "stringData": {"pw": CLEAR}})}],
    ],
)  # fmt: skip
def test_json_patch_of_a_secret_masks_every_value(ops):
    shown = record(ops, content_type=JSON_PATCH)
    assert CLEAR not in shown
    masked = json.loads(shown)
    assert [op["path"] for op in masked] == [op["path"] for op in ops]  # where it goes stays readable
    assert all(op["value"] != ops[i]["value"] for i, op in enumerate(masked))


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "add", "path": "", "value": {"kind": "Secret", "data": {"x": CLEAR}}}],
        [{"op": "add", "path": "data/x", "value": CLEAR}],  # not a pointer: the API server reads /x
    ],
)
def test_json_patch_with_pointers_the_gateway_refuses_is_recorded_by_size_and_hash(ops):
    assert record(ops, content_type=JSON_PATCH).startswith("<")  # the body reader refuses it: not shown


def test_json_patch_env_value_by_index_is_masked_its_name_is_not_visible():
    ops = [
        {"op": "replace", "path": "/spec/containers/0/env/1/value", "value": CLEAR},
        {"op": "add", "path": "/spec/containers/0/env/-", "value": {"name": "LEVEL", "value": "info"}},
        {"op": "add", "path": "/spec/containers/0/env/-", "value": {"name": "DB_PASSWORD", "value": CLEAR}},
        {"op": "add", "path": "/spec/containers/0/env", "value": [{"value": CLEAR}]},
    ]
    masked = json.loads(record(ops, "pods", content_type=JSON_PATCH))
    assert CLEAR not in json.dumps(masked)
    assert masked[1]["value"] == {"name": "LEVEL", "value": "info"}  # nothing secret: kept for reviewers
    assert masked[0]["value"] == MARKER


def test_json_patch_env_in_a_deployment_template_and_a_custom_resource():
    path = "/spec/template/spec/containers/0/env/0"
    ops = [{"op": "add", "path": path, "value": {"name": "API_TOKEN", "value": CLEAR}}]
    assert CLEAR not in record(ops, "deployments", content_type=JSON_PATCH)
    # A kind the gateway does not know: env entries are found wherever they are.
    ops = [{"op": "add", "path": "/spec/runner/env/0", "value": {"name": "DB_PASSWORD", "value": CLEAR}}]
    assert CLEAR not in record(ops, "widgets", content_type=JSON_PATCH)


def test_json_patch_configmap_key_rule_applies_at_the_patched_key():
    m = masking(configmap_keys=[{"namespaces": "prod", "names": "app-config", "keys": ["DB_*"]}])
    ops = [{"op": "add", "path": "/data/DB_HOST", "value": CLEAR}, {"op": "add", "path": "/data/LEVEL",
                                                                     "value": "info"}]  # fmt: skip
    masked = json.loads(record(ops, "configmaps", content_type=JSON_PATCH, name="app-config", masked=m))
    assert masked[0]["value"] == MARKER and masked[1]["value"] == "info"


def test_json_patch_known_values_and_detectors_anywhere():
    ops = [
        {"op": "add", "path": "/metadata/labels/x", "value": KNOWN},
        {"op": "add", "path": "/spec/containers/0/args/-", "value": f"--dsn=postgres://u:{KNOWN}@db/x"},
        {"op": "copy", "from": "/spec/containers/0/image", "path": "/metadata/annotations/a"},
    ]
    shown = record(ops, "pods", content_type=JSON_PATCH)
    assert KNOWN not in shown
    assert json.loads(shown)[2] == ops[2]  # from/path kept


# -- merge, strategic-merge and apply patches; objects ------------------------------------------------------


@pytest.mark.parametrize("content_type", [MERGE, STRATEGIC, APPLY, "application/json"])
def test_a_body_sent_to_secrets_is_masked_as_a_secret_whatever_its_kind_says(content_type):
    body = {"kind": "ConfigMap", "data": {"x": CLEAR}, "stringData": {"y": CLEAR}}
    assert CLEAR not in record(body, content_type=content_type)


def test_strategic_merge_patch_env_without_name_and_directives():
    patch = {"spec": {"template": {"spec": {"containers": [{
        "name": "app", "env": [{"name": "DB_PASSWORD", "value": CLEAR}, {"value": CLEAR, "$patch": "replace"}],
        "$setElementOrder/env": [{"name": "DB_PASSWORD"}, {"name": "LEVEL"}],
        "$deleteFromPrimitiveList/args": [f"--password={CLEAR}"],
    }]}}}}  # fmt: skip
    shown = record(patch, "deployments", content_type=STRATEGIC)
    assert CLEAR not in shown
    assert "$setElementOrder/env" in shown


def test_apply_patch_as_yaml_is_masked_and_shown_as_json():
    body = f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  pw: {CLEAR}\n".encode()
    shown = record(body, method="PATCH", content_type=APPLY)
    assert CLEAR not in shown
    assert json.loads(shown)["stringData"]["pw"] == MARKER


def test_yaml_aliases_are_read_as_the_api_server_reads_them_and_a_bomb_is_only_sized():
    body = b"a: &x {pw: " + CLEAR.encode() + b"}\nstringData: *x\n"
    shown = record(body, content_type=APPLY)
    assert CLEAR not in shown and json.loads(shown)["stringData"] == {"pw": MARKER}
    bomb = (
        b"a: &a ["
        + CLEAR.encode()
        + b"]\n"
        + b"".join(
            b"%c: &%c [%s]\n" % (c, c, b",".join([b"*%c" % (c - 1)] * 10)) for c in range(ord("b"), ord("h"))
        )
    )
    shown = record(bomb, content_type=APPLY)
    assert shown.startswith("<") and "sha256" in shown and CLEAR not in shown


def test_a_body_the_api_server_would_refuse_is_only_sized():
    for body, content_type in [
        (b'{"stringData": {"pw": "x"}, "stringData": {"pw": "' + CLEAR.encode() + b'"}}', MERGE),  # duplicate
        (
            json.dumps([{"op": "add", "path": "/data/x", "value": CLEAR}, "not an operation"]).encode(),
            JSON_PATCH,
        ),
        (json.dumps({"data": {"x": CLEAR}}).encode(), "application/x-unknown"),
    ]:
        shown = record(body, content_type=content_type)
        assert shown.startswith("<") and CLEAR not in shown, shown


def test_delete_options_are_shown():
    shown = record({"kind": "DeleteOptions", "propagationPolicy": "Foreground"}, method="DELETE")
    assert json.loads(shown)["propagationPolicy"] == "Foreground"


def test_nested_lists_and_non_map_secret_data():
    body = {"kind": "List", "items": [
        {"kind": "List", "items": [{"kind": "Secret", "data": {"x": CLEAR}}]},
        {"kind": "SecretList", "items": [{"data": {"y": CLEAR}}]},
        {"kind": "Secret", "data": [CLEAR], "stringData": CLEAR},
        {"kind": "Pod", "spec": {"containers": [{"env": [{"name": "API_KEY", "value": CLEAR}]}]}},
    ]}  # fmt: skip
    assert CLEAR not in record(body, "", method="POST")


def test_a_list_where_an_object_is_expected_is_masked_as_operations_too():
    ops = [{"op": "add", "path": "/data/x", "value": CLEAR}]
    assert CLEAR not in record(ops, content_type=MERGE)


def test_undecodable_body_is_size_and_hash_only():
    shown = record(b"\x00\x01not json " + CLEAR.encode(), method="POST")
    assert shown.startswith("<") and CLEAR not in shown


def test_records_are_masked_on_a_connection_without_masking():
    f = flow(content_type=JSON_PATCH)
    f.connection.state = {}
    ops = [{"op": "add", "path": "/data/x", "value": CLEAR}]
    assert CLEAR not in mask_body_for_record(f, json.dumps(ops).encode())


# Any place in a JSON patch of a Secret, any nesting of Lists of Secrets: the value never shows.
_segments = st.lists(st.one_of(st.sampled_from(["data", "stringData", "metadata", "-", "0", "a~1b", "x"]),
                               st.text(max_size=6)), max_size=5)  # fmt: skip
_json = st.recursive(
    st.just(CLEAR) | st.integers() | st.none(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(segments=_segments, value=_json, op=st.sampled_from(["add", "replace", "test"]))
def test_any_json_patch_position_of_a_secret_is_masked(segments, value, op):
    path = "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in segments)
    assert CLEAR not in record([{"op": op, "path": path, "value": value}], content_type=JSON_PATCH)


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(0, 6), list_kind=st.sampled_from(["List", "SecretList", "", "ConfigMapList"]))
def test_any_nesting_of_lists_posted_to_secrets_is_masked(depth, list_kind):
    doc: dict[str, Any] = {"data": {"pw": CLEAR}}
    for _ in range(depth):
        doc = {"kind": list_kind, "items": [doc]} if list_kind else {"items": [doc]}
    assert CLEAR not in record(doc, method="POST")


# -- command lines ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "kept"),
    [
        (["sh", "-c", f"mysql -uroot -p{CLEAR} shop; echo done"], "mysql -uroot -p"),
        (["/usr/bin/mysql", f"-p{CLEAR}"], "/usr/bin/mysql"),
        (["env", f"DB_PASSWORD={CLEAR}", "app"], "DB_PASSWORD="),
        (["sh", "-c", f"export API_KEY='{CLEAR}'; ./run"], "export API_KEY="),
        (["sshpass", "-p", CLEAR, "ssh", "host"], "ssh"),
        (["sh", "-c", f"redis-cli -a {CLEAR} ping"], "redis-cli -a"),
        (["app", "--password", CLEAR], "--password"),
        (["app", f"--db-token={CLEAR}"], "--db-token="),
        (["curl", "-u", f"bob:{CLEAR}", "http://x"], "bob:"),
        (["curl", "-H", f"Authorization: Bearer {CLEAR}", "http://x"], "Authorization: Bearer"),
        (["sh", "-c", f"echo {KNOWN} | psql"], "psql"),  # a known value, wherever it is
        (["sh", "-c", f"PASSWORD={CLEAR} ./migrate"], "./migrate"),
    ],
)
def test_command_line_secrets_are_masked(argv, kept):
    masked = mask_command_for_record(flow("pods"), argv)
    assert len(masked) == len(argv)
    assert CLEAR not in " ".join(masked) and KNOWN not in " ".join(masked)
    assert kept in " ".join(masked) and MARKER in " ".join(masked)


@pytest.mark.parametrize(
    "argv", [["mkdir", "-p", "/tmp/x"], ["mysql", "-p", "shop"], ["ls", "-la"], ["psql", "-p", "5432"]]
)
def test_ordinary_command_lines_are_kept(argv):
    assert mask_command_for_record(flow("pods"), argv) == argv


def test_arguments_with_nul_are_masked_one_by_one():
    m = masking()
    masked = mask_command(["a\x00b", f"DB_PASSWORD={CLEAR}"], m.text.mask, m.env_name, MARKER)
    assert masked == ["a\x00b", f"DB_PASSWORD={MARKER}"]


def test_query_command_parameters_are_masked_and_others_kept_byte_for_byte():
    query = f"command=sh&command=-c&command=mysql+-p{CLEAR}&container=app&stdin=true&tty=%74rue"
    masked = mask_query_for_record(flow("pods"), query)
    assert masked is not None and CLEAR not in masked
    assert masked.startswith("command=sh&command=-c&command=mysql%20-p%3C")
    assert masked.endswith("&container=app&stdin=true&tty=%74rue")
    assert mask_query_for_record(flow("pods"), "command=ls&stdout=true") is None  # nothing to mask


def test_query_command_key_spelled_otherwise_is_recognised():
    query = f"c%6Fmmand=env&COMMAND=DB_PASSWORD%3D{CLEAR}"
    masked = mask_command_query(query, lambda argv: [MARKER if CLEAR in a else a for a in argv])
    assert masked is not None and CLEAR not in masked


def test_pointer_segments():
    assert pointer_segments("") == []
    assert pointer_segments("/a~1b/~0c/0") == ["a/b", "~c", "0"]
    assert pointer_segments("a") is None


def test_other_query_parameters_are_scrubbed_by_the_text_rules():
    # pods/proxy and services/proxy pass the query on to the pod: `?token=…` is the pod's own credential.
    query = f"token={CLEAR}&limit=500&next=postgres%3A%2F%2Fu%3A{CLEAR}%40db&q={KNOWN}"
    masked = mask_query_for_record(flow("pods"), query)
    assert masked is not None and CLEAR not in masked and KNOWN not in masked
    assert "&limit=500&" in masked
    assert mask_query_for_record(flow("pods"), "labelSelector=app%3Dweb&limit=500") is None


def test_container_command_and_args_are_masked_as_command_lines():
    pod = {"kind": "Pod", "spec": {"containers": [{"name": "db", "command": ["mysqld"],
                                                   "args": ["--root-password", CLEAR, "--port=3306"]}],
                                   "initContainers": [{"name": "init", "command": ["sh", "-c",
                                                                                   f"mysql -p{CLEAR} < init.sql"]}]}}  # fmt: skip
    masked = json.loads(record(pod, "pods", method="POST"))
    assert CLEAR not in json.dumps(masked)
    assert masked["spec"]["containers"][0]["args"] == ["--root-password", MARKER, "--port=3306"]
    ops = [{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": f"--api-token={CLEAR}"}]
    assert CLEAR not in record(ops, "deployments", content_type=JSON_PATCH)


def test_json_patch_index_like_segments_are_read_as_map_keys_too():
    # `/data/0` of a ConfigMap is the key "0" (a map), not an index: the key rule must see it.
    m = masking(configmap_keys=[{"keys": ["*"]}])
    ops = [{"op": "add", "path": "/data/0", "value": CLEAR}, {"op": "add", "path": "/data/-", "value": CLEAR}]
    assert CLEAR not in record(ops, "configmaps", content_type=JSON_PATCH, masked=m)


# -- ConfigMap keys where the request, not the body, names the object ---------------------------------------

HOOK_RULE = {"namespaces": "prod", "names": "app-*", "keys": ["*_URL"]}


@pytest.mark.parametrize(
    ("method", "content_type", "name", "body"),
    [
        # `kubectl create configmap app-hooks --from-literal=SLACK_URL=…` without -n: the namespace is the path's
        ("POST", "application/json", "", {"kind": "ConfigMap", "apiVersion": "v1",
                                          "metadata": {"name": "app-hooks"}, "data": {"SLACK_URL": CLEAR}}),
        # `kubectl patch cm app-hooks -p '{"data":{…}}'`, `kubectl edit`, server-side apply: no metadata at all
        ("PATCH", STRATEGIC, "app-hooks", {"data": {"SLACK_URL": CLEAR}}),
        ("PATCH", MERGE, "app-hooks", {"data": {"SLACK_URL": CLEAR}}),
        ("PATCH", APPLY, "app-hooks", {"apiVersion": "v1", "kind": "ConfigMap", "data": {"SLACK_URL": CLEAR}}),
        ("PUT", "application/json", "app-hooks", {"kind": "ConfigMap", "data": {"SLACK_URL": CLEAR}}),
        # a last-applied annotation in a patch: masked as the ConfigMap the request is for
        ("PATCH", MERGE, "app-hooks", {"metadata": {"annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                {"kind": "ConfigMap", "data": {"SLACK_URL": CLEAR}})}}}),
        ("PATCH", JSON_PATCH, "app-hooks", [{"op": "add", "path": "/data", "value": {"SLACK_URL": CLEAR}}]),
    ],
)  # fmt: skip
def test_configmap_keys_use_the_requests_namespace_and_name_where_the_body_has_none(
    method, content_type, name, body
):
    masked = masking(configmap_keys=[HOOK_RULE])
    shown = record(body, "configmaps", method=method, content_type=content_type, name=name, masked=masked)
    assert CLEAR not in shown, shown
    assert MARKER in shown
    elsewhere = record(body, "configmaps", method=method, content_type=content_type, name=name,
                       namespace="staging", masked=masked)  # fmt: skip
    assert CLEAR in elsewhere  # the rule is for prod only: not a mask-everything
