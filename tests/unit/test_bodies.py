"""core/bodies: a write body is read the way the API server reads it, or refused (BodyError). Each case is a
body two readers could see differently; the expectations follow the API server's Go code (negotiation,
patch.go, sigs.k8s.io/json, sigs.k8s.io/yaml on goyaml.v2, gogo-protobuf)."""

from __future__ import annotations

import json

import pytest

from kubegate.core import protobuf
from kubegate.core.bodies import BodyError, decode_write_body, json_patch_problem

POD = b'{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c"}]}}'


def refused(method: str, content_type: str, body: bytes) -> BodyError:
    with pytest.raises(BodyError) as info:
        decode_write_body(method, content_type, body)
    return info.value


# --- content types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "content_type", "media_type", "shape"),
    [
        ("POST", "", "application/json", "object"),  # no Content-Type: the first serializer, JSON
        ("POST", "application/json; charset=utf-8", "application/json", "object"),
        ("PUT", "Application/JSON", "application/json", "object"),  # mime.ParseMediaType lower-cases
        ("POST", "application/yaml", "application/yaml", "object"),
        ("PATCH", "application/strategic-merge-patch+json", "application/strategic-merge-patch+json",
         "strategic-merge-patch"),
        ("PATCH", "application/merge-patch+json; charset=utf-8", "application/merge-patch+json", "merge-patch"),
        ("PATCH", "application/apply-patch+yaml", "application/apply-patch+yaml", "apply-patch"),
    ],
)  # fmt: skip
def test_accepted_content_types(method, content_type, media_type, shape):
    body = decode_write_body(method, content_type, POD)
    assert (body.media_type, body.shape, body.doc["metadata"]) == (media_type, shape, {"name": "p"})


@pytest.mark.parametrize(
    ("method", "content_type", "status"),
    [
        ("POST", "text/yaml", 415),  # the sandbox accepts it; the API server has no such serializer
        ("POST", "application/x-yaml", 415),
        ("POST", "application/cbor", 415),  # client-go retries CBOR as JSON on 415
        ("POST", "text/plain", 415),
        ("POST", "application/json;;=", 415),  # Go's mime.ParseMediaType: invalid parameter
        ("POST", "application/json; charset", 415),
        ("POST", "application/strategic-merge-patch+json", 415),  # a patch type is not an object type
        ("PATCH", "application/json", 415),  # not a patch type
        ("PATCH", "Application/merge-patch+json", 415),  # patch.go compares exactly
        ("PATCH", "application/merge-patch+json ;x=y", 415),  # cut at ';', the space stays
        ("PATCH", "application/apply-patch+cbor", 415),
        ("PATCH", "", 415),
        ("DELETE", "application/json", 400),
    ],
)
def test_refused_content_types(method, content_type, status):
    assert refused(method, content_type, POD).status == status


# --- JSON ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"spec":{"hostPID":true},"spec":{}}', "duplicate key 'spec'"),
        (b'{"spec":{"containers":[{"name":"a","name":"b"}]}}', "duplicate key 'name'"),
        (b'{"spec":{"replicas":NaN}}', "NaN is not JSON"),
        (b'{"spec":{}} {"spec":{"hostPID":true}}', "not valid JSON"),  # trailing data
        (b'{"metadata":{"name":"\xff"}}', "not valid UTF-8"),
        ('{"spec":{}}'.encode("utf-16"), "not valid UTF-8"),  # Python's json would sniff UTF-16
        (b"", "empty"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"metadata":{"name":"a\\ud800"}}', "unpaired UTF-16 surrogate"),
    ],
)
def test_json_read_two_ways_is_refused(body, why):
    assert why in str(refused("POST", "application/json", body))


def test_json_keys_are_kept_as_sent():
    """sigs.k8s.io/json matches field names case-sensitively: `Spec` is not `spec` there either."""
    doc = decode_write_body("POST", "", b'{"Spec":{"hostPID":true},"spec":{}}').doc
    assert doc == {"Spec": {"hostPID": True}, "spec": {}}


