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


def _models_within(model: type, seen: set[type]) -> None:
    """`model` and every model its fields hold (lists, optionals and unions of models included)."""
    import typing

    from pydantic import BaseModel

    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                _models_within(annotation, seen)
            stack.extend(typing.get_args(annotation))


def test_every_config_key_is_documented():
    # Every settings model the gateway validates: the top level, each connection type's upstream block and
    # every built-in plugin's per-connection and gateway-wide settings, with the models nested in them.
    from kubegate.core.config import GatewaySettings

    host = PluginHost(load_entry_points=False)
    roots = [GatewaySettings, *(ctype.settings_model for ctype in host.connection_types().values()),
             *host.plugin_settings_models().values(), *host.gateway_settings_models().values()]  # fmt: skip
    models: set[type] = set()
    for root in roots:
        _models_within(root, models)
    assert len(models) > 25  # the collection itself works
    for model in sorted(models, key=lambda m: m.__name__):
        for field in model.model_fields:
            assert f"`{field}`" in CONFIG_DOC or f"{field}`" in CONFIG_DOC, (
                f"docs/configuration.md lacks {model.__name__}.{field}"
            )
