"""Shared helpers: bounded waiting, spawned processes that are always reaped, inner suites.

Nothing here is autouse: a test asks for what it needs.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pytest_prewarm import portable

PYTHON = sys.executable
T = TypeVar("T")

# The portable code path (docs/how-it-works.md, "Platforms and filesystems"): Windows and
# macOS take it, and PYTEST_PREWARM_PORTABLE=1 forces it on Linux. That variable is not in
# LEAKY_ENV, so inner runs and spawned processes take the same path as this process.
PORTABLE = portable.forced() or not sys.platform.startswith("linux")
# The owner-record field that tells a holder from a later process with its pid, on this path.
START_FIELD = "create_time" if PORTABLE else "start_ticks"


def linux_proc_only(fact: str) -> pytest.MarkDecorator:
    """Skip under the forced portable path a test that asserts ``fact``, a Linux /proc fact
    (start ticks, PF_EXITING, /proc/PID/stat fields) that the portable path does not use."""
    return pytest.mark.skipif(
        portable.forced(),
        reason=f"asserts {fact}; the portable path (PYTEST_PREWARM_PORTABLE=1) does not use it",
    )


# Environment a nested pytest must not inherit from an outer xdist worker, the user or the
# CI machine: it would change what the inner run does or how its output reads (CI and
# BUILD_NUMBER: pytest stops truncating summary lines; the colour variables: escape codes).
LEAKY_ENV = (
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "CI",
    "BUILD_NUMBER",
    "PY_COLORS",
    "FORCE_COLOR",
    "NO_COLOR",
    "COLUMNS",
)
# What a nested pytest gets instead of the user's PYTEST_ADDOPTS. No inner suite uses
# hypothesis, and its pytest plugin imports all of hypothesis in every process for its
# terminal summary: about 0.6 s of CPU per process, and an inner run on 8 workers is 9.
INNER_ADDOPTS = "-p no:hypothesispytest"
# Set for every nested pytest. Without PYTHONDONTWRITEBYTECODE an inner run leaves a
# __pycache__ in its suite's directory, which tests of what a run leaves behind would see.
NESTED_ENV = {"PYTEST_ADDOPTS": INNER_ADDOPTS, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(autouse=True, scope="session")
def private_system_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The system temp dir of this test process and its children: a dir of its own.

    Inner runs without --prewarm-lock-dir make their default lock dirs in the system temp
    dir, and a run whose build failed keeps its dir a day for its log: run after run, the
    suite left hundreds of them in /tmp, and every real run's end-of-run sweep read them
    all. pytest's own basetemp is fixed first, so it stays where pytest keeps it.
    """
    tmp_path_factory.getbasetemp()
    import tempfile

    before_env, before_cached = os.environ.get("TMPDIR"), tempfile.tempdir
    private = Path(tempfile.mkdtemp(prefix="prewarm-tests-"))
    # As /tmp: world-writable and sticky, for the tests that run as a second user (the
    # PostgreSQL demo's server, another user's records).
    private.chmod(0o1777)
    os.environ["TMPDIR"] = str(private)
    tempfile.tempdir = str(private)
    try:
        yield private
    finally:
        tempfile.tempdir = before_cached
        if before_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before_env
        shutil.rmtree(private, ignore_errors=True)


def env_without_leaks() -> dict[str, str]:
    """os.environ for a nested pytest: without LEAKY_ENV, with NESTED_ENV."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env.update(NESTED_ENV)
    return env


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in NESTED_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def no_leaky_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make os.environ what env_without_leaks() returns, for one test (inner pytester runs)."""
    _clean_env(monkeypatch)


def require_unshare(*flags: str) -> list[str]:
    """``unshare`` with ``flags``, as an argv prefix; the test is skipped where it cannot run."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(
        [unshare, *flags, "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare {' '.join(flags)} is not permitted here: {probe.stderr.strip()}")
    return [unshare, *flags]


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, *, what: str = "a condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s.

    This is waiting on an observable state (a file, an exit), never sleeping in place of
    synchronisation: the short pause only keeps the poll from spinning a core.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``wait_for(predicate, timeout=30, what=...)``: bounded polling, see ``wait_until``."""
    return wait_until


