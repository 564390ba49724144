"""How pytest-prewarm scales: each measurement printed as a curve, not a point.

* ``templates``: K = 1, 4, 16, 64 templates with eager builds at ``-n 4`` (one marked test
  per template). Goal: wall <= 1.2 x (longest build + the tests' own time + the start-up of
  ``pytest -n 4`` without the plugin, measured in the same invocation on the same tests
  unmarked). With K above the worker count the builds queue up per worker, so the table
  also shows the bound for ceil(K / 4) builds in a row.
* ``workers``: ``-n`` 2, 4, 8, 16 on one template: builds (must be 1), wake p50 and max
  (build returns -> each waiter has the template).
* ``markers``: 1,000 and 10,000 tests carrying prewarm markers: the CPU time of the
  collection phase with the plugin against ``-p no:prewarm``. Goal: <= 1.05x at 10,000.
  The tests take no fixture: resolving the ``prewarmed`` fixture (which only exists with
  the plugin) is pytest's own work, the same as for any fixture a suite would use.
* ``lockdir``: a persistent lock dir holding 0, 10, 100, 1,000 published templates: the
  cost of getting one published template in a fresh store (goal <= 2 ms) and of the first
  request's preparation of the lock dir (must not grow with their number).
* ``waits``: 100, 1,000, 10,000 wait events in one run: the summary and the JSON report
  written from them. Goal: <= 100 ms at 10,000.

The last three run in this interpreter (it must import pytest_prewarm); the first two run
pytest in subprocesses. Run: ``python benchmarks/bench_scale.py`` (``--only workers``,
``--rounds 3``, ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

STAMPS = """
import json, os, time
from pathlib import Path

