"""Masking without a network: structured rules per kind, text detectors, known values, and the stream
transformers under arbitrary chunk boundaries (hypothesis)."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.plugins.masking import JsonBody, Masking, MaskingSettings, Text, WatchLines, scanner
from kubegate.plugins.masking.objects import LAST_APPLIED, mask_document

MARKER = "<masked by kubegate>"
MARKER_B64 = base64.b64encode(MARKER.encode()).decode()
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": "prod", "uid": "u1",
          "resourceVersion": "7"}, "data": {"password": base64.b64encode(b"hunter2-x").decode()}}  # fmt: skip


def masking(**settings_) -> Masking:
    m = Masking(MaskingSettings.model_validate(settings_))
    m.set_known({"hunter2-x", "plain-known-value"})
    return m


def flow(resource: str = "secrets", verb: str = "get") -> SimpleNamespace:
    return SimpleNamespace(attributes=SimpleNamespace(resource=resource, verb=verb), state={},
                           connection=SimpleNamespace(name="c"), request=SimpleNamespace(path="/x"))  # fmt: skip


def test_secret_list_without_item_kinds_and_metadata_untouched():
    doc = {
        "kind": "SecretList",
        "apiVersion": "v1",
        "items": [{k: v for k, v in SECRET.items() if k != "kind"}],
    }
    assert mask_document(doc, masking().rules)
    item = doc["items"][0]
    assert item["data"] == {"password": MARKER_B64}
    assert item["metadata"] == SECRET["metadata"]


def test_last_applied_is_masked_inside_and_stays_json():
    applied = {
        "apiVersion": "v1",
        "kind": "Secret",
        "stringData": {"token": "abc"},
        "metadata": {"name": "s"},
    }
    obj = {"kind": "ConfigMap", "metadata": {"name": "x", "annotations": {LAST_APPLIED: json.dumps(applied)}}}
    mask_document(obj, masking().rules)
    assert json.loads(obj["metadata"]["annotations"][LAST_APPLIED])["stringData"] == {"token": MARKER}
    broken = {"kind": "Pod", "metadata": {"name": "p", "annotations": {LAST_APPLIED: "{not json"}}}
    mask_document(broken, masking().rules)
    assert broken["metadata"]["annotations"][LAST_APPLIED] == MARKER


def test_env_values_in_every_pod_template():
    env = [{"name": "DB_PASSWORD", "value": "p1"}, {"name": "LOG_LEVEL", "value": "info"},
           {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]  # fmt: skip
    pod_spec = {
        "containers": [{"name": "a", "env": [dict(e) for e in env]}],
        "initContainers": [{"name": "i", "env": [dict(env[0])]}],
    }
    cron = {
        "kind": "CronJob",
        "spec": {"jobTemplate": {"spec": {"template": {"spec": json.loads(json.dumps(pod_spec))}}}},
    }
    deploy = {"kind": "Deployment", "spec": {"template": {"spec": json.loads(json.dumps(pod_spec))}}}
    for obj, spec in (
        (cron, cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        (deploy, deploy["spec"]["template"]["spec"]),
    ):
        mask_document(obj, masking().rules)
        assert spec["containers"][0]["env"][0]["value"] == MARKER
        assert spec["containers"][0]["env"][1]["value"] == "info"
        assert "value" not in spec["containers"][0]["env"][2]
        assert spec["initContainers"][0]["env"][0]["value"] == MARKER


def test_table_rows_token_requests_and_configmap_rules():
    table = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "rows": [{"cells": ["db", "Opaque", 1], "object": dict(SECRET)}],
    }
    mask_document(table, masking().rules)
    assert table["rows"][0]["object"]["data"] == {"password": MARKER_B64}
    token = {"kind": "TokenRequest", "status": {"token": "eyJ...", "expirationTimestamp": "t"}}
    mask_document(token, masking().rules)
    assert token["status"]["token"] == MARKER
    rules = masking(configmap_keys=[{"namespaces": "prod", "names": "app-*", "keys": ["*_URL"]}]).rules
    cm = {
        "kind": "ConfigMap",
        "metadata": {"name": "app-config", "namespace": "prod"},
        "data": {"DB_URL": "u", "LEVEL": "x"},
    }
    mask_document(cm, rules)
    assert cm["data"] == {"DB_URL": MARKER, "LEVEL": "x"}


def test_known_values_anywhere_in_a_body_but_names_are_kept():
    obj = {"kind": "ConfigMap", "metadata": {"name": "plain-known-value"},
           "data": {"a": "url=postgres://u:plain-known-value@h", "b": base64.b64encode(b"hunter2-x").decode()}}  # fmt: skip
    mask_document(obj, masking().rules)
    assert obj["data"] == {"a": f"url=postgres://u:{MARKER}@h", "b": MARKER}
    assert obj["metadata"]["name"] == "plain-known-value"


# Hyperscan has no wheel for Linux on ARM: there, only the Python engine exists (and is the default).
ENGINES = ["hyperscan", "python"] if scanner.available() else ["python"]


def test_known_values_in_a_served_body_leave_names_alone():
    body = {"kind": "ConfigMapList", "items": [{"metadata": {"name": "plain-known-value", "uid": "u"},
            "data": {"a": "x plain-known-value", "b": "plain"}}, {"metadata": {"name": "other"}}]}  # fmt: skip
    out = json.loads(masking().mask_json(body, "ConfigMap"))
    assert out["items"][0] == {"metadata": {"name": "plain-known-value", "uid": "u"},
                               "data": {"a": f"x {MARKER}", "b": "plain"}}  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_text_detectors_and_assignments(engine):
    m = masking(engine=engine)
    line = "AKIAIOSFODNN7EXAMPLE x https://bob:pw123456@host/ db_password=abc12345 level=info"
    assert m.text.mask(line) == f"{MARKER} x https://bob:{MARKER}@host/ db_password={MARKER} level=info"
    custom = masking(patterns=[r"tok_[a-z0-9]{8}"], detectors=[], assignments=False, engine=engine)
    assert custom.text.mask("tok_abcd1234 password=x") == f"{MARKER} password=x"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_prefix_group_does_not_limit_what_is_masked(engine):
    # GitHub's and GitLab's regexes capture their prefix `(ghp|gho…)`: the whole token goes, not the prefix.
    m = masking(engine=engine)
    token = "ghp_" + "a1" * 18
    gitlab = "glpat-" + "x9" * 10
    assert m.text.mask(f"t={token} u {gitlab} v") == f"t={MARKER} u {MARKER} v"
    # a value masked as known is not masked a second time by the assignment rule
    assert m.text.mask("PASSWORD=hunter2-x next") == f"PASSWORD={MARKER} next"


FRAGMENTS = ["hunter2-x", "plain-known-value", " ", "\n", "password", "=", ": ", "'", '"', "AKIA", "IOSFODNN7EXAMPLE",
             "https://", "bob:", "pw123456", "@host", "eyJhbGciOi", ".", "eyJzdWIiOjEy", "sig_-", "ghp_", "a1" * 18,
             "token", "x", "é", "db_", "TOKEN_FILE", "abcdefgh"]  # fmt: skip


@pytest.mark.skipif(not scanner.available(), reason="hyperscan is not installed on this platform")
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30))
def test_hyperscan_masks_at_least_what_python_masks(fragments):
    # Hyperscan reports every match, overlapping ones too, where `re.sub` takes them left to right: what it
    # leaves in clear is a part of what the Python engine leaves in clear (usually all of it).
    text = "".join(fragments)
    fast, slow = masking(engine="hyperscan").text.mask(text), masking(engine="python").text.mask(text)
    assert _has_subsequence(slow.replace(MARKER, ""), fast.replace(MARKER, "")), (fast, slow)


def _has_subsequence(text: str, part: str) -> bool:
    chars = iter(text)
    return all(char in chars for char in part)


def test_hyperscan_engine_is_the_default_where_installed():
    assert (masking().text.scanner is not None) == scanner.available()
    assert masking(engine="python").text.scanner is None


def _run(transformer, chunks: list[bytes]) -> bytes:
    return b"".join(transformer.feed(c) for c in chunks) + transformer.end()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


EVENTS = b"".join(
    json.dumps({"type": t, "object": {**SECRET, "data": {"password": base64.b64encode(v).decode()}}}).encode() + b"\n"
    for t, v in [("ADDED", b"hunter2-x"), ("MODIFIED", b"new-rotated-value"), ("DELETED", b"plain-known-value")]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(EVENTS)), max_size=12))
def test_watch_stream_masked_whatever_the_chunk_boundaries(cuts):
    out = _run(WatchLines(masking(), flow(verb="watch"), None), _split(EVENTS, cuts))
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert all(e["object"]["data"] == {"password": MARKER_B64} for e in events)
    assert out == _run(WatchLines(masking(), flow(verb="watch"), None), [EVENTS])


LOG = (
    "line one db=postgres://app:hunter2-x@db/app\n" * 3
    + "key AKIAIOSFODNN7EXAMPLE then plain-known-value\npartial hunter2-x"
).encode()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(LOG)), max_size=12))
def test_log_stream_masked_whatever_the_chunk_boundaries(cuts):
    out = _run(Text(masking(), None), _split(LOG, cuts))
    assert b"hunter2-x" not in out and b"AKIA" not in out and b"plain-known-value" not in out
    assert out == _run(Text(masking(), None), [LOG])


BODY = json.dumps(
    {"kind": "SecretList", "items": [{**SECRET, "metadata": {"name": f"s{i}"}} for i in range(20)]}
).encode()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=10))
def test_json_body_masked_whatever_the_chunk_boundaries(cuts):
    out = json.loads(_run(JsonBody(masking(), flow(), None), _split(BODY, cuts)))
    assert {i["data"]["password"] for i in out["items"]} == {MARKER_B64}


def test_unparsable_json_is_withheld_not_passed():
    f = flow()
    out = json.loads(_run(JsonBody(masking(), f, None), [b'{"kind":"Secret","data":{"a":"aHVudGVyMi14"']))
    assert out["kind"] == "Status" and out["code"] == 502 and "could not be masked" in out["message"]
    assert f.state["masking"]["withheld"] == "not valid JSON"


def test_gzip_bodies_are_decoded_before_masking():
    import gzip

    from kubegate.plugins.masking import Decoder

    out = json.loads(
        _run(
            JsonBody(masking(), flow(), Decoder("gzip")),
            _split(gzip.compress(json.dumps(SECRET).encode()), [5, 17]),
        )
    )
    assert out["data"] == {"password": MARKER_B64}


def test_base64_channel_frames_are_masked_too():
    from kubegate.core.flow import Frame, FrameDirection
    from kubegate.plugins.masking import kubegate_stream_frame

    m = masking()
    flow_ = SimpleNamespace(connection=SimpleNamespace(state={"masking": m}), state={},
                            attributes=SimpleNamespace(api_group="", resource="pods", subresource="exec"))  # fmt: skip
    session = SimpleNamespace(subprotocol="v4.base64.channel.k8s.io", state={})
    frame = Frame(FrameDirection.UPSTREAM_TO_CLIENT, b"1" + base64.b64encode(b"pw=hunter2-x\n"), text=True)
    kubegate_stream_frame(flow_, session, frame)
    assert frame.data[:1] == b"1" and base64.b64decode(frame.data[1:]) == f"pw={MARKER}\n".encode()
    garbage = Frame(FrameDirection.UPSTREAM_TO_CLIENT, b"1hunter2-x not base64!", text=True)
    kubegate_stream_frame(flow_, session, garbage)
    assert garbage.data == b"1"


def test_accept_keeps_json_ranges_with_parameters_and_drops_binary_ones():
    from kubegate.plugins.masking import json_only

    table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
    assert json_only(table) == table.replace(",", ", ")
    assert json_only("application/vnd.kubernetes.protobuf,application/json") == "application/json"
    assert json_only("application/com.github.proto-openapi.spec.v2@v1.0+protobuf") == "application/json"
    assert json_only("application/cbor, application/json;q=0.9") == "application/json;q=0.9"


# -- issue 13 §3: no representation or parser difference the masking gives up at ----------------------------

CLEAR = "hunter2-x"  # a known value (see `masking()`)
CLEAR_FORMS = [CLEAR, base64.b64encode(CLEAR.encode()).decode()]


def first_wins(text: bytes | str):
    """A client whose JSON parser keeps the first of duplicate keys (Go's does not; others do)."""

    def pairs(items):
        out = {}
        for key, value in items:
            out.setdefault(key, value)
        return out

    return json.loads(text, object_pairs_hook=pairs)


def assert_no_clear(out: bytes, *clear: str) -> None:
    for value in clear or CLEAR_FORMS:
        assert value.encode() not in out, out[:300]


@pytest.mark.parametrize(
    ("accept", "watch", "form", "upstream"),
    [
        ("", False, "json", "application/json"),
        ("*/*", False, "json", "application/json"),
        ("application/*", False, "json", "application/json"),
        ("application/yaml", False, "yaml", "application/json"),
        ("application/vnd.kubernetes.protobuf,application/json", False, "json", "application/json"),
        ("application/yaml, application/json;q=0.5", False, "yaml", "application/json"),
        ("application/json;q=0.5, application/yaml", False, "yaml", "application/json"),
        ("application/json;q=0, */*", False, "yaml", "application/json"),  # q=0 rejects JSON, */* → YAML
        ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json", False, "json",
         "application/json;as=Table;v=v1;g=meta.k8s.io, application/json"),
        ("application/yaml;as=Table;v=v1;g=meta.k8s.io", False, "yaml", "application/json;as=Table;v=v1;g=meta.k8s.io"),
        ("application/json", True, "json", "application/json"),
        ("application/json, application/yaml", True, "json", "application/json"),
    ],
)  # fmt: skip
def test_accept_is_negotiated_as_the_api_server_does(accept, watch, form, upstream):
    from kubegate.plugins.masking.media import negotiate

    negotiated = negotiate(accept, watch=watch)
    assert (negotiated.form, negotiated.upstream_accept) == (form, upstream)
    assert "protobuf" not in negotiated.upstream_accept and "yaml" not in negotiated.upstream_accept


