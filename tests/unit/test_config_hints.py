"""What a new user types wrong gets one line that says what is wrong and what is expected (issue 16):
bad listening addresses (`listen`, `serve --bind`), typo'd keys at every nesting level (with the closest
valid key), and files the config names that cannot be read."""

from typing import Literal

import pytest
from kubetest import base_config, run_kubegate
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubegate.core.config import GatewaySettings, first_error, split_listen, valid_keys


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("localhost:8443", ("localhost", 8443)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:8443", ("::1", 8443)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_good_addresses_split(address, expected):
    assert split_listen(address) == expected


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range (0-65535)"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("localhost", "'localhost' has no port: expected HOST:PORT, e.g. localhost:8443"),
        ("localhost:", "has no port: expected HOST:PORT"),
        (":abc", "port 'abc' is not a number"),
        (":8443", "has no host: expected HOST:PORT, e.g. 127.0.0.1:8443"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:٨٠", "is not a number"),  # Arabic-Indic digits: isdigit() but not a port
        ("::1:8443", "an IPv6 address goes in brackets, e.g. [::1]:8443"),
        ("[::1]", "has no port: expected HOST:PORT, e.g. [::1]:8443"),
        ("[::1]:99999", "out of range"),
        ("[::1", "expected [IPv6]:PORT"),
        ("[example.com]:80", "expected [IPv6]:PORT"),
        ("[::1]8443", "expected [IPv6]:PORT"),
        ("", "has no port"),
    ],
)
def test_bad_addresses_say_what_is_wrong(address, reason):
    with pytest.raises(ValueError) as caught:
        split_listen(address)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_keys_suggest_the_closest_valid_key_at_every_level():
    def reason(data):
        with pytest.raises(ValidationError) as caught:
            GatewaySettings.model_validate(data)
        return first_error(caught.value)

    good = {"connections": {"prod": {"upstream": {}}}}
    assert reason({**good, "lisen": "x"}) == ("lisen", "unknown key (did you mean 'listen'?)")
    assert reason({**good, "tls": {"cert_fil": "x"}}) == (
        "tls.cert_fil",
        "unknown key (did you mean 'cert_file'?)",
    )
    assert reason({"connections": {"prod": {"upstram": {}}}}) == (
        "connections.prod.upstram",
        "unknown key (did you mean 'upstream'?)",
    )
    # Nothing close: the keys that are valid there.
    key, text = reason({**good, "limits": {"zzz": 1}})
    assert key == "limits.zzz" and text.startswith("unknown key (valid here: max_request_body_bytes, ")


class Leaf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["leaf"] = "leaf"
    colour: str = ""


class Other(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["other"] = "other"
    size: int = 0


class PluginLike(BaseModel):
    """Shaped like a plugin's settings: lists, mappings and a discriminated union below the top."""

    model_config = ConfigDict(extra="forbid")
    items: list[Leaf] = []
    by_name: dict[str, Leaf] = {}
    choice: Leaf | Other | None = Field(None, discriminator="kind")


@pytest.mark.parametrize(
    ("data", "where", "hint"),
    [
        ({"itmes": []}, "plugins.x.itmes", "did you mean 'items'?"),
        ({"items": [{"color": "red"}]}, "plugins.x.items.0.color", "did you mean 'colour'?"),
        ({"by_name": {"a": {"colr": "red"}}}, "plugins.x.by_name.a.colr", "did you mean 'colour'?"),
        ({"choice": {"kind": "other", "sise": 1}}, "plugins.x.choice.other.sise", "did you mean 'size'?"),
    ],
)
def test_nested_plugin_settings_get_a_suggestion_without_being_told_the_model(data, where, hint):
    """Plugin settings are validated outside this module (connections, gateway): `first_error` finds the model
    by the error's title and walks lists, mappings and discriminated unions down to the mapping."""
    with pytest.raises(ValidationError) as caught:
        PluginLike.model_validate(data)
    key, reason = first_error(caught.value, "plugins.x")
    assert key == where
    assert reason == f"unknown key ({hint})"


def test_valid_keys_is_none_where_there_is_no_model():
    assert valid_keys(GatewaySettings, ("plugins", "anything")) is None
    assert valid_keys(None, ()) is None
    assert valid_keys(GatewaySettings, ("tls",)) == ["enabled", "cert_file", "key_file", "hostnames"]


# Through the real CLI: one line, exit 2, no traceback.


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line, line
    assert line.startswith("kubegate: error: ")
    return line


@pytest.mark.parametrize(
    ("bind", "reason"),
    [
        ("127.0.0.1:99999", "'127.0.0.1:99999': port 99999 is out of range (0-65535)"),
        ("localhost", "'localhost' has no port: expected HOST:PORT"),
        (":abc", "port 'abc' is not a number"),
        ("::1:8443", "an IPv6 address goes in brackets"),
    ],
)
def test_serve_bind_flag_errors_are_one_line(tmp_path, bind, reason):
    line = one_line_error(run_kubegate(tmp_path, base_config(tmp_path), "serve", "--bind", bind))
    assert line.startswith(f"kubegate: error: --bind: {bind!r}") and reason in line


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "localhost", "[::1]"])
def test_listen_key_errors_are_one_line(tmp_path, listen):
    config = base_config(tmp_path)
    config["listen"] = listen
    line = one_line_error(run_kubegate(tmp_path, config, "serve"))
    assert f"{tmp_path / 'kubegate.yaml'}: listen: {listen!r}" in line


def test_typo_through_the_cli_names_the_closest_key(tmp_path):
    config = base_config(tmp_path)
    config["connections"]["prod"]["plugins"]["static-tokens"]["tokens"][0]["group"] = ["dev"]
    line = one_line_error(run_kubegate(tmp_path, config))
    assert line.endswith(
        "connections.prod.plugins.static-tokens.tokens.0.group: unknown key (did you mean 'groups'?)"
    )


def test_missing_tls_files_are_named(tmp_path):
    config = base_config(tmp_path)
    config["tls"] = {"cert_file": "nope.pem", "key_file": "nope.key"}
    line = one_line_error(run_kubegate(tmp_path, config, "serve", "--bind", "127.0.0.1:0"))
    assert line == (
        f"kubegate: error: {tmp_path / 'kubegate.yaml'}: tls.cert_file: cannot read {tmp_path / 'nope.pem'}: "
        "No such file or directory"
    )


def test_demo_port_out_of_range_is_one_line(tmp_path):
    import subprocess

    from kubetest import KUBEGATE

    proc = subprocess.run(
        [KUBEGATE, "demo", "--dir", str(tmp_path / "demo"), "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        one_line_error(proc)
        == "kubegate: error: listening address: '127.0.0.1:99999': port 99999 is out of range (0-65535)"
    )


@pytest.mark.parametrize("sink", ["audit-db", "audit-file"])
def test_a_missing_audit_signing_key_stops_the_start_with_one_line(tmp_path, sink):
    # Found when the sink starts (not when the config is read): it must still be one line, never a traceback.
    config = base_config(tmp_path)
    config["plugins"] = {sink: {"signing_algorithm": "hmac-sha256", "signing_key_file": "missing.key"}}
    config["connections"]["prod"]["plugins"][sink] = {}
    proc = run_kubegate(tmp_path, config, "serve", "--bind", "127.0.0.1:0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"kubegate: error: cannot start: {tmp_path / 'kubegate.yaml'}: plugins.{sink}: "
        f"cannot read the signing key {tmp_path / 'missing.key'}: No such file or directory"
    ), last