OUT = Path(os.environ["BENCH_OUT"])
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def stamp(kind, **fields):
    record = {"kind": kind, "worker": WORKER, "t": time.monotonic(), **fields}
    fd = os.open(OUT / "stamps.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, (json.dumps(record) + "\\n").encode())
    os.close(fd)
"""

TEMPLATES_CONFTEST = (
    STAMPS
    + """
import pytest_prewarm

BUILD_SECONDS = float(os.environ["BENCH_BUILD_SECONDS"])


def make(name):
    def build(path):
        stamp("build", name=name)
        time.sleep(BUILD_SECONDS)
        (path / "data.txt").write_text(name)

    return build


for index in range(int(os.environ["BENCH_K"])):
    pytest_prewarm.template(f"t{index}")(make(f"t{index}"))
"""
)

# Markers applied at collection (the parametrized test gets one marker per template name).
TEMPLATES_MARKED = """
import pytest

CASES = [pytest.param(i, marks=pytest.mark.prewarm(f"t{{i}}")) for i in range({k})]


@pytest.mark.parametrize("index", CASES)
def test_one(prewarmed, index):
    assert (prewarmed[f"t{{index}}"].path / "data.txt").read_text() == f"t{{index}}"
"""

TEMPLATES_PLAIN = """
import pytest


@pytest.mark.parametrize("index", range({k}))
def test_one(index):
    assert index >= 0
"""

WORKERS_CONFTEST = (
    STAMPS
    + """
import pytest

BUILD_SECONDS = float(os.environ["BENCH_BUILD_SECONDS"])


def build(path):
    stamp("build")
    time.sleep(BUILD_SECONDS)
    (path / "data.txt").write_text("built")
    stamp("returning")


@pytest.fixture(scope="session")
def template(prewarmed_template):
    stamp("ask")
    got = prewarmed_template("db", build)
    stamp("got")
    return got


# The wake profile: where the time from "build returns" to "waiter has it" goes. The
# builder stamps after publishing and after releasing the lock; a waiter stamps when its
# wait for the lock's holder returns (the last return before it got the template).
import pytest_prewarm.flock
import pytest_prewarm.request


def _after(cls, name, kind):
    original = getattr(cls, name)

    def wrapped(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            stamp(kind)

    setattr(cls, name, wrapped)


_after(pytest_prewarm.request._Fetch, "_publish", "published")
_after(pytest_prewarm.request._Fetch, "_build", "released")
_after(pytest_prewarm.flock.FlockLock, "wait_for_change", "woke")
"""
)

WORKERS_TESTS = """
import pytest


@pytest.mark.parametrize("i", range({tests}))
def test_uses(template, i):
    assert (template.path / "data.txt").read_text() == "built"
"""

MARKERS_CONFTEST = """
import json, os, time
from pathlib import Path

import pytest
import pytest_prewarm

OUT = Path(os.environ["BENCH_OUT"])
pytest_prewarm.template("db")(lambda path: None)


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session):
    session.config._bench_start = (time.perf_counter(), time.process_time())


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    wall, cpu = session.config._bench_start
    record = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    (OUT / "collect.json").write_text(json.dumps({**record, "items": len(session.items)}))
"""

MARKERS_MODULE = """
import pytest

{tests}
"""

MARKERS_INI = "[pytest]\naddopts =\nmarkers =\n    prewarm: for -p no:prewarm runs\n"


# -- templates ---------------------------------------------------------------------------


def bench_templates(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for k in [int(x) for x in args.k.split(",")]:
        suites = {}
        for variant, source in (("plugin", TEMPLATES_MARKED), ("no plugin", TEMPLATES_PLAIN)):
            suite = work / f"templates-{k}-{variant.replace(' ', '-')}"
            suite.mkdir()
            (suite / "pytest.ini").write_text(harness.PYTEST_INI)
            if variant == "plugin":
                (suite / "conftest.py").write_text(TEMPLATES_CONFTEST)
            (suite / "test_k.py").write_text(source.format(k=k))
            suites[variant] = suite
        walls: dict[str, list[float]] = {v: [] for v in suites}
        builds = []
        problems = []
        for round_no, variant in [(-1, v) for v in suites] + list(
            harness.interleave(args.rounds, list(suites))
        ):
            out = work / "out" / f"templates-{k}-{variant}-{round_no}"
            out.mkdir(parents=True)
            env = harness.pytest_env(
                work, BENCH_OUT=str(out), BENCH_K=str(k), BENCH_BUILD_SECONDS=str(args.build)
            )
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "4"]
            if variant == "no plugin":
                cmd += ["-p", "no:prewarm"]
            run = harness.run_timed(
                cmd, cwd=suites[variant], env=env, timeout=args.timeout, log=out / "log"
            )
            if run.returncode != 0:
                problems.append(f"{variant} round {round_no}: exit {run.returncode}")
            if round_no >= 0:
                walls[variant].append(run.wall_s)
                if variant == "plugin":
                    stamps = harness.read_jsonl(out / "stamps.jsonl")
                    builds.append(sum(1 for s in stamps if s["kind"] == "build"))
        plugin = harness.median(walls["plugin"])
        base = harness.median(walls["no plugin"])
        bound = None if base is None else 1.2 * (args.build + base)
        queued = None if base is None else 1.2 * (math.ceil(k / 4) * args.build + base)
        rows.append(
            {
                "k": k,
                "wall_s": plugin,
                "no_plugin_wall_s": base,
                "bound_s": bound,
                "bound_queued_s": queued,
                "within_bound": None if plugin is None or bound is None else plugin <= bound,
                "builds": harness.median(builds),
                "problems": problems,
            }
        )
    return rows


# -- workers -----------------------------------------------------------------------------


def bench_workers(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    suite = work / "workers"
    suite.mkdir()
    (suite / "pytest.ini").write_text(harness.PYTEST_INI)
    (suite / "conftest.py").write_text(WORKERS_CONFTEST)
    (suite / "test_w.py").write_text(WORKERS_TESTS.format(tests=32))
    ns = [int(x) for x in args.n.split(",")]
    results: dict[int, dict[str, list[float]]] = {
        n: {"builds": [], "p50": [], "max": [], "wall": []} for n in ns
    }
    problems = []
    for round_no, n in [(-1, ns[0]), *harness.interleave(args.rounds, ns)]:
        out = work / "out" / f"workers-{n}-{round_no}"
        out.mkdir(parents=True)
        env = harness.pytest_env(work, BENCH_OUT=str(out), BENCH_BUILD_SECONDS=str(args.build))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(n)]
        run = harness.run_timed(cmd, cwd=suite, env=env, timeout=args.timeout, log=out / "log")
        if run.returncode != 0:
            problems.append(f"-n {n} round {round_no}: exit {run.returncode}")
        if round_no < 0:
            continue
        stamps = harness.read_jsonl(out / "stamps.jsonl")
        returned = [s["t"] for s in stamps if s["kind"] == "returning"]
        builder = {s["worker"] for s in stamps if s["kind"] == "build"}
        asked = {s["worker"]: s["t"] for s in stamps if s["kind"] == "ask"}
        got = {s["worker"]: s["t"] for s in stamps if s["kind"] == "got"}
        lat = [
            got[w] - returned[0]
            for w in got
            if returned and w not in builder and asked.get(w, math.inf) < returned[0]
        ]
        results[n]["builds"].append(sum(1 for s in stamps if s["kind"] == "build"))
        results[n]["wall"].append(run.wall_s)
        if lat:
            results[n]["p50"].append(harness.median(lat) or 0.0)
            results[n]["max"].append(max(lat))
            profile = _wake_profile(stamps, returned[0], builder, got)
            for step, value in profile.items():
                results[n].setdefault(step, []).append(value)
    steps = ("to_published", "to_released", "to_woken_p50", "woken_to_got_p50")
    return [
        {
            "n": n,
            "profile_ms": {step: _ms(harness.median(r.get(step, []))) for step in steps},
            "builds": harness.median(r["builds"]),
            "wake_p50_ms": _ms(harness.median(r["p50"])),
            "wake_max_ms": _ms(harness.median(r["max"])),
            "wall_s": harness.median(r["wall"]),
            "problems": [p for p in problems if p.startswith(f"-n {n} ")],
        }
        for n, r in results.items()
    ]


def _wake_profile(
    stamps: list[dict[str, Any]], returned: float, builder: set[str], got: dict[str, float]
) -> dict[str, float]:
    """Seconds from the build's return: to publication, to the lock's release, to each
    waiter's wake (median), and from wake to having the template (median)."""
    after = [s for s in stamps if s["t"] >= returned]
    first = {}
    for kind in ("published", "released"):
        times = [s["t"] for s in after if s["kind"] == kind and s["worker"] in builder]
        if times:
            first[f"to_{kind}"] = min(times) - returned
    woke = {}
    for s in after:
        if s["kind"] == "woke" and s["worker"] not in builder and s["t"] <= got.get(s["worker"], 0):
            woke[s["worker"]] = s["t"]  # the last wake before it got the template
    if woke:
        first["to_woken_p50"] = harness.median(t - returned for t in woke.values()) or 0.0
        first["woken_to_got_p50"] = harness.median(got[w] - t for w, t in woke.items()) or 0.0
    return first


# -- markers -----------------------------------------------------------------------------


def bench_markers(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for count in [int(x) for x in args.markers.split(",")]:
        suite = work / f"markers-{count}"
        suite.mkdir()
        (suite / "pytest.ini").write_text(MARKERS_INI)
        (suite / "conftest.py").write_text(MARKERS_CONFTEST)
        per_module = 100
        for module in range(max(1, count // per_module)):
            tests = "\n".join(
                f'@pytest.mark.prewarm("db")\ndef test_{i}():\n    pass\n'
                for i in range(min(per_module, count))
            )
            (suite / f"test_m{module}.py").write_text(MARKERS_MODULE.format(tests=tests))
        variants = {"plugin": [], "no:prewarm": ["-p", "no:prewarm"]}
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        problems = []
        for round_no, variant in [(-1, v) for v in variants] + list(
            harness.interleave(args.rounds, list(variants))
        ):
            out = work / "out" / f"markers-{count}-{variant}-{round_no}"
            out.mkdir(parents=True)
            env = harness.pytest_env(work, BENCH_OUT=str(out))
            cmd = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"]
            cmd += ["-p", "no:xdist", *variants[variant]]
            run = harness.run_timed(cmd, cwd=suite, env=env, timeout=args.timeout, log=out / "log")
            if run.returncode != 0:
                problems.append(f"{variant} round {round_no}: exit {run.returncode}")
            elif round_no >= 0:
                record = json.loads((out / "collect.json").read_text())
                seconds[variant].append(record["s"])
                cpu[variant].append(record["cpu_s"])
        plugin, base = harness.median(cpu["plugin"]), harness.median(cpu["no:prewarm"])
        rows.append(
            {
                "tests": count,
                "collect_cpu_s": plugin,
                "no_plugin_collect_cpu_s": base,
                "ratio": harness.ratio(plugin, base),
                "collect_wall_s": harness.median(seconds["plugin"]),
                "no_plugin_collect_wall_s": harness.median(seconds["no:prewarm"]),
                "problems": problems,
            }
        )
    return rows


# -- a lock dir holding many templates ---------------------------------------------------


def bench_lockdir(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from pytest_prewarm.config import DEFAULT_TIMEOUT
    from pytest_prewarm.lockdir import choose_lock_mode, pin_mode, prepare
    from pytest_prewarm.registry import Registry
    from pytest_prewarm.request import TemplateStore, make_request

    def request(name: str) -> Any:
        return make_request(
            name,
            lambda path: (path / "data.txt").write_text(name),
            None,
            None,
            registry=Registry(),
            default_timeout=DEFAULT_TIMEOUT,
            default_source="default",
        )

    rows = []
    lock_dir = work / "many"
    filled = 0
    for count in [int(x) for x in args.published.split(",")]:
        filler = TemplateStore(prepare(lock_dir, "bench"), run_id=f"fill-{count}", worker="main")
        for index in range(filled, count):
            filler.get(request(f"p{index}"))
        filled = max(filled, count)
        prepare_s = []
        get_s = []
        for round_no in range(args.rounds * 5):
            start = time.perf_counter()
            prepare(lock_dir, "bench")
            mode, why = choose_lock_mode(lock_dir, "auto")
            pin_mode(lock_dir, mode, why)
            store = TemplateStore(lock_dir, run_id=f"get-{count}-{round_no}", worker="main")
            prepare_s.append(time.perf_counter() - start)
            if count:
                name = f"p{(round_no * 7919) % count}"
                start = time.perf_counter()
                template = store.get(request(name))
                get_s.append(time.perf_counter() - start)
                assert (template.path / "data.txt").read_text() == name
        rows.append(
            {
                "published": count,
                "get_one_ms": _ms(harness.median(get_s)),
                "get_one_max_ms": _ms(max(get_s, default=None)),
                "prepare_ms": _ms(harness.median(prepare_s)),
            }
        )
    return rows


# -- many waits --------------------------------------------------------------------------


def bench_waits(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from pytest_prewarm.events import EventLog, TemplateEvent
    from pytest_prewarm.layout import Layout
    from pytest_prewarm.report import dumps, format_summary, summarize, to_json

    rows = []
    for count in [int(x) for x in args.waits.split(",")]:
        per_worker: dict[str, list[dict[str, Any]]] = {}
        for index in range(count):
            worker = f"gw{index % 16}"
            event = TemplateEvent(
                template=f"t{index % 100}",
                worker=worker,
                outcome="waited",
                wait_seconds=(index % 997) / 100,
                built_by="gw0",
                pid=1000 + index % 16,
            )
            per_worker.setdefault(worker, []).append(event.to_dict())
        seconds = []
        for round_no in range(args.rounds):
            log = EventLog(Layout(work / "no-such-lock-dir"), "run", "main")
            start = time.perf_counter()
            for worker, dicts in per_worker.items():
                log.add_reported(worker, dicts)
            events = log.merged()
            summaries = summarize(events)  # as the plugin does: once for both
            lines = format_summary(events, top=10, summaries=summaries)
            data = to_json(events, {"lock_dir": "x"}, summaries=summaries)
            (work / f"report-{count}-{round_no}.json").write_text(dumps(data))
            seconds.append(time.perf_counter() - start)
            assert len(data["events"]) == count
            assert lines
        rows.append({"waits": count, "summary_and_json_ms": _ms(harness.median(seconds))})
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# -- output ------------------------------------------------------------------------------


def print_report(data: dict[str, Any]) -> None:
    load = harness.fmt(data["machine"]["load_average"], ".2f")
    print(f"machine: {data['machine']['cpus']} cpus, load average {load}")
    f = harness.fmt
    if "templates" in data:
        print(f"\nK templates, eager builds at -n 4 (build {data['args']['build']} s each):")
        print("      K   wall s  no-plugin s  bound s  bound(queued) s  builds  within bound")
        for r in data["templates"]:
            print(
                f"  {r['k']:>5}  {f(r['wall_s'], '7.2f')}  {f(r['no_plugin_wall_s'], '11.2f')}"
                f"  {f(r['bound_s'], '7.2f')}  {f(r['bound_queued_s'], '15.2f')}"
                f"  {f(r['builds'], '6.0f')}  {r['within_bound']}  {r['problems'] or ''}"
            )
    if "workers" in data:
        print(f"\n-n N on one template (build {data['args']['build']} s):")
        print("      N  builds  wake p50 ms  wake max ms  wall s")
        for r in data["workers"]:
            print(
                f"  {r['n']:>5}  {f(r['builds'], '6.0f')}  {f(r['wake_p50_ms'], '11.2f')}"
                f"  {f(r['wake_max_ms'], '11.2f')}  {f(r['wall_s'], '6.2f')}  {r['problems'] or ''}"
            )
        print("  where the wake goes, ms after the build returned (medians):")
        print("      N  published  released  waiter woke  woke -> has it")
        for r in data["workers"]:
            p = r["profile_ms"]
            print(
                f"  {r['n']:>5}  {f(p['to_published'], '9.2f')}  {f(p['to_released'], '8.2f')}"
                f"  {f(p['to_woken_p50'], '11.2f')}  {f(p['woken_to_got_p50'], '14.2f')}"
            )
    if "markers" in data:
        print("\ntests with prewarm markers, collection phase (CPU s; wall in brackets):")
        print("   tests  plugin s          no:prewarm s      ratio")
        for r in data["markers"]:
            cpu, wall = r["collect_cpu_s"], r["collect_wall_s"]
            plugin = f"{f(cpu, '6.3f')} ({f(wall, '.3f')})"
            cpu, wall = r["no_plugin_collect_cpu_s"], r["no_plugin_collect_wall_s"]
            base = f"{f(cpu, '6.3f')} ({f(wall, '.3f')})"
            ratio = f(r["ratio"], "5.3f")
            print(f"  {r['tests']:>6}  {plugin}   {base}   {ratio}  {r['problems'] or ''}")
    if "lockdir" in data:
        print("\npersistent lock dir with N published templates:")
        print("       N  get one ms (median, max)  first request's preparation ms")
        for r in data["lockdir"]:
            print(
                f"  {r['published']:>6}  {f(r['get_one_ms'], '10.3f')}"
                f" {f(r['get_one_max_ms'], '8.3f')}       {f(r['prepare_ms'], '10.3f')}"
            )
    if "waits" in data:
        print("\nwait events in one run -> summary + JSON report:")
        for r in data["waits"]:
            print(f"  {r['waits']:>6} waits  {f(r['summary_and_json_ms'], '8.2f')} ms")


PARTS = ("templates", "workers", "markers", "lockdir", "waits")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build", type=float, default=0.5, help="seconds per build")
    parser.add_argument("--k", default="1,4,16,64")
    parser.add_argument("--n", default="2,4,8,16")
    parser.add_argument("--markers", default="1000,10000")
    parser.add_argument("--published", default="0,10,100,1000")
    parser.add_argument("--waits", default="100,1000,10000")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--output", type=Path, help="raw results file (default: results/)")
    args = parser.parse_args(argv)
    data: dict[str, Any] = {"machine": harness.machine(), "args": {**vars(args), "output": None}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        (work / "tmp").mkdir()
        os.environ["TMPDIR"] = str(work / "tmp")  # the inner runs' lock dirs stay in here
        for part in args.only.split(","):
            data[part] = globals()[f"bench_{part}"](args, work)
    data["machine_after"] = harness.machine()
    harness.save_results("bench_scale", data, args.output)
    if args.json:
        harness.emit_json(data)
    else:
        print_report(data)
    problems = [p for part in PARTS for row in data.get(part, []) for p in row.get("problems", [])]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