@pytest.mark.parametrize(
    ("accept", "watch"),
    [
        ("application/vnd.kubernetes.protobuf", False),
        ("application/cbor", False),
        ("text/html", False),
        ("application/json;q=0, application/yaml;q=0, */*", False),
        ("application/yaml", True),  # YAML has no stream serializer: the API server refuses the watch
        ("application/yaml, application/json", True),
    ],
)
def test_what_cannot_be_served_masked_is_not_acceptable(accept, watch):
    from kubegate.core.errors import StatusError
    from kubegate.plugins.masking import kubegate_upstream_request

    f = hook_flow(accept, verb="watch" if watch else "get")
    with pytest.raises(StatusError) as refused:
        kubegate_upstream_request(f)
    assert refused.value.code == 406 and refused.value.reason == "NotAcceptable"
    assert "application/json" in refused.value.message


def hook_flow(
    *accepts: str, verb: str = "get", resource: str = "secrets", subresource: str = ""
) -> SimpleNamespace:
    """A flow as the upstream-request and response hooks see it, on a masked connection."""
    attributes = SimpleNamespace(resource=resource, verb=verb, subresource=subresource, is_resource_request=True,
                                 is_streaming_subresource=False)  # fmt: skip
    return SimpleNamespace(
        attributes=attributes, state={}, identity=None, upstream_headers=[("Accept", a) for a in accepts],
        connection=SimpleNamespace(name="c", state={"masking": masking()}),
        request=SimpleNamespace(path="/api/v1/namespaces/prod/secrets/db", websocket=False),
        response=SimpleNamespace(status=200, headers=[]),
    )  # fmt: skip


