"""A real PostgreSQL server as a template: the demo at -n 4, and a run killed as a group.

Skipped where Debian's PostgreSQL is not installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Suite, env_without_leaks, wait_until

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "postgres_demo"
sys.path.insert(0, str(DEMO))
import pg  # noqa: E402  (the demo's helper)

pytestmark = pytest.mark.skipif(
    pg.bin_dir() is None or os.name != "posix", reason="needs Debian's PostgreSQL"
)


def test_the_demo_starts_one_server_for_four_workers_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    log = tmp_path / "servers.jsonl"
    env = {**env_without_leaks(), "PREWARM_DEMO_SERVERS_LOG": str(log)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "4", "-p", "no:randomly"],
        cwd=DEMO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "40 passed" in done.stdout
    assert "servers started: 1\n" in done.stdout
    assert "postgres processes left after the run: 0\n" in done.stdout
    assert "postgres  teardown by controller: done in" in done.stdout
    [server] = [json.loads(line) for line in log.read_text().splitlines()]
    assert pg.server_processes([server["home"]]) == []
    assert not os.path.exists(server["home"])  # the teardown removed the data directory


KILLED_CONFTEST = """
    import json
    import os
    import time
    from pathlib import Path

    import pg
    import pytest

    import prewarm_probe as probe
    import pytest_prewarm

    TEARDOWNS = Path(__file__).parent / "teardowns.jsonl"


    def stop_postgres(path, value):
        with open(TEARDOWNS, "a") as handle:
            handle.write(json.dumps({"at": time.time(), "home": value["home"]}) + "\\n")
        pg.stop(value)


    @pytest_prewarm.template("postgres", teardown=stop_postgres)
    def build_postgres(path):
        return pg.start(path)
"""

KILLED_TESTS = """
    import time

    import pg
    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(2))
    @pytest.mark.prewarm("postgres")
    def test_uses_postgres(prewarmed, i):
        value = prewarmed["postgres"].value
        assert pg.psql(value, "shop", "SELECT count(*) FROM customers") == [["5000"]]
        probe.record("up", home=value["home"])
        time.sleep(120)
"""


def test_a_run_killed_as_a_process_group_leaves_no_postgres_process(suite: Suite) -> None:
    shutil.copy(DEMO / "pg.py", suite.path / "pg.py")
    suite.write(conftest=KILLED_CONFTEST, test_pg=KILLED_TESTS)
    proc = suite.spawn("-n", "2")
    wait_until(lambda: len(suite.records("up")) == 2, 100, what="both tests to use the server")
    home = suite.records("up")[0]["home"]
    assert pg.server_processes([home])

    killed_at = time.time()
    os.killpg(proc.pid, signal.SIGKILL)

    proc.wait()
    teardowns = suite.path / "teardowns.jsonl"
    # open("a") creates the file before its line is written: wait for a whole line.
    wait_until(
        lambda: teardowns.exists() and teardowns.read_text().endswith("\n"),
        30,
        what="the watcher's teardown",
    )
    [done] = [json.loads(line) for line in teardowns.read_text().splitlines()]
    assert done["home"] == home
    assert done["at"] - killed_at < 2.0
    wait_until(lambda: not pg.server_processes([home]), 30, what="postgres to stop")
    wait_until(lambda: not os.path.exists(home), 30, what="the data directory to go")
