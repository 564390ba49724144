"""A builder SIGKILLed half-way: someone else rebuilds from clean staging; nobody sees a part."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_prewarm.request import Request, TemplateStore

FILES = 40
KILL_AFTER = 15  # the first attempt dies after writing this many files (+1)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="builders are killed with SIGKILL")

# The first attempt (by the counter) SIGKILLs its own worker half-way through writing.
# Every attempt records whether its staging dir was empty and which attempts sat beside it.
KILL_CONFTEST = f"""
    import os

    import pytest

    import prewarm_probe as probe


    def build(path):
        attempt = probe.count_attempt(path)
        probe.wait_for_requests(int(os.environ["PREWARM_TEST_EXPECT"]))
        assert not any(path.iterdir()), "staging dir not empty at start"
        kill_after = {KILL_AFTER} if attempt == 1 else None
        probe.write_files(path, {FILES}, kill_after=kill_after)
        return {{"attempt": attempt}}


    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        probe.announce_request()
        return prewarmed_template("db", build)
"""

KILL_TESTS = """
    import os

    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(9))
    def test_sees_a_complete_template(db, i):
        files = probe.check_complete(db)
        probe.record("seen", files=files, value=db.value, fspath=os.fspath(db))
"""


@pytest.mark.parametrize("attempt", range(3))
def test_builder_killed_mid_build_is_replaced_and_no_test_sees_a_partial_template(suite, attempt):
    suite.write(conftest=KILL_CONFTEST, test_db=KILL_TESTS)

    result = suite.run("-n", "3", "--max-worker-restart=2", env={"PREWARM_TEST_EXPECT": "3"})

    # The killed worker's test is reported as crashed; every other test passes.
    result.assert_outcomes(passed=8, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*"])
    attempts = suite.attempts()
    assert len(attempts) == 2, attempts
    killed, rebuilt = attempts
    assert killed["worker"] != rebuilt["worker"]
    assert rebuilt["empty"] is True
    # The dead builder's attempt was moved aside: the new one is alone in staging.
    assert rebuilt["siblings"] == [Path(rebuilt["path"]).parent.name]
    seen = suite.records("seen")
    assert len(seen) == 8
    assert {r["value"]["attempt"] for r in seen} == {2}
    assert all(len(r["files"]) == FILES for r in seen)
    assert len({json.dumps(r["files"], sort_keys=True) for r in seen}) == 1
    assert len({r["fspath"] for r in seen}) == 1
    assert killed["worker"] not in {r["worker"] for r in seen}


# Two plain processes share a lock dir through the plugin's TemplateStore. The first
# signals (by a file) that it is half-way through writing, then waits to be killed.
STORE_SCRIPT = f"""
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import prewarm_probe as probe
    from pytest_prewarm.request import Request, TemplateStore

    lock_dir, flags, worker = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


    def build(path):
        attempt = probe.count_attempt(path)
        if attempt == 1:
            probe.write_files(path, {KILL_AFTER})  # half of it, manifest included
            (path / "manifest.json").unlink()
            (flags / "mid-build").touch()
            probe.wait_until(lambda: False, timeout=90, what="being killed")
        assert not any(path.iterdir()), "staging dir not empty at start"
        probe.write_files(path, {FILES})
        return {{"attempt": attempt, "by": worker}}


    store = TemplateStore(lock_dir, run_id="one-run", worker=worker)
    (flags / f"asking-{{worker}}").touch()
    template = store.get(Request("db", build, "k1", 60.0))
    files = probe.check_complete(template)
    print(json.dumps({{"origin": template.origin, "value": template.value,
                      "files": len(files), "path": os.fspath(template)}}))
"""


@pytest.mark.parametrize("attempt", range(3))
def test_store_holder_killed_mid_build_lets_a_waiting_process_rebuild_cleanly(
    suite, processes, wait_for, attempt
):
    flags = suite.path / "flags"
    flags.mkdir()
    script = suite.path / "store_script.py"
    script.write_text(textwrap.dedent(STORE_SCRIPT))

    def start(worker: str):
        return processes.spawn(
            [sys.executable, str(script), str(suite.lock_dir), str(flags), worker],
            cwd=suite.path,
        )

    first = start("first")
    wait_for(
        lambda: (flags / "mid-build").exists() or first.popen.poll() is not None,
        what="the first builder to be half-way",
    )
    assert first.popen.poll() is None, first.output()
    second = start("second")
    wait_for((flags / "asking-second").exists, what="the second to ask")

    first.kill()

    assert first.popen.returncode == -signal.SIGKILL
    assert second.wait(timeout=60) == 0, second.output()
    got = json.loads(second.output().strip().splitlines()[-1])
    assert got["origin"] == "built"
    assert got["value"] == {"attempt": 2, "by": "second"}
    assert got["files"] == FILES
    killed, rebuilt = suite.attempts()
    assert killed["pid"] == first.pid
    assert rebuilt["pid"] == second.pid
    assert rebuilt["empty"] is True
    assert rebuilt["siblings"] == [Path(rebuilt["path"]).parent.name]
    # A third process of the run finds the whole template without building.
    third = start("third")
    assert third.wait(timeout=60) == 0, third.output()
    again = json.loads(third.output().strip().splitlines()[-1])
    assert again["origin"] == "reused"
    assert again["value"] == {"attempt": 2, "by": "second"}
    assert again["path"] == got["path"]
    assert len(suite.attempts()) == 2


# A large address space makes the kernel's exit slow enough to observe: the holder's flock
# is released while /proc still shows it running (PF_EXITING set, not yet a zombie).
BIG_HOLDER = """
    import sys
    import time
    from pathlib import Path

    from pytest_prewarm.request import Request, TemplateStore

    ballast = bytearray(200 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    lock_dir, flag = Path(sys.argv[1]), Path(sys.argv[2])


    def build(path):
        flag.touch()
        time.sleep(90)  # stands still until the test kills it


    TemplateStore(lock_dir, run_id="r", worker="holder").get(Request("db", build, None, 60.0))
"""


@pytest.mark.parametrize("attempt", range(6))
def test_waiter_takes_over_from_a_killed_holder_that_is_still_exiting(
    tmp_path, processes, wait_for, attempt
):
    lock_dir, flag = tmp_path / "lock-dir", tmp_path / "building"
    holder = processes.python(BIG_HOLDER, str(lock_dir), str(flag))
    wait_for(
        lambda: flag.exists() or holder.popen.poll() is not None,
        timeout=60,
        what="the holder to start building",
    )
    assert holder.popen.poll() is None, holder.output()

    os.kill(holder.pid, signal.SIGKILL)  # not reaped yet, as under xdist
    template = TemplateStore(lock_dir, run_id="r", worker="waiter").get(
        Request("db", lambda path: "rebuilt", None, 30.0)
    )

    assert template.origin == "built"
    assert template.value == "rebuilt"
    assert holder.popen.wait(timeout=30) == -signal.SIGKILL
