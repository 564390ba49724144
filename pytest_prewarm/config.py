"""Options, ini settings and their validation, resolved once into a frozen Settings."""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from .clock import MAX_SECONDS

DEFAULT_TIMEOUT = 1800.0  # container image builds take minutes; a hang still ends

DEFAULT_NOTICE_AFTER = 10.0
DEFAULT_REPORT = 10
DEFAULT_TEARDOWN_TIMEOUT = 60.0  # teardown.DEFAULT_TIMEOUT; not imported: start-up stays light
DEFAULT_KEEP_RUNS = 3  # as pytest's tmp_path_retention_count
MAX_AUTO_EAGER_THREADS = 16  # eager.MAX_AUTO_THREADS, for the help text; a test checks

# (option suffix, ini type, help). The same help text serves the option and its ini twin.
_OPTIONS: list[tuple[str, str, str]] = [
    (
        "lock-dir",
        "string",
        "directory for template locks and published templates. Relative paths resolve "
        "against rootdir. Shared by concurrent runs, which then share builds; published "
        "templates are reused by later runs while their key matches. "
        "Default: a fresh directory per test run in the system temp dir, made when the "
        "first template is asked for; the last few are kept (see --prewarm-keep-runs).",
    ),
    (
        "keep-runs",
        "string",
        f"number of ended runs whose per-run default lock dir is kept for inspection, "
        f"the way pytest keeps the last basetemps (default {DEFAULT_KEEP_RUNS}; 0 removes "
        "it at the end of its run). Older ones of this user are removed; a lock dir given "
        "with --prewarm-lock-dir keeps its templates anyway.",
    ),
    (
        "timeout",
        "string",
        f"seconds to wait for another process's build before failing (default "
        f"{DEFAULT_TIMEOUT:.0f}).",
    ),
    ("rebuild", "bool", "build every template afresh, ignoring templates published earlier."),
    (
        "notice-after",
        "string",
        f"print a line naming the holder every N seconds while a wait lasts (default "
        f"{DEFAULT_NOTICE_AFTER:.0f}; 0 disables).",
    ),
    (
        "lock-mode",
        "string",
        "auto, flock or lease. flock: kernel locks, released the moment a holder dies. "
        "lease: claim files with a heartbeat, for filesystems where flock does not exclude "
        "(NFS, VirtioFS, SMB). auto (default) picks lease on such filesystems, else flock.",
    ),
    (
        "stale-after",
        "string",
        "lease mode: seconds a holder of unknown liveness (another host, another pid "
        "namespace) may leave its heartbeat still before its lease is reclaimed. Must be "
        "below the timeout. Default: the smaller of 60 and half the timeout.",
    ),
    (
        "eager",
        "bool",
        "build the templates named by selected tests' prewarm markers early, in "
        "background threads, splitting them across workers (default on). Turn off with "
        "--no-prewarm-eager for builders that must run on the main thread.",
    ),
    (
        "eager-threads",
        "string",
        "how many eager builds one process runs side by side: a number >= 1, or auto "
        f"(default): its share of the marked templates, at most {MAX_AUTO_EAGER_THREADS}. "
        "Use 1 for builds too heavy on memory or CPU to run together.",
    ),
    (
        "teardown-timeout",
        "string",
        f"seconds a template's teardown may run before it is reported as hung and the run "
        f"fails (default {DEFAULT_TEARDOWN_TIMEOUT:.0f}).",
    ),
    (
        "report",
        "string",
        f"number of longest lock waits listed in the terminal summary (default "
        f"{DEFAULT_REPORT}; 0 lists all).",
    ),
    (
        "json",
        "string",
        "write the prewarm report (templates, builds, waits, recoveries, settings) as JSON "
        "to this file; relative paths resolve against the invocation directory.",
    ),
    (
        "keys",
        "string",
        "write the names and keys of the templates to this file, for a CI cache key: with "
        "--collect-only, those the selected tests' markers need; after a run, those it got. "
        "Relative paths resolve against the invocation directory.",
    ),
]


def _dest(suffix: str) -> str:
    return "prewarm_" + suffix.replace("-", "_")


def addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("prewarm", "build shared templates once per run (pytest-prewarm)")
    for suffix, ini_type, help_text in _OPTIONS:
        flag = f"--prewarm-{suffix}"
        if ini_type == "bool":
            group.addoption(
                flag, action="store_true", default=None, dest=_dest(suffix), help=help_text
            )
            if suffix == "eager":
                group.addoption(
                    f"--no-prewarm-{suffix}",
                    action="store_false",
                    dest=_dest(suffix),
                    help="do not build marked templates early; see --prewarm-eager.",
                )
        else:
            group.addoption(
                flag,
                action="store",
                default=None,
                dest=_dest(suffix),
                metavar=suffix.split("-")[-1].upper(),
                help=help_text,
            )
        parser.addini(_dest(suffix), help_text, type=ini_type, default=None)  # type: ignore[arg-type]
    group.addoption(
        "--prewarm-supply",
        action="append",
        default=[],
        dest="prewarm_supply",
        metavar="NAME=DIR",
        help=SUPPLY_HELP,
    )
    parser.addini("prewarm_supply", SUPPLY_HELP, type="linelist", default=[])


SUPPLY_HELP = (
    "use the existing directory DIR as template NAME, never building, changing or "
    "deleting it (repeatable; also PYTEST_PREWARM_SUPPLY=NAME=DIR[:NAME=DIR...]). "
    "The command line wins over the environment, which wins over the ini file."
)


SUPPLY_ENV_VAR = "PYTEST_PREWARM_SUPPLY"  # supply.ENV_VAR, spelled out: start-up stays light


def _supplied(config: pytest.Config) -> dict[str, Any]:
    where = f" in {config.inipath}" if config.inipath else ""
    specs = [(spec, "--prewarm-supply") for spec in config.getoption("prewarm_supply") or []]
    env = os.environ.get(SUPPLY_ENV_VAR, "")
    specs += [(spec, SUPPLY_ENV_VAR) for spec in env.split(os.pathsep) if spec.strip()]
    specs += [(spec, f"ini prewarm_supply{where}") for spec in config.getini("prewarm_supply")]
    if not specs:
        return {}
    from . import supply  # only runs that supply a template pay for it
    from .exceptions import PrewarmUsageError

    try:
        return supply.parse(specs, config.invocation_params.dir)
    except PrewarmUsageError as exc:
        raise pytest.UsageError(f"prewarm: {exc}") from None


# NamedTuples, not frozen dataclasses: as immutable, and a sixth of the cost to define,
# in a module that every pytest run imports.
class Setting(NamedTuple):
    value: Any
    source: str  # "--prewarm-timeout", "ini prewarm_timeout in tox.ini", "default"


def _raw(config: pytest.Config, suffix: str) -> Setting | None:
    """Command line first, then ini; ``None`` when neither sets it (a 0 is kept)."""
    name = _dest(suffix)
    value = config.getoption(name)
    if value is not None:
        return Setting(value, f"--prewarm-{suffix}")
    value = config.getini(name)
    if value is not None and value != "":
        where = f" in {config.inipath}" if config.inipath else ""
        return Setting(value, f"ini {name}{where}")
    return None


