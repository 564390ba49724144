"""Options and ini settings: resolution, and start-up errors that say what to fix."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_prewarm.config import DEFAULT_TIMEOUT, Settings

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR
LOCK_DIR_HINT = "pass a writable directory with --prewarm-lock-dir"


def usage_error_text(result: pytest.RunResult) -> str:
    assert result.ret == USAGE_ERROR, result.stdout.str() + result.stderr.str()
    return result.stderr.str()


def ini(pytester: pytest.Pytester, **values: str) -> Path:
    lines = "\n".join(f"{name} = {value}" for name, value in values.items())
    return pytester.makeini(f"[pytest]\n{lines}\n")


# -- numbers -------------------------------------------------------------------------------

BAD_TIMEOUTS = ["abc", "-1", "0", "-0.5", "nan", "inf", ""]


@pytest.mark.parametrize("value", BAD_TIMEOUTS)
def test_bad_timeout_on_the_command_line_is_a_usage_error_naming_value_and_option(pytester, value):
    text = usage_error_text(pytester.runpytest(f"--prewarm-timeout={value}"))

    assert f"{value!r} from --prewarm-timeout is not valid" in text
    assert "a number of seconds > 0" in text
    assert f"--prewarm-timeout={DEFAULT_TIMEOUT:g}" in text  # what to write instead


@pytest.mark.parametrize("value", [v for v in BAD_TIMEOUTS if v])
def test_bad_timeout_in_the_ini_file_is_a_usage_error_naming_the_file(pytester, value):
    path = ini(pytester, prewarm_timeout=value)

    text = usage_error_text(pytester.runpytest())

    assert f"{value!r} from ini prewarm_timeout in {path} is not valid" in text
    assert "a number of seconds > 0" in text


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_bad_notice_after_is_a_usage_error(pytester, value):
    text = usage_error_text(pytester.runpytest(f"--prewarm-notice-after={value}"))

    assert f"{value!r} from --prewarm-notice-after is not valid" in text
    assert "a number of seconds >= 0" in text


def test_command_line_wins_over_the_ini_file(pytester):
    ini(pytester, prewarm_timeout="abc", prewarm_notice_after="7")

    settings = Settings.from_config(pytester.parseconfig("--prewarm-timeout=2.5"))

    assert settings.timeout.value == 2.5
    assert settings.timeout.source == "--prewarm-timeout"
    assert settings.notice_after.value == 7.0
    assert settings.notice_after.source.startswith("ini prewarm_notice_after in ")


def test_a_notice_after_below_the_shortest_interval_is_a_usage_error(pytester):
    text = usage_error_text(pytester.runpytest("--prewarm-notice-after=0.000001"))

    assert "1e-06 from --prewarm-notice-after is too short" in text
    assert "must be 0 (no notices) or at least 0.1 s" in text


def test_the_shortest_notice_interval_agrees_with_the_wait_loops(pytester):
    from pytest_prewarm.config import MIN_NOTICE_AFTER
    from pytest_prewarm.request import MIN_NOTICE_EVERY

    assert MIN_NOTICE_AFTER == MIN_NOTICE_EVERY
    settings = Settings.from_config(
        pytester.parseconfig(f"--prewarm-notice-after={MIN_NOTICE_AFTER}")
    )
    assert settings.notice_after.value == MIN_NOTICE_AFTER


def test_a_zero_notice_after_is_kept_and_not_replaced_by_the_default(pytester):
    settings = Settings.from_config(pytester.parseconfig("--prewarm-notice-after=0"))

    assert settings.notice_after.value == 0
    assert settings.notice_after.source == "--prewarm-notice-after"


def test_defaults_say_they_are_defaults(pytester):
    settings = Settings.from_config(pytester.parseconfig())

    assert settings.timeout.value == DEFAULT_TIMEOUT
    assert settings.timeout.source == "default"
    assert settings.lock_dir.value is None
    assert settings.rebuild is False


def test_rebuild_can_be_set_in_the_ini_file(pytester):
    ini(pytester, prewarm_rebuild="true")

    assert Settings.from_config(pytester.parseconfig()).rebuild is True


# -- the lock dir --------------------------------------------------------------------------


def test_lock_dir_that_is_a_file_is_a_usage_error_on_the_command_line(pytester):
    path = pytester.path / "a-file"
    path.write_text("not a directory")

    text = usage_error_text(pytester.runpytest(f"--prewarm-lock-dir={path}"))

    assert f"lock dir {str(path)!r} exists and is not a directory" in text
    assert "came from --prewarm-lock-dir" in text
    assert LOCK_DIR_HINT in text
    assert path.read_text() == "not a directory"


def test_lock_dir_that_is_a_file_is_a_usage_error_in_the_ini_file(pytester):
    (pytester.path / "a-file").write_text("")
    path = ini(pytester, prewarm_lock_dir="a-file")

    text = usage_error_text(pytester.runpytest())

    assert f"lock dir {str(pytester.path / 'a-file')!r} exists and is not a directory" in text
    assert f"came from ini prewarm_lock_dir in {path}" in text
    assert LOCK_DIR_HINT in text


def test_lock_dir_below_a_file_is_a_usage_error(pytester):
    (pytester.path / "a-file").write_text("")
    path = pytester.path / "a-file" / "locks"

    text = usage_error_text(pytester.runpytest(f"--prewarm-lock-dir={path}"))

    assert f"cannot create lock dir {str(path)!r}" in text
    assert "came from --prewarm-lock-dir" in text
    assert LOCK_DIR_HINT in text


def test_lock_dir_with_a_nul_byte_is_a_usage_error_on_the_command_line(pytester):
    text = usage_error_text(pytester.runpytest("--prewarm-lock-dir=locks\x00evil"))

    assert "'locks\\x00evil' from --prewarm-lock-dir contains a NUL byte" in text
    assert LOCK_DIR_HINT in text


def test_lock_dir_with_a_nul_byte_is_a_usage_error_in_the_ini_file(pytester):
    path = ini(pytester, prewarm_lock_dir="locks\x00evil")

    text = usage_error_text(pytester.runpytest())

    assert f"'locks\\x00evil' from ini prewarm_lock_dir in {path} contains a NUL byte" in text
    assert LOCK_DIR_HINT in text


def _read_only_runner() -> list[str] | None:
    """A command prefix that runs its arguments with ``$0`` made read-only, or None.

    root ignores permission bits, so for root the directory becomes a read-only bind mount
    in a private mount namespace (nothing outside the command sees it); anyone else gets
    a plain chmod.
    """
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    probe = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script, "/tmp", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return None
    return [unshare, "-m", "--propagation", "private", "sh", "-c", script]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits and mounts")
@pytest.mark.parametrize("inside", [False, True], ids=["the-dir", "a-subdir"])
def test_lock_dir_on_a_read_only_filesystem_is_a_usage_error(pytester, processes, inside):
    runner = _read_only_runner()
    if runner is None:
        pytest.skip(
            "running as root, and no read-only bind mount is possible here (unshare/mount "
            "need CAP_SYS_ADMIN); root ignores permission bits, so there is no other way "
            "to make an unwritable directory"
        )
    read_only = pytester.path / "read-only"
    read_only.mkdir()
    lock_dir = read_only / "locks" if inside else read_only
    pytest_argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--prewarm-lock-dir={lock_dir}",
    ]
    if runner:
        argv = [*runner, str(read_only), *pytest_argv]
    else:
        read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
        argv = pytest_argv

    proc = processes.spawn(argv, cwd=pytester.path)

    assert proc.wait(timeout=60) == USAGE_ERROR, proc.output()
    text = proc.output()
    expected = (
        f"cannot create lock dir {str(lock_dir)!r}"
        if inside
        else f"lock dir {str(lock_dir)!r} is not writable"
    )
    assert expected in text
    assert "came from --prewarm-lock-dir" in text
    assert LOCK_DIR_HINT in text
    assert list(read_only.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_lock_dir_is_created_owner_only(pytester):
    lock_dir = pytester.path / "new" / "locks"
    pytester.makepyfile(
        "def test_uses(prewarmed_template):\n    prewarmed_template('db', lambda path: None)\n"
    )

    pytester.runpytest(f"--prewarm-lock-dir={lock_dir}").assert_outcomes(passed=1)

    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o700
    for sub in lock_dir.iterdir():
        if sub.is_dir():
            assert stat.S_IMODE(sub.stat().st_mode) == 0o700, sub


def test_relative_lock_dir_in_the_ini_file_resolves_against_rootdir(suite, monkeypatch):
    suite.pytester.makeini("[pytest]\nprewarm_lock_dir = relative/locks\n")
    sub = suite.path / "sub"
    sub.mkdir()
    (sub / "test_where.py").write_text(
        "import os\n"
        "from pathlib import Path\n\n\n"
        "def test_where(prewarmed_template):\n"
        "    template = prewarmed_template('db', lambda path: None)\n"
        "    Path(__file__).with_name('where.txt').write_text(os.fspath(template))\n"
    )
    monkeypatch.chdir(sub)

    result = suite.run(lock_dir=False)

    result.assert_outcomes(passed=1)
    where = Path((sub / "where.txt").read_text())
    assert where.is_relative_to(suite.path / "relative" / "locks" / "templates")
    assert not (sub / "relative").exists()


# -- the report ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "abc", "2.5"])
def test_a_report_size_that_is_not_a_whole_number_is_a_usage_error(pytester, value):
    with pytest.raises(pytest.UsageError) as info:
        Settings.from_config(pytester.parseconfig(f"--prewarm-report={value}"))

    assert str(info.value) == (
        f"prewarm: {value!r} from --prewarm-report is not valid; it must be a whole number "
        ">= 0, for example --prewarm-report=10"
    )


def test_a_report_size_of_zero_is_kept(pytester):
    assert Settings.from_config(pytester.parseconfig("--prewarm-report=0")).report_top == 0


def test_a_json_report_path_that_is_a_directory_is_a_usage_error(pytester):
    (pytester.path / "reports").mkdir()

    with pytest.raises(pytest.UsageError) as info:
        Settings.from_config(pytester.parseconfig("--prewarm-json=reports"))

    assert str(info.value) == (
        f"prewarm: report file {str(pytester.path / 'reports')!r} from --prewarm-json is a "
        "directory; give a file name such as prewarm-report.json"
    )


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_teardown_timeout_is_a_usage_error(pytester, value):
    text = usage_error_text(pytester.runpytest(f"--prewarm-teardown-timeout={value}"))

    assert f"{value!r} from --prewarm-teardown-timeout is not valid" in text
    assert "--prewarm-teardown-timeout=60" in text


def test_the_teardown_timeout_comes_from_the_ini_file_and_defaults_to_60(pytester):
    assert Settings.from_config(pytester.parseconfig()).teardown_timeout.value == 60.0
    ini(pytester, prewarm_teardown_timeout="2.5")

    settings = Settings.from_config(pytester.parseconfig())

    assert settings.teardown_timeout.value == 2.5
    assert settings.teardown_timeout.source.startswith("ini prewarm_teardown_timeout in ")


# -- eager threads ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-2", "many", "2.5", ""])
def test_a_bad_eager_thread_count_is_a_usage_error_naming_value_and_option(pytester, value):
    text = usage_error_text(pytester.runpytest(f"--prewarm-eager-threads={value}"))

    assert f"{value!r} from --prewarm-eager-threads is not valid" in text
    assert "auto or a whole number >= 1, for example --prewarm-eager-threads=4" in text


def test_the_eager_thread_count_is_auto_by_default_and_comes_from_option_or_ini(pytester):
    assert Settings.from_config(pytester.parseconfig()).eager_threads is None
    assert (
        Settings.from_config(pytester.parseconfig("--prewarm-eager-threads=AUTO")).eager_threads
        is None
    )
    ini(pytester, prewarm_eager_threads="3")
    assert Settings.from_config(pytester.parseconfig()).eager_threads == 3
    settings = Settings.from_config(pytester.parseconfig("--prewarm-eager-threads=1"))
    assert settings.eager_threads == 1  # the command line wins
    assert settings.as_dict(lock_dir=pytester.path, lock_mode="flock")["eager_threads"] == 1
