#!/usr/bin/env python3
"""Benchmark: from the builder's SIGKILL to another process starting the rebuild.

One builder process and ``--waiters`` waiter processes compete for one template. The builder
enters its build function and blocks there (it waits for a file that never appears). Once every
waiter is about to ask for the template, the harness SIGKILLs the builder and measures

    takeover = t_start2 - t_kill

where ``t_kill`` is ``time.monotonic()`` in the harness just before ``os.kill(pid, SIGKILL)``
and ``t_start2`` is ``time.monotonic()`` at the first line of the next build function to run,
in whichever waiter takes over. CLOCK_MONOTONIC is system-wide on Linux, so the two stamps
compare directly across processes.

The harness is the builder's parent and does not reap it until the run is measured: the killed
builder stays a zombie, as a SIGKILLed pytest-xdist worker stays a zombie of the controller for
the rest of the session. ``os.kill(pid, 0)`` and ``psutil.pid_exists`` call a zombie alive, so
a tool that decides "dead" by those never takes over (see the eve-style note below).

Variants (``--modes``):

* ``flock``: pytest-prewarm's TemplateStore, lock_mode="flock".
* ``lease``: pytest-prewarm's TemplateStore, lock_mode="lease", stale_after=60 s. The harness
  gives up on a run after ``--takeover-timeout`` (30 s), well below the stale window, so a
  takeover that shows up at all was decided by liveness (the holder is a zombie), not by age.
* ``recipe``: pytest-xdist's documented FileLock recipe ("Making session-scoped fixtures execute
  only once"): ``with FileLock(path + ".lock"): read the data if it exists, else build``, with
  filelock's default poll interval (50 ms).
* ``sss``: pytest-shared-session-scope's lock as its yield-form fixture uses it:
  ``with JsonStore().lock(...)``, read, and on StoreValueNotExists build and write. Needs the
  package, from ``--python`` or from $PREWARM_BENCH_PEERS_PYTHON (default .venv-peers/bin/python);
  skipped otherwise.

Not measured, because the answer is known without a stopwatch: an eve-style lock (mkdir plus an
owner.json with pid and hostname, liveness by ``kill(pid, 0)``, 250 ms poll, 10 min stale
window, 15 min timeout) counts the zombie as alive, so its waiters sit out the stale window
(10 min) or the timeout; filelock's SoftFileLock never reclaims from a zombie owner at all.

Each child is this same file run as ``bench_takeover.py _child VARIANT WORKDIR ROLE INDEX``,
so the child code is linted and type-checked with the harness. The harness itself needs only
the standard library. Raw numbers go to benchmarks/results/bench_takeover-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import RESULTS_DIR

HERE = Path(__file__).resolve().parent
# A separate interpreter that has pytest-shared-session-scope, if --python lacks it.
BENCH_VENV_PYTHON = Path(os.environ.get("PREWARM_BENCH_PEERS_PYTHON", ".venv-peers/bin/python"))

VARIANTS: tuple[str, ...] = ("flock", "lease", "recipe", "sss")
PLUGIN_VARIANTS: tuple[str, ...] = ("flock", "lease")

# What each variant's child imports; checked once per interpreter before any run, so a missing
# package skips the variant with a message instead of failing every run.
REQUIRED_IMPORTS: dict[str, str] = {
    "flock": "pytest_prewarm.request",
    "lease": "pytest_prewarm.request",
    "recipe": "filelock",
    "sss": "pytest_shared_session_scope.store",
}

DISTRIBUTIONS: tuple[str, ...] = (
    "pytest-prewarm",
    "filelock",
    "psutil",
    "pytest-shared-session-scope",
)

GOALS_MS: dict[str, float] = {"flock": 10.0, "lease": 1000.0}  # issue 3, "Benchmark"

LEASE_STALE_AFTER = 60.0  # far above --takeover-timeout: the stale window can never be the cause
LEASE_HEARTBEAT = 2.0  # the plugin's default
REQUEST_TIMEOUT = 120.0  # above the stale window, as the plugin's start-up check demands

# --------------------------------------------------------------------------------------------
# Child side. Files in a run's work dir:
#   log              "start <pid> <monotonic>" per entry into a build function (O_APPEND)
#   waiting/<i>      written by waiter i right before it calls into the lock / store
#   done/<i>.json    written by each process whose call returned: how it got the template
#   never            never created: the first builder waits for it forever
# --------------------------------------------------------------------------------------------


def _append_line(path: Path, line: str) -> None:
    # One write() on an O_APPEND descriptor: lines from concurrent processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _child(variant: str, workdir: Path, role: str, index: int) -> None:
    log = workdir / "log"
    never = workdir / "never"

    def build_body() -> None:
        # The stamp is the first thing a build does: it marks "the rebuild has started".
        _append_line(log, f"start {os.getpid()} {time.monotonic():.9f}\n")
        if role == "builder":
            # The first builder never finishes; it is SIGKILLed in here, holding the lock.
            while not never.exists():
                time.sleep(0.05)

    def about_to_wait() -> None:
        if role == "waiter":
            (workdir / "waiting" / str(index)).write_text(f"{time.monotonic():.9f}\n")

    done: dict[str, Any] = {"pid": os.getpid(), "role": role}
    if variant in PLUGIN_VARIANTS:
        from pytest_prewarm.request import Request, TemplateStore

        store = TemplateStore(
            workdir / "lockdir",
            run_id="bench-takeover",
            worker=f"gw{index}",
            lock_mode=variant,
            stale_after=LEASE_STALE_AFTER,
            heartbeat=LEASE_HEARTBEAT,
        )

        def build(data: Path) -> str:
            build_body()
            (data / "payload").write_text("ok")
            return "ok"

        about_to_wait()
        template = store.get(Request("db", build, "k", REQUEST_TIMEOUT))
        done["origin"] = template.origin
        # "gw0, pid N: dead, zombie" on the process that took over: proves why it did.
        done["recovered_from"] = next(
            (e.recovered_from for e in store.events if e.recovered_from), None
        )
    elif variant == "recipe":
        from filelock import FileLock

        fn = workdir / "data.json"
        about_to_wait()
        # Verbatim shape of the pytest-xdist docs recipe; default timeout and poll interval.
        with FileLock(str(fn) + ".lock"):
            if fn.is_file():
                json.loads(fn.read_text())
                done["origin"] = "read"
            else:
                build_body()
                fn.write_text(json.dumps("ok"))
                done["origin"] = "built"
    elif variant == "sss":
        # Optional, untyped and absent from the dev venv: mypy may not see it.
        from pytest_shared_session_scope.store import (  # type: ignore[import-not-found,unused-ignore]
            JsonStore,
        )
        from pytest_shared_session_scope.types import (  # type: ignore[import-not-found,unused-ignore]
            StoreValueNotExists,
        )

        class _Factory:
            # The store only calls getbasetemp().parent: the shared root of all workers.
            def getbasetemp(self) -> Path:
                return workdir / "basetemp" / f"popen-gw{index}"

        sss_store = JsonStore()
        values: dict[str, Any] = {"tmp_path_factory": _Factory()}
        ident = "conftest.template.0"
        (workdir / "basetemp").mkdir(exist_ok=True)
        about_to_wait()
        # As pytest-shared-session-scope's yield form does: lock held over read, build, write.
        with sss_store.lock(ident, values):
            try:
                sss_store.read(ident, values)
                done["origin"] = "read"
            except StoreValueNotExists:
                build_body()
                sss_store.write(ident, "ok", values)
                done["origin"] = "built"
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    done["t"] = time.monotonic()
    (workdir / "done" / f"{index}.json").write_text(json.dumps(done))


# --------------------------------------------------------------------------------------------
# Harness side.
# --------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    run: int
    variant: str
    warmup: bool
    ok: bool = False
    error: str | None = None
    error_detail: str = ""  # the failing child's last output lines, for the JSON
    takeover_ms: float | None = None
    # From the kill to the last waiter's call returning: how long the whole crowd was held up.
    all_done_ms: float | None = None
    builds: int = 0
    builder_zombie: bool | None = None
    taker_pid: int | None = None
    recovered_from: str | None = None
    settle_s: float = 0.0
    origins: dict[str, int] = field(default_factory=dict)


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _starts(log: Path) -> list[tuple[int, float]]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "start":
            out.append((int(parts[1]), float(parts[2])))
    return out


def _wait_for(
    cond: Callable[[], bool], timeout: float, procs: list[subprocess.Popen[bytes]], what: str
) -> str | None:
    """Poll ``cond`` every 2 ms; an error message if it times out or a child exits first."""
    deadline = time.monotonic() + timeout
    while not cond():
        for proc in procs:
            if proc.poll() is not None:
                return f"{what}: pid {proc.pid} exited early with {proc.returncode}"
        if time.monotonic() > deadline:
            return f"{what}: timed out after {timeout:g} s"
        time.sleep(0.002)
    return None


def _child_cmd(python: str, variant: str, workdir: Path, role: str, index: int) -> list[str]:
    return [python, str(Path(__file__).resolve()), "_child", variant, str(workdir), role,
            str(index)]  # fmt: skip


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def one_run(
    run: int, variant: str, python: str, args: argparse.Namespace, root: Path, warmup: bool
) -> RunRecord:
    rec = RunRecord(run=run, variant=variant, warmup=warmup)
    workdir = root / f"{'w' if warmup else 'r'}{run:03d}-{variant}"
    for sub in ("waiting", "done"):
        (workdir / sub).mkdir(parents=True)
    log = workdir / "log"
    started: list[subprocess.Popen[bytes]] = []

    def spawn(role: str, index: int) -> subprocess.Popen[bytes]:
        # The child gets its own copy of the descriptor; ours is closed right after the spawn.
        with open(workdir / f"{role}{index}.out", "wb") as out:
            proc = subprocess.Popen(
                _child_cmd(python, variant, workdir, role, index),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        started.append(proc)
        return proc

    builder = spawn("builder", 0)
    try:
        # 1. The builder is inside its build function, holding the lock.
        err = _wait_for(lambda: len(_starts(log)) >= 1, 60, [builder], "builder start")
        if err:
            rec.error = err
            return rec
        # 2. Every waiter has imported its tool and is about to call into it...
        waiters = [spawn("waiter", i) for i in range(1, args.waiters + 1)]
        err = _wait_for(
            lambda: len(os.listdir(workdir / "waiting")) >= args.waiters,
            60,
            [builder, *waiters],
            "waiters ready",
        )
        if err:
            rec.error = err
            return rec
        # ... and, after the settle time, parked in the lock's wait (well under 200 ms from
        # "about to call" on this machine; a waiter still on its way would only make the
        # takeover look faster, never slower, since it would find the lock already free).
        time.sleep(args.settle)
        rec.settle_s = args.settle
        if builder.poll() is not None:
            rec.error = f"builder exited before the kill ({builder.returncode})"
            return rec
        # 3. Kill. The harness keeps the Popen object and calls no wait()/poll() on the builder
        #    until the run is measured, so the builder stays an unreaped zombie.
        t_kill = time.monotonic()
        os.kill(builder.pid, signal.SIGKILL)
        deadline = t_kill + args.takeover_timeout
        timed_out = False
        for proc in waiters:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        # Read before reaping: 'Z' now means it was a zombie for the whole measurement.
        rec.builder_zombie = _proc_state(builder.pid) == "Z"
        starts = _starts(log)
        rec.builds = len(starts)
        dones = [json.loads(p.read_text()) for p in (workdir / "done").glob("*.json")]
        for d in dones:
            rec.origins[d["origin"]] = rec.origins.get(d["origin"], 0) + 1
            if d.get("recovered_from"):
                rec.recovered_from = d["recovered_from"]
        if len(starts) >= 2:
            rec.taker_pid = starts[1][0]
            rec.takeover_ms = (starts[1][1] - t_kill) * 1000
        if timed_out:
            rec.error = (
                f"no takeover within {args.takeover_timeout:g} s"
                if len(starts) < 2
                else f"waiters not done within {args.takeover_timeout:g} s"
            )
            return rec
        bad = [p for p in waiters if p.returncode != 0]
        if bad:
            tail = _tail(workdir / f"waiter{waiters.index(bad[0]) + 1}.out")
            last = tail.splitlines()[-1] if tail else ""
            others = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
            rec.error = f"waiter exited with {bad[0].returncode}{others}: {last}"
            rec.error_detail = tail
            return rec
        if len(starts) != 2 or starts[0][0] != builder.pid:
            rec.error = f"expected 2 builds (builder, then one taker), saw {starts}"
            return rec
        if len(dones) != args.waiters:
            rec.error = f"{len(dones)} of {args.waiters} waiters got the template"
            return rec
        rec.all_done_ms = (max(d["t"] for d in dones) - t_kill) * 1000
        rec.ok = True
        return rec
    finally:
        # Only our own children, by pid; the builder is reaped here, after the measurement.
        for proc in started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if not args.keep and rec.ok:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Summary.
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def summarise(records: list[RunRecord], variants: list[str]) -> dict[str, Any]:
    measured = [r for r in records if not r.warmup]
    summary: dict[str, Any] = {}
    for v in variants:
        rows = [r for r in measured if r.variant == v]
        good = [r.takeover_ms for r in rows if r.ok and r.takeover_ms is not None]
        done = [r.all_done_ms for r in rows if r.ok and r.all_done_ms is not None]
        summary[v] = {
            "runs": len(rows),
            "ok": len(good),
            "failed": len(rows) - len(good),
            "median_ms": harness.median(good),
            "p90_ms": harness.percentile(good, 90),
            "max_ms": max(good) if good else None,
            "min_ms": min(good) if good else None,
            "all_done_median_ms": harness.median(done),
            "zombie_every_run": all(r.builder_zombie for r in rows if r.builder_zombie is not None),
            # Failed runs still say when somebody started the rebuild (after the failure).
            "failed_takeover_ms": [r.takeover_ms for r in rows if not r.ok],
            "errors": [r.error for r in rows if not r.ok],
        }
    # Per-run ratio of the plugin to the recipe, both measured in the same round, so that a
    # noisy stretch of the machine hits numerator and denominator alike.
    by_run: dict[int, dict[str, RunRecord]] = {}
    for r in measured:
        by_run.setdefault(r.run, {})[r.variant] = r
    for v in PLUGIN_VARIANTS:
        if v not in variants or "recipe" not in variants:
            continue
        ratios = []
        for pair in by_run.values():
            a, b = pair.get(v), pair.get("recipe")
            if a and b and a.ok and b.ok and a.takeover_ms and b.takeover_ms:
                ratios.append(a.takeover_ms / b.takeover_ms)
        summary[v]["ratio_to_recipe"] = {
            "pairs": len(ratios),
            "median": harness.median(ratios),
            "p90": harness.percentile(ratios, 90),
            "max": max(ratios) if ratios else None,
        }
    return summary


def print_table(summary: dict[str, Any], variants: list[str], args: argparse.Namespace) -> None:
    print()
    print(
        f"takeover = SIGKILL of the builder -> next build starts; zombie kept; "
        f"{args.waiters} waiters; ms"
    )
    head = f"{'variant':<8} {'ok/runs':>8} {'median':>8} {'p90':>8} {'max':>8} {'min':>8}"
    head += f" {'all done':>9} {'zombie':>7}"
    print(head)
    print("-" * len(head))
    for v in variants:
        s = summary[v]
        print(
            f"{v:<8} {s['ok']:>3}/{s['runs']:<4} {_fmt(s['median_ms']):>8} {_fmt(s['p90_ms']):>8} "
            f"{_fmt(s['max_ms']):>8} {_fmt(s['min_ms']):>8} {_fmt(s['all_done_median_ms']):>9} "
            f"{'yes' if s['zombie_every_run'] else 'NO':>7}"
        )
    for v in variants:
        errors = summary[v]["errors"]
        if errors:
            # One line per variant, not per run: the JSON has every run's error and output.
            distinct = len({e.split(": ", 1)[-1][:60] for e in errors})
            print(
                f"{v}: {len(errors)} failed run(s), {distinct} distinct error(s); first: "
                f"{errors[0][:400]}"
            )
    print()
    for v in PLUGIN_VARIANTS:
        ratio = summary.get(v, {}).get("ratio_to_recipe")
        if ratio and ratio["median"] is not None:
            print(
                f"{v}/recipe, per-run ratio over {ratio['pairs']} runs: median "
                f"{ratio['median']:.2f}, p90 {ratio['p90']:.2f}, max {ratio['max']:.2f} "
                "(below 1: the plugin takes over sooner)"
            )
    for v, goal in GOALS_MS.items():
        if v in summary and summary[v]["median_ms"] is not None:
            met = summary[v]["median_ms"] <= goal and summary[v]["failed"] == 0
            print(
                f"goal {v}: median <= {goal:g} ms with no failed run: {'met' if met else 'NOT met'}"
            )
    print(
        "not run (known without measuring): an eve-style lock (kill(pid, 0) liveness, 10 min "
        "stale window,\n  15 min timeout) takes the zombie for alive and waits out its window; "
        "filelock's SoftFileLock never reclaims."
    )


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def _can_import(python: str, module: str) -> bool:
    proc = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, check=False, timeout=60
    )
    return proc.returncode == 0


def _versions(python: str) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        f"for d in {list(DISTRIBUTIONS)!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def pick_interpreters(variants: list[str], python: str) -> dict[str, str]:
    """The interpreter per variant; variants no interpreter can run are dropped with a note."""
    chosen: dict[str, str] = {}
    for v in variants:
        candidates = [python]
        # Only pytest-shared-session-scope may come from the scratch venv: it is not a
        # dependency of the project, so the dev venv normally lacks it.
        if v == "sss" and BENCH_VENV_PYTHON.exists():
            candidates.append(str(BENCH_VENV_PYTHON))
        for candidate in candidates:
            if _can_import(candidate, REQUIRED_IMPORTS[v]):
                chosen[v] = candidate
                break
        else:
            hint = (
                f"; install it into {BENCH_VENV_PYTHON.parent.parent} "
                "(pip install pytest-shared-session-scope pytest-xdist)"
                if v == "sss"
                else ""
            )
            print(f"skipping {v}: cannot import {REQUIRED_IMPORTS[v]} with {candidates}{hint}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="recorded runs per variant")
    parser.add_argument("--modes", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--waiters", type=int, default=7, help="waiter processes per run")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds after all are ready")
    parser.add_argument("--takeover-timeout", type=float, default=30.0)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the children")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.modes.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(VARIANTS)}")
    interpreters = pick_interpreters(variants, args.python)
    variants = [v for v in variants if v in interpreters]
    if not variants:
        print("nothing to run")
        return 1
    for v in variants:
        print(f"{v}: {interpreters[v]}")

    # Other work on the machine shows up in every number here; the load average says how much.
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} (cpus: {os.cpu_count()})")
    root = Path(tempfile.mkdtemp(prefix="bench-takeover-"))
    records: list[RunRecord] = []
    rounds = [(i, True) for i in range(args.warmup)] + [(i, False) for i in range(args.runs)]
    try:
        for number, warmup in rounds:
            # Interleave variants within a round and rotate their order round by round: slow
            # drift of a noisy 2-core machine then hits every variant alike, and no variant
            # always runs right after the same neighbour.
            shift = number % len(variants)
            order = variants[shift:] + variants[:shift]
            line = []
            for v in order:
                rec = one_run(number, v, interpreters[v], args, root, warmup)
                records.append(rec)
                line.append(f"{v} {_fmt(rec.takeover_ms)}" + ("" if rec.ok else " (FAILED)"))
                if not rec.ok:
                    print(f"  {v}: {rec.error}", file=sys.stderr, flush=True)
            label = f"warmup {number + 1}" if warmup else f"run {number + 1:>2}/{args.runs}"
            print(f"{label}: " + ", ".join(line) + " ms", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    summary = summarise(records, variants)
    print_table(summary, variants, args)
    load_end = os.getloadavg()
    print(f"load average: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")

    RESULTS_DIR.mkdir(exist_ok=True)
    output = args.output or RESULTS_DIR / f"bench_takeover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.write_text(
        json.dumps(
            {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "interpreters": interpreters,
                "versions": {p: _versions(p) for p in sorted(set(interpreters.values()))},
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "load_avg_start": load_start,
                    "load_avg_end": load_end,
                },
                "summary": summary,
                "runs": [asdict(r) for r in records],
            },
            indent=2,
        )
    )
    print(f"\nraw numbers: {output}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        harness.emit_json({"summary": summary, "interpreters": interpreters})
    return 0 if all(r.ok for r in records if not r.warmup) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(main())