def test_upstream_gets_one_json_accept_and_yaml_is_rendered_after_masking():
    from kubegate.plugins.masking import (
        kubegate_response_headers,
        kubegate_response_stream,
        kubegate_upstream_request,
    )

    # Two Accept headers: the API server reads the first; exactly one JSON Accept goes up.
    f = hook_flow("application/yaml", "application/vnd.kubernetes.protobuf")
    kubegate_upstream_request(f)
    assert [v for k, v in f.upstream_headers if k.lower() == "accept"] == ["application/json"]
    secret = {**SECRET, "data": {"one": "eA==", "bin": base64.b64encode(b"\x00\xff\xfe").decode(),
                                 "big": base64.b64encode(b"B" * (1 << 20)).decode()}}  # fmt: skip
    f.response.headers = [("Content-Type", "application/json"), ("Content-Length", "9")]
    kubegate_response_headers(f)
    assert ("Content-Type", "application/yaml") in f.response.headers
    out = _run(kubegate_response_stream(f), [json.dumps(secret).encode()])
    import yaml

    assert yaml.safe_load(out)["data"] == {"one": MARKER_B64, "bin": MARKER_B64, "big": MARKER_B64}
    assert b"eA==" not in out and b"AP/+" not in out and b"QkJC" not in out


@pytest.mark.parametrize(
    "content_type", ["application/yaml", "application/vnd.kubernetes.protobuf", "application/cbor"]
)
def test_an_object_response_the_masker_cannot_read_is_refused_not_masked_as_text(content_type):
    from kubegate.plugins.masking import (
        kubegate_response_headers,
        kubegate_response_stream,
        kubegate_upstream_request,
    )

    f = hook_flow("application/json")
    kubegate_upstream_request(f)
    f.response.headers = [("Content-Type", content_type)]
    kubegate_response_headers(f)
    assert f.response.status == 502
    out = _run(kubegate_response_stream(f), [b"data:\n  password: aHVudGVyMg==\n  one: eA==\n"])
    assert json.loads(out)["kind"] == "Status" and b"eA==" not in out


