"""Each template is built once per run: across xdist workers, without xdist, across runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import START_FIELD

# The builder counts its attempt, keeps a copy of the owner record as it is mid-build,
# waits until PREWARM_TEST_EXPECT processes have asked for the template (so they are
# provably waiting, not arriving late), then writes 12 files and a manifest.
CONFTEST = """
    import os

    import pytest

    import prewarm_probe as probe

    EXPECT = int(os.environ.get("PREWARM_TEST_EXPECT", "1"))
    KEY = os.environ.get("PREWARM_TEST_KEY")


    def build(path):
        probe.count_attempt(path)
        lock_dir, tid = path.parents[3], path.parents[1].name
        lock = lock_dir / "locks" / f"{tid}.lock"
        owner = lock_dir / "locks" / f"{tid}.owner.json"
        probe.record(
            "during-build",
            owner=owner.read_text(),
            lock=str(lock),
            lock_inode=os.stat(lock).st_ino,
            lock_dir=str(lock_dir),
            tempdir=__import__("tempfile").gettempdir(),
        )
        probe.wait_for_requests(EXPECT)
        probe.write_files(path, 12)
        return {"port": 5432, "pair": (1, 2)}


    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        probe.announce_request()
        return prewarmed_template("db", build, key=KEY)
"""

TESTS = """
    import os

    import pytest

    import prewarm_probe as probe

    COUNT = int(os.environ.get("PREWARM_TEST_COUNT", "2"))


    @pytest.mark.parametrize("i", range(COUNT))
    def test_uses_template(db, i):
        files = probe.check_complete(db)
        probe.record(
            "seen",
            value=db.value,
            fspath=os.fspath(db),
            path=str(db.path),
            files=files,
            origin=db.origin,
            name=db.name,
            key=db.key,
            built_by=db.built_by,
        )
