"""Chaos: the builder is SIGKILLed at a random moment, many times, in both lock modes.

Each trial starts three competing processes on a fresh lock dir. The first to build arms
a timer that SIGKILLs it 0 to 50 ms into its build (which writes 20 files over ~45 ms,
its manifest last), so the kill lands mid-build, while publishing, while releasing, or
after. The killed process stays an unreaped zombie for the rest of the trial.

Checked over every trial: no process hangs (each trial is bounded), no build starts while
another one runs (by the build log), every surviving process gets a template, and every
template handed out is complete (each process verifies it against its manifest).

The competitors are forked from one interpreter that has already imported the plugin
(tests/_workers.py --chaos): a fresh interpreter per competitor would cost 0.7 s each.
PREWARM_CHAOS_TRIALS (default 50) and PREWARM_CHAOS_SEED change the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from _workers import SCRIPT, overlaps, read_log, verify

from pytest_prewarm.layout import DATA_DIR

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="pidfd and liveness proofs need Linux"
)

TRIALS = int(os.environ.get("PREWARM_CHAOS_TRIALS", "50"))
COMPETITORS = 3
FILES = 20


def check_trial(trial: Path) -> tuple[list[str], bool]:
    """Problems found in one trial, and whether a takeover happened in it."""
    problems: list[str] = []
    outcome = json.loads((trial / "outcome.json").read_text())
    if outcome["hung"]:
        problems.append(f"hung: pids {outcome['hung']}")
    log = read_log(trial / "build.log")
    problems += [f"overlap: {text}" for text in overlaps(log)]
    killed = {e["pid"] for e in log if e["ev"] == "kill"}
    if len(killed) > 1:
        problems.append(f"more than one process killed itself: {killed}")
    results = {}
    for path in (trial / "flags").glob("result-*.json"):
        result = json.loads(path.read_text())
        results[result["pid"]] = result
    for pid in outcome["pids"]:
        status = outcome["status"][str(pid)]
        if pid in killed:
            if status != -signal.SIGKILL:
                problems.append(f"pid {pid} was to be killed but exited with {status}")
            continue
        result = results.get(pid)
        if result is None or not result["ok"] or status != 0:
            problems.append(f"pid {pid} (exit {status}) did not get a template: {result}")
        elif result["files"] != FILES:
            problems.append(f"pid {pid} got {result['files']} files")
    starts = [e for e in log if e["ev"] == "start"]
    if not 1 <= len(starts) <= 2:
        problems.append(f"{len(starts)} builds started")
    took_over = len(starts) == 2
    if took_over:
        rebuilt = results.get(starts[1]["pid"], {})
        (built,) = [e for e in rebuilt.get("events", []) if e["outcome"] == "built"] or [{}]
        reason = built.get("recovered_from") or ""
        if f"pid {starts[0]['pid']}: dead, " not in reason:
            problems.append(f"the takeover did not name the dead builder: {reason!r}")
        if not starts[1]["empty"]:
            problems.append("the rebuild did not start from an empty staging dir")
    published = list((trial / "lock-dir" / "templates").iterdir())
    if len(published) != 1:
        problems.append(f"{len(published)} templates published")
    for template in published:
        try:
            build = json.loads((template / "meta.json").read_text())["build"]
            verify(template / build / DATA_DIR)
        except (AssertionError, OSError) as exc:
            problems.append(f"the published template is not whole: {exc}")
    return problems, took_over


@pytest.mark.parametrize("mode", ["flock", "lease"])
def test_killing_the_builder_at_random_never_hangs_overlaps_or_serves_a_partial_template(
    processes, tmp_path, mode
):
    seed = int(os.environ.get("PREWARM_CHAOS_SEED", random.randrange(2**32)))
    spec = {
        "root": str(tmp_path),
        "mode": mode,
        "trials": TRIALS,
        "seed": seed,
        "competitors": COMPETITORS,
        "files": FILES,
        "pause": 0.002,  # a ~45 ms build, so most kills land mid-build
        "max_delay": 0.05,
        "timeout": 20.0,
        "stale_after": 10.0,  # a takeover by proof, never by age
        "heartbeat": 0.5,
        "deadline": 30.0,
    }
    driver = processes.spawn([sys.executable, SCRIPT, "--chaos", json.dumps(spec)])
    assert driver.wait(timeout=100) == 0, driver.output()

    problems = []
    takeovers = 0
    for trial in sorted(tmp_path.glob("trial-*")):
        found, took_over = check_trial(trial)
        problems += [f"{trial.name}: {text}" for text in found]
        takeovers += took_over

    assert problems == [], f"seed {seed} (PREWARM_CHAOS_SEED):\n" + "\n".join(problems)
    assert len(list(tmp_path.glob("trial-*"))) == TRIALS
    if TRIALS >= 20:
        # The kills must mostly land mid-build, or this tests little.
        assert takeovers >= TRIALS // 4, f"only {takeovers} of {TRIALS} trials had a takeover"
