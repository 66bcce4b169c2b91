"""The documentation site builds with warnings as errors, and its generated references match the code.

`mkdocs build --strict` fails on a broken link, a nav entry without a page or a page outside the nav;
docs/hooks.py generates the configuration reference (from the settings models) and the hook reference
(from kubegate.core.hookspecs) at build time, and these tests read them back from the built site.
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from kubegate.core import hookspecs
from kubegate.core.plugins import PluginHost

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).parent / "mkdocs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or not MKDOCS.exists(),
    reason="mkdocs is not installed in this environment (pip install 'mkdocs>=1.6,<2')",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}{proc.stdout}"
    return out


def _text(page: Path) -> str:
    """The page's text content (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_every_nav_page_is_built(site):
    for page in ("index.html", "getting-started/index.html", "operations/index.html",
                 "plugins/index.html", "examples/kubegate-example-plugin/index.html"):  # fmt: skip
        assert (site / page).is_file(), page


def test_hook_reference_has_every_hook_with_its_signature_and_docstring(site):
    text = _text(site / "reference" / "hooks" / "index.html")
    for name in hookspecs.all_hook_names():
        fn = getattr(hookspecs, name)
        assert f"{name}({', '.join(inspect.signature(fn).parameters)})" in text, name
        assert f"def {name}(" in text, name
        # The docstring's first sentence, as it reads once rendered (``literals`` become code).
        first = (inspect.getdoc(fn) or "").split("\n", 1)[0].replace("``", "")
        assert re.sub(r"\s+", " ", first) in re.sub(r"\s+", " ", text), f"{name}: {first!r}"


def _models() -> list[type]:
    from pydantic import BaseModel

    from kubegate.core.config import GatewaySettings

    host = PluginHost(load_entry_points=False)
    roots = [GatewaySettings, *(c.settings_model for c in host.connection_types().values()),
             *host.plugin_settings_models().values(), *host.gateway_settings_models().values()]  # fmt: skip
    seen: list[type] = []
    stack: list[typing.Any] = list(roots)
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item in seen:
                continue
            seen.append(item)
            stack.extend(f.annotation for f in item.model_fields.values())
        stack.extend(typing.get_args(item))
    return seen


def test_configuration_reference_has_every_field_of_every_settings_model(site):
    page = (site / "reference" / "configuration" / "index.html").read_text()
    models = _models()
    assert len(models) > 25
    for model in models:
        # Each model has its own section (anchor), and a row per field in it.
        anchor = f"{model.__module__}.{model.__qualname__}".replace(".", "-").replace("_", "-").lower()
        start = page.find(f'id="{anchor}"')
        assert start > 0, f"no section for {model.__name__} (#{anchor})"
        section = _section(page, start)
        for name, field in model.model_fields.items():
            assert f"<td><code>{field.alias or name}</code></td>" in section, f"{model.__name__}.{name}"


def _section(page: str, start: int) -> str:
    """From a model's heading to the next model heading (h3 or h4)."""
    nxt = re.search(r"<h[234] ", page[start + 4 :])
    return page[start : start + 4 + nxt.start()] if nxt else page[start:]


def test_configuration_reference_shows_types_defaults_and_descriptions(site):
    text = _text(site / "reference" / "configuration" / "index.html")
    from kubegate.core.config import GatewaySettings, LimitSettings

    listen = GatewaySettings.model_fields["listen"]
    assert f'listen str "{listen.default}" {listen.description}' in re.sub(r"\s+", " ", text)
    body = LimitSettings.model_fields["max_request_body_bytes"]
    assert f"max_request_body_bytes int {body.default}" in re.sub(r"\s+", " ", text)
    for key in ("connections.NAME.plugins.masking", "connections.NAME.upstream (type: kubernetes)",
                "plugins.login"):  # fmt: skip
        assert key in text, key


def test_links_out_of_docs_are_rewritten(site):
    ui = (site / "ui" / "index.html").read_text()
    assert "../test-artifacts/" not in ui
    for shot in ("ui-approval-dialog.png", "ui-session-replay.png"):
        if (ROOT / "test-artifacts" / shot).exists():
            assert f'src="../_external/test-artifacts/{shot}"' in ui
            assert (site / "_external" / "test-artifacts" / shot).is_file()
        else:  # produced by the browser tests; without them the page says so
            assert f"test-artifacts/{shot}</code> is produced by the tests" in ui


def test_outside_link_rewriting_keeps_code_and_uses_the_repository():
    spec = importlib.util.spec_from_file_location("kubegate_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec and spec.loader
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    docs = ROOT / "docs"
    page = "See [the README](../README.md#quick-start), `[x](../core/flow.py)` and [policy](policy.md).\n"
    page += "```\n[kept](../core/flow.py)\n```\n![missing](../test-artifacts/nothing-here.png)\n"
    out = hooks.rewrite_outside_links(
        page, page_dir=docs, page_uri="x.md", docs_dir=docs, repo_url="https://example.org/o/kubegate",
        edit_branch="main",
    )  # fmt: skip
    assert "[the README](https://example.org/o/kubegate/blob/main/README.md#quick-start)" in out
    assert "`[x](../core/flow.py)`" in out and "[kept](../core/flow.py)" in out
    assert "[policy](policy.md)" in out
    assert "`test-artifacts/nothing-here.png` is produced by the tests" in out
    plain = hooks.rewrite_outside_links(
        "[flow](../core/flow.py)", page_dir=docs, page_uri="x.md", docs_dir=docs, repo_url=None,
        edit_branch="main",
    )  # fmt: skip
    assert plain == "flow (`core/flow.py`)"
    folder = hooks.rewrite_outside_links(
        "[`deploy/`](../deploy/) and `[x](../deploy/)`", page_dir=docs, page_uri="x.md", docs_dir=docs,
        repo_url=None, edit_branch="main",
    )  # fmt: skip
    assert folder == "`deploy/` and `[x](../deploy/)`"
