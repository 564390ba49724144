"""The lock dir is ours alone: careless and hostile lock dirs lose no data and never hang.

Every case runs a real pytest (in a subprocess, bounded) against a lock dir that a careless
user pointed at the wrong place, or that another local user (made with ``useradd``) has
prepared. Each checks that nothing outside the lock dir changed (a checksum of a victim
tree before and after), that nothing foreign was served, and that the run ended in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import env_without_leaks, wait_until

from pytest_prewarm.layout import TAG_FILE, Layout, template_id
from pytest_prewarm.lockdir import prepare
from pytest_prewarm.names import canonical_key

pwd = pytest.importorskip("pwd", reason="another local user, POSIX modes and FIFOs")

OTHER_USER = "prewarm-other"

CONFTEST = """
    import json
    import os
    import threading
    from pathlib import Path

    import pytest

    LOG = Path(os.environ["HOSTILE_LOG"])


    def build(path):
        with open(LOG, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid()}) + "\\n")
        mode = os.environ.get("HOSTILE_BUILD", "ok")
        if mode == "fill":
            # Write until the filesystem is full: the build fails with ENOSPC.
            with open(path / "big.bin", "wb") as out:
                while True:
                    out.write(b"x" * 65536)
                    out.flush()
        if mode == "inodes":
            # Create files until the filesystem has no inodes left: ENOSPC again.
            for n in range(100000):
                (path / f"f{n}").touch()
        if mode == "fail":
            print("the build's own words")
            raise RuntimeError("the build failed")
        if mode == "slow":
            Path(os.environ["HOSTILE_STARTED"]).touch()
            threading.Event().wait()  # a build that never ends on its own
        (path / "data.txt").write_text("genuine")
        return "genuine"


    @pytest.fixture(scope="session")
    def tmpl(prewarmed_template):
        return prewarmed_template("db", build)
"""

TESTS = """
    import pytest


    @pytest.mark.parametrize("i", range(4))
    def test_uses_template(tmpl, i):
        assert (tmpl.path / "data.txt").read_text() == "genuine"
        assert tmpl.value == "genuine"
"""


def tree_digest(path: Path) -> str:
    """A checksum of every name, type, mode and content under ``path`` (links not followed)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in sorted(dirs + files):
            full = Path(root, name)
            info = os.lstat(full)
            digest.update(f"{full.relative_to(path)}:{info.st_mode}:{info.st_uid}".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(full).encode())
            elif stat.S_ISREG(info.st_mode):
                digest.update(full.read_bytes())
        dirs.sort()
    return digest.hexdigest()