def test_pod_log_and_proxy_keep_their_own_content_types():
    from kubegate.plugins.masking import kubegate_upstream_request

    f = hook_flow("text/html", resource="pods", subresource="proxy")
    kubegate_upstream_request(f)  # the pod's own content: not an API object, not negotiated
    assert [v for k, v in f.upstream_headers if k.lower() == "accept"] == ["text/html"]


DUPLICATES = [
    # The same key twice: orjson (and Go) keep the last, other parsers the first.
    b'{"kind":"ConfigMap","data":{"a":"hunter2-x","a":"fine"}}',
    b'{"kind":"Secret","data":{"p":"aHVudGVyMi14"},"data":{}}',
    b'{"kind":"Secret","data":{"p":"aHVudGVyMi14"},"kind":"ConfigMap","data":{"p":"eA=="}}',
    b'{"kind":"Pod","spec":{"containers":[{"name":"a","env":[{"name":"DB_PASSWORD","value":"hunter2-x","value":"x"}]}]}}',
]


@pytest.mark.parametrize("body", DUPLICATES)
def test_duplicate_keys_never_pass_in_clear_whichever_one_a_client_keeps(body):
    out = _run(JsonBody(masking(), flow("configmaps"), None), [body])
    assert_no_clear(out)
    assert first_wins(out) == json.loads(out)  # no duplicates left: every parser reads the same
    events = b'{"type":"ADDED","object":' + body + b',"type":"ADDED"}\n'
    watched = _run(WatchLines(masking(), flow("configmaps", verb="watch"), None), [events])
    assert_no_clear(watched)
    assert first_wins(watched) == json.loads(watched)


