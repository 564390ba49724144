"""The package's shape: one-way layering, a pytest-free core, a plugin that loads without fcntl."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import env_without_leaks

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_prewarm"

# Lowest first. A module may import modules of lower layers only (function-level, lazy
# imports included); docs/architecture.md draws the same picture.
LAYERS: list[set[str]] = [
    {"_version", "clock", "kinds", "exceptions", "console", "portable", "capture", "rundir"},
    {"names", "trust", "fstype", "values", "services"},
    {"files", "supply"},
    {"owner", "digest", "kernel"},
    {"liveness", "records"},
    {"layout"},
    {"locking", "failure"},
    {"flock", "lease", "teardown"},
    {"locks", "events", "registry", "reaper"},
    {"request"},
    {"eager", "report", "lockdir", "keys"},
    {"config", "marker"},  # the pytest edge
    {"state"},  # a process's state, made on first use
    {"plugin"},  # the pytest11 entry point
]
EDGE = {"config", "marker", "state", "plugin"}
LAYER_OF = {name: index for index, layer in enumerate(LAYERS) for name in layer}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def package_imports(name: str) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_prewarm"):
            parts = (node.module or "").split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pytest_prewarm" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_has_a_layer() -> None:
    assert set(modules()) == set(LAYER_OF), "add new modules to LAYERS and architecture.md"


@pytest.mark.parametrize("name", modules())
def test_no_module_imports_a_higher_layer(name: str) -> None:
    upward = {
        other
        for other in package_imports(name)
        if other in LAYER_OF and LAYER_OF[other] >= LAYER_OF[name] and other != name
    }
    assert not upward, f"{name} (layer {LAYER_OF[name]}) imports {sorted(upward)}"


def test_the_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    # Control: the parser sees relative, absolute and function-level imports alike.
    source = "def f():\n    from .request import Template\n    import pytest_prewarm.plugin\n"
    (tmp_path / "probe.py").write_text(source)
    tree = ast.parse(source)
    kinds = {type(node).__name__ for node in ast.walk(tree)}
    assert {"ImportFrom", "Import"} <= kinds
    assert package_imports("liveness") >= {"clock", "owner"}


CORE = sorted(set(modules()) - EDGE)


@pytest.mark.parametrize("name", CORE)
def test_a_core_module_loads_without_pytest(name: str) -> None:
    code = (
        f"import sys, pytest_prewarm.{name}\n"
        "loaded = sorted(m for m in sys.modules if m == 'pytest' or m.startswith('_pytest'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_leaks(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"pytest_prewarm.{name} loaded {result.stdout.strip()}"


def test_the_package_itself_loads_nothing_but_its_version() -> None:
    code = (
        "import sys, pytest_prewarm\n"
        "print(sorted(m for m in sys.modules if m.startswith('pytest_prewarm')))\n"
        "print(pytest_prewarm.Template.__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    first, second = result.stdout.splitlines()
    assert first == "['pytest_prewarm', 'pytest_prewarm._version']"
    assert second == "pytest_prewarm.request"


HIDE_FCNTL = 'import sys\nsys.modules["fcntl"] = None  # as on Windows: importing it fails\n'

SUITE = """
    import os

    import pytest


    def build(path):
        with open(os.environ["COUNT_FILE"], "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        (path / "data.txt").write_text("ok")
        return 1


    @pytest.fixture(scope="session")
    def tmpl(prewarmed_template):
        return prewarmed_template("t", build)
"""

TESTS = """
    import sys

    import pytest


    @pytest.mark.parametrize("i", range(6))
    def test_template(tmpl, i):
        assert "fcntl" not in sys.modules or sys.modules["fcntl"] is None
        assert (tmpl.path / "data.txt").read_text() == "ok"
"""


def run_without_fcntl(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    site = tmp_path / "site"
    suite = tmp_path / "suite"
    site.mkdir()
    suite.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_FCNTL)
    (suite / "conftest.py").write_text(textwrap.dedent(SUITE))
    (suite / "test_t.py").write_text(textwrap.dedent(TESTS))
    count = tmp_path / "count"
    env = env_without_leaks()
    env.update(PYTHONPATH=str(site), COUNT_FILE=str(count))
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", str(suite), *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False
    )
    return result, count


@pytest.mark.skipif(os.name != "posix", reason="hides fcntl where it exists")
def test_without_fcntl_the_plugin_loads_and_builds_once_across_workers(tmp_path: Path) -> None:
    result, count = run_without_fcntl(tmp_path, "-n", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
    assert "lock mode lease (auto: no kernel file lock on this platform" in result.stdout
    assert len(count.read_text().split()) == 1  # built once, by one of the two workers


@pytest.mark.skipif(os.name != "posix", reason="hides fcntl where it exists")
def test_without_fcntl_an_explicit_flock_mode_says_what_is_missing(tmp_path: Path) -> None:
    result, count = run_without_fcntl(tmp_path, "--prewarm-lock-mode", "flock")
    assert result.returncode == 1
    assert (
        "PrewarmLockError: template 't': flock mode needs a kernel file lock and this "
        "platform has none (the fcntl module is missing)"
    ) in result.stdout
    assert not count.exists()  # nothing was built without exclusion
