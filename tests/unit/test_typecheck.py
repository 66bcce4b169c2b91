"""mypy sees kubegate's types across packages, the way a plugin author's mypy sees them.

A plugin module written to a temporary folder is checked with the project's mypy configuration
([tool.mypy] in pyproject.toml: kubegate.* resolved through .typecheck/, no global ignore_missing_imports).
A wrong attribute of `Flow`, a wrong argument to `Decision`, `hookimpl` or `make_flow` must be reported;
were any of them `Any` (the editable install's import hook is invisible to mypy), nothing would be.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = """
from kubegate.core import hookimpl
from kubegate.core.flow import Decision, Flow
from kubegate.testing import make_flow


@hookimpl(tryfirst=True)
def kubegate_decide(flow: Flow) -> Decision | None:
    if flow.attributes.verb == "delete" and flow.attributes.namespace == "prod":
        return Decision.deny("deletes in prod need a person")
    return None


def check() -> None:
    kubegate_decide(make_flow("DELETE", "/api/v1/namespaces/prod/pods/web"))
"""

# Each mistake, the line that introduces it and what mypy must say about it.
MISTAKES = [
    (
        'if flow.attributes.verb == "delete"',
        'if flow.no_such_attribute == "delete"',
        '"Flow" has no attribute "no_such_attribute"',
    ),
    ('Decision.deny("deletes in prod need a person")', "Decision.deny(42)", 'to "deny" of "Decision"'),
    ("@hookimpl(tryfirst=True)", "@hookimpl(try_first=True)", 'Unexpected keyword argument "try_first"'),
    ('make_flow("DELETE", ', 'make_flow(verb="DELETE", path=', 'Unexpected keyword argument "verb"'),
]


def mypy(module: Path) -> subprocess.CompletedProcess[str]:
    # The project's config and cache: the kubegate modules are analysed once, not per test.
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(module)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def _mypy_installed() -> None:
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mypy is a dev dependency: `make setup` installs it")


def test_a_correct_plugin_passes(tmp_path: Path) -> None:
    module = tmp_path / "acme_plugin.py"
    module.write_text(PLUGIN)
    proc = mypy(module)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found in 1 source file" in proc.stdout


def test_cross_package_mistakes_are_reported(tmp_path: Path) -> None:
    broken = PLUGIN
    for correct, wrong, _ in MISTAKES:
        assert broken.count(correct) == 1, correct
        broken = broken.replace(correct, wrong)
    module = tmp_path / "acme_plugin.py"
    module.write_text(broken)
    proc = mypy(module)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if ": error: " in line]
    for _, wrong, message in MISTAKES:
        line = 1 + broken.splitlines().index(next(x for x in broken.splitlines() if wrong in x))
        assert any(e.startswith(f"{module}:{line}: error: ") and message in e for e in errors), (
            message,
            proc.stdout,
        )
    assert len(errors) == len(MISTAKES), proc.stdout
