"""What pytest-prewarm costs a run: one that asks for no template, and one that uses one.

Four measurements, each against its peers in the same invocation, runs interleaved:

* ``import``: ``import <plugin module>`` in a fresh interpreter that has imported pytest
  (``-X importtime``, the module's cumulative time), for pytest-prewarm and every other
  installed pytest plugin of the list below. Goal: pytest-prewarm <= 3 ms.
* ``collect``: ``pytest --co`` on a 20-test suite that uses no template, with the plugin
  against ``-p no:prewarm``, in pairs; CPU time of the whole process. Goal: the ratio of the
  medians <= 1.02. Each plugin run has TMPDIR pointed at an empty directory that must stay
  empty, and must print no ``prewarm`` line.
* ``instructions`` (opt-in, needs valgrind): the same two ``pytest --co`` runs under
  cachegrind, which counts the instructions the process executes. The count is the same
  from one run to the next (hash seed fixed), where this VM's CPU time for one and the same
  run spreads by 2x: it shows a 1 % difference that 20 pairs of CPU times cannot.
* ``startup``: a run at ``-n 8`` whose tests use one template: the plugin's own start-up
  work in each process (settings at configure; the core's imports, at the end of
  collection since the tests use the fixture; and on the first request: lock dir, mode
  choice and pin, store), timed inside the processes. Goal: imports + work <= 5 ms per
  process.

Run: ``python benchmarks/bench_cost.py`` (``--rounds 20``, ``--json`` for JSON on stdout).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness

# (pytest11 module, plugin name for -p no:..., pip package): the peers measured alongside.
PLUGINS = [
    ("pytest_prewarm.plugin", "prewarm", "pytest-prewarm"),
    ("xdist.plugin", "xdist.plugin", "pytest-xdist"),
    ("pytest_timeout", "timeout", "pytest-timeout"),
    ("pytest_cov.plugin", "pytest_cov", "pytest-cov"),
    ("pytest_randomly", "randomly", "pytest-randomly"),
    ("pytest_django.plugin", "django", "pytest-django"),
]

UNUSED_SUITE = """
import pytest


@pytest.mark.parametrize("i", range(10))
def test_plain(i):
    assert i >= 0


@pytest.mark.parametrize("i", range(10))
def test_asks_for_nothing_of_prewarm(i, tmp_path_factory):
    assert i >= 0
"""

# Times the plugin's start-up work inside each process and appends it to BENCH_OUT.
TIMING_CONFTEST = """
import json, os, time
from pathlib import Path

import pytest_prewarm.config as prewarm_config
import pytest_prewarm.state as prewarm_state

OUT = Path(os.environ["BENCH_OUT"])
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_settings = prewarm_config.Settings.from_config.__func__
_make_core = prewarm_state._make_core
_load_core = prewarm_state.load_core


