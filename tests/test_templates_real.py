"""Templates that fit real builds, in real pytest runs with xdist workers.

A virtualenv with a console script and an editable install, used in place from every
worker; a waiter that misses its per-process step, caught; a supplied directory left
untouched; a lock dir carried to another "machine" (another boot id in its records),
reused after verification and rebuilt after tampering; layers rebuilt only where they
changed; the cache-key file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pytest_prewarm.digest import manifest

# A wheel made by hand (a zip with dist-info): pip installs it with no build backend, so
# the test needs nothing from the network. The editable one is what PEP 660 backends
# produce: a .pth file naming a source directory, here inside the template itself.
VENV_CONFTEST = """
    import base64
    import hashlib
    import json
    import os
    import subprocess
    import sys
    import zipfile

    import pytest

    import prewarm_probe as probe


    def wheel(path, name, files, entry_points=""):
        dist = f"{name}-1.0.dist-info"
        files = dict(files)
        files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\\nName: {name}\\nVersion: 1.0\\n"
        files[f"{dist}/WHEEL"] = (
            "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
        )
        if entry_points:
            files[f"{dist}/entry_points.txt"] = entry_points
        record = []
        target = path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(target, "w") as archive:
            for member, text in files.items():
                data = text.encode()
                archive.writestr(member, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                record.append(f"{member},sha256={digest.decode()},{len(data)}")
            archive.writestr(f"{dist}/RECORD", "\\n".join(record + [f"{dist}/RECORD,,"]) + "\\n")
        return target


    def build_venv(path):
        probe.count_attempt(path)
        venv = path / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        src = path / "src"
        src.mkdir()
        (src / "demo_edit.py").write_text("WHERE = __file__\\n")
        tool = {"demo_tool.py": "import sys\\nimport demo_edit\\n"
                "def main():\\n    print(sys.executable)\\n    print(demo_edit.WHERE)\\n"}
        wheels = path / "wheels"
        wheels.mkdir()
        made = [
            wheel(wheels, "demo_tool", tool, "[console_scripts]\\ndemo-tool = demo_tool:main\\n"),
            wheel(wheels, "demo_edit", {"__editable__.demo_edit.pth": f"{src}\\n"}),
        ]
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
             "--no-index", "--no-deps", "-q", *map(str, made)],
            check=True,
        )
        return {"built_in": str(path)}


    @pytest.fixture(scope="session")
    def venv(prewarmed_template):
        return prewarmed_template("venv", build_venv)