class Hostile:
    """A suite, a victim tree beside it, and bounded pytest runs against a chosen lock dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.suite = root / "suite"
        self.suite.mkdir()
        (self.suite / "conftest.py").write_text(textwrap.dedent(CONFTEST))
        (self.suite / "test_use.py").write_text(textwrap.dedent(TESTS))
        self.log = root / "builds.jsonl"
        self.victim = root / "victim"
        (self.victim / "trash" / "keep").mkdir(parents=True)
        (self.victim / "trash" / "keep" / "precious.txt").write_text("do not delete")
        (self.victim / "notes.txt").write_text("mine")
        self.victim_digest = tree_digest(self.victim)

    def builds(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        full = env_without_leaks()
        full.update(HOSTILE_LOG=str(self.log), **(env or {}))
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(self.suite), *args],
            cwd=self.root,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run(
        self, *args: str, env: dict[str, str] | None = None, bound: float = 60
    ) -> tuple[int, str, float]:
        """(exit code, output, seconds); a run past ``bound`` is killed and fails the test."""
        started = time.monotonic()
        proc = self.popen(*args, env=env)
        try:
            out, _ = proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"the run did not end within {bound} s:\n{out}")
        return proc.returncode, out, time.monotonic() - started

    def victim_untouched(self) -> bool:
        return tree_digest(self.victim) == self.victim_digest


@pytest.fixture
def hostile(tmp_path: Path) -> Hostile:
    return Hostile(tmp_path)


@pytest.fixture(scope="session")
def other_user() -> pwd.struct_passwd:
    """A second local user, created for these tests where possible."""
    if os.geteuid() != 0:
        pytest.skip("creating a second user needs root")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("useradd(8) is not installed")
    made = subprocess.run(
        [useradd, "-M", "-s", "/usr/sbin/nologin", OTHER_USER], capture_output=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.decode(errors='replace').strip()}")
    return pwd.getpwnam(OTHER_USER)


def db_tid() -> str:
    return template_id("db", canonical_key(None, name="db"))


# -- a lock dir pointed at the wrong place --------------------------------------------------


def test_a_non_empty_directory_without_the_tag_is_refused_and_left_untouched(hostile):
    code, out, _ = hostile.run("--prewarm-lock-dir", str(hostile.victim))

    assert code == 4, out  # a usage error, at start-up
    assert f"lock dir {str(hostile.victim)!r} is not empty (notes.txt, trash)" in out
    assert "nothing in it was touched" in out
    assert hostile.victim_untouched()
    assert hostile.builds() == 0


@pytest.mark.parametrize("value", ["", "   ", "/", "."])
def test_an_empty_value_the_root_and_the_rootdir_are_refused(hostile, value):
    (hostile.suite / "pytest.ini").write_text("[pytest]\n")  # the suite is the rootdir
    code, out, _ = hostile.run(f"--prewarm-lock-dir={value}")

    assert code == 4, out
    expected = {"": "is empty", "   ": "is empty", "/": "is the root /", ".": "is the rootdir"}
    assert expected[value] in out
    assert "pass a directory of its own" in out
    assert hostile.builds() == 0


def test_an_empty_directory_is_adopted_and_marked(hostile):
    empty = hostile.root / "empty"
    empty.mkdir()

    code, out, _ = hostile.run("-n", "2", "--prewarm-lock-dir", str(empty))

    assert code == 0, out
    assert (empty / TAG_FILE).read_text().startswith("Signature: pytest-prewarm lock dir")
    assert hostile.builds() == 1
    again, out, _ = hostile.run("--prewarm-lock-dir", str(empty))  # ours now: reused
    assert again == 0, out
    assert hostile.builds() == 1


def test_a_lock_dir_of_the_earlier_version_without_a_tag_is_adopted(hostile):
    legacy = hostile.root / "legacy"
    for sub in ("locks", "staging", "templates", "failures", "trash"):
        (legacy / sub).mkdir(parents=True, mode=0o700)
    (legacy / "lock-mode").write_text("flock\n")

    code, out, _ = hostile.run("--prewarm-lock-dir", str(legacy))

    assert code == 0, out
    assert (legacy / TAG_FILE).is_file()


def test_a_lock_dir_pinned_to_the_other_mode_is_a_usage_error_at_start_up(hostile):
    locks = hostile.root / "locks"
    code, out, _ = hostile.run("--prewarm-lock-dir", str(locks), "--prewarm-lock-mode=lease")
    assert code == 0, out

    code, out, _ = hostile.run("--prewarm-lock-dir", str(locks), "--prewarm-lock-mode=flock")

    assert code == 4, out
    assert (
        f"lock dir {str(locks)!r} is used in lease mode, but this run asks for flock mode "
        "(from --prewarm-lock-mode)"
    ) in out
    assert "Traceback" not in out
    assert hostile.builds() == 1
    again, out, _ = hostile.run("--prewarm-lock-dir", str(locks))  # auto takes the pin
    assert again == 0, out


PIN_AFTER_START_UP = """
    from pathlib import Path

    def pytest_sessionstart(session):
        # Another run pins the other mode after this one's start-up checks.
        lock_dir = Path(session.config.getoption("prewarm_lock_dir"))
        lock_dir.mkdir(mode=0o700)
        tag = lock_dir / "PYTEST_PREWARM_LOCKDIR.TAG"
        tag.write_text("Signature: pytest-prewarm lock dir\\n")
        (lock_dir / "lock-mode").write_text("lease\\n")