class Proc:
    """A spawned process whose output goes to a log file (no pipe can fill and block it)."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"pid {self.pid} still running after {timeout:g} s; output so far:\n"
                + self.output()
            ) from None

    def kill(self) -> None:
        """SIGKILL the process and reap it, so it leaves no zombie behind."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Processes:
    """Spawns processes in their own session; every one is killed and reaped at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[Proc] = []

    def spawn(
        self, argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        log = self._log_dir / f"proc-{len(self._procs)}.log"
        full_env = env_without_leaks()
        full_env.update(env or {})
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # killpg then reaches xdist workers too
            )
        proc = Proc(popen, log)
        self._procs.append(proc)
        return proc

    def python(self, code: str, *args: str, cwd: Path | None = None) -> Proc:
        return self.spawn([PYTHON, "-c", textwrap.dedent(code), *args], cwd=cwd)

    def reap(self) -> None:
        for proc in self._procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=30)


@pytest.fixture
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Spawn real processes; all of them are SIGKILLed (if still running) and reaped after."""
    procs = Processes(tmp_path_factory.mktemp("proc-logs"))
    try:
        yield procs
    finally:
        procs.reap()


class Tmpfs:
    """Mounts small tmpfs filesystems for one test (a full disk, a read-only one), or skips."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._mounted: list[Path] = []

    def mount(self, options: str = "size=2m,nr_inodes=400") -> Path:
        """A fresh tmpfs mounted with ``options`` (mode 0700 added); skips if that is refused."""
        if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        mount_point = self._root / f"tmpfs-{len(self._mounted)}"
        mount_point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {done.stderr.decode(errors='replace').strip()}")
        self._mounted.append(mount_point)
        return mount_point

    def remount(self, mount_point: Path, options: str) -> None:
        """Change the options of a mount made here (``ro``: a read-only disk)."""
        subprocess.run(
            ["mount", "-o", f"remount,{options}", str(mount_point)], check=True, timeout=30
        )

    def unmount_all(self) -> None:
        for mount_point in reversed(self._mounted):
            subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)


@pytest.fixture
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tmpfs]:
    """``tmpfs.mount(options)``: a small tmpfs of its own; every one is unmounted after."""
    mounts = Tmpfs(tmp_path_factory.mktemp("mounts"))
    try:
        yield mounts
    finally:
        mounts.unmount_all()


def fill_up(directory: Path) -> Path:
    """Write one file in ``directory`` until its filesystem is full; that file's path."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def use_up_inodes(directory: Path) -> list[Path]:
    """Create empty files in ``directory`` until its filesystem has no inode left."""
    made: list[Path] = []
    try:
        while True:
            path = directory / f"inode-{len(made)}"
            path.touch()
            made.append(path)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    return made


@pytest.fixture
def small_tmpfs(tmpfs: Tmpfs) -> Path:
    """A 2 MiB tmpfs with 400 inodes: a build fills it quickly (a full disk), or skip."""
    return tmpfs.mount("size=2m,nr_inodes=400")


def let_other_users_save_coverage() -> None:
    """Let measured children that drop to another uid save their coverage data.

    coverage.py writes each process's data next to the data file, in a directory made by
    the user running the suite; a child that dropped to another uid (tests of liveness
    seen by another user) could not write there, and what it ran went unmeasured. The
    directory becomes sticky and writable by all, as /tmp is. Unmeasured runs: nothing.
    """
    try:
        import coverage
    except ImportError:  # coverage is a test dependency, but the suite runs without it
        return
    current = coverage.Coverage.current()
    if current is None:
        return
    data_dir = Path(current.get_data().data_filename()).parent
    with contextlib.suppress(OSError):
        data_dir.mkdir(parents=True, exist_ok=True)  # made on demand: maybe not yet
        data_dir.chmod(0o1777)


