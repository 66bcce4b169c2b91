"""The mcp plugin without the `mcp` package: a gateway that enables it stops at start with one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kubegate.core.errors import ConfigError
from kubegate.plugins import mcp as plugin


async def test_a_missing_sdk_stops_the_start_naming_the_connection_and_the_install(monkeypatch):
    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: None)
    gateway = SimpleNamespace(
        config_path=Path("kubegate.yaml"),
        connections=[SimpleNamespace(name="prod", enabled_plugins=["static-tokens", "mcp"])],
        extensions={},
    )
    with pytest.raises(ConfigError) as caught:
        await plugin.kubegate_startup(gateway)
    assert str(caught.value) == (
        "kubegate.yaml: connections.prod.plugins.mcp: needs the `mcp` package, which is not installed: "
        "pip install 'kubegate[mcp]'"
    )
    assert gateway.extensions == {}


async def test_without_a_connection_that_enables_it_nothing_is_loaded(monkeypatch):
    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: pytest.fail("looked for the SDK"))
    gateway = SimpleNamespace(connections=[SimpleNamespace(name="prod", enabled_plugins=["static-tokens"])],
                              extensions={})  # fmt: skip
    await plugin.kubegate_startup(gateway)
    assert gateway.extensions == {}
