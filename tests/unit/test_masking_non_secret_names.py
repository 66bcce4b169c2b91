"""Well-known non-secret names (PWD, OLDPWD, SSL_CERT_FILE, SSL_CERT_DIR) are not masked by the name rules
(issue 16: `kubectl exec -- env` showed `PWD=<masked by kubegate>`), in every engine and path — and the
allow-list never becomes a way out for a secret: only exact whole names, case-sensitive, and the known-values
rule and the detectors still apply to their values."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubegate.plugins.masking import (
    DEFAULT_ENV_NAMES,
    Masking,
    MaskingSettings,
    env_name_rule,
    mask_command_for_record,
    scanner,
)
from kubegate.plugins.masking.objects import mask_document
from kubegate.plugins.masking.stream import StreamMasker
from kubegate.plugins.masking.text import DEFAULT_NON_SECRET_NAMES, DETECTORS, TextMasker, detector_patterns

M = "<masked by kubegate>"
KNOWN = "hunter2-known"  # a Secret's value the gateway has seen
DETECTOR_PATTERNS = detector_patterns(DETECTORS)
ENGINES = ["python", *(["hyperscan"] if scanner.available() else [])]

# `kubectl exec -- env` in a typical container.
ENV_OUTPUT = (
    "PATH=/usr/local/sbin:/usr/local/bin\nHOSTNAME=web-1\nPWD=/root\nOLDPWD=/tmp\nHOME=/root\n"
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\nSHLVL=1\n"
)
# Names that contain an allowed name, or are one in another case: still secrets to the assignment rule.
STILL_MASKED = [
    "DB_PWD=hunter22",
    "MY_PWD=hunter22",
    "PWD_FILE=hunter22",
    "XPWD=hunter22",
    "OLDPWD2=hunter22",
    "pwd=hunter22",
    "Pwd: hunter22",
    "oldpwd=hunter22",
    "X.PWD=hunter22",
    "APP-PWD=hunter22",
    "PWD.backup=hunter22",
    "PASSWORD=hunter22",
]


def masker(engine: str, known: tuple[str, ...] = (KNOWN,), names=DEFAULT_NON_SECRET_NAMES) -> TextMasker:
    return TextMasker(M, known, DETECTOR_PATTERNS, engine=engine, non_secret_names=names)


def streamed(text_masker: TextMasker, text: str, chunk: int) -> str:
    stream = StreamMasker(text_masker)
    data = text.encode()
    out = b"".join(stream.feed(data[i : i + chunk]) for i in range(0, len(data), chunk)) + stream.end()
    return out.decode()


@pytest.mark.parametrize("engine", ENGINES)
def test_env_output_keeps_pwd_and_oldpwd(engine):
    assert masker(engine).mask(ENV_OUTPUT) == ENV_OUTPUT
    # Without the allow-list, the assignment rule masks both (what issue 16 saw): the test above can fail.
    without = masker(engine, names=()).mask(ENV_OUTPUT)
    assert f"PWD={M}" in without and f"OLDPWD={M}" in without


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("line", STILL_MASKED)
def test_names_that_merely_contain_an_allowed_name_are_masked(engine, line):
    masked = masker(engine).mask(f"{line}\n")
    assert "hunter22" not in masked and M in masked


@pytest.mark.parametrize("engine", ENGINES)
def test_a_known_value_is_masked_under_an_allowed_name(engine):
    """The allow-list only switches off the name rules: a Secret's value is masked wherever it appears."""
    text_masker = masker(engine)
    assert text_masker.mask(f"PWD={KNOWN}\nOLDPWD=/x/{KNOWN}\n") == f"PWD={M}\nOLDPWD=/x/{M}\n"
    # …and a detector's find too (a GitHub token is a token whatever the variable is called).
    token = "ghp_" + "a1B2" * 9
    assert token not in text_masker.mask(f"PWD=/srv/{token}\n")


@pytest.mark.parametrize("engine", ENGINES)
def test_an_allowed_assignment_does_not_hide_the_next_one(engine):
    """`PWD=PASSWORD=x` — the value of the allowed name holds an assignment of its own; and two on one line."""
    text_masker = masker(engine)
    for text in ("PWD=PASSWORD=hunter22\n", "PWD=/root PASSWORD=hunter22\n", "OLDPWD=/a;TOKEN=hunter22\n"):
        assert "hunter22" not in text_masker.mask(text), text