# Written into every inner suite as prewarm_probe.py: what inner builders and tests use to
# leave evidence (a counter of build attempts, one record per test) for the outer test.
PROBE = '''
"""Evidence left by an inner suite for the outer test to check."""

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = os.environ.get("PREWARM_TEST_RUN", "run")
COUNTER = HERE / "counter.jsonl"
RECORDS = HERE / "records" / RUN
# Concurrent runs that must meet share a group; by default each run is its own group.
REQUESTS = HERE / "requests" / os.environ.get("PREWARM_TEST_GROUP", RUN)


def worker():
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def wait_until(predicate, timeout=80.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def count_attempt(path, **extra):
    """Append one line per build attempt (O_APPEND: concurrent appends stay whole)."""
    path = Path(path)
    line = {
        "run": RUN,
        "worker": worker(),
        "pid": os.getpid(),
        "path": str(path),
        "empty": not any(path.iterdir()),
        "siblings": sorted(p.name for p in path.parent.parent.iterdir()),
        **extra,
    }
    with open(COUNTER, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\\n")
    return len(COUNTER.read_text(encoding="utf-8").splitlines())


def announce_request():
    """Say that this process is about to ask for the template."""
    REQUESTS.mkdir(parents=True, exist_ok=True)
    (REQUESTS / f"{worker()}-{os.getpid()}").touch()


def wait_for_requests(count):
    """Block a builder until ``count`` processes have asked for the template.

    The waiters are then provably waiting while the build runs, not arriving after it.
    """
    wait_until(
        lambda: REQUESTS.is_dir() and len(list(REQUESTS.iterdir())) >= count,
        what=f"{count} requests",
    )


def write_files(path, count, kill_after=None):
    """Fill ``path`` with ``count`` files, then a manifest of them, written last."""
    path = Path(path)
    manifest = {}
    for i in range(count):
        data = (f"file {i} ".encode() * (50 + 37 * i))[: 200 + 113 * i]
        (path / f"part-{i:03d}.bin").write_bytes(data)
        manifest[f"part-{i:03d}.bin"] = hashlib.sha256(data).hexdigest()
        if kill_after is not None and i == kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def tree(path):
    """Every file under ``path`` with its sha256."""
    path = Path(path)
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def check_complete(path):
    """Raise unless ``path`` holds exactly the files its manifest lists, all whole."""
    files = tree(path)
    manifest = json.loads(Path(path, "manifest.json").read_text())
    del files["manifest.json"]
    assert files == manifest, f"partial template at {path}"
    return files


def record(kind, **data):
    RECORDS.mkdir(parents=True, exist_ok=True)
    data.update(kind=kind, worker=worker(), pid=os.getpid())
    tmp = RECORDS / f".{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.rename(RECORDS / f"{kind}-{uuid.uuid4().hex}.json")
'''