@pytest.mark.parametrize(
    "body",
    [
        b'{"kind":"ConfigMap","data":{"a":NaN,"b":"hunter2-x"}}',
        b'\xef\xbb\xbf{"kind":"ConfigMap","data":{"b":"hunter2-x"}}',  # a BOM
        b'{"kind":"ConfigMap","data":{"b":"hunter2-x","c":"\xff"}}',  # invalid UTF-8
        b'{"kind":"ConfigMap","data":{"b":"hunter2-x","c":"\\ud800"}}',  # a lone surrogate escape
        b'{"kind":"ConfigMap","data":{"b":"hunter2-x"}} {"b":"hunter2-x"}',  # trailing data
        b'{"kind":"ConfigMap","data":{"b":"hunter2-x","n":1e400}}',  # beyond a double
        b"[" * 2000 + b'"hunter2-x"' + b"]" * 2000,  # deeper than any parser should go
    ],
)
def test_bodies_a_client_may_read_differently_are_withheld(body):
    out = _run(JsonBody(masking(), flow("configmaps"), None), [body])
    assert json.loads(out)["kind"] == "Status" and json.loads(out)["code"] == 502
    assert_no_clear(out)


@pytest.mark.parametrize(
    "body",
    [
        b'{"kind":"ConfigMap","\\u0064ata":{"b":"hunter2-x"}}',  # an escaped key
        b'["hunter2-x", {"name": "hunter2-x"}]',  # not an object at the top
        b'"hunter2-x"',
        b'{"kind":"ConfigMap","data":{"b":"hunter2-x","n":123456789012345678901234567890}}',
    ],
)
def test_other_documents_end_masked_and_re_serialized(body):
    out = _run(JsonBody(masking(), flow("configmaps"), None), [body])
    assert_no_clear(out)
    assert b"\\u0064" not in out


