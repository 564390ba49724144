"""The prewarm report end to end: inner suites run under xdist in real processes.

Two suites are run once per module and looked at by several tests (each run costs seconds):
four workers waiting on one build, and two workers with one slow build and eleven failed
ones (whose users fail fast, giving waits of 0 s). The other tests run their own suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import env_without_leaks

RUN_TIMEOUT = 100.0

# Shared by the inner suites: bounded waits on files, and who-am-I.
HELPERS = '''
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker():
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def wait_until(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def announce(template):
    """Say that this worker is about to ask for ``template``."""
    folder = HERE / "requests" / template
    folder.mkdir(parents=True, exist_ok=True)
    (folder / worker()).touch()


def rendezvous_builder(template, count, seconds):
    """A builder that starts only once ``count`` workers asked for the template, then
    takes ``seconds``: every other worker is then provably waiting on it."""

    def build(path):
        folder = HERE / "requests" / template
        wait_until(lambda: folder.is_dir() and len(list(folder.iterdir())) >= count,
                   f"{count} workers to ask for {template!r}")
        (HERE / f"builder-{template}").write_text(f"{worker()} {os.getpid()}")
        time.sleep(seconds)

    return build
'''


@dataclass
class Outcome:
    ret: int
    outlines: list[str]
    errlines: list[str]
    path: Path

    @property
    def stdout(self) -> pytest.LineMatcher:
        return pytest.LineMatcher(self.outlines)

    @property
    def stderr(self) -> pytest.LineMatcher:
        return pytest.LineMatcher(self.errlines)

    def text(self, name: str) -> str:
        return (self.path / name).read_text()


def run_suite(path: Path, *args: str) -> Outcome:
    """Run pytest in ``path`` as a subprocess; its whole process group dies on timeout."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    argv += [f"--basetemp={path / 'basetemp'}", *args]
    with subprocess.Popen(
        argv,
        cwd=path,
        env=env_without_leaks(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"inner pytest timed out:\n{out}\n{err}") from None
    return Outcome(proc.returncode, out.splitlines(), err.splitlines(), path)


def write_suite(path: Path, **files: str) -> None:
    (path / "pytest.ini").write_text("[pytest]\n")
    (path / "prewarm_helpers.py").write_text(HELPERS)
    for name, source in files.items():
        (path / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture(autouse=True)
def _no_leaky_env(no_leaky_env: None) -> None:
    """Every test here runs inner pytest sessions (see conftest.LEAKY_ENV)."""


def run_pytester(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)


def section(lines: list[str]) -> list[str]:
    """The lines of the prewarm summary section, up to the next ==== line."""
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"=+ prewarm summary =+", line)]
    assert len(starts) == 1, "\n".join(lines)
    rest = lines[starts[0] + 1 :]
    # It ends at the next ==== heading, or under -q at the bare "4 passed in 1.00s" line.
    end = next(
        (i for i, line in enumerate(rest) if re.match(r"=+ |\d+ (passed|failed|error)", line)),
        len(rest),
    )
    # The settings lines that close it (where the lock dir is, the lock mode) are not rows.
    return [line for line in rest[:end] if not line.startswith("prewarm: ")]


WAIT_ROW = re.compile(r"^ +(\d+\.\d\d)s  (\S+) +(\S+)( \(\w+\))?$")


def wait_rows(lines: list[str]) -> list[tuple[float, str, str, str]]:
    """(seconds, worker, template, note) of each row of the longest-waits list."""
    rows = []
    for line in lines:
        match = WAIT_ROW.match(line)
        if match:
            rows.append((float(match[1]), match[2], match[3], (match[4] or "").strip()))
    return rows


# -- four workers, one template ---------------------------------------------------------

FOUR_WORKERS = """
    import pytest
    from prewarm_helpers import announce, rendezvous_builder

    BUILD = rendezvous_builder("db", count=4, seconds=1.0)


    @pytest.mark.parametrize("n", range(4))
    def test_uses_db(prewarmed_template, n):
        announce("db")
        template = prewarmed_template("db", BUILD)
        assert template.path.is_dir()
"""