def _seconds(config: pytest.Config, suffix: str, default: float, *, zero_ok: bool) -> Setting:
    raw = _raw(config, suffix)
    if raw is None:
        return Setting(default, "default")
    try:
        value = float(raw.value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        need = "a number of seconds >= 0" if zero_ok else "a number of seconds > 0"
        raise pytest.UsageError(
            f"prewarm: {raw.value!r} from {raw.source} is not valid; it must be {need}, "
            f"for example --prewarm-{suffix}={default:g}"
        )
    if value > MAX_SECONDS:
        raise pytest.UsageError(
            f"prewarm: {raw.value!r} from {raw.source} is too large; the most is "
            f"{MAX_SECONDS:g} s (about 3 years), for example --prewarm-{suffix}={default:g}"
        )
    return Setting(value, raw.source)


# request.MIN_NOTICE_EVERY, spelt out: start-up stays light. Below it the wait loop would
# print a notice on every pass; it clamps to this anyway, so a smaller value is a mistake.
MIN_NOTICE_AFTER = 0.1


def _notice_after(config: pytest.Config) -> Setting:
    notice = _seconds(config, "notice-after", DEFAULT_NOTICE_AFTER, zero_ok=True)
    if 0 < notice.value < MIN_NOTICE_AFTER:
        raise pytest.UsageError(
            f"prewarm: {notice.value:g} from {notice.source} is too short; the interval "
            f"between notices must be 0 (no notices) or at least {MIN_NOTICE_AFTER:g} s, "
            f"for example --prewarm-notice-after={DEFAULT_NOTICE_AFTER:g}"
        )
    return notice


def _count(config: pytest.Config, suffix: str, default: int) -> int:
    raw = _raw(config, suffix)
    if raw is None:
        return default
    try:
        value = int(str(raw.value))
    except ValueError:
        value = -1
    if value < 0:
        raise pytest.UsageError(
            f"prewarm: {raw.value!r} from {raw.source} is not valid; it must be a whole "
            f"number >= 0, for example --prewarm-{suffix}={default}"
        )
    return value


def _eager_threads(config: pytest.Config) -> int | None:
    raw = _raw(config, "eager-threads")
    if raw is None or str(raw.value).strip().lower() == "auto":
        return None
    try:
        value = int(str(raw.value).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(
            f"prewarm: {raw.value!r} from {raw.source} is not valid; it must be auto or a "
            "whole number >= 1, for example --prewarm-eager-threads=4"
        )
    return value


# kinds.LockMode's values, spelt out: the enum module is not worth loading at start-up in
# every run (a test checks the two agree). Settings carry the mode as a plain string.
LOCK_MODES = ("auto", "flock", "lease")


def heartbeat_for(stale_after: float) -> float:
    """Lease heartbeat interval: a fifth of the stale window, within [0.02, 2] s."""
    return min(2.0, max(0.02, stale_after / 5))


MIN_HEARTBEATS = 3  # a stale window shorter than this many heartbeats misjudges a slow beat


def _lock_mode(config: pytest.Config) -> Setting:
    raw = _raw(config, "lock-mode")
    if raw is None:
        return Setting("auto", "default")
    value = str(raw.value).strip().lower()
    if value not in LOCK_MODES:
        raise pytest.UsageError(
            f"prewarm: lock mode {raw.value!r} from {raw.source} is not one of "
            f"{', '.join(LOCK_MODES)}; for example --prewarm-lock-mode=auto"
        )
    return Setting(value, raw.source)


def _stale_after(config: pytest.Config, timeout: Setting) -> Setting:
    given = _raw(config, "stale-after") is not None
    default = min(60.0, timeout.value / 2)
    stale = _seconds(config, "stale-after", default, zero_ok=False)
    if not given:
        return Setting(default, f"default: min(60, timeout / 2), timeout from {timeout.source}")
    # The unknown-owner window must end before any waiter gives up, or a crashed holder
    # on another host makes every waiter time out instead of taking over.
    if stale.value >= timeout.value:
        raise pytest.UsageError(
            f"prewarm: the stale window {stale.value:g} s (from {stale.source}) must be "
            f"below the timeout {timeout.value:g} s (from {timeout.source}); lower "
            "--prewarm-stale-after or raise --prewarm-timeout"
        )
    heartbeat = heartbeat_for(stale.value)
    if stale.value < MIN_HEARTBEATS * heartbeat:
        raise pytest.UsageError(
            f"prewarm: the stale window {stale.value:g} s (from {stale.source}) is shorter "
            f"than {MIN_HEARTBEATS} heartbeats of {heartbeat:g} s; use at least "
            f"{MIN_HEARTBEATS * heartbeat:g} s (timeout {timeout.value:g} s from "
            f"{timeout.source})"
        )
    return stale


def _expanded(text: str, what: str, source: str, fix: str) -> Path:
    """``text`` as a path with ``~`` expanded; a home that cannot be found is a usage error."""
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # "~someone" who has no home on this machine
        raise pytest.UsageError(f"prewarm: {what} {text!r} from {source}: {exc}; {fix}") from None


def _lock_dir_path(config: pytest.Config, text: str, source: str) -> Path:
    """The lock dir the user named; the filesystem root and the rootdir are refused.

    A lock dir is emptied of stale builds and trash: pointing it at a directory full of
    the user's own files (an empty value resolves to the rootdir) must fail at once.
    """
    fix = "pass a directory of its own, for example --prewarm-lock-dir=.prewarm"
    if not text.strip():
        raise pytest.UsageError(
            f"prewarm: lock dir {text!r} from {source} is empty, which would mean the "
            f"rootdir {config.rootpath}; {fix}"
        )
    path = _expanded(text, "lock dir", source, fix)
    if not path.is_absolute():
        path = config.rootpath / path
    from .trust import link_problem  # only runs that name a lock dir pay for it

    problem = link_problem(path)
    if problem is not None:
        raise pytest.UsageError(f"prewarm: {problem} (value {text!r} from {source})")
    real = Path(os.path.realpath(path))
    if real == Path(real.anchor):
        raise pytest.UsageError(
            f"prewarm: lock dir {text!r} from {source} is the root {real}; {fix}"
        )
    if real == Path(os.path.realpath(config.rootpath)):
        raise pytest.UsageError(
            f"prewarm: lock dir {text!r} from {source} is the rootdir {config.rootpath} "
            f"itself; {fix}"
        )
    return real


def _output_file(config: pytest.Config, suffix: str, example: str) -> Path | None:
    """A file the plugin writes at the end, checked now: a directory, or unwritable, fails."""
    raw = _raw(config, suffix)
    if raw is None:
        return None
    path = _expanded(str(raw.value), "report file", raw.source, f"give a path such as {example}")
    if not path.is_absolute():
        path = config.invocation_params.dir / path
    if path.is_dir():
        raise pytest.UsageError(
            f"prewarm: report file {str(path)!r} from {raw.source} is a directory; give a "
            f"file name such as {example}"
        )
    _check_writable_target(path, raw.source)
    return path


def _check_writable_target(path: Path, source: str) -> None:
    """A report file must be creatable: fail at start-up, not after the whole run."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return
    raise pytest.UsageError(
        f"prewarm: report file {str(path)!r} from {source} cannot be written ({parent} is "
        "not a writable directory); give a path in a writable directory"
    )


class Settings(NamedTuple):
    lock_dir: Setting  # value: Path | None (None: per-run default dir)
    timeout: Setting
    rebuild: bool
    notice_after: Setting
    report_top: int
    json_path: Path | None
    lock_mode: Setting
    stale_after: Setting
    eager: bool = True
    supplied: dict[str, Any] = {}  # noqa: RUF012 - name -> supply.Supplied; never mutated
    keys_path: Path | None = None
    teardown_timeout: Setting = Setting(DEFAULT_TEARDOWN_TIMEOUT, "default")
    keep_runs: int = DEFAULT_KEEP_RUNS
    eager_threads: int | None = None  # None: auto

    @property
    def heartbeat(self) -> float:
        return heartbeat_for(self.stale_after.value)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "Settings":
        lock_raw = _raw(config, "lock-dir")
        lock_dir = Setting(None, "default")
        if lock_raw is not None:
            text = str(lock_raw.value)
            if "\x00" in text:
                raise pytest.UsageError(
                    f"prewarm: lock dir {text!r} from {lock_raw.source} contains a NUL byte; "
                    "pass a writable directory with --prewarm-lock-dir (or ini "
                    "prewarm_lock_dir)"
                )
            lock_dir = Setting(_lock_dir_path(config, text, lock_raw.source), lock_raw.source)
        rebuild = _raw(config, "rebuild")
        eager = _raw(config, "eager")
        timeout = _seconds(config, "timeout", DEFAULT_TIMEOUT, zero_ok=False)
        return cls(
            lock_dir=lock_dir,
            timeout=timeout,
            rebuild=bool(rebuild.value) if rebuild is not None else False,
            notice_after=_notice_after(config),
            report_top=_count(config, "report", DEFAULT_REPORT),
            json_path=_output_file(config, "json", "prewarm-report.json"),
            keys_path=_output_file(config, "keys", "prewarm-keys.txt"),
            eager=bool(eager.value) if eager is not None else True,
            lock_mode=_lock_mode(config),
            stale_after=_stale_after(config, timeout),
            supplied=_supplied(config),
            teardown_timeout=_seconds(
                config, "teardown-timeout", DEFAULT_TEARDOWN_TIMEOUT, zero_ok=False
            ),
            keep_runs=_count(config, "keep-runs", DEFAULT_KEEP_RUNS),
            eager_threads=_eager_threads(config),
        )

    def as_dict(self, *, lock_dir: Path, lock_mode: str) -> dict[str, Any]:
        """Effective settings for the JSON report."""
        return {
            "lock_dir": str(lock_dir),
            "lock_dir_source": self.lock_dir.source,
            "lock_mode": str(lock_mode),
            "lock_mode_source": self.lock_mode.source,
            "timeout": self.timeout.value,
            "rebuild": self.rebuild,
            "notice_after": self.notice_after.value,
            "eager": self.eager,
            "eager_threads": "auto" if self.eager_threads is None else self.eager_threads,
            "stale_after": self.stale_after.value,
            "supplied": {name: str(s.path) for name, s in self.supplied.items()},
            "teardown_timeout": self.teardown_timeout.value,
            "keep_runs": self.keep_runs,
        }
