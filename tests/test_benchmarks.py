"""The benchmarks keep running: each script starts, and bench_scale's in-process parts run.

The benchmarks are not timed here (figures live in benchmarks/README.md); this only catches
a script broken by a change to the package's API, as a change of ``report.to_json`` once
broke the 10,000-waits benchmark without any test noticing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")


def test_there_are_benchmarks_to_check() -> None:
    assert "bench_scale.py" in SCRIPTS
    assert "bench_cost.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_benchmark_script_starts(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def json_of(script: str, *args: str, bound: float) -> Any:
    """Run a benchmark with ``--json``; what it printed on stdout, which must be JSON alone."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=bound,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_the_in_process_scale_parts_run_and_print_json(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    data = json_of(
        "bench_scale.py",
        *("--only", "waits,lockdir", "--waits", "10,100", "--published", "0,10"),
        *("--rounds", "1", "--output", str(results)),
        bound=120,
    )
    assert [row["waits"] for row in data["waits"]] == [10, 100]
    assert all(row["summary_and_json_ms"] > 0 for row in data["waits"])
    assert [row["published"] for row in data["lockdir"]] == [0, 10]
    assert data["lockdir"][1]["get_one_ms"] > 0
    assert json.loads(results.read_text())["waits"] == data["waits"]


@pytest.mark.slow
def test_the_marker_variant_builds_once_and_fails_once(tmp_path: Path) -> None:
    # The one-template benchmark's eager-build variant: a real run at -n 2, both scenarios.
    data = json_of(
        "bench_shared_build.py",
        *("--only", "marker", "--runs", "1", "--warmup", "0", "--workers", "2"),
        *("--tests", "4", "--build-seconds", "0.2", "--output", str(tmp_path / "results.json")),
        bound=240,
    )
    marker = data["summary"]["marker"]
    assert marker["builds"] == 1
    assert marker["fail_attempts"] == 1
    assert marker["bad_runs"] == 0
    assert marker["fail_spread_ms"] is not None  # each worker's failed setup was stamped
