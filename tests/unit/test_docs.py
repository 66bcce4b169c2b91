"""Documentation that must not drift from the code."""

import inspect
import re
from pathlib import Path

import pytest

from kubegate.core import hookspecs
from kubegate.core.plugins import PluginHost

ROOT = Path(__file__).resolve().parents[2]
PLUGINS_DOC = (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("name", hookspecs.all_hook_names())
def test_every_hook_is_documented_with_its_docstring(name):
    fn = getattr(hookspecs, name)
    params = ", ".join(inspect.signature(fn).parameters)
    heading = f"### `{name}({params})`"
    assert heading in PLUGINS_DOC, f"docs/plugins.md lacks {heading}"
    section = PLUGINS_DOC.split(heading, 1)[1].split("\n### ", 1)[0]
    assert inspect.getdoc(fn) in section, f"docs/plugins.md: the text of {name} differs from its docstring"


def test_documented_hooks_exist():
    documented = set(re.findall(r"^### `(kubegate_\w+)\(", PLUGINS_DOC, re.M))
    assert documented == set(hookspecs.all_hook_names())


def test_every_hook_has_a_docstring():
    for name in hookspecs.all_hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_builtin_plugins_implement_only_known_hooks():
    host = PluginHost(load_entry_points=False)
    for info in host.describe():
        assert set(info.hooks) <= set(hookspecs.all_hook_names())
    assert {"kubernetes", "static-tokens"} <= set(host.names)


CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()


def test_every_config_key_is_documented():
    from kubegate.connections.kubernetes import KubernetesUpstreamSettings
    from kubegate.core.config import (
        ConnectionSettings,
        DatabaseSettings,
        GatewaySettings,
        LimitSettings,
        TLSSettings,
    )
    from kubegate.plugins.login.settings import (
        LoginConnectionSettings,
        LoginSettings,
        OIDCLoginProvider,
        SAMLLoginProvider,
    )
    from kubegate.plugins.masking import ConfigMapKeys, Exempt, KnownValues, MaskingSettings
    from kubegate.plugins.oidc import (
        ClaimMappings,
        GitHubActionsPreset,
        GitHubMatch,
        GitHubRule,
        GroupsMapping,
        IssuerSettings,
        OIDCSettings,
        UsernameMapping,
    )
    from kubegate.plugins.policy import PolicySettings, Rule, RuleApproval, RuleMatch
    from kubegate.plugins.static_tokens import StaticToken, StaticTokenSettings
    from kubegate.plugins.webhook import Receiver, WebhookSettings

    models = [
        GatewaySettings,
        TLSSettings,
        LimitSettings,
        ConnectionSettings,
        KubernetesUpstreamSettings,
        StaticTokenSettings,
        StaticToken,
        OIDCSettings,
        IssuerSettings,
        ClaimMappings,
        UsernameMapping,
        GroupsMapping,
        GitHubActionsPreset,
        GitHubRule,
        GitHubMatch,
        DatabaseSettings,
        LoginSettings,
        OIDCLoginProvider,
        SAMLLoginProvider,
        LoginConnectionSettings,
        PolicySettings,
        Rule,
        RuleMatch,
        RuleApproval,
        WebhookSettings,
        Receiver,
        MaskingSettings,
        ConfigMapKeys,
        KnownValues,
        Exempt,
    ]
    for model in models:
        for field in model.model_fields:
            assert f"`{field}`" in CONFIG_DOC or f"{field}`" in CONFIG_DOC, (
                f"docs/configuration.md lacks {model.__name__}.{field}"
            )