def _record(what, start, cpu_start):
    # Wall time, and this thread's CPU time: nine processes on two cores wait for each
    # other, so the CPU time is the work's own cost and the wall time what the user sees.
    record = {"worker": WORKER, "s": time.perf_counter() - start}
    record["cpu_s"] = time.thread_time() - cpu_start
    fd = os.open(OUT / f"{what}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, (json.dumps(record) + "\\n").encode())
    os.close(fd)


def from_config(cls, config):
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        return _settings(cls, config)
    finally:
        _record("settings", start, cpu_start)


def make_core(state):
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        return _make_core(state)
    finally:
        _record("core", start, cpu_start)


def load_core():
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        return _load_core()
    finally:
        _record("load", start, cpu_start)


prewarm_config.Settings.from_config = classmethod(from_config)
prewarm_state._make_core = make_core
prewarm_state.load_core = load_core

if os.environ.get("BENCH_PREIMPORT") == "1":
    # Split the first request's time: with the core's modules already imported, what
    # remains is the work itself (lock dir, mode probe and pin, store, event log).
    import filelock, psutil  # noqa: F401  (loaded by the portable path only)
    import pytest_prewarm.events, pytest_prewarm.flock, pytest_prewarm.lockdir  # noqa: F401
    import pytest_prewarm.request  # noqa: F401
"""

ONE_TEMPLATE_SUITE = """
import time

import pytest


def build(path):
    (path / "data.txt").write_text("built")
    time.sleep(0.5)


@pytest.mark.parametrize("i", range(16))
def test_uses_template(prewarmed_template, i):
    assert (prewarmed_template("db", build) / "data.txt").read_text() == "built"
"""


def importable(python: str) -> list[tuple[str, str, str]]:
    code = (
        "import importlib.util, sys\n"
        "for m in sys.argv[1:]:\n"
        "    print(m, bool(importlib.util.find_spec(m.split('.')[0])))\n"
    )
    out = subprocess.run(
        [python, "-c", code, *(m for m, _, _ in PLUGINS)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = dict(zip(out[::2], out[1::2], strict=True))
    return [p for p in PLUGINS if found[p[0]] == "True"]


IMPORTTIME = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$")


def import_ms(python: str, module: str, env: dict[str, str]) -> float:
    """Cumulative import time of ``module`` (ms), pytest already imported."""
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", f"import pytest\nimport {module}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for line in proc.stderr.splitlines():
        match = IMPORTTIME.search(line)
        if match and match[2].strip() == module:
            return int(match[1]) / 1000
    raise RuntimeError(f"no import time line for {module}:\n{proc.stderr[-2000:]}")


def bench_import(python: str, work: Path, rounds: int) -> dict[str, Any]:
    env = harness.pytest_env(work)
    plugins = importable(python)
    for module, _, _ in plugins:  # warm-up: fills the bytecode cache
        import_ms(python, module, env)
    times: dict[str, list[float]] = {m: [] for m, _, _ in plugins}
    for _, module in harness.interleave(rounds, [m for m, _, _ in plugins]):
        times[module].append(import_ms(python, module, env))
    return {
        package: {"median_ms": harness.median(times[module]), "runs_ms": times[module]}
        for module, _, package in plugins
    }


def bench_collect(python: str, work: Path, rounds: int) -> dict[str, Any]:
    suite = _collect_suite(work)
    temp_root = work / "empty-tmp"
    temp_root.mkdir()
    env = harness.pytest_env(work, TMPDIR=str(temp_root))
    base = [python, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    variants = {"plugin": base, "no:prewarm": [*base, "-p", "no:prewarm"]}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    problems: list[str] = []
    for round_no, variant in [(-1, v) for v in variants] + list(
        harness.interleave(rounds, list(variants))
    ):
        log = work / "logs" / f"collect-{variant}-{round_no}.log"
        run = harness.run_timed(variants[variant], cwd=suite, env=env, timeout=120, log=log)
        if run.returncode != 0:
            problems.append(f"{variant} round {round_no}: exit {run.returncode}")
        created = sorted(p.name for p in temp_root.iterdir())
        if created:
            problems.append(f"{variant} round {round_no} created {created} in TMPDIR")
        if variant == "plugin" and any(
            line.startswith("prewarm") for line in run.output().splitlines()
        ):
            problems.append(f"round {round_no}: a prewarm line was printed")
        if round_no >= 0:
            cpu[variant].append(run.cpu_s)
            wall[variant].append(run.wall_s)
    med = {v: harness.median(cpu[v]) for v in variants}
    # This VM's CPU time for one and the same run spreads by 2x (210 to 400 ms), so the
    # ratio of two medians of 20 moves by several percent from one invocation to the next.
    # The two runs of a round are made back to back and see the same machine: the median
    # of the rounds' own ratios cancels that drift, and the ratio of the minimums compares
    # the least disturbed run of each, as timeit does.
    paired = [p / n for p, n in zip(cpu["plugin"], cpu["no:prewarm"], strict=True) if n]
    return {
        "cpu_median_s": med,
        "cpu_paired_ratio": harness.median(paired),
        "cpu_min_ratio": harness.ratio(
            min(cpu["plugin"], default=None), min(cpu["no:prewarm"], default=None)
        ),
        "wall_median_s": {v: harness.median(wall[v]) for v in variants},
        "cpu_ratio": harness.ratio(med["plugin"], med["no:prewarm"]),
        "wall_ratio": harness.ratio(
            harness.median(wall["plugin"]), harness.median(wall["no:prewarm"])
        ),
        "pairs": rounds,
        "problems": problems,
    }


def _collect_suite(work: Path) -> Path:
    suite = work / "unused"
    if not suite.exists():
        suite.mkdir()
        (suite / "pytest.ini").write_text(harness.PYTEST_INI)
        (suite / "test_unused.py").write_text(UNUSED_SUITE)
    return suite


INSTRUCTIONS = re.compile(r"I\s+refs:\s+([\d,]+)")


def bench_instructions(python: str, work: Path, rounds: int) -> dict[str, Any]:
    """``pytest --co`` with and without the plugin, instructions counted by cachegrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"skipped": "valgrind not found (Debian: apt-get install valgrind)"}
    suite = _collect_suite(work)
    # A fixed hash seed: set and dict orders, and so the work, are then the same every run.
    env = harness.pytest_env(work, PYTHONHASHSEED="0")
    base = [python, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    variants = {"plugin": base, "no:prewarm": [*base, "-p", "no:prewarm"]}
    for cmd in variants.values():  # fill the bytecode cache: compiling is not measured
        harness.run_timed(cmd, cwd=suite, env=env, timeout=120)
    counts: dict[str, list[int]] = {v: [] for v in variants}
    problems: list[str] = []
    grind = [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    for round_no, variant in harness.interleave(rounds, list(variants)):
        log = work / "logs" / f"instructions-{variant}-{round_no}.log"
        run = harness.run_timed(
            [*grind, *variants[variant]], cwd=suite, env=env, timeout=600, log=log
        )
        found = INSTRUCTIONS.search(run.output())
        if run.returncode != 0 or found is None:
            problems.append(
                f"{variant} round {round_no}: exit {run.returncode}: {run.output()[-300:]}"
            )
            continue
        counts[variant].append(int(found.group(1).replace(",", "")))
    med = {v: harness.median(c) for v, c in counts.items()}
    plugin, without = med["plugin"], med["no:prewarm"]
    return {
        "instructions": counts,
        "ratio": harness.ratio(plugin, without),
        "added": None if plugin is None or without is None else round(plugin - without),
        "rounds": rounds,
        "problems": problems,
    }


def bench_startup(python: str, work: Path, rounds: int, workers: int) -> dict[str, Any]:
    """Per process: settings, and the first request with and without the core's imports."""
    suite = work / "one-template"
    suite.mkdir()
    (suite / "pytest.ini").write_text(harness.PYTEST_INI)
    (suite / "conftest.py").write_text(TIMING_CONFTEST)
    (suite / "test_one.py").write_text(ONE_TEMPLATE_SUITE)
    variants = {"with imports": "0", "imports done before": "1"}
    settings: list[float] = []
    core: dict[str, list[float]] = {v: [] for v in variants}
    core_cpu: dict[str, list[float]] = {v: [] for v in variants}
    load_cpu: dict[str, list[float]] = {v: [] for v in variants}
    total_cpu: dict[str, list[float]] = {v: [] for v in variants}
    problems = []
    runs = [(-1, v) for v in variants] + list(harness.interleave(rounds, list(variants)))
    for round_no, variant in runs:
        out = work / "startup" / f"{round_no}-{variants[variant]}"
        out.mkdir(parents=True)
        env = harness.pytest_env(
            work, BENCH_OUT=str(out), TMPDIR=str(out), BENCH_PREIMPORT=variants[variant]
        )
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers)]
        run = harness.run_timed(cmd, cwd=suite, env=env, timeout=120, log=out / "pytest.log")
        if run.returncode != 0:
            problems.append(f"{variant} round {round_no}: exit {run.returncode}")
        if round_no >= 0:
            settings += [r["cpu_s"] for r in harness.read_jsonl(out / "settings.jsonl")]
            loads = {r["worker"]: r["cpu_s"] for r in harness.read_jsonl(out / "load.jsonl")}
            load_cpu[variant] += loads.values()
            for record in harness.read_jsonl(out / "core.jsonl"):
                core[variant].append(record["s"])
                core_cpu[variant].append(record["cpu_s"])
                # A process's whole bill: the imports at collection, and the first request.
                total_cpu[variant].append(record["cpu_s"] + loads.get(record["worker"], 0.0))
    return {
        "workers": workers,
        "settings_cpu_ms": _stats(settings),
        "first_request_wall_ms": {v: _stats(core[v]) for v in variants},
        "first_request_cpu_ms": {v: _stats(core_cpu[v]) for v in variants},
        "collection_imports_cpu_ms": {v: _stats(load_cpu[v]) for v in variants},
        "per_process_cpu_ms": {v: _stats(total_cpu[v]) for v in variants},
        "processes_measured": len(core["with imports"]),
        "problems": problems,
    }