"""

VENV_TESTS = """
    import os
    import subprocess

    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("n", range(6))
    def test_the_venv_runs_in_place(venv, n):
        assert venv.value["built_in"] == str(venv.path)
        out = subprocess.run(
            [str(venv.path / "venv" / "bin" / "demo-tool")],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        probe.record("ran", out=out, path=str(venv.path), origin=venv.origin)
"""


def test_a_venv_with_an_editable_install_runs_from_the_published_path_in_every_worker(suite):
    suite.write(conftest=VENV_CONFTEST, test_venv=VENV_TESTS)

    result = suite.run("-n", "3")

    result.assert_outcomes(passed=6)
    (attempt,) = suite.attempts()
    ran = suite.records("ran")
    assert {r["worker"] for r in ran} == {"gw0", "gw1", "gw2"}
    published = Path(attempt["path"])
    for r in ran:
        assert Path(r["path"]) == published
        python, module = r["out"]
        # The console script's #! line and the editable .pth both name the published path.
        assert Path(python) == published / "venv" / "bin" / "python"
        assert Path(module) == published / "src" / "demo_edit.py"


CONFIGURE_CONFTEST = """
    import os

    import pytest

    import prewarm_probe as probe


    def build(path):
        probe.count_attempt(path)
        probe.wait_for_requests(3)  # every worker asks while it builds
        os.environ["APP_URL"] = f"file://{path}"  # only this process sees it
        return f"file://{path}"


    def configure(template):
        os.environ["APP_URL"] = template.value


    @pytest.fixture(scope="session")
    def app(prewarmed_template):
        probe.announce_request()
        hook = configure if os.environ.get("PREWARM_TEST_CONFIGURE") == "1" else None
        return prewarmed_template("app", build, configure=hook)
"""

CONFIGURE_TESTS = """
    import os

    import pytest


    @pytest.mark.parametrize("n", range(6))
    def test_every_process_is_configured(app, n):
        assert os.environ.get("APP_URL") == app.value
"""


def test_a_waiter_that_misses_the_per_process_step_is_caught(suite):
    suite.write(conftest=CONFIGURE_CONFTEST, test_app=CONFIGURE_TESTS)

    with_hook = suite.run("-n", "3", run="with", env={"PREWARM_TEST_CONFIGURE": "1"})
    without = suite.run(
        "-n", "3", "--prewarm-rebuild", run="without", env={"PREWARM_TEST_CONFIGURE": "0"}
    )

    with_hook.assert_outcomes(passed=6)
    # Without the hook only the builder's process is configured: the waiters' tests fail,
    # and the builder was warned that it configured its own process only.
    outcome = without.parseoutcomes()
    assert outcome.get("failed", 0) >= 2, without.stdout.str()
    assert outcome.get("passed", 0) >= 1
    assert "PrewarmWarning" in without.stdout.str()
    assert "changed this process's environment (APP_URL)" in without.stdout.str()


SUPPLY_CONFTEST = """
    import pytest

    import prewarm_probe as probe


    def build(path):
        probe.count_attempt(path)


    @pytest.fixture(scope="session")
    def wheel(prewarmed_template):
        return prewarmed_template("wheel", build, key={"version": 3})
"""

SUPPLY_TESTS = """
    import os

    import pytest


    @pytest.mark.parametrize("n", range(4))
    def test_the_supplied_wheel_is_used(wheel, n):
        assert wheel.origin == "supplied"
        assert str(wheel.path) == os.environ["EXPECTED_DIR"]
        assert (wheel.path / "app-1.0-py3-none-any.whl").read_text() == "prebuilt"
"""


def test_a_supplied_directory_is_used_untouched_and_reported_as_supplied(suite, tmp_path):
    suite.write(conftest=SUPPLY_CONFTEST, test_wheel=SUPPLY_TESTS)
    given = tmp_path / "ci-artifacts"
    given.mkdir()
    (given / "app-1.0-py3-none-any.whl").write_text("prebuilt")
    before = manifest(given)
    report = tmp_path / "report.json"

    by_option = suite.run(
        "-n", "2", "--prewarm-supply", f"wheel={given}", "--prewarm-json", str(report),
        env={"EXPECTED_DIR": str(given)},
    )  # fmt: skip
    data = json.loads(report.read_text())
    by_env = suite.run(
        "-n", "2", env={"EXPECTED_DIR": str(given), "PYTEST_PREWARM_SUPPLY": f"wheel={given}"}
    )
    missing = suite.run("--prewarm-supply", f"wheel={tmp_path / 'nope'}")

    by_option.assert_outcomes(passed=4)
    by_env.assert_outcomes(passed=4)
    assert suite.attempts() == []
    assert manifest(given) == before
    assert sorted(p.name for p in given.iterdir()) == ["app-1.0-py3-none-any.whl"]
    (entry,) = data["templates"]
    assert entry["outcome"] == "supplied"
    assert data["settings"]["supplied"] == {"wheel": str(given)}
    by_option.stdout.fnmatch_lines([f"wheel  supplied: {given} (from --prewarm-supply), not built"])
    by_env.stdout.fnmatch_lines(["wheel  supplied: * (from PYTEST_PREWARM_SUPPLY), not built"])
    assert missing.ret == 4
    missing.stderr.fnmatch_lines([f"*'wheel={tmp_path / 'nope'}' from --prewarm-supply*"])
    assert "does not exist" in missing.stderr.str()


RESTORE_CONFTEST = """
    import pytest

    import prewarm_probe as probe


    def build(path):
        probe.count_attempt(path)
        (path / "data.txt").write_text("genuine")
        (path / "bin").mkdir()
        (path / "bin" / "tool").write_text("#!/bin/sh\\necho ok\\n")
        (path / "bin" / "tool").chmod(0o755)
        return "v1"


    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        return prewarmed_template("db", build, key="schema-1")
"""

RESTORE_TESTS = """
    import pytest


    @pytest.mark.parametrize("n", range(4))
    def test_uses_db(db, n):
        assert (db.path / "data.txt").read_text() in ("genuine", "tampered")
"""


def restore_as_if_on_another_machine(lock_dir: Path) -> None:
    """A CI cache restore: the same files at the same path, written by another boot."""
    saved = lock_dir.with_name("cache-archive")
    shutil.rmtree(saved, ignore_errors=True)
    lock_dir.rename(saved)
    shutil.copytree(saved, lock_dir, symlinks=True)
    for meta in (lock_dir / "templates").glob("*/meta.json"):
        data = json.loads(meta.read_text())
        data["boot_id"] = "0f5e-another-machine"
        meta.write_text(json.dumps(data))


def test_a_lock_dir_carried_to_another_machine_is_reused_after_verifying_or_rebuilt(suite):
    suite.write(conftest=RESTORE_CONFTEST, test_db=RESTORE_TESTS)

    first = suite.run("-n", "2", run="first")
    restore_as_if_on_another_machine(suite.lock_dir)
    verified = suite.run("-n", "2", run="verified")
    (published,) = (suite.lock_dir / "templates").glob("*/*/data")
    restore_as_if_on_another_machine(suite.lock_dir)
    (published / "data.txt").write_text("tampered")
    tampered = suite.run("-n", "2", run="tampered")

    for result in (first, verified, tampered):
        result.assert_outcomes(passed=4)
    assert [a["run"] for a in suite.attempts()] == ["first", "tampered"]
    verified.stdout.fnmatch_lines(["db  reused*", "*: restored from another boot, verified in *"])
    tampered.stdout.fnmatch_lines(
        ["db  built by *", "*: restored from another boot, and it did not verify: data.txt changed"]
    )


LAYERS_CONFTEST = """
    import os

    import pytest_prewarm

    import prewarm_probe as probe


    @pytest_prewarm.template("base", key=os.environ.get("BASE_KEY", "1"))
    def build_base(path):
        probe.count_attempt(path, name="base")
        (path / "base.txt").write_text(os.environ.get("BASE_KEY", "1"))


    @pytest_prewarm.template("app", key="app-1", requires=["base"])
    def build_app(path, layers):
        probe.count_attempt(path, name="app")
        (path / "app.txt").write_text("on " + (layers["base"].path / "base.txt").read_text())


    @pytest_prewarm.template("other", key="other-1")
    def build_other(path):
        probe.count_attempt(path, name="other")
"""

LAYERS_TESTS = """
    import os

    import pytest


    @pytest.mark.prewarm("app", "other")
    @pytest.mark.parametrize("n", range(4))
    def test_layers(prewarmed, n):
        expected = "on " + os.environ.get("BASE_KEY", "1")
        assert (prewarmed["app"].path / "app.txt").read_text() == expected
"""


def test_a_changed_layer_rebuilds_it_and_what_is_built_on_it_only(suite, tmp_path):
    suite.write(conftest=LAYERS_CONFTEST, test_layers=LAYERS_TESTS)
    keys = tmp_path / "prewarm-keys.txt"

    listed = suite.run("--collect-only", "-q", "--prewarm-keys", str(keys), run="keys")
    key_text = keys.read_text()
    first = suite.run("-n", "2", run="first")
    again = suite.run("-n", "2", run="again")
    changed = suite.run("-n", "2", run="changed", env={"BASE_KEY": "2"})

    assert listed.ret == 0
    assert key_text.splitlines()[1:] == [
        'app\t"app-1"\tbase',
        'base\t"1"\t',
        'other\t"other-1"\t',
    ]
    for result in (first, again, changed):
        result.assert_outcomes(passed=4)
    built = [(a["run"], a["name"]) for a in suite.attempts()]
    assert sorted(built) == sorted(
        [("first", "base"), ("first", "app"), ("first", "other"), ("changed", "base"),
         ("changed", "app")]
    )  # fmt: skip
    # After a run, the file lists what the run got, layers' digests in the layered key.
    after = tmp_path / "after.txt"
    suite.run("-n", "2", "--prewarm-keys", str(after), run="again").assert_outcomes(passed=4)
    names = [line.split("\t")[0] for line in after.read_text().splitlines()[1:]]
    assert names == ["app", "base", "other"]