def test_unchanged_bodies_are_re_serialized_too():
    body = b'{"kind":"ConfigMap",  "data":{"a":"b"}}'
    assert (
        _run(JsonBody(masking(), flow("configmaps"), None), [body])
        == b'{"kind":"ConfigMap","data":{"a":"b"}}\n'
    )


def test_identifier_keys_are_kept_only_in_identifier_positions():
    known = "plain-known-value"
    cm = {
        "kind": "ConfigMap", "apiVersion": "v1",
        "metadata": {"name": known, "namespace": "prod", "uid": "u1", "annotations": {"name": known, "uid": known},
                     "labels": {"kind": known},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": known, "uid": "u2"}]},
        "data": {"name": known, "uid": known, "namespace": known, "kind": known, "nested": {"name": known}},
    }  # fmt: skip
    out = json.loads(masking().mask_json(json.loads(json.dumps(cm)), "ConfigMap"))
    assert out["metadata"]["name"] == known and out["metadata"]["ownerReferences"][0]["name"] == known
    assert out["metadata"]["annotations"] == {"name": MARKER, "uid": MARKER}
    assert out["metadata"]["labels"] == {"kind": MARKER}
    nested = {"name": MARKER}
    assert out["data"] == {
        "name": MARKER,
        "uid": MARKER,
        "namespace": MARKER,
        "kind": MARKER,
        "nested": nested,
    }
    # the per-string scrub (also used for records) follows the same positions
    slow = json.loads(json.dumps(cm))
    mask_document(slow, masking().rules, "ConfigMap")
    assert slow["metadata"]["name"] == known and slow["data"]["name"] == MARKER
    assert slow["metadata"]["annotations"]["uid"] == MARKER


def test_schema_identifiers_clients_address_by_are_kept():
    known = "plain-known-value"
    pod = {"kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": known, "ports": [{"name": known}], "env": [{"name": known, "value": known}],
                                    "args": [known]}], "volumes": [{"name": known}]},
           "status": {"containerStatuses": [{"name": known, "image": known}]}}  # fmt: skip
    out = json.loads(masking().mask_json(pod, "Pod"))
    container = out["spec"]["containers"][0]
    assert container["name"] == known and container["ports"][0]["name"] == known
    assert container["env"][0] == {"name": known, "value": MARKER} and container["args"] == [MARKER]
    assert out["spec"]["volumes"][0]["name"] == known
    assert out["status"]["containerStatuses"][0] == {"name": known, "image": MARKER}
    event = {"kind": "Event", "metadata": {"name": "e"}, "message": f"pulled {known}",
             "involvedObject": {"kind": "Pod", "name": known, "namespace": "prod"}}  # fmt: skip
    out = json.loads(masking().mask_json(event, ""))
    assert out["involvedObject"]["name"] == known and out["message"] == f"pulled {MARKER}"