# --- YAML ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "value"),
    [
        ("true", True), ("y", True), ("Yes", True), ("on", True), ("n", False), ("OFF", False),
        ("~", None), ("null", None), ("", None),
        ("12", 12), ("-3", -3), ("0x1F", 31), ("0o17", 15), ("017", 15), ("0b101", 5), ("1_000", 1000),
        ("1e3", 1000), ("2.5", 2.5), (".5", 0.5), ("08", 8),  # goyaml.v2: ParseInt fails, ParseFloat does not
        ("1:30", "1:30"),  # PyYAML would read sexagesimal 90
        ("2001-12-14", "2001-12-14"),  # timestamps stay strings (PyYAML: a date)
        ("2001-12-14t21:59:43.10-05:00", "2001-12-14t21:59:43.10-05:00"),
        ("1e400", "1e400"),  # out of float range: a string in Go
        ("'true'", "true"), ('"12"', "12"), ("privileged", "privileged"),
        ("9223372036854775808", 9223372036854775808),  # ParseUint
    ],
)  # fmt: skip
def test_yaml_scalars_resolve_as_goyaml_v2(scalar, value):
    doc = decode_write_body("POST", "application/yaml", f"kind: Pod\nv: {scalar}\n".encode()).doc
    assert doc["v"] == value and type(doc["v"]) is type(value)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"kind: Pod\nspec: {}\n---\nkind: Pod\nspec: {hostPID: true}\n", "2 documents"),
        (b"kind: Pod\n---\n", "2 documents"),
        (b"spec:\n  hostPID: false\n  hostPID: true\n", "duplicate key 'hostPID'"),
        (b"spec:\n  true: 1\n  'true': 2\n", "duplicate key 'true'"),  # one key once converted to JSON
        (b"base: &b {hostPID: true}\nspec:\n  <<: *b\n", "merge keys"),
        (b"spec: !!binary aGk=\n", "tag"),
        (b"spec: !!python/object:os.system {}\n", "tag"),
        (b"spec: {replicas: .nan}\n", "NaN"),
        (b"spec: {replicas: -.inf}\n", "NaN and infinite"),
        (b"spec: {1.5: x}\n", "map key"),
        (b"spec: {~: x}\n", "map key"),
        (b"spec: {[a]: x}\n", "not a scalar"),
        (b"spec: [\n", "not valid YAML"),
        (b"spec: \xff\n", "not valid UTF-8"),
        (b"- a\n", "must be a JSON object"),
        (b"", "empty"),
    ],
)
def test_yaml_read_two_ways_is_refused(body, why):
    assert why in str(refused("POST", "application/yaml", body))


def test_yaml_alias_bomb_is_bounded():
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    refusal = refused("POST", "application/yaml", "\n".join(lines).encode())
    assert "aliases expand to more than" in str(refusal)
    assert "nested too deeply" in str(refused("POST", "application/yaml", b"a: &x [*x]\n"))


def test_yaml_aliases_of_a_large_value_are_bounded_by_what_they_expand_to():
    # Few nodes, many bytes: 20 aliases of a 500 KB value stay one object when parsed, and were 10 MB of
    # JSON (10,000 of them, 5 GB) when masked, recorded or sent on (found 2026-12-08).
    big = "v" * 500_000
    body = f"metadata: {{name: x, annotations: {{a: &v {big}}}}}\nitems: [{', '.join(['*v'] * 20)}]\n"
    assert "aliases expand to more than 4194304 characters" in str(
        refused("POST", "application/yaml", body.encode())
    )
    fine = f"a: &v {'w' * 1000}\nb: [{', '.join(['*v'] * 100)}]\n"
    assert len(decode_write_body("POST", "application/yaml", fine.encode()).doc["b"]) == 100


def test_yaml_small_aliases_and_key_conversion_are_read():
    doc = decode_write_body(
        "POST", "application/yaml", b"env: &e [{name: A, value: b}]\ninit: *e\nyes: 1\n8080: port\n"
    ).doc
    assert doc == {"env": [{"name": "A", "value": "b"}], "init": [{"name": "A", "value": "b"}],
                   "true": 1, "8080": "port"}  # fmt: skip


# --- patches ------------------------------------------------------------------------------------------


def test_patch_documents_are_what_the_condition_sees():
    ops = b'[{"op":"add","path":"/spec/hostPID","value":true}]'
    assert decode_write_body("PATCH", "application/json-patch+json", ops).doc[0]["path"] == "/spec/hostPID"
    smp = b'{"spec":{"$setElementOrder/containers":[{"name":"c"}],"containers":[{"name":"c"}]}}'
    assert (
        "$setElementOrder/containers"
        in decode_write_body("PATCH", "application/strategic-merge-patch+json", smp).doc["spec"]
    )
    apply = decode_write_body("PATCH", "application/apply-patch+yaml", b"kind: Pod\nspec: {hostPID: yes}\n")
    assert apply.doc["spec"]["hostPID"] is True