"""


def test_a_lock_dir_error_after_start_up_fails_each_test_in_one_line(hostile):
    conftest = hostile.suite / "conftest.py"
    conftest.write_text(conftest.read_text() + textwrap.dedent(PIN_AFTER_START_UP))
    locks = hostile.root / "locks"

    code, out, _ = hostile.run("--prewarm-lock-dir", str(locks), "--prewarm-lock-mode=flock")

    assert code == 1, out
    assert out.count("ERROR at setup of test_uses_template") == 4, out
    assert sum(line.startswith("prewarm: lock dir") for line in out.splitlines()) == 4, out
    assert "is used in lease mode, but this run would use flock mode" in out
    assert "lockdir.py" not in out  # no traceback through the plugin
    assert "During handling" not in out
    assert hostile.builds() == 0


# -- another user ---------------------------------------------------------------------------


def test_a_lock_dir_of_another_user_is_refused_naming_owner_and_mode(hostile, other_user):
    theirs = hostile.root / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, other_user.pw_uid, other_user.pw_gid)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(theirs))

    assert code == 4, out
    assert f"{theirs} belongs to {OTHER_USER} (uid {other_user.pw_uid})" in out
    assert "mode 0755" in out
    assert list(theirs.iterdir()) == []


def test_a_world_writable_lock_dir_without_the_sticky_bit_is_refused(hostile):
    shared = hostile.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(shared))

    assert code == 4, out
    assert f"{shared} is writable by other users (mode 0777)" in out
    assert f"chmod go-w {shared}" in out


@pytest.mark.parametrize("owner", ["other", "me"])
def test_a_lock_dir_that_is_a_symlink_is_refused_and_its_target_left_alone(
    hostile, other_user, owner
):
    # Another user's link in /tmp pointing at a place the victim may write: followed, the
    # victim would create and fill the target. Our own link is refused too (docs/usage.md).
    shared = hostile.root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = hostile.victim / "lockdir-here"
    link = shared / "prewarm-shared"
    link.symlink_to(target)
    if owner == "other":
        os.lchown(link, other_user.pw_uid, other_user.pw_gid)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(link))

    assert code == 4, out
    assert f"the lock dir {link} is a symbolic link (to {target})" in out
    assert "name the directory itself" in out
    assert not os.path.lexists(target)
    assert hostile.victim_untouched()
    assert hostile.builds() == 0


def plant_their_link(hostile: Hostile, other_user: pwd.struct_passwd, name: str) -> Path:
    """Another user's link to the victim's tree, in a shared sticky dir as /tmp is."""
    shared = hostile.root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / name).symlink_to(hostile.victim)
    os.lchown(shared / name, other_user.pw_uid, other_user.pw_gid)
    return shared / name


def test_a_link_of_another_user_on_the_lock_dirs_path_is_refused(hostile, other_user):
    link = plant_their_link(hostile, other_user, "link")
    shared = link.parent

    code, out, _ = hostile.run("--prewarm-lock-dir", str(shared / "link" / "locks"))

    assert code == 4, out
    assert f"{shared / 'link'} on the lock dir's path is a symbolic link" in out
    assert f"owned by {OTHER_USER}" in out
    assert hostile.victim_untouched()


def test_a_link_of_another_user_behind_a_link_of_ours_is_refused(hostile, other_user):
    evil = plant_their_link(hostile, other_user, "evil")
    shared = evil.parent
    (hostile.root / "mine").symlink_to(evil)  # ours, but it leads through theirs

    code, out, _ = hostile.run("--prewarm-lock-dir", str(hostile.root / "mine" / "locks"))

    assert code == 4, out
    assert f"{shared / 'evil'} on the lock dir's path is a symbolic link" in out
    assert hostile.victim_untouched()


def test_a_link_of_the_users_own_on_the_lock_dirs_path_is_followed(hostile):
    # How macOS reaches /private/tmp from /tmp, and how many CI caches are mounted.
    real = hostile.root / "real"
    real.mkdir()
    (hostile.root / "via").symlink_to(real)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(hostile.root / "via" / "locks"))

    assert code == 0, out
    assert (real / "locks" / TAG_FILE).is_file()


def test_a_lock_dir_below_a_parent_anyone_may_write_is_refused(hostile):
    # Not sticky: another user could rename the lock dir away mid-run and put theirs there.
    open_parent = hostile.root / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(open_parent / "locks"))

    assert code == 4, out
    assert f"{open_parent}, above the lock dir, is writable by every user and not sticky" in out
    assert f"chmod o-w {open_parent}" in out
    assert list(open_parent.iterdir()) == []


@pytest.mark.parametrize("option", ["--prewarm-lock-dir", "--prewarm-json"])
def test_a_home_of_an_unknown_user_is_a_usage_error(hostile, option):
    code, out, _ = hostile.run(f"{option}=~no-such-user-here/x")

    assert code == 4, out
    assert "'~no-such-user-here/x' from" in out
    assert "INTERNALERROR" not in out


def test_a_symlink_planted_in_a_shared_sticky_lock_dir_is_refused_not_followed(hostile, other_user):
    shared = hostile.root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may create names, nobody may remove others'
    (shared / TAG_FILE).write_text("Signature: pytest-prewarm lock dir\n")
    # The other user plants "locks" as a link to the victim's tree before our first run.
    (shared / "locks").symlink_to(hostile.victim)
    os.lchown(shared / "locks", other_user.pw_uid, other_user.pw_gid)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(shared))

    assert code != 0
    assert f"{shared / 'locks'} is a symbolic link, where a directory should be" in out
    assert hostile.victim_untouched()
    assert hostile.builds() == 0


def test_a_template_planted_by_another_user_is_never_served(hostile, other_user):
    lock_dir = hostile.root / "locks"
    first, out, _ = hostile.run("--prewarm-lock-dir", str(lock_dir))
    assert first == 0, out
    meta = Layout(lock_dir).meta_file(db_tid())
    build = json.loads(meta.read_text())["build"]
    data = Layout(lock_dir).data_dir(db_tid(), build) / "data.txt"
    # Replace the published template by the other user's: same boot id, other data.
    doc = json.loads(meta.read_text())
    doc["value"] = "planted"
    meta.write_text(json.dumps(doc))
    data.write_text("planted")
    for path in (meta, data):
        os.chown(path, other_user.pw_uid, other_user.pw_gid)

    code, out, _ = hostile.run("--prewarm-lock-dir", str(lock_dir))

    # Not served: the tests would fail on "planted". Not moved or deleted either.
    assert code == 1, out
    assert "that this user did not make" in out
    assert "it was neither used nor touched" in out
    assert data.read_text() == "planted"
    assert json.loads(meta.read_text())["value"] == "planted"
    # The refused attempt was discarded, not left beside the planted template.
    assert sorted(p.name for p in Layout(lock_dir).template_dir(db_tid()).iterdir()) == [
        build,
        "meta.json",
    ]


# -- special files where records should be ----------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "other user"])
def test_a_special_file_at_the_lock_file_fails_fast_with_its_own_words(hostile, kind, request):
    lock_dir = hostile.root / "locks"
    assert hostile.run("--prewarm-lock-dir", str(lock_dir))[0] == 0
    shutil.rmtree(Layout(lock_dir).template_dir(db_tid()))
    lock = Layout(lock_dir).lock_file(db_tid())
    if kind == "other user":  # a lock file of another user: never locked through
        other = request.getfixturevalue("other_user")
        os.chown(lock, other.pw_uid, other.pw_gid)
    else:
        lock.unlink()
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "directory":
        lock.mkdir()
    elif kind == "symlink":
        lock.symlink_to(hostile.victim / "notes.txt")

    code, out, seconds = hostile.run("-n", "2", "--prewarm-lock-dir", str(lock_dir), bound=60)

    words = {
        "fifo": "a FIFO",
        "directory": "a directory",
        "symlink": "a symbolic link",
        "other user": "another user's file",
    }[kind]
    assert code == 1, out
    assert f"the lock file {lock} is {words}, not a lock file pytest-prewarm made" in out
    assert "does not support flock" not in out
    assert hostile.victim_untouched()
    assert seconds < 30


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_special_file_at_the_owner_record_never_blocks_and_releases_the_lock(hostile, kind):
    lock_dir = hostile.root / "locks"
    assert hostile.run("--prewarm-lock-dir", str(lock_dir))[0] == 0
    shutil.rmtree(Layout(lock_dir).template_dir(db_tid()))
    owner = Layout(lock_dir).owner_file(db_tid())
    owner.unlink()
    os.mkfifo(owner) if kind == "fifo" else owner.mkdir()

    code, out, seconds = hostile.run("-n", "2", "--prewarm-lock-dir", str(lock_dir))

    if kind == "fifo":
        # A FIFO is not a record: it reads as "no record" and is replaced by ours.
        assert code == 0, out
        assert hostile.builds() == 2
    else:
        # Every worker fails at once with the cause; none waits for a lock left held.
        assert code == 1, out
        assert f"cannot write the owner record {owner}" in out
        assert "it is a directory" in out
        assert "the lock was released" in out
        assert "timed out" not in out
    assert seconds < 30


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_files_planted_at_partial_build_log_names_are_never_opened_or_followed(hostile, outcome):
    lock_dir = prepare(hostile.root / "locks", "test")
    layout = Layout(lock_dir)
    layout.ensure()
    # What a dead builder's partial logs would be named, holding what no log would be.
    fifo = lock_dir / "failures" / f".{db_tid()}+1-0000fifo.partial"
    os.mkfifo(fifo)
    directory = lock_dir / "failures" / f".{db_tid()}+2-00000dir.partial"
    directory.mkdir()
    (directory / "inside.txt").write_text("x")
    link = lock_dir / "failures" / f".{db_tid()}+3-0000link.partial"
    link.symlink_to(hostile.victim / "notes.txt")
    assert sorted(layout.partial_logs(db_tid())) == [fifo, directory, link]

    code, out, seconds = hostile.run(
        "-n", "2", "--prewarm-lock-dir", str(lock_dir), env={"HOSTILE_BUILD": outcome}
    )

    assert hostile.victim_untouched(), out
    assert seconds < 30  # nothing blocked opening the FIFO, no waiter hung
    assert "INTERNALERROR" not in out
    assert hostile.builds() == 1
    if outcome == "ok":
        assert code == 0, out
    else:
        assert code == 1, out
        assert "building template 'db' failed in gw" in out
        (log,) = layout.build_logs(db_tid())
        assert f"Full log: {log}" in out
        assert "the build's own words" in log.read_text()
    # The lock holder clears a dead builder's partial logs: a FIFO or a link there is
    # unlinked (the link, never its target); a directory cannot be, and is left as it is.
    assert layout.partial_logs(db_tid()) == [directory]
    assert (directory / "inside.txt").read_text() == "x"


# -- a stale record of a live process ---------------------------------------------------------


def test_a_held_record_naming_another_live_process_does_not_block_on_a_local_filesystem(
    hostile, processes
):
    lock_dir = hostile.root / "locks"
    assert hostile.run("--prewarm-lock-dir", str(lock_dir))[0] == 0
    shutil.rmtree(Layout(lock_dir).template_dir(db_tid()))
    # A live process that does not hold the lock, named by a record that says "held".
    code = (
        "import json, sys, time\n"
        "from pytest_prewarm.liveness import own_record\n"
        "print(own_record('gw7', 'other-run').to_json(), flush=True)\n"
        "time.sleep(600)\n"
    )
    sleeper = processes.spawn([sys.executable, "-c", code])
    record = wait_until(lambda: sleeper.output().strip(), what="the sleeper's record")
    Layout(lock_dir).owner_file(db_tid()).write_text(record)

    run, out, _ = hostile.run("--prewarm-lock-dir", str(lock_dir), "-v")

    assert run == 0, out
    assert "--prewarm-lock-mode lease" not in out
    reclaimed = f"reclaimed the lock from gw7, pid {sleeper.pid}: alive, running"
    assert f"{reclaimed}, but it does not hold the lock" in out


# -- bounds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--prewarm-timeout", "--prewarm-notice-after"])
def test_a_timeout_beyond_what_the_code_can_represent_is_a_usage_error(hostile, option):
    code, out, _ = hostile.run(f"{option}=1e10")

    assert code == 4, out
    assert f"'1e10' from {option} is too large; the most is 1e+08 s" in out
    assert "OverflowError" not in out


def test_an_unwritable_json_report_is_a_usage_error_at_start_up(hostile):
    locked = hostile.root / "read-only"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: use a path below a file
        target = hostile.victim / "notes.txt" / "report.json"
    else:
        target = locked / "report.json"

    code, out, _ = hostile.run(f"--prewarm-json={target}")

    assert code == 4, out
    assert f"report file {str(target)!r} from --prewarm-json cannot be written" in out
    assert hostile.builds() == 0
    assert hostile.victim_untouched()


def test_ctrl_c_during_an_eager_build_ends_the_run_at_once(hostile, tmp_path):
    (hostile.suite / "conftest.py").write_text(
        textwrap.dedent(CONFTEST)
        + textwrap.dedent(
            """
            import pytest_prewarm

            pytest_prewarm.template("slow")(build)
            """
        )
    )
    (hostile.suite / "test_use.py").write_text(
        "import pytest\n\n\n@pytest.mark.prewarm('slow')\ndef test_slow(prewarmed):\n    pass\n"
        "\n\ndef test_other():\n    pass\n"
    )
    started = tmp_path / "started"
    proc = hostile.popen(
        "-p", "no:xdist", env={"HOSTILE_BUILD": "slow", "HOSTILE_STARTED": str(started)}
    )
    try:
        wait_until(started.exists, 60, what="the eager build to start")
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        ended = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 2, out
    # The plugin waits for nothing after Ctrl-C (it abandons the build at once); the run's
    # own exit takes well under 2 s on a quiet machine, and the bound leaves room for a
    # loaded one. Waiting for the build would take the timeout, 1800 s.
    assert ended < 5.0, f"took {ended:.1f} s after Ctrl-C:\n{out}"
    assert "abandoning its eager build of 'slow'" in out


# -- a full disk ----------------------------------------------------------------------------


@pytest.mark.parametrize("exhaust", ["fill", "inodes"])
def test_a_full_disk_during_a_build_is_a_clear_error_and_the_next_run_starts(
    hostile, small_tmpfs, exhaust
):
    lock_dir = small_tmpfs / "locks"

    code, out, _ = hostile.run(
        "-n", "2", "--prewarm-lock-dir", str(lock_dir), env={"HOSTILE_BUILD": exhaust}
    )

    assert code == 1, out
    assert "No space left on device" in out
    assert f"the filesystem holding the lock dir {lock_dir} is full" in out
    assert "Traceback" not in out.split("short test summary")[-1]
    assert "INTERNALERROR" not in out
    assert hostile.builds() == 1  # the other worker failed fast on the recorded failure
    builds = Layout(lock_dir).template_dir(db_tid())
    assert not builds.exists() or list(builds.iterdir()) == []
    leftovers = [p.name for p in lock_dir.rglob("*.tmp")]
    assert leftovers == []

    again, out, _ = hostile.run("-n", "2", "--prewarm-lock-dir", str(lock_dir))
    assert again == 0, out


# -- concurrent first runs --------------------------------------------------------------------

PROBE_RACE = """
import sys
from pathlib import Path
from pytest_prewarm.lockdir import choose_lock_mode, pin_mode, prepare