def test_secret_values_of_any_size_or_bytes_in_every_shape():
    values = {"one": "eA==", "empty": "", "bin": base64.b64encode(bytes(range(256))).decode(),
              "big": base64.b64encode(b"z" * (1 << 20)).decode()}  # fmt: skip
    secret = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "s"}, "data": values}
    applied = json.dumps({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "s"}, "data": values})
    shapes = {
        "object": secret,
        "list": {"kind": "SecretList", "items": [{k: v for k, v in secret.items() if k != "kind"}]},
        "table": {"kind": "Table", "rows": [{"cells": ["s"], "object": secret}]},
        "watch": {"type": "ADDED", "object": secret},
        "partial": {"kind": "PartialObjectMetadata", "metadata": {"name": "s", "annotations": {LAST_APPLIED: applied}}},
    }  # fmt: skip
    for name, doc in shapes.items():
        out = masking().mask_json(json.loads(json.dumps(doc)), "Secret")
        for value in values.values():
            if value:
                assert value.encode() not in out, name
    not_a_map = masking().mask_json({"kind": "Secret", "data": "aHVudGVyMg=="}, "Secret")
    assert b"aHVudGVyMg" not in not_a_map
    listed_applied = {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {LAST_APPLIED: '["aHVudGVyMg=="]'}},
    }
    assert b"aHVudGVyMg" not in masking().mask_json(listed_applied, "Pod")


def test_last_applied_with_duplicate_keys_is_re_serialized():
    applied = '{"kind":"Secret","stringData":{"t":"short"},"kind":"ConfigMap"}'
    obj = {"kind": "Pod", "metadata": {"name": "p", "annotations": {LAST_APPLIED: applied}}}
    out = masking().mask_json(obj, "Pod")
    annotation = json.loads(out)["metadata"]["annotations"][LAST_APPLIED]
    assert first_wins(annotation) == json.loads(annotation)


def test_known_values_learned_whatever_their_bytes_and_masked_in_text():
    from kubegate.plugins.masking.known import KnownSecrets

    known = KnownSecrets(SimpleNamespace(), [], 6, 100, 64, lambda added, removed: None)  # type: ignore[arg-type]
    binary = b"\x00\xff\xfe\x80keystore"
    secret = {"data": {"bin": base64.b64encode(binary).decode(), "short": "eA==",
                       "big": base64.b64encode(b"y" * 65).decode(), "multi": base64.b64encode(b'a"b\nc-line\n').decode()}}  # fmt: skip
    values = known._extract(secret)
    assert binary.decode("utf-8", "surrogateescape") in values
    assert "x" not in values and "y" * 65 not in values  # below min_length, above max_value_bytes (bytes)
    m = Masking(MaskingSettings())
    m.set_known(values)
    assert m.text.mask_bytes(b"dump: " + binary + b" end") == f"dump: {MARKER} end".encode()
    assert m.text.mask(f"b64 {base64.b64encode(binary).decode()} .") == f"b64 {MARKER} ."
    # a value JSON escapes (quote, newline) is found in served JSON too
    cm = {"kind": "ConfigMap", "data": {"copy": 'a"b\nc-line'}}
    assert b"c-line" not in m.mask_json(cm, "ConfigMap")


@pytest.mark.parametrize("marker", ['x"y', "back\\slash", "new\nline"])
def test_a_marker_that_could_break_json_text_is_refused(marker):
    with pytest.raises(ValueError):
        MaskingSettings(marker=marker)