@pytest.mark.parametrize(
    ("content_type", "body", "why"),
    [
        ("application/json-patch+json", b'{"op":"add"}', "list of operation objects"),
        ("application/json-patch+json", b'["add"]', "list of operation objects"),
        ("application/json-patch+json", b'[{"op":"add","op":"remove"}]', "duplicate key"),
        ("application/merge-patch+json", b"null", "must be a JSON object"),
        ("application/strategic-merge-patch+json", b'{"a":1,"a":2}', "duplicate key"),
        ("application/apply-patch+yaml", b"a: 1\n---\nb: 2\n", "2 documents"),
    ],
)
def test_bad_patches_are_refused(content_type, body, why):
    assert why in str(refused("PATCH", content_type, body))


# JSON patch pointers the API server's library (gopkg.in/evanphx/json-patch.v4: findObject splits on "/" and
# drops the first piece; decodePatchKey replaces ~1 and ~0 and keeps any other "~") reads otherwise than
# RFC 6901, which conditions (`op.path.startsWith('/spec')`) and masking (`/data`) rely on.
AMBIGUOUS_POINTERS = [
    ('{"op":"add","path":"x/spec/hostPID","value":true}', "drops its first segment", "'/spec/hostPID'"),
    ('{"op":"add","path":"spec/hostPID","value":true}', "drops its first segment", "'/hostPID'"),
    ('{"op":"copy","from":"x/data/password","path":"/metadata/annotations/a"}', "from 'x/data/password'", ""),
    ('{"op":"test","path":"x/data/password","value":"aHVudGVyMg=="}', "does not start with '/'", ""),
    ('{"op":"test","path":"","value":{}}', "is empty", ""),
    ('{"op":"move","from":"","path":"/a"}', "is empty", ""),
    ('{"op":"add","path":"/spec//hostPID","value":true}', "empty segment", ""),
    ('{"op":"add","path":"/metadata/labels/","value":"a"}', "empty segment", ""),
    ('{"op":"add","path":"/metadata/annotations/a~2b","value":"a"}', "'~'", ""),
    ('{"op":"add","path":"/metadata/annotations/a~","value":"a"}', "'~'", ""),
]


@pytest.mark.parametrize(("op", "why", "read_as"), AMBIGUOUS_POINTERS)
def test_json_patch_pointers_go_reads_otherwise_are_refused(op, why, read_as):
    body = f'[{{"op":"add","path":"/metadata/labels/a","value":"b"}},{op}]'.encode()
    error = refused("PATCH", "application/json-patch+json", body)
    assert why in str(error) and read_as in str(error) and "(operation 1)" in str(error)
    assert error.status == 400
    assert json_patch_problem("application/json-patch+json; charset=utf-8", body) == str(error)


@pytest.mark.parametrize(
    "pointer",
    ["/spec/hostPID", "/metadata/annotations/example.com~1a", "/metadata/annotations/a~0b", "/spec/containers/-",
     "/data/01"],
)  # fmt: skip
def test_rfc_6901_pointers_pass(pointer):
    body = json.dumps(
        [{"op": "add", "path": pointer, "value": 1}, {"op": "copy", "from": pointer, "path": "/a"}]
    )
    assert decode_write_body("PATCH", "application/json-patch+json", body.encode()).doc[0]["path"] == pointer
    assert json_patch_problem("application/json-patch+json", body.encode()) is None


def test_json_patch_problem_only_judges_json_patches():
    ops = b'[{"op":"add","path":"x/spec/hostPID","value":true}]'
    assert json_patch_problem("application/merge-patch+json", ops) is None
    assert json_patch_problem("", ops) is None
    # unreadable: the readers that judge bodies refuse it themselves
    assert json_patch_problem("application/json-patch+json", b"[{") is None


# --- protobuf -----------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(num: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message)."""
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def vi(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value)


def envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    return protobuf.MAGIC + ld(1, ld(1, api_version.encode()) + ld(2, kind.encode())) + ld(2, raw)


def pod(spec: bytes) -> bytes:
    return envelope("v1", "Pod", ld(1, ld(1, b"p")) + ld(2, spec))


CONTAINER = ld(1, b"c") + ld(2, b"nginx")
PROTOBUF = "application/vnd.kubernetes.protobuf"


