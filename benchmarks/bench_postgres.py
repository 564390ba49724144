#!/usr/bin/env python3
"""Benchmark: a 40-test suite that needs PostgreSQL under ``pytest -n 4``, two ways.

The suite is examples/postgres_demo (40 tests, each on a database of its own made with
``CREATE DATABASE ... TEMPLATE shop``):

* ``per-worker``: a plain session fixture starts a server in every worker
  (``PREWARM_DEMO_SERVER=per-worker``), the usual set-up;
* ``plugin``: pytest-prewarm's template with a teardown, one server per run.

For each run: wall time, servers started (the demo's log of servers), peak memory (the
largest sum, over 0.1 s samples, of the proportional set size (PSS) of every process of
the run: pytest, its workers, the servers and their backends, the watcher), and postgres
processes left after pytest exited. Variants are interleaved run by run.

Needs psutil and Debian's PostgreSQL (``apt-get install -y postgresql``). Run from the
repository root: ``python benchmarks/bench_postgres.py --runs 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "examples" / "postgres_demo"
sys.path.insert(0, str(DEMO))
import pg  # noqa: E402  (the demo's helper: finding its servers' processes)

VARIANTS = ("per-worker", "plugin")


def _memory(proc: psutil.Process) -> int:
    try:
        info = proc.memory_full_info()
        return int(getattr(info, "pss", info.rss))
    except psutil.Error:
        return 0


def _tree(root: psutil.Process, homes: list[str]) -> list[psutil.Process]:
    """The run's processes: pytest and its descendants, and the servers once detached."""
    try:
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.Error:
        procs = {}
    for pid in pg.server_processes(homes):
        try:
            procs.setdefault(pid, psutil.Process(pid))
        except psutil.Error:
            continue  # exited between the two looks
    return list(procs.values())


def run_once(variant: str, python: str, workers: int) -> dict[str, Any]:
    log = Path(tempfile.mkstemp(prefix="bench-pg-servers-", suffix=".jsonl")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PREWARM_DEMO_SERVERS_LOG"] = str(log)
    if variant == "per-worker":
        env["PREWARM_DEMO_SERVER"] = "per-worker"
    argv = [python, "-m", "pytest", "-n", str(workers), "-q", "-p", "no:randomly"]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=DEMO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    root = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            homes = [json.loads(line)["home"] for line in log.read_text().splitlines()]
            peak = max(peak, sum(_memory(p) for p in _tree(root, homes)))
            stop.wait(0.1)  # a sample every 0.1 s: memory has no event to wait for

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate(timeout=600)
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    servers = [json.loads(line) for line in log.read_text().splitlines()]
    left = pg.server_processes([s["home"] for s in servers])
    log.unlink()
    text = output.decode("utf-8", "replace")
    if proc.returncode != 0:
        print(text, file=sys.stderr)
    return {
        "variant": variant,
        "exit": proc.returncode,
        "wall_seconds": round(wall, 2),
        "servers_started": len(servers),
        "peak_pss_mib": round(peak / 2**20, 1),
        "postgres_processes_left": len(left),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--workers", type=int, default=4, help="xdist workers (-n)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if pg.bin_dir() is None:
        print("PostgreSQL is not installed: apt-get install -y postgresql", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    for index in range(args.runs):
        for variant in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
            result = run_once(variant, args.python, args.workers)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(f"\nmedians of {args.runs} runs, pytest -n {args.workers}, 40 tests:")
    print(f"{'variant':<12} {'wall s':>8} {'servers':>8} {'peak PSS MiB':>13} {'left':>5}")
    for variant in VARIANTS:
        mine = [r for r in results if r["variant"] == variant]
        print(
            f"{variant:<12} {statistics.median(r['wall_seconds'] for r in mine):>8.2f} "
            f"{statistics.median(r['servers_started'] for r in mine):>8g} "
            f"{statistics.median(r['peak_pss_mib'] for r in mine):>13.1f} "
            f"{max(r['postgres_processes_left'] for r in mine):>5}"
        )
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