def test_when_the_value_pass_breaks_json_the_slow_pass_still_masks_every_string():
    # A custom pattern that eats a quote makes the fast text pass produce invalid JSON: the string-by-string
    # pass then runs, also over what `mask_document` does not visit (a top-level array, non-object items).
    m = masking(patterns=[r'tok_[a-z]+"'])
    for doc, kind in (
        (["tok_abc", "hunter2-x"], ""),
        ({"kind": "List", "items": ["tok_abc", "hunter2-x"]}, ""),
        (
            {
                "kind": "ConfigMap",
                "metadata": {"name": "hunter2-x"},
                "data": {"a": "tok_abc", "b": "hunter2-x"},
            },
            "ConfigMap",
        ),
    ):
        out = m.mask_json(doc, kind)
        assert out.count(b"hunter2-x") == (1 if kind else 0), out  # only the object's name is kept


def test_a_compression_bomb_or_corrupt_gzip_is_withheld_without_expanding_it():
    import gzip

    from kubegate.plugins.masking import Decoder

    m = masking(max_body_bytes=1 << 20)
    bomb = gzip.compress(
        b'{"kind":"ConfigMap","data":{"a":"' + b"x" * (64 << 20) + b'"}}'
    )  # 64 MiB from ~64 KiB

    class Measured(Decoder):
        largest = 0

        def feed(self, chunk: bytes, *limit: int) -> bytes:
            out = super().feed(chunk, *limit)
            Measured.largest = max(Measured.largest, len(out))
            return out

    body = JsonBody(m, flow("configmaps"), Measured("gzip"))
    for start in range(0, len(bomb), 8192):
        assert body.feed(bomb[start : start + 8192]) == b""
    assert json.loads(body.end())["code"] == 502
    assert Measured.largest <= (1 << 20) + 1  # never expanded beyond the limit, not even for a moment
    corrupt = JsonBody(m, flow("configmaps"), Decoder("gzip"))
    assert json.loads(_run(corrupt, [b"\x1f\x8b\x08\x00garbage-not-deflate"]))["code"] == 502
    watch = WatchLines(m, flow("configmaps", verb="watch"), Decoder("gzip"))
    out = _run(watch, [bomb[:8192], bomb[8192:16384]])
    assert json.loads(out.splitlines()[0])["code"] == 502 and len(out) < 1000


def test_accept_negotiations_are_remembered_only_for_short_headers():
    """The client's Accept is a cache key: only short ones are kept (at most 256), a long one is negotiated
    each time, with the same answer."""
    from kubegate.plugins.masking import media

    padded = "application/json, " + ", ".join(f"application/x-{i}" for i in range(80))
    assert len(padded) > media.CACHED_ACCEPT_CHARS
    before = media._negotiate_cached.cache_info().currsize
    long_answer = media.negotiate(padded, watch=False)
    assert media._negotiate_cached.cache_info().currsize == before
    assert long_answer == media.negotiate("application/json", watch=False)
    for i in range(300):
        media.negotiate(f"application/json, application/x-{i}", watch=False)
    assert media._negotiate_cached.cache_info().currsize <= 256


@pytest.mark.parametrize(
    "ops",
    [
        # the API server's JSON patch library drops the first segment: these read /data/password
        [{"op": "copy", "from": "x/data/password", "path": "/metadata/annotations/leak"}],
        [{"op": "move", "from": "data/password", "path": "/type"}],
        [{"op": "test", "path": "x/data/password", "value": "aHVudGVyMg=="}],
        [{"op": "test", "path": "", "value": {}}],
    ],
)
def test_a_json_patch_reading_a_secret_value_through_a_non_rfc_pointer_is_refused(ops):
    from kubegate.core.bodies import BodyError, decode_write_body
    from kubegate.plugins.masking.writes import reading_op

    assert reading_op(ops) is not None  # the masking check, were it given the operations as they are
    with pytest.raises(BodyError, match="JSON patch's"):  # and the body reader refuses them first
        decode_write_body("PATCH", "application/json-patch+json", json.dumps(ops).encode())
    fine = [{"op": "copy", "from": "/metadata/labels/a", "path": "/metadata/annotations/b"}]
    assert reading_op(fine) is None