@pytest.fixture(scope="module")
def four_workers(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    path = tmp_path_factory.mktemp("four-workers")
    write_suite(path, test_db=FOUR_WORKERS)
    result = run_suite(path, "-n", "4")
    assert result.ret == 0, "\n".join(result.outlines + result.errlines)
    return result


def test_the_summary_names_the_builder_and_counts_the_three_waiters(four_workers: Outcome) -> None:
    builder = four_workers.text("builder-db").split()[0]
    lines = section(four_workers.outlines)
    match = re.fullmatch(
        rf"db  built by {builder} in (\d+\.\d\d) s; 3 waited, "
        r"longest (\d+\.\d\d) s, total (\d+\.\d\d) s",
        lines[0],
    )
    assert match, lines
    build, longest, total = (float(g) for g in match.groups())
    assert build >= 1.0
    assert longest <= total <= 3 * longest + 0.01


def test_the_longest_waits_list_one_row_per_waiting_worker_sorted(four_workers: Outcome) -> None:
    builder = four_workers.text("builder-db").split()[0]
    lines = section(four_workers.outlines)
    assert "longest lock waits:" in lines
    rows = wait_rows(lines)
    assert sorted(worker for _, worker, _, _ in rows) == sorted(
        {"gw0", "gw1", "gw2", "gw3"} - {builder}
    )
    assert all(template == "db" and note == "" for _, _, template, note in rows)
    seconds = [s for s, _, _, _ in rows]
    assert seconds == sorted(seconds, reverse=True)
    # Each waiter asked before the 1 s build began (how long before it started waiting
    # depends on the machine's load, so no more than "clearly not short" is asserted).
    assert min(seconds) >= 0.05
    longest = re.search(r"longest (\d+\.\d\d) s", lines[0])
    assert longest is not None
    assert seconds[0] == float(longest[1])


def test_the_report_header_names_the_lock_dir_and_settings(four_workers: Outcome) -> None:
    four_workers.stdout.fnmatch_lines(
        [
            "prewarm: lock dir * (per-run default), lock mode flock (*), timeout 1800 s, "
            "stale window 60 s"
        ]
    )


# -- two workers: one slow build, eleven failed builds ---------------------------------

BAD_COUNT = 11

MIXED_BUILDER = f"""
    import pytest
    import pytest_prewarm
    from prewarm_helpers import HERE, announce, rendezvous_builder, worker

    BAD = [f"bad{{i:02d}}" for i in range({BAD_COUNT})]
    SLOW = rendezvous_builder("slow", count=2, seconds=1.5)


    def failing(name):
        def build(path):
            raise RuntimeError(f"{{name}} is broken")

        return build


    def test_builds_that_fail(prewarmed_template):
        for name in BAD:
            with pytest.raises(pytest_prewarm.PrewarmBuildError):
                prewarmed_template(name, failing(name))
        (HERE / "bad-builder").write_text(worker())


    def test_slow(prewarmed_template):
        announce("slow")
        prewarmed_template("slow", SLOW)
"""

MIXED_USERS = """
    import pytest
    import pytest_prewarm
    from prewarm_helpers import HERE, announce, wait_until
    from test_builder import BAD, SLOW, failing


    def test_slow_too(prewarmed_template):
        announce("slow")
        prewarmed_template("slow", SLOW)


    def test_failed_templates_fail_fast(prewarmed_template):
        wait_until((HERE / "bad-builder").exists, "the failed builds")
        for name in BAD:
            with pytest.raises(pytest_prewarm.PrewarmBuildError, match=f"{name} is broken"):
                prewarmed_template(name, failing(name))
"""

# "--dist loadfile" gives each file to its own worker.
MIXED_ARGS = ("-n", "2", "--dist", "loadfile")


def write_mixed(path: Path) -> None:
    write_suite(path, test_builder=MIXED_BUILDER, test_users=MIXED_USERS)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    path = tmp_path_factory.mktemp("mixed")
    write_mixed(path)
    result = run_suite(
        path, *MIXED_ARGS, "--prewarm-notice-after", "0.2", "--prewarm-json", "out/report.json"
    )
    assert result.ret == 0, "\n".join(result.outlines + result.errlines)
    return result


def mixed_workers(result: Outcome) -> tuple[str, str, str]:
    """(worker that ran the failed builds, worker that built "slow", the other one)."""
    bad_builder = result.text("bad-builder")
    slow_builder = result.text("builder-slow").split()[0]
    slow_waiter = ({"gw0", "gw1"} - {slow_builder}).pop()
    return bad_builder, slow_builder, slow_waiter


def test_each_template_gets_one_line_with_its_builder_or_its_failure(mixed: Outcome) -> None:
    bad_builder, slow_builder, _ = mixed_workers(mixed)
    lines = section(mixed.outlines)
    expected = [
        f"bad{i:02d}  failed in {bad_builder} after *.** s: RuntimeError: bad{i:02d} is broken; "
        "1 waited, longest 0.00 s, total 0.00 s"
        for i in range(BAD_COUNT)
    ]
    expected.append(f"slow   built by {slow_builder} in *.** s; 1 waited, longest *, total *")
    # One line each, in the order the controller first heard of them (worker by worker).
    per_template = lines[: lines.index("")]
    assert len(per_template) == len(expected)
    for pattern in expected:
        pytest.LineMatcher(per_template).fnmatch_lines([pattern])


def test_waits_under_a_twentieth_of_a_second_are_hidden_with_a_hint(mixed: Outcome) -> None:
    _, _, slow_waiter = mixed_workers(mixed)
    lines = section(mixed.outlines)
    rows = wait_rows(lines)
    assert [(worker, template) for _, worker, template, _ in rows] == [(slow_waiter, "slow")]
    assert rows[0][0] >= 0.5  # asked before the 1.5 s build began
    pytest.LineMatcher(lines).fnmatch_lines(
        [
            "longest lock waits:",
            f"    *s  {slow_waiter}  slow",
            f"({BAD_COUNT} waits under 0.05 s hidden; use -vv to show them)",
        ],
        consecutive=True,
    )
    assert not any("not shown" in line for line in lines)


def test_a_live_line_names_the_holder_while_a_wait_lasts(mixed: Outcome) -> None:
    _, slow_builder, slow_waiter = mixed_workers(mixed)
    pid = mixed.text("builder-slow").split()[1]
    # Workers' output is captured; the line goes to the controller's real stderr.
    mixed.stderr.fnmatch_lines(
        [
            # "[[]" is a literal "[" in fnmatch.
            f"[[]prewarm] {slow_waiter} has waited *.* s for template 'slow', held by "
            f"{slow_builder}, pid {pid} on this host, alive, running, * s",
        ]
    )
    notices = [line for line in mixed.errlines if line.startswith("[prewarm]")]
    # Repeated every 0.2 s of a wait of about 1.5 s; nobody waited on other templates.
    assert len(notices) >= 2
    assert all("template 'slow'" in line for line in notices)
    waited = [float(m[1]) for line in notices if (m := re.search(r"waited (\d+\.\d) s", line))]
    assert waited == sorted(waited)


# A small JSON-Schema (draft 2020-12 subset) of the documented report, checked by hand below
# so that the test needs no validator package.
NUMBER = {"type": "number", "minimum": 0}
WORKER = {"type": "string", "pattern": r"^(gw\d+|main)$"}
SETTINGS_SCHEMA = {
    "type": "object",
    "required": [
        "lock_dir",
        "lock_dir_source",
        "lock_mode",
        "lock_mode_source",
        "timeout",
        "rebuild",
        "notice_after",
        "eager",
        "stale_after",
        "keep_runs",
    ],
    "properties": {
        "lock_dir": {"type": "string"},
        "lock_dir_source": {"type": "string"},
        # "auto" only in a run that asked for no template: no mode was chosen then.
        "lock_mode": {"enum": ["flock", "lease", "auto"]},
        "lock_mode_source": {"type": "string"},
        "timeout": NUMBER,
        "rebuild": {"type": "boolean"},
        "notice_after": NUMBER,
        "eager": {"type": "boolean"},
        "stale_after": NUMBER,
        "keep_runs": {"type": "integer", "minimum": 0},
    },
}
TEMPLATE_SCHEMA = {
    "type": "object",
    "required": [
        "name",
        "outcome",
        "builds",
        "failures",
        "waits",
        "wait_total_seconds",
        "wait_longest_seconds",
        "recoveries",
    ],
    "properties": {
        "name": {"type": "string"},
        "outcome": {"enum": ["built", "failed", "timeout", "reused", "unused"]},
        "builds": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["worker", "pid", "seconds"],
                "properties": {"worker": WORKER, "pid": {"type": "integer"}, "seconds": NUMBER},
            },
        },
        "failures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["worker", "pid", "seconds", "error"],
                "properties": {
                    "worker": WORKER,
                    "pid": {"type": "integer"},
                    "seconds": NUMBER,
                    "error": {"type": "string"},
                },
            },
        },
        "waits": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["worker", "pid", "seconds", "outcome"],
                "properties": {
                    "worker": WORKER,
                    "pid": {"type": "integer"},
                    "seconds": NUMBER,
                    "outcome": {"enum": ["waited", "reused", "failed", "timeout"]},
                },
            },
        },
        "wait_total_seconds": NUMBER,
        "wait_longest_seconds": NUMBER,
        "recoveries": {"type": "array", "items": {"type": "string"}},
    },
}
EVENT_SCHEMA = {
    "type": "object",
    "required": [
        "template",
        "worker",
        "outcome",
        "wait_seconds",
        "build_seconds",
        "built_by",
        "error",
        "recovered_from",
        "pid",
    ],
    "properties": {
        "template": {"type": "string"},
        "worker": WORKER,
        "outcome": {"enum": ["built", "waited", "reused", "failed", "timeout"]},
        "wait_seconds": NUMBER,
        "build_seconds": {"type": ["number", "null"]},
        "built_by": {"type": ["string", "null"]},
        "error": {"type": ["string", "null"]},
        "recovered_from": {"type": ["string", "null"]},
        "pid": {"type": "integer"},
    },
}
REPORT_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "settings", "templates", "events"],
    "properties": {
        "schema_version": {"const": 1},
        "settings": SETTINGS_SCHEMA,
        "templates": {"type": "array", "items": TEMPLATE_SCHEMA},
        "events": {"type": "array", "items": EVENT_SCHEMA},
    },
}

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the keywords used above only)."""
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[t])
            and not (t in ("integer", "number") and isinstance(value, bool))
            for t in types
        )
        if not ok:
            return [f"{where}: {value!r} is not of type {schema['type']}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value!r} < {schema['minimum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                errors += schema_errors(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def test_the_schema_checker_rejects_what_the_schema_forbids() -> None:
    assert schema_errors({"schema_version": 1, "settings": {}}, REPORT_SCHEMA) != []
    assert schema_errors({"seconds": -1.0}, {"properties": {"seconds": NUMBER}}) != []
    assert schema_errors(True, {"type": "integer"}) != []
    assert schema_errors({"a": 1}, {"type": "object", "additionalProperties": False}) != []


def test_the_json_report_matches_the_documented_schema(mixed: Outcome) -> None:
    data = json.loads((mixed.path / "out" / "report.json").read_text())
    assert schema_errors(data, REPORT_SCHEMA) == []
    with contextlib.suppress(ImportError):
        import jsonschema

        jsonschema.validate(data, REPORT_SCHEMA)


def test_the_json_report_holds_every_worker_s_builds_failures_and_waits(mixed: Outcome) -> None:
    bad_builder, slow_builder, slow_waiter = mixed_workers(mixed)
    data = json.loads((mixed.path / "out" / "report.json").read_text())
    assert data["schema_version"] == 1
    assert data["settings"]["notice_after"] == 0.2
    assert data["settings"]["lock_dir_source"] == "default"
    templates = {t["name"]: t for t in data["templates"]}
    assert set(templates) == {f"bad{i:02d}" for i in range(BAD_COUNT)} | {"slow"}
    slow = templates["slow"]
    assert slow["outcome"] == "built"
    assert [b["worker"] for b in slow["builds"]] == [slow_builder]
    assert [(w["worker"], w["outcome"]) for w in slow["waits"]] == [(slow_waiter, "waited")]
    assert slow["wait_longest_seconds"] == slow["wait_total_seconds"] >= 0.5
    assert slow["builds"][0]["seconds"] >= 1.5
    for i in range(BAD_COUNT):
        bad = templates[f"bad{i:02d}"]
        assert bad["outcome"] == "failed"
        assert [(f["worker"], f["error"]) for f in bad["failures"]] == [
            (bad_builder, f"RuntimeError: bad{i:02d} is broken")
        ]
        assert [(w["worker"], w["outcome"], w["seconds"]) for w in bad["waits"]] == [
            (_other(bad_builder), "failed", 0.0)
        ]
    # 11 failed builds, 11 fail-fast users, one build and one wait.
    assert len(data["events"]) == 2 * BAD_COUNT + 2


def _other(worker: str) -> str:
    return ({"gw0", "gw1"} - {worker}).pop()


@pytest.mark.parametrize(
    ("args", "expected_rows", "hint"),
    [
        pytest.param(
            ("-vv", "-o", "prewarm_report=3"),
            3,
            f"({BAD_COUNT + 1 - 3} more waits not shown; use --prewarm-report 0 to show all)",
            id="vv-ini-report-3",
        ),
        pytest.param(("-vv", "--prewarm-report", "0"), BAD_COUNT + 1, None, id="vv-report-0"),
    ],
)
def test_very_verbose_lists_the_short_waits_up_to_the_report_limit(
    pytester: pytest.Pytester, args: tuple[str, ...], expected_rows: int, hint: str | None
) -> None:
    write_mixed(pytester.path)
    result = run_pytester(pytester, *MIXED_ARGS, *args)
    result.assert_outcomes(passed=4)
    bad_builder = (pytester.path / "bad-builder").read_text()
    lines = section(result.outlines)
    rows = wait_rows(lines)
    assert len(rows) == expected_rows
    assert rows[0][2] == "slow"
    # The rest are the users' fail-fast waits of 0 s, labelled with their outcome.
    assert all(
        (seconds, worker, note) == (0.0, _other(bad_builder), "(failed)")
        for seconds, worker, _, note in rows[1:]
    )
    assert not any("hidden" in line for line in lines)
    if hint is None:
        assert not any("not shown" in line for line in lines)
    else:
        assert lines[-1] == hint


def test_quiet_keeps_only_the_per_template_lines(pytester: pytest.Pytester) -> None:
    write_mixed(pytester.path)
    result = run_pytester(pytester, *MIXED_ARGS, "-q")
    result.assert_outcomes(passed=4)
    lines = section(result.outlines)
    assert len(lines) == BAD_COUNT + 1
    assert sum(line.startswith("slow   built by gw") for line in lines) == 1
    assert sum(" failed in gw" in line for line in lines) == BAD_COUNT
    assert not any("longest lock waits" in line or "hidden" in line for line in result.outlines)


# -- a worker that dies ----------------------------------------------------------------

CRASH_DIES = """
    import os
    import signal
    from prewarm_helpers import HERE, announce, rendezvous_builder, worker

    B = rendezvous_builder("b", count=2, seconds=0.5)


    def test_waits_for_b(prewarmed_template):
        announce("b")
        prewarmed_template("b", B)


    def test_builds_a(prewarmed_template):
        def build(path):
            (HERE / "builder-a").write_text(worker())

        assert prewarmed_template("a", build).origin == "built"


    def test_dies():
        # Only once: xdist runs the crashing test again on the replacement worker.
        try:
            os.close(os.open(HERE / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
"""

CRASH_SURVIVES = """
    from test_dies import B
    from prewarm_helpers import announce


    def test_builds_b(prewarmed_template):
        announce("b")
        prewarmed_template("b", B)
"""


@pytest.mark.skipif(os.name != "posix", reason="the inner worker kills itself with SIGKILL")
def test_a_worker_killed_after_building_still_shows_in_the_summary(
    pytester: pytest.Pytester,
) -> None:
    write_suite(pytester.path, test_dies=CRASH_DIES, test_survives=CRASH_SURVIVES)
    result = run_pytester(pytester, "-n", "2", "--dist", "loadfile", "--max-worker-restart=1")
    dead = (pytester.path / "builder-a").read_text()
    assert (pytester.path / "died").exists()
    result.stdout.fnmatch_lines(
        [f"*worker '{dead}' crashed while running 'test_dies.py::test_dies'*"]
    )
    assert result.parseoutcomes()["failed"] == 1
    b_builder = (pytester.path / "builder-b").read_text().split()[0]
    b_waiter = _other(b_builder)
    lines = section(result.outlines)
    pytest.LineMatcher(lines).fnmatch_lines(
        [f"b  built by {b_builder} in *.** s; 1 waited, longest *.** s, total *.** s"]
    )
    # "a" was built by the dead worker: only its event file in the lock dir says so.
    pytest.LineMatcher(lines).fnmatch_lines([f"a  built by {dead} in *.** s"])
    assert [(worker, template) for _, worker, template, _ in wait_rows(lines)] == [(b_waiter, "b")]
    assert sum(line.startswith(("a ", "b ")) for line in lines) == 2  # nothing counted twice


# -- no template, and the header -------------------------------------------------------

UNUSED = """
    def test_plain():
        pass


    def test_asks_for_the_fixture_but_builds_nothing(prewarmed_template):
        assert callable(prewarmed_template)
"""


def test_a_run_that_uses_no_template_prints_no_prewarm_section(pytester: pytest.Pytester) -> None:
    write_suite(pytester.path, test_unused=UNUSED)
    lock_dir = pytester.path / "locks"
    result = run_pytester(
        pytester,
        "-n",
        "2",
        "--prewarm-lock-dir",
        str(lock_dir),
        "--prewarm-timeout",
        "30",
        "--prewarm-json",
        "report.json",
    )
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*prewarm: *")  # no header line either, without -v
    result.stdout.no_fnmatch_line("*prewarm summary*")
    result.stdout.no_fnmatch_line("*longest lock waits*")
    # The JSON file is still written, with nothing in it.
    data = json.loads((pytester.path / "report.json").read_text())
    assert (data["templates"], data["events"]) == ([], [])
    assert data["settings"]["lock_dir_source"] == "--prewarm-lock-dir"
    assert schema_errors(data, REPORT_SCHEMA) == []
    # Under -v the header says what a template request would use.
    verbose = run_pytester(
        pytester, "-n", "2", "-v", "--prewarm-lock-dir", str(lock_dir), "--prewarm-timeout", "30"
    )
    verbose.assert_outcomes(passed=2)
    verbose.stdout.fnmatch_lines(
        [
            f"prewarm: lock dir {lock_dir} (--prewarm-lock-dir), lock mode auto (default; "
            "chosen on first use), timeout 30 s, stale window 15 s"
        ]
    )


# -- frozen clocks ---------------------------------------------------------------------

FROZEN_FREEZEGUN = """
    import pytest
    from freezegun import freeze_time
    from prewarm_helpers import announce, worker, HERE
    import time

    REAL_SLEEP = time.sleep


    def build(path):
        # No deadline arithmetic here: time.monotonic is frozen.
        folder = HERE / "requests" / "frozen"
        for _ in range(12000):
            if folder.is_dir() and len(list(folder.iterdir())) >= 2:
                break
            REAL_SLEEP(0.005)
        else:
            raise AssertionError("the other worker never asked")
        (HERE / "builder-frozen").write_text(worker())
        REAL_SLEEP(1.0)


    @pytest.mark.parametrize("n", range(2))
    def test_under_a_frozen_clock(prewarmed_template, n):
        with freeze_time("2020-01-01 12:00:00"):
            assert time.monotonic() == time.monotonic()
            assert time.time() == time.time()
            announce("frozen")
            prewarmed_template("frozen", build)
"""

FROZEN_BY_HAND = """
    import time

    REAL_SLEEP = time.sleep


    def test_under_a_stopped_clock(prewarmed_template, monkeypatch):
        monkeypatch.setattr(time, "time", lambda: 1_600_000_000.0)
        monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
        monkeypatch.setattr(time, "perf_counter", lambda: 1000.0)
        monkeypatch.setattr(time, "monotonic_ns", lambda: 1000 * 10**9)
        prewarmed_template("frozen", lambda path: REAL_SLEEP(0.3))
"""


def _reported_seconds(line: str, pattern: str) -> float:
    match = re.search(pattern, line)
    assert match, line
    return float(match[1])


def test_build_and_wait_times_are_real_under_freezegun(pytester: pytest.Pytester) -> None:
    pytest.importorskip("freezegun")
    write_suite(pytester.path, test_frozen=FROZEN_FREEZEGUN)
    result = run_pytester(pytester, "-n", "2")
    result.assert_outcomes(passed=2)
    builder = (pytester.path / "builder-frozen").read_text()
    (line,) = section(result.outlines)[:1]
    assert line.startswith(f"frozen  built by {builder} in ")
    # The build includes waiting for the other worker, so only its lower bound is tight.
    assert 1.0 <= _reported_seconds(line, r"in (\d+\.\d\d) s") <= 60.0
    assert 0.1 <= _reported_seconds(line, r"longest (\d+\.\d\d) s") <= 60.0


def test_build_time_is_real_when_the_time_module_is_stopped_by_hand(
    pytester: pytest.Pytester,
) -> None:
    write_suite(pytester.path, test_frozen=FROZEN_BY_HAND)
    result = run_pytester(pytester, "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    (line,) = section(result.outlines)
    assert line.startswith("frozen  built by main in ")
    assert 0.25 <= _reported_seconds(line, r"in (\d+\.\d\d) s") <= 10.0