class Suite:
    """An inner pytest suite in ``pytester.path``, run in real subprocesses."""

    def __init__(
        self, pytester: pytest.Pytester, processes: Processes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.pytester = pytester
        self.processes = processes
        self.monkeypatch = monkeypatch
        self.path = pytester.path
        self.lock_dir = pytester.path / "lock-dir"
        pytester.makepyfile(prewarm_probe=PROBE)

    def write(self, **files: str) -> None:
        """``write(conftest=..., test_x=...)``: dedented Python files in the suite."""
        self.pytester.makepyfile(**{name: textwrap.dedent(src) for name, src in files.items()})

    def run(
        self,
        *args: str,
        lock_dir: bool = True,
        run: str = "run",
        env: dict[str, str] | None = None,
        timeout: float = 100,
    ) -> pytest.RunResult:
        """Run the inner suite in a subprocess, bounded by ``timeout``.

        ``env`` (plus ``PREWARM_TEST_RUN=run``) is set for this run only.
        """
        argv = ["-p", "no:cacheprovider"]
        if lock_dir:
            argv += ["--prewarm-lock-dir", str(self.lock_dir)]
        with self.monkeypatch.context() as patch:
            for name, value in {"PREWARM_TEST_RUN": run, **(env or {})}.items():
                patch.setenv(name, value)
            return self.pytester.runpytest_subprocess(*argv, *args, timeout=timeout)

    def spawn(
        self,
        *args: str,
        lock_dir: bool = True,
        run: str = "run",
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start the inner suite as a plain child process (for concurrent runs)."""
        argv = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider"]
        if lock_dir:
            argv += ["--prewarm-lock-dir", str(self.lock_dir)]
        return self.processes.spawn(
            [*argv, *args], cwd=self.path, env={"PREWARM_TEST_RUN": run, **(env or {})}
        )

    def attempts(self) -> list[dict[str, Any]]:
        """One entry per build attempt, in order."""
        counter = self.path / "counter.jsonl"
        if not counter.exists():
            return []
        return [json.loads(line) for line in counter.read_text().splitlines()]

    def records(self, kind: str, run: str = "run") -> list[dict[str, Any]]:
        folder = self.path / "records" / run
        return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{kind}-*.json"))]


@pytest.fixture
def suite(
    pytester: pytest.Pytester, processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> Suite:
    """An inner suite with ``prewarm_probe`` importable; runs in subprocesses only."""
    _clean_env(monkeypatch)
    return Suite(pytester, processes, monkeypatch)


def template_ids(lock_dir: Path) -> list[str]:
    """Ids of the templates that have a lock file in ``lock_dir``."""
    return sorted(p.name.removesuffix(".lock") for p in (lock_dir / "locks").glob("*.lock"))


# -- The fast tier -------------------------------------------------------------------------
#
# `pytest -m "not slow"` is the fast tier: the tests that stay in this process, or start
# nothing heavier than a short-lived child. A test is marked ``slow`` by rule, never by hand:
#
# - it asks (directly or through other fixtures) for a fixture in SLOW_FIXTURES, which exist
#   to run inner suites and other programs in fresh processes (a module whose every test runs
#   inner sessions asks for ``no_leaky_env`` from an autouse fixture), or
# - its code, the code of a fixture of this suite it uses, or the code of a function or
#   class of this suite that those name, refers to a name in SLOW_NAMES: the ways of starting
#   a nested pytest.
SLOW_FIXTURES = frozenset({"suite", "processes", "no_leaky_env"})
SLOW_NAMES = frozenset({"runpytest_subprocess", "spawn_pytest", "env_without_leaks"})
TESTS_DIR = Path(__file__).resolve().parent
_CONFTEST = Path(__file__).resolve()


def _in_suite(obj: object) -> Path | None:
    """The file under tests/ (other than this one) that defines ``obj``, else None."""
    try:
        path = Path(inspect.getfile(obj)).resolve()  # type: ignore[arg-type]
    except (TypeError, OSError):
        return None
    return path if path.is_relative_to(TESTS_DIR) and path != _CONFTEST else None


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _starts_pytest(obj: object, scope: dict[str, Any], seen: set[int]) -> bool:
    """Whether ``obj`` (a function or class of this suite), or what it names, is in SLOW_NAMES."""
    if id(obj) in seen or _in_suite(obj) is None:
        return False
    seen.add(id(obj))
    if inspect.isclass(obj):
        return any(_starts_pytest(v, scope, seen) for v in vars(obj).values())
    func = inspect.unwrap(getattr(obj, "__func__", obj))  # type: ignore[arg-type]
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    names = _code_names(code)
    if names & SLOW_NAMES:
        return True
    scope = {**getattr(func, "__globals__", {}), **scope}
    return any(_starts_pytest(scope[n], scope, seen) for n in names if n in scope)


def _fixture_defs(item: pytest.Item) -> dict[str, Any]:
    info = getattr(item, "_fixtureinfo", None)
    return dict(info.name2fixturedefs) if info is not None else {}


def _is_slow(item: pytest.Item) -> bool:
    if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    obj = getattr(item, "obj", None)
    cls = getattr(item, "cls", None)
    scope = dict(vars(cls)) if cls is not None else {}
    funcs = [obj] + [defs[-1].func for defs in _fixture_defs(item).values() if defs]
    return any(_starts_pytest(f, scope, set()) for f in funcs if f is not None)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


PYTESTER_SETS = ("PYTEST_ADDOPTS", "PY_COLORS")  # the builtin discards one, sets the other to 0


@pytest.fixture
def pytester(
    pytester: pytest.Pytester, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """The builtin ``pytester``, whose pytest subprocesses get INNER_ADDOPTS and no LEAKY_ENV.

    The builtin discards PYTEST_ADDOPTS; a ``runpytest_subprocess`` run gets what is still
    unset of NESTED_ENV (so INNER_ADDOPTS). An inner run that inherited PYTEST_XDIST_WORKER
    from an outer xdist worker would take itself for that worker: the test fails at once
    instead, saying what to ask for.
    """
    run = pytester.runpytest_subprocess

    def checked(*args: Any, **kwargs: Any) -> pytest.RunResult:
        leaks = [n for n in LEAKY_ENV if n not in PYTESTER_SETS and n in os.environ]
        if leaks:
            pytest.fail(
                f"{request.node.nodeid}: an inner pytest would inherit {', '.join(leaks)}; "
                "ask for the no_leaky_env fixture (or suite), see conftest.LEAKY_ENV",
                pytrace=False,
            )
        with monkeypatch.context() as patch:
            for name, value in NESTED_ENV.items():
                if name not in os.environ:
                    patch.setenv(name, value)
            return run(*args, **kwargs)

    pytester.runpytest_subprocess = checked  # type: ignore[method-assign]
    return pytester