"""

VALUE = {"port": 5432, "pair": [1, 2]}


def check_seen(seen: list[dict], *, count: int, builder: str) -> None:
    """Every test saw one and the same complete template, built by ``builder``."""
    assert len(seen) == count
    assert all(r["value"] == VALUE for r in seen)
    assert len({r["fspath"] for r in seen}) == 1
    assert all(r["fspath"] == r["path"] for r in seen)
    files = seen[0]["files"]
    assert len(files) == 12
    assert all(r["files"] == files for r in seen)
    assert {r["built_by"] for r in seen} == {builder}
    assert {r["name"] for r in seen} == {"db"}


def check_origins(seen: list[dict], builder: str) -> None:
    """Only the builder built; everyone else got the template of this run's build.

    "waited" or "reused" both fit the others: each announced itself before the build
    finished, but a worker descheduled between announcing and looking (2 cores, 9
    processes) can find the template already published.
    """
    for r in seen:
        if r["worker"] == builder:
            assert r["origin"] == "built", r
        else:
            assert r["origin"] in ("waited", "reused"), r


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_one_build_serves_every_xdist_worker_the_same_template(suite, workers):
    suite.write(conftest=CONFTEST, test_db=TESTS)

    result = suite.run(
        "-n",
        str(workers),
        env={"PREWARM_TEST_EXPECT": str(workers), "PREWARM_TEST_COUNT": str(2 * workers)},
    )

    result.assert_outcomes(passed=2 * workers)
    attempts = suite.attempts()
    assert len(attempts) == 1, attempts
    builder = attempts[0]["worker"]
    seen = suite.records("seen")
    check_seen(seen, count=2 * workers, builder=builder)
    assert {r["worker"] for r in seen} == {f"gw{i}" for i in range(workers)}
    check_origins(seen, builder)
    assert Path(seen[0]["fspath"]).is_relative_to(suite.lock_dir / "templates")


@pytest.mark.parametrize("args", [["-p", "no:xdist"], ["-n", "0"]], ids=["no-xdist", "n0"])
def test_one_build_outside_xdist(suite, args):
    suite.write(
        conftest=CONFTEST,
        test_db=TESTS,
        test_direct="""
            import os

            import conftest


            def test_asking_again_returns_the_same_template(db, prewarmed_template):
                again = prewarmed_template("db", conftest.build)
                assert os.fspath(again) == os.fspath(db)
                assert again.value == db.value
        """,
    )

    result = suite.run(*args, env={"PREWARM_TEST_COUNT": "3"})

    result.assert_outcomes(passed=4)
    attempts = suite.attempts()
    assert len(attempts) == 1
    assert attempts[0]["worker"] == "main"
    seen = suite.records("seen")
    check_seen(seen, count=3, builder="main")
    assert {r["origin"] for r in seen} == {"built"}


@pytest.mark.parametrize("runs", [2, 3])
def test_concurrent_runs_sharing_a_lock_dir_build_once(suite, runs):
    suite.write(conftest=CONFTEST, test_db=TESTS)

    procs = [
        suite.spawn(
            "-p",
            "no:xdist",
            run=f"run{i}",
            env={
                "PREWARM_TEST_GROUP": "together",
                "PREWARM_TEST_EXPECT": str(runs),
                "PREWARM_TEST_COUNT": "2",
            },
        )
        for i in range(runs)
    ]

    for proc in procs:
        assert proc.wait(timeout=90) == 0, proc.output()
    attempts = suite.attempts()
    assert len(attempts) == 1, attempts
    seen = [r for i in range(runs) for r in suite.records("seen", run=f"run{i}")]
    check_seen(seen, count=2 * runs, builder="main")
    builder_pid = attempts[0]["pid"]
    assert {r["pid"] for r in seen} == {p.pid for p in procs}
    # Another run's build is "waited" for by a run that asked while it ran, and "reused"
    # by one whose request came after publication (the barrier only orders announcements).
    for r in seen:
        if r["pid"] == builder_pid:
            assert r["origin"] == "built", r
        else:
            assert r["origin"] in ("waited", "reused"), r


def test_default_lock_dir_is_shared_by_the_workers_of_a_run_and_kept_after_it(suite):
    suite.write(conftest=CONFTEST, test_db=TESTS)

    first = suite.run(
        "-n",
        "2",
        lock_dir=False,
        run="first",
        env={"PREWARM_TEST_EXPECT": "2", "PREWARM_TEST_COUNT": "4"},
    )
    second = suite.run("-p", "no:xdist", lock_dir=False, run="second")

    first.assert_outcomes(passed=4)
    second.assert_outcomes(passed=2)
    attempts = suite.attempts()
    assert [a["run"] for a in attempts] == ["first", "second"]
    tops = []
    for run, count in (("first", 4), ("second", 2)):
        seen = suite.records("seen", run=run)
        check_seen(seen, count=count, builder=attempts[0 if run == "first" else 1]["worker"])
        (during,) = suite.records("during-build", run=run)
        top = Path(seen[0]["fspath"]).parents[3]  # <top>/templates/<id>/<build>/data
        assert top == Path(during["lock_dir"])
        assert top.parent == Path(during["tempdir"])
        assert top.name.startswith("pytest-prewarm-run-")
        # Kept for inspection (the last three runs' are), the template whole inside it.
        assert Path(seen[0]["fspath"]).is_dir(), f"{top} did not outlive its run"
        tops.append(top)
    assert tops[0] != tops[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc's boot id")
def test_owner_record_names_the_builder_while_it_builds_and_the_template_names_the_hold(suite):
    suite.write(conftest=CONFTEST, test_db=TESTS)

    result = suite.run("-p", "no:xdist")

    result.assert_outcomes(passed=2)
    (attempt,) = suite.attempts()
    (during,) = suite.records("during-build")
    held = json.loads(during["owner"])
    for field in (
        "pid",
        START_FIELD,  # start_ticks, or create_time on the portable path
        "boot_id",
        "pid_ns",
        "hostname",
        "worker",
        "run_id",
        "started_at",
    ):
        assert held.get(field) not in (None, ""), (field, held)
    assert held["pid"] == attempt["pid"]
    assert held["worker"] == "main"
    assert held["state"] == "held"
    assert held["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert held["pid_ns"] == os.stat("/proc/self/ns/pid").st_ino
    lock = Path(during["lock"])
    owner = lock.with_name(lock.stem + ".owner.json")
    # A hold that published is not rewritten on release (that would delay every waiter);
    # the published template names the hold instead, which proves it finished cleanly.
    assert json.loads(owner.read_text()) == held
    meta = json.loads((lock.parents[1] / "templates" / lock.stem / "meta.json").read_text())
    assert meta["holder"] == [held["pid"], held["started_at"]]


def test_lock_files_are_permanent_and_never_written(suite):
    suite.write(conftest=CONFTEST, test_db=TESTS)

    first = suite.run("-p", "no:xdist", run="first")
    second = suite.run("-p", "no:xdist", "--prewarm-rebuild", run="second")

    first.assert_outcomes(passed=2)
    second.assert_outcomes(passed=2)
    assert len(suite.attempts()) == 2
    (one,) = suite.records("during-build", run="first")
    (two,) = suite.records("during-build", run="second")
    lock = Path(one["lock"])
    assert lock.parent == suite.lock_dir / "locks"
    assert lock.exists()
    assert lock.stat().st_size == 0
    # The same inode across runs: the file was never deleted and recreated.
    assert one["lock_inode"] == two["lock_inode"] == lock.stat().st_ino


def test_same_key_reuses_a_published_template_and_a_new_key_builds_another(suite):
    suite.write(conftest=CONFTEST, test_db=TESTS)

    def run(label: str, key: str) -> list[dict]:
        result = suite.run("-p", "no:xdist", run=label, env={"PREWARM_TEST_KEY": key})
        result.assert_outcomes(passed=2)
        return suite.records("seen", run=label)

    v1 = run("v1", "v1")
    v1_again = run("v1-again", "v1")
    assert len(suite.attempts()) == 1
    v2 = run("v2", "v2")
    assert len(suite.attempts()) == 2
    v1_third = run("v1-third", "v1")
    assert len(suite.attempts()) == 2

    assert {r["origin"] for r in v1} == {"built"}
    assert {r["origin"] for r in v1_again} == {"reused"}
    assert {r["origin"] for r in v2} == {"built"}
    assert {r["origin"] for r in v1_third} == {"reused"}
    assert {r["key"] for r in v1 + v1_again + v1_third} == {"v1"}
    assert {r["key"] for r in v2} == {"v2"}
    assert v1_again[0]["fspath"] == v1[0]["fspath"] == v1_third[0]["fspath"]
    assert v2[0]["fspath"] != v1[0]["fspath"]
    assert v1_again[0]["files"] == v1[0]["files"]


def test_rebuild_option_builds_once_per_run_not_once_per_worker(suite):
    suite.write(conftest=CONFTEST, test_db=TESTS)
    suite.run("-p", "no:xdist", run="warm").assert_outcomes(passed=2)
    assert len(suite.attempts()) == 1

    result = suite.run(
        "-n",
        "4",
        "--prewarm-rebuild",
        run="rebuild",
        env={"PREWARM_TEST_EXPECT": "4", "PREWARM_TEST_COUNT": "8"},
    )

    result.assert_outcomes(passed=8)
    attempts = suite.attempts()
    assert [a["run"] for a in attempts] == ["warm", "rebuild"]
    seen = suite.records("seen", run="rebuild")
    check_seen(seen, count=8, builder=attempts[1]["worker"])
    check_origins(seen, attempts[1]["worker"])
    assert {r["worker"] for r in seen} == {"gw0", "gw1", "gw2", "gw3"}