def _stats(seconds: list[float]) -> dict[str, float | None]:
    return {"median": _ms(harness.median(seconds)), "max": _ms(max(seconds, default=None))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _show(row: dict[str, float | None]) -> str:
    return f"median {harness.fmt(row['median'], '.2f')} ms, max {harness.fmt(row['max'], '.2f')} ms"


def print_report(data: dict[str, Any]) -> None:
    load = harness.fmt(data["machine"]["load_average"], ".2f")
    print(f"machine: {data['machine']['cpus']} cpus, load average {load}")
    if "import" in data:
        print("\nimport of the plugin module, pytest already imported (median ms):")
        for package, row in data["import"].items():
            print(f"  {package:<16} {harness.fmt(row['median_ms'], '7.2f')}")
    if "collect" in data:
        c = data["collect"]
        print(f"\npytest --co, 20 tests, no template ({c['pairs']} interleaved pairs):")
        for variant, value in c["cpu_median_s"].items():
            wall = harness.fmt(c["wall_median_s"][variant], ".3f")
            print(f"  {variant:<12} cpu {harness.fmt(value, '.3f')} s   wall {wall} s")
        cpu_ratio = harness.fmt(c["cpu_ratio"], ".3f")
        wall_ratio = harness.fmt(c["wall_ratio"], ".3f")
        print(f"  ratio plugin / no:prewarm: cpu {cpu_ratio}, wall {wall_ratio}")
        paired = harness.fmt(c["cpu_paired_ratio"], ".3f")
        least = harness.fmt(c["cpu_min_ratio"], ".3f")
        print(f"  cpu: median of the rounds' own ratios {paired}, ratio of the minimums {least}")
        print(f"  problems (files created, lines printed, failures): {c['problems'] or 'none'}")
    if "instructions" in data:
        n = data["instructions"]
        print("\npytest --co, 20 tests, no template: instructions counted by cachegrind")
        if "skipped" in n:
            print(f"  skipped: {n['skipped']}")
        else:
            for variant, counts in n["instructions"].items():
                print(f"  {variant:<12} {', '.join(f'{c:,}' for c in counts)}")
            added = "-" if n["added"] is None else f"{n['added']:,}"
            print(f"  ratio plugin / no:prewarm: {harness.fmt(n['ratio'], '.4f')} ({added} added)")
            print(f"  problems: {n['problems'] or 'none'}")
    if "startup" in data:
        s = data["startup"]
        print(
            f"\nstart-up work per process, one template, -n {s['workers']} "
            f"({s['processes_measured']} processes per variant):"
        )
        print(f"  settings at configure, cpu: {_show(s['settings_cpu_ms'])}")
        for variant, row in s["first_request_cpu_ms"].items():
            wall = _show(s["first_request_wall_ms"][variant])
            loading = _show(s["collection_imports_cpu_ms"][variant])
            print(f"  {variant}:")
            print(f"    core's imports at the end of collection, cpu: {loading}")
            print(f"    first request, cpu: {_show(row)}; wall {wall}")
            print(f"    both, per process, cpu: {_show(s['per_process_cpu_ms'][variant])}")
        print(f"  problems: {s['problems'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--startup-rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--instruction-rounds", type=int, default=2)
    parser.add_argument("--only", default="import,collect,startup")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--output", type=Path, help="raw results file (default: results/)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    data: dict[str, Any] = {"machine": harness.machine(), "args": {**vars(args), "output": None}}
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        work = Path(tmp)
        if "import" in only:
            data["import"] = bench_import(args.python, work, args.rounds)
        if "collect" in only:
            data["collect"] = bench_collect(args.python, work, args.rounds)
        if "instructions" in only:
            data["instructions"] = bench_instructions(args.python, work, args.instruction_rounds)
        if "startup" in only:
            data["startup"] = bench_startup(args.python, work, args.startup_rounds, args.workers)
    data["machine_after"] = harness.machine()
    harness.save_results("bench_cost", data, args.output)
    if args.json:
        harness.emit_json(data)
    else:
        print_report(data)
    problems = [
        p
        for part in ("collect", "instructions", "startup")
        for p in data.get(part, {}).get("problems", [])
    ]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
