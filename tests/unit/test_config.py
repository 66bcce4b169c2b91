"""A bad config exits non-zero naming the file, the key and the reason, without a traceback."""

import subprocess

import pytest
import yaml
from kubetest import GOOD_HASH, KUBEGATE, base_config, run_kubegate  # noqa: F401


def mutate(config: dict, dotted: str, value) -> dict:
    node = config
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[int(key)]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return config


@pytest.mark.parametrize(
    ("key", "value", "expect_key", "expect_reason"),
    [
        ("listen", "nope", "listen", "HOST:PORT"),
        ("surprise", 1, "surprise", "unknown key"),
        (
            "connections.prod.upstream.server",
            "ftp://x",
            "connections.prod.upstream.server",
            "not an http(s) URL",
        ),
        (
            "connections.prod.upstream.token_file",
            "missing-file",
            "connections.prod.upstream.token_file",
            "cannot read token file",
        ),
        ("connections.prod.upstream.tokenfile", "x", "connections.prod.upstream.tokenfile", "unknown key"),
        ("connections.prod.type", "ssh", "connections.prod.type", "unknown connection type 'ssh'"),
        ("connections.prod.plugins.nope", {}, "connections.prod.plugins.nope", "no such plugin (installed: "),
        (
            "connections.prod.plugins.maskng",
            {},
            "connections.prod.plugins.maskng",
            "no such plugin (did you mean 'masking'? installed: ",
        ),
        (
            "connections.prod.plugins.static-tokens.tokens.0.sha256",
            "abc",
            "connections.prod.plugins.static-tokens.tokens.0.sha256",
            "64-character hex",
        ),
        (
            "connections.prod.plugins.static-tokens.tokens.0.groups",
            ["system:masters"],
            "connections.prod.plugins.static-tokens.tokens.0.groups",
            "system: groups",
        ),
        (
            "connections.prod.plugins.static-tokens.tokens.0.user",
            KeyError,
            "connections.prod.plugins.static-tokens.tokens.0.user",
            "required key is missing",
        ),
        ("limits.max_request_body_bytes", -1, "limits.max_request_body_bytes", "greater than 0"),
        (
            "connections.prod.upstream.kubeconfig",
            "kc.yaml",
            "connections.prod.upstream.kubeconfig",
            "exactly one credential",
        ),
    ],
)
def test_bad_config_names_file_key_and_reason(tmp_path, key, value, expect_key, expect_reason):
    proc = run_kubegate(tmp_path, mutate(base_config(tmp_path), key, value))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0, line
    assert str(tmp_path / "kubegate.yaml") in line
    assert f": {expect_key}: " in line
    assert expect_reason in line


def test_invalid_yaml_and_missing_file(tmp_path):
    proc = run_kubegate(tmp_path, "connections: [unclosed\n")
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "line 2" in proc.stderr
    proc = subprocess.run(
        [KUBEGATE, "serve", "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kubegate: error: {tmp_path / 'nope.yaml'}: file not found"


def test_kubeconfig_credential_problems_are_named(tmp_path):
    config = base_config(tmp_path)
    config["connections"]["prod"]["upstream"] = {"kubeconfig": "kc.yaml", "context": "missing"}
    (tmp_path / "kc.yaml").write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2 and "connections.prod.upstream.context: no context 'missing'" in proc.stderr
    del config["connections"]["prod"]["upstream"]["context"]
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2 and "uses 'exec'" in proc.stderr


def test_good_config_prints_kubeconfig(tmp_path):
    proc = run_kubegate(
        tmp_path, base_config(tmp_path), "kubeconfig", "--connection", "prod", "--token", "secret-t"
    )
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:0/k8s/prod"
    assert doc["clusters"][0]["cluster"]["certificate-authority-data"]
    assert doc["users"][0]["user"]["token"] == "secret-t"
    proc = run_kubegate(tmp_path, base_config(tmp_path), "kubeconfig", "--connection", "nope", "--token", "t")
    assert proc.returncode == 2 and "no connection 'nope'" in proc.stderr


def test_plugins_command_lists_where_enabled(tmp_path):
    proc = run_kubegate(tmp_path, base_config(tmp_path), "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "static-tokens" in proc.stdout and "kubernetes" in proc.stdout
    assert "enabled on: prod" in proc.stdout


def test_private_reads_a_models_private_attribute_as_attribute_access_would():
    from pydantic import BaseModel, PrivateAttr

    from kubegate.core.config import private

    class Settings(BaseModel):
        name: str = "x"
        _built: dict = PrivateAttr(default_factory=dict)
        _later: object = PrivateAttr(None)

    settings = Settings()
    settings._later = "set after validation"
    assert private(settings, "_built") is settings._built
    assert private(settings, "_later") == "set after validation"
    with pytest.raises(AttributeError, match="no private attribute '_missing'"):
        private(settings, "_missing")
    with pytest.raises(AttributeError):
        private(settings, "name")  # a field is not a private attribute