root, me, rounds, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    pass  # spin: all racers start their rounds within microseconds of each other
for i in range(rounds):
    lock_dir = prepare(root / f"round-{i}", "test")
    mode, why = choose_lock_mode(lock_dir, "auto")
    pin_mode(lock_dir, mode, why)
    print(i, mode, why, flush=True)
"""


def test_runs_starting_together_on_fresh_lock_dirs_all_choose_flock(tmp_path, processes):
    racers, rounds = 4, 50
    go = tmp_path / "go"
    procs = [
        processes.spawn(
            [sys.executable, "-c", PROBE_RACE, str(tmp_path), str(n), str(rounds), str(go)]
        )
        for n in range(racers)
    ]
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.output()
    lines = [line for proc in procs for line in proc.output().splitlines()]
    assert len(lines) == racers * rounds
    modes = {line.split(" ", 2)[1] for line in lines}
    assert modes == {"flock"}, [line for line in lines if " flock " not in line][:5]
    for i in range(rounds):
        assert (tmp_path / f"round-{i}" / "lock-mode").read_text() == "flock\n"


# -- symlinks planted where directories should be ---------------------------------------------


@pytest.mark.parametrize(
    "where", ["templates/ID", "failures/ID", "trash/planted", "events", "locks"]
)
def test_a_planted_symlink_is_never_followed(hostile, where):
    lock_dir = hostile.root / "locks-dir"
    assert hostile.run("--prewarm-lock-dir", str(lock_dir))[0] == 0
    layout = Layout(lock_dir)
    shutil.rmtree(layout.template_dir(db_tid()))
    link = lock_dir / where.replace("ID", db_tid())
    if link.exists():
        shutil.rmtree(link)
    link.symlink_to(hostile.victim / "trash", target_is_directory=True)

    code, out, seconds = hostile.run("-n", "2", "--prewarm-lock-dir", str(lock_dir), bound=60)

    assert hostile.victim_untouched(), out
    assert seconds < 30
    assert "INTERNALERROR" not in out
    if where == "trash/planted":
        # Leftover trash is removed, and a link in it is unlinked, not followed.
        assert code == 0, out
        assert not os.path.lexists(link) or os.path.islink(link)
    else:
        assert code != 0, out
        assert f"{link} is a symbolic link, where a directory should be" in out


@pytest.mark.parametrize("planted", ["the published build", "a stray build"])
def test_a_symlink_planted_among_a_templates_builds_is_never_followed(hostile, planted):
    lock_dir = hostile.root / "locks-dir"
    assert hostile.run("--prewarm-lock-dir", str(lock_dir))[0] == 0
    layout = Layout(lock_dir)
    published = json.loads(layout.meta_file(db_tid()).read_text())["build"]
    if planted == "the published build":
        link = layout.build_dir(db_tid(), published)
        shutil.rmtree(link)
    else:
        link = layout.build_dir(db_tid(), "4242-0badc0de")  # what a dead builder leaves
        (layout.meta_file(db_tid())).unlink()  # unpublished: the next holder sweeps
    link.symlink_to(hostile.victim, target_is_directory=True)

    code, out, seconds = hostile.run("-n", "2", "--prewarm-lock-dir", str(lock_dir), bound=60)

    assert hostile.victim_untouched(), out
    assert seconds < 30
    assert "INTERNALERROR" not in out
    if planted == "the published build":
        assert code != 0, out
        assert f"{link} is a symbolic link, where a directory should be" in out
    else:
        # Swept into the trash as a link (one rename), removed there without following it.
        assert code == 0, out
        assert not os.path.lexists(link)
        assert hostile.builds() == 2


def test_an_owner_record_of_another_user_is_not_trusted_and_says_so(hostile, other_user):
    from pytest_prewarm.flock import FlockLock

    lock_dir = hostile.root / "locks"
    assert hostile.run("--prewarm-lock-dir", str(lock_dir))[0] == 0
    owner = Layout(lock_dir).owner_file(db_tid())
    os.chown(owner, other_user.pw_uid, other_user.pw_gid)

    holder = FlockLock(Layout(lock_dir), db_tid(), "db").holder()

    assert holder.record is None
    assert holder.describe() == (
        f"no identifiable holder (the owner record {owner} belongs to {OTHER_USER} "
        f"(uid {other_user.pw_uid}): not trusted)"
    )


def test_a_planted_lease_dir_symlink_is_refused_in_lease_mode(hostile):
    lock_dir = hostile.root / "locks"
    lease_mode = ("--prewarm-lock-dir", str(lock_dir), "--prewarm-lock-mode", "lease")
    assert hostile.run(*lease_mode)[0] == 0
    shutil.rmtree(Layout(lock_dir).template_dir(db_tid()))
    lease = Layout(lock_dir).lease_dir(db_tid())
    shutil.rmtree(lease)
    lease.symlink_to(hostile.victim / "trash", target_is_directory=True)

    code, out, _ = hostile.run(*lease_mode)

    assert code == 1, out
    assert f"{lease} is a symbolic link, where a directory should be" in out
    assert hostile.victim_untouched()