def test_protobuf_pod_security_fields_are_seen():
    privileged = CONTAINER + ld(15, vi(2, 1) + vi(4, 0))  # securityContext {privileged: true, runAsUser: 0}
    body = pod(ld(2, privileged) + vi(12, 1) + vi(13, 0) + vi(11, 0))  # hostPID true; hostIPC/hostNetwork 0
    doc = decode_write_body("POST", PROTOBUF, body).doc
    assert doc["kind"] == "Pod" and doc["spec"]["hostPID"] is True
    assert "hostIPC" not in doc["spec"]  # gogo writes non-pointer zeros; JSON's omitempty would not
    # pointer fields were sent because they were set: runAsUser 0 (root) is kept
    assert doc["spec"]["containers"][0]["securityContext"] == {"privileged": True, "runAsUser": 0}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (pod(ld(2, CONTAINER) + ld(99, b"x")), "field 99 of PodSpec is not in the schema"),
        (pod(ld(2, CONTAINER + ld(15, vi(13, 1)))), "field 13 of SecurityContext"),  # ulimits: not known here
        (pod(ld(1, ld(1, b"v"))), "field 1 of PodSpec"),  # volumes: not known here
        (pod(ld(2, CONTAINER) + vi(12, 0) + vi(12, 1)), "field 12 (hostPID) of PodSpec appears twice"),
        (pod(ld(2, CONTAINER)) + ld(2, b""), "field 2 (raw) of Unknown appears twice"),  # a second raw object
        (pod(ld(2, CONTAINER) + ld(12, b"\x01")), "field 12 (hostPID) of PodSpec has wire type 2"),
        (pod(ld(2, CONTAINER) + vi(12, 2)), "a bool field holds 2"),
        (envelope("v1", "Pod", ld(1, ld(11, ld(1, b"a") + ld(2, b"1")) + ld(11, ld(1, b"a") + ld(2, b"2")))),
         "key 'a' of ObjectMeta.labels appears twice"),
        (envelope("v1", "PersistentVolume", b""), "cannot decode a protobuf body of kind 'PersistentVolume'"),
        (pod(ld(2, CONTAINER))[:-3], "truncated"),
        (b"k8s", "magic"),
    ],
)  # fmt: skip
def test_protobuf_is_decoded_strictly(body, why):
    assert why in str(refused("POST", PROTOBUF, body))


def test_protobuf_unknown_kind_is_415_and_the_lenient_mode_stays_for_the_sandbox():
    assert refused("POST", PROTOBUF, envelope("v1", "PersistentVolume", b"")).status == 415
    lenient = protobuf.decode_body(pod(ld(2, CONTAINER) + ld(99, b"x")))  # the sandbox's reading
    assert lenient["spec"]["containers"] == [{"name": "c", "image": "nginx"}]


def test_protobuf_int32_fields_are_read_as_go_reads_them():
    """gogo keeps the low 32 bits of an int32 varint: 2^32 + 80 would be port 80 there, 4294967376 here."""
    port = ld(6, vi(3, (1 << 32) + 80))  # ports[{containerPort: 2^32 + 80}]
    assert "an int32 field holds 4294967376" in str(refused("POST", PROTOBUF, pod(ld(2, CONTAINER + port))))
    negative = ld(6, vi(3, (1 << 64) - 1))  # -1, sign-extended to 10 bytes as Go writes it
    doc = decode_write_body("POST", PROTOBUF, pod(ld(2, CONTAINER + negative))).doc
    assert doc["spec"]["containers"][0]["ports"] == [{"containerPort": -1}]


def test_protobuf_eviction_keeps_a_zero_grace_period():
    """DeleteOptions.gracePeriodSeconds is a pointer: 0 means "now" and must not read as unset."""
    eviction = envelope("policy/v1", "Eviction", ld(1, ld(1, b"web")) + ld(2, vi(1, 0)))
    doc = decode_write_body("POST", PROTOBUF, eviction).doc
    assert doc["deleteOptions"] == {"gracePeriodSeconds": 0}


def test_protobuf_pdb_and_priority_class_as_kubectl_create_sends_them():
    intorstr_zero = ld(3, vi(1, 0) + vi(2, 0))  # maxUnavailable: 0 — "no voluntary eviction at all"
    pdb = envelope(
        "policy/v1", "PodDisruptionBudget", ld(1, ld(1, b"pdb")) + ld(2, intorstr_zero) + ld(3, b"")
    )
    assert decode_write_body("POST", PROTOBUF, pdb).doc["spec"] == {"maxUnavailable": 0}
    pc = envelope(
        "scheduling.k8s.io/v1", "PriorityClass", ld(1, ld(1, b"pc")) + vi(2, 0) + vi(3, 0) + ld(4, b"")
    )
    assert decode_write_body("POST", PROTOBUF, pc).doc == {
        "kind": "PriorityClass", "apiVersion": "scheduling.k8s.io/v1", "metadata": {"name": "pc"}, "value": 0,
    }  # fmt: skip
