"""Issue 15: when the value pass changes nothing, the text it read is what goes out (not a second
serialization of the same document). Pinned here: that text is byte for byte what serializing the masked
document gives, and it is never upstream's bytes (whitespace, duplicate keys and escapes do not survive)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import orjson
import pytest

from kubegate.plugins.masking import JsonBody, Masking, MaskingSettings, WatchLines

KNOWN = "hunter2-known"
POD = {
    "kind": "Pod",
    "apiVersion": "v1",
    "metadata": {"name": "web", "namespace": "prod", "uid": "u1", "labels": {"app": "web"}},
    "spec": {
        "containers": [{"name": "web", "image": "nginx", "env": [{"name": "LOG_LEVEL", "value": "info"}]}]
    },
}


def masking() -> Masking:
    m = Masking(MaskingSettings())
    m.set_known({KNOWN})
    return m


def flow(resource: str = "pods", verb: str = "get") -> SimpleNamespace:
    return SimpleNamespace(attributes=SimpleNamespace(resource=resource, verb=verb), state={},
                           connection=SimpleNamespace(name="c"), request=SimpleNamespace(path="/x"))  # fmt: skip


def run(transformer, body: bytes) -> bytes:
    return transformer.feed(body) + transformer.end()


def test_an_unmasked_document_goes_out_as_its_one_serialization():
    m = masking()
    doc = copy.deepcopy(POD)
    out = m.mask_json(doc, "Pod")
    assert out == orjson.dumps(POD)
    assert doc == POD  # nothing was edited


@pytest.mark.parametrize(
    "doc",
    [
        {
            **POD,
            "metadata": {**POD["metadata"], "annotations": {"note": f"copied {KNOWN} here"}},
        },  # value pass
        {
            **POD,
            "spec": {"containers": [{"name": "w", "env": [{"name": "DB_PASSWORD", "value": "x"}]}]},
        },  # walk
        {"kind": "Secret", "data": {"a": "eA=="}},  # structure
    ],
)
def test_a_masked_document_is_serialized_from_the_masked_document(doc):
    m = masking()
    out = m.mask_json(copy.deepcopy(doc), "Pod")
    assert out == orjson.dumps(m.mask_doc(copy.deepcopy(doc), "Pod"))
    assert out != orjson.dumps(doc)
    assert KNOWN.encode() not in out


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(POD, indent=2).encode(),  # whitespace
        b'{"kind":"Pod","metadata":{"name":"a","name":"b"}}',  # a duplicate key
        b'{"kind":"Pod","metadata":{"name":"\\u0061\\/b"}}',  # escapes
        json.dumps(POD).encode() + b"\n",
    ],
)
def test_what_goes_out_is_never_upstream_bytes_but_the_inspected_document(body):
    for transformer, lines in ((JsonBody(masking(), flow(), None), False),
                               (WatchLines(masking(), flow(verb="watch"), None), True)):  # fmt: skip
        data = body.replace(b"\n", b"") + b"\n" if lines else body
        out = run(transformer, data)
        assert out == orjson.dumps(orjson.loads(body)) + b"\n"


def test_yaml_is_rendered_from_the_masked_document():
    m = masking()
    doc = {**POD, "metadata": {**POD["metadata"], "annotations": {"note": KNOWN}}}
    transformer = JsonBody(m, flow(), None, render="yaml")
    out = run(transformer, orjson.dumps(doc))
    assert KNOWN.encode() not in out
    assert b"note: <masked by kubegate>" in out