def test_the_trade_off_a_secret_under_an_allowed_name_is_shown():
    """Documented in masking.md: `PWD=hunter22` (not a known value) goes out as is. Pinned, so a change of
    this promise is a decision, not an accident."""
    for engine in ENGINES:
        assert masker(engine).mask("PWD=hunter22\n") == "PWD=hunter22\n"


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=40, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=40))
def test_streams_mask_the_same_as_text_wherever_chunks_are_cut(engine, chunk):
    """The stream masker holds a possible assignment while it is in progress; once complete, an allowed one
    goes out as is and the others are masked, whatever the chunking."""
    text = ENV_OUTPUT + "".join(f"{line}\n" for line in STILL_MASKED) + f"PWD={KNOWN}\n"
    text_masker = masker(engine)
    out = streamed(text_masker, text, chunk)
    assert out == text_masker.mask(text)
    assert "PWD=/root\nOLDPWD=/tmp\n" in out and "hunter22" not in out and KNOWN not in out


def test_env_name_rule_skips_exact_names_only():
    rule = env_name_rule(DEFAULT_ENV_NAMES, list(DEFAULT_NON_SECRET_NAMES))
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "PWD", "OLDPWD", "PATH"):
        assert not rule.search(name), name
    for name in (
        "ssl_cert_file",
        "SSL_CERT_FILE2",
        "MY_SSL_CERT_DIR",
        "SSL_CERT_FILE_KEY",
        "DB_PASSWORD",
        "AUTH",
    ):
        assert rule.search(name), name
    # What the searched rule still masks (no allow-list entry: not well-known, and fail-closed):
    assert rule.search("KEYBOARD") and rule.search("AUTHOR")
    assert env_name_rule(DEFAULT_ENV_NAMES, []).search("SSL_CERT_DIR")
    assert not env_name_rule([], ["PWD"]).search("PASSWORD")


def pod(env: list[dict]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"containers": [{"name": "c", "image": "x", "env": env}]},
    }


def plugin_masking(**settings_) -> Masking:
    m = Masking(MaskingSettings.model_validate(settings_))
    m.set_known({KNOWN})
    return m


def test_pod_env_values_of_allowed_names_are_kept_and_known_values_still_masked():
    env = [
        {"name": "SSL_CERT_FILE", "value": "/etc/ssl/certs/ca.pem"},
        {"name": "SSL_CERT_DIR", "value": "/etc/ssl/certs"},
        {"name": "MY_SSL_CERT_DIR", "value": "/not/shown"},
        {"name": "ssl_cert_file", "value": "/not/shown/either"},
        {"name": "SSL_CERT_FILE", "value": KNOWN},  # a Secret's value under an allowed name
    ]
    m = plugin_masking()
    masked = m.mask_doc(copy.deepcopy(pod(env)), "Pod")
    values = [var["value"] for var in masked["spec"]["containers"][0]["env"]]
    assert values == ["/etc/ssl/certs/ca.pem", "/etc/ssl/certs", M, M, M]
    # The structure rules alone (records, the object walk): same answer for the names.
    doc = pod(env[:4])
    mask_document(doc, m.structure_rules)
    assert [var["value"] for var in doc["spec"]["containers"][0]["env"]] == [
        "/etc/ssl/certs/ca.pem",
        "/etc/ssl/certs",
        M,
        M,
    ]


def test_settings_replace_the_list_and_refuse_patterns():
    # An empty list: the name rules as before the allow-list.
    m = plugin_masking(non_secret_names=[])
    assert m.text.mask("PWD=/root\n") == f"PWD={M}\n"
    doc = m.mask_doc(pod([{"name": "SSL_CERT_FILE", "value": "/etc/ssl/ca.pem"}]), "Pod")
    assert doc["spec"]["containers"][0]["env"][0]["value"] == M
    # A name of one's own.
    m = plugin_masking(non_secret_names=["GPG_KEY"])
    assert m.text.mask("PWD=/root\n") == f"PWD={M}\n"
    assert (
        m.mask_doc(pod([{"name": "GPG_KEY", "value": "A035C8C1"}]), "Pod")["spec"]["containers"][0]["env"][0][
            "value"
        ]
        == "A035C8C1"
    )
    for bad in (".*", "DB_*", "PWD|PASSWORD", "", "A B", "PWD\n"):
        with pytest.raises(ValidationError, match="not a variable name"):
            MaskingSettings.model_validate({"non_secret_names": [bad]})


def test_command_lines_in_records():
    flow = SimpleNamespace(connection=SimpleNamespace(state={"masking": plugin_masking()}), state={})
    argv = ["env", "PWD=/srv", "SSL_CERT_FILE=/etc/ca.pem", "DB_PWD=hunter22", "MY_TOKEN=hunter22", "sh"]
    masked = mask_command_for_record(flow, argv)
    assert masked[:3] == ["env", "PWD=/srv", "SSL_CERT_FILE=/etc/ca.pem"]
    assert "hunter22" not in " ".join(masked)
    assert mask_command_for_record(flow, ["sh", "-c", f"PWD={KNOWN} ls"]) == ["sh", "-c", f"PWD={M} ls"]
