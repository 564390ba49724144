"""A build's output is logged as it is written, passed on, and cut to a tail for its error.

BuildOutput is driven directly in this process, as the request code drives it: the test's
own stdout and stderr (pytest's capture) play the build's original destination, and the
builder's writes are real writes to fds 1 and 2 and to sys.stdout / sys.stderr, some of
them by a child process that inherits the fds.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import fill_up, wait_until

from pytest_prewarm import capture
from pytest_prewarm.capture import TAIL_CHARS, BuildOutput, command_output, tail


@pytest.fixture(autouse=True)
def traced_pumps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the fd pumps through ``threading``, the one way coverage.py sees a thread.

    capture.py starts each pump with ``_thread.start_new_thread`` (it says why); coverage
    measures only threads that ``threading`` starts. The pump runs the same code either way.
    """

    def start(function: Callable[[], None], args: tuple[()]) -> None:
        threading.Thread(target=function, args=args, name="test-pump", daemon=True).start()

    monkeypatch.setattr(capture, "_thread", types.SimpleNamespace(start_new_thread=start))


def child(code: str) -> None:
    """Run ``code`` in a short-lived Python child that inherits fds 1 and 2."""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def output(tmp_path: Path, *, redirect: bool = True) -> BuildOutput:
    return BuildOutput(tmp_path / "build.partial", "header line\n", redirect=redirect)


class Passed:
    """What reached the test's own stdout and stderr, read as it arrives (capfd)."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.text = ""

    def read(self) -> str:
        out, err = self.capfd.readouterr()
        self.text += out + err
        return self.text


# -- the main thread: fds and streams redirected --------------------------------------------


def test_in_the_main_thread_every_write_is_logged_once_kept_in_the_tail_and_passed_on(
    tmp_path, capfd
):
    final = tmp_path / "build.log"
    lines = [
        "print line",
        "stderr line",
        "fd 1 line",
        "child out",
        "child err",
        "lines 1",
        "lines 2",
    ]

    with output(tmp_path) as out:
        print("print line")
        sys.stderr.write("stderr line\n")
        os.write(1, b"fd 1 line\n")
        child("import sys; print('child out'); print('child err', file=sys.stderr)")
        sys.stdout.writelines(["lines 1\n", "lines 2\n"])

    assert not out.empty
    assert out.save(final, "summary line\n") == final
    assert not (tmp_path / "build.partial").exists()
    log = final.read_text()
    assert log.startswith("header line\n")
    assert log.endswith("summary line\n")
    passed = Passed(capfd).read()
    for line in lines:  # two pumps (fds 1 and 2) add what they read: lines may interleave
        assert log.count(line) == 1, (line, log)
        assert line in out.tail()
        assert passed.count(line) == 1, (line, passed)


def test_after_the_build_fds_and_streams_are_what_they_were(tmp_path):
    before = (sys.stdout, sys.stderr, os.fstat(1).st_ino, os.fstat(2).st_ino)

    with output(tmp_path) as out:
        assert sys.stdout is not before[0]
        assert os.fstat(1).st_ino != before[2]  # a pipe while the build runs
    out.discard()

    assert (sys.stdout, sys.stderr, os.fstat(1).st_ino, os.fstat(2).st_ino) == before


def test_what_other_threads_write_meanwhile_is_passed_on_but_not_logged(tmp_path, capfd):
    with output(tmp_path) as out:
        print("the build's")
        other = threading.Thread(target=print, args=("another thread's",))
        other.start()
        other.join()

    assert "the build's" in out.tail()
    assert "another thread's" not in out.tail()
    assert "another thread's\n" in Passed(capfd).read()
    out.discard()


def test_a_stream_that_writes_to_a_captured_fd_is_logged_once_not_twice(tmp_path, monkeypatch):
    # As under pytest -s: sys.stdout writes straight to fd 1, which the build captures.
    on_fd_1 = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdout", on_fd_1)
    try:
        with output(tmp_path) as out:
            print("once")
    finally:
        on_fd_1.close()

    assert out.tail() == "once"


def test_a_stream_without_a_file_descriptor_is_teed_and_keeps_its_own_methods(
    tmp_path, monkeypatch
):
    sink = io.StringIO()
    monkeypatch.setattr(sys, "stdout", sink)

    with output(tmp_path) as out:
        print("to a StringIO")
        seen_inside = sys.stdout.getvalue()  # the tee passes other attributes through

    assert sys.stdout is sink
    assert seen_inside == sink.getvalue() == "to a StringIO\n"
    assert out.tail() == "to a StringIO"


def test_a_missing_stderr_stream_is_left_missing_and_fd_2_is_still_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)

    with output(tmp_path) as out:
        assert sys.stderr is None
        os.write(2, b"fd 2 still\n")
        print("stdout still")

    assert sys.stderr is None
    assert "fd 2 still" in out.tail()
    assert "stdout still" in out.tail()


def test_a_stream_the_build_replaced_is_not_put_back_by_the_end_of_the_build(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # the test's own, restored after
    theirs = io.StringIO()

    with output(tmp_path) as out:
        print("before")
        sys.stdout = theirs
        print("after")

    assert sys.stdout is theirs
    assert theirs.getvalue() == "after\n"
    assert out.tail() == "before"


def test_output_that_looks_like_the_start_of_the_end_token_is_logged_whole(tmp_path):
    final = tmp_path / "build.log"
    with output(tmp_path) as out:
        token = out._fd_tees[0]._token  # the fd 1 pump's end-of-build token
        os.write(1, b"x" + token[:15])  # ends like the token, which follows at stop()
        os.write(1, b"\n" + token[:8] + b"y\n")

    assert out.save(final, "") == final
    assert final.read_bytes() == b"header line\nx" + token[:15] + b"\n" + token[:8] + b"y\n"


def test_a_child_that_outlives_the_build_is_passed_on_but_not_logged(tmp_path, capfd):
    go = tmp_path / "go"
    code = (
        "import pathlib, time\n"
        f"go = pathlib.Path({str(go)!r})\n"
        "deadline = time.monotonic() + 60\n"
        "while not go.exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.005)\n"  # polls a file the test creates, with a bound
        "print('after the build', flush=True)\n"
    )
    with output(tmp_path) as out:
        late = subprocess.Popen([sys.executable, "-c", code])
        print("during the build")
    try:
        go.touch()
        assert late.wait(timeout=60) == 0
    finally:
        late.kill()
        late.wait(timeout=30)
    passed = Passed(capfd)
    wait_until(lambda: "after the build\n" in passed.read(), 30, what="the late line")

    assert out.tail() == "during the build"


# -- any other thread: nothing redirected ---------------------------------------------------


def test_in_another_thread_nothing_is_redirected_and_the_log_has_only_its_header(tmp_path):
    seen: dict[str, object] = {}

    def build() -> None:
        fd_1 = os.fstat(1).st_ino
        with output(tmp_path, redirect=False) as out:
            seen["stdout"] = sys.stdout
            seen["fd 1 unchanged"] = os.fstat(1).st_ino == fd_1
            print("not the build's to log")
        seen["empty"] = out.empty
        seen["tail"] = out.tail()
        seen["saved"] = out.save(tmp_path / "build.log", "")

    before = sys.stdout
    worker = threading.Thread(target=build)
    worker.start()
    worker.join(60)

    assert seen == {
        "stdout": before,
        "fd 1 unchanged": True,
        "empty": True,
        "tail": "",
        "saved": tmp_path / "build.log",
    }
    assert (tmp_path / "build.log").read_text() == "header line\n"


# -- the log file ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink to a victim"])
def test_something_planted_at_the_log_path_is_neither_opened_nor_touched(tmp_path, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    planted = tmp_path / "build.partial"
    if kind == "fifo":
        os.mkfifo(planted)
    elif kind == "directory":
        planted.mkdir()
    else:
        planted.symlink_to(victim)

    out = output(tmp_path)  # an open of a FIFO could block: O_EXCL refuses it first
    with out:
        print("still captured")

    assert out.path is None  # no log for this build
    assert out.tail() == "still captured"
    assert out.save(tmp_path / "build.log", "summary") is None
    assert not (tmp_path / "build.log").exists()
    assert os.path.lexists(planted)
    assert victim.read_text() == "mine"


def test_without_a_log_path_the_output_is_kept_in_memory_only(tmp_path):
    out = BuildOutput(None, "header", redirect=False)
    out.add(b"kept\n")

    assert out.tail() == "kept"
    assert out.save(tmp_path / "build.log", "summary") is None
    out.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_log_that_cannot_be_moved_into_place_is_removed_and_the_tail_kept(tmp_path):
    out = output(tmp_path, redirect=False)
    out.add(b"the output\n")

    assert out.save(tmp_path / "missing-dir" / "build.log", "summary") is None

    assert list(tmp_path.iterdir()) == []
    assert out.tail() == "the output"
    out.discard()  # a second end is harmless


def test_output_after_the_end_is_ignored(tmp_path):
    out = output(tmp_path, redirect=False)
    out.add(b"")
    assert out.empty
    out.add(b"in time\n")
    final = out.save(tmp_path / "build.log", "summary\n")

    out.add(b"too late\n")

    assert final is not None
    assert final.read_text() == "header line\nin time\nsummary\n"
    assert out.tail() == "in time"


def test_a_full_disk_stops_the_log_but_not_the_build(small_tmpfs):
    out = BuildOutput(small_tmpfs / "build.partial", "header line\n", redirect=False)
    fill_up(small_tmpfs)

    out.add(b"x" * 100_000 + b"\n")  # fails part way: the log stops there
    out.add(b"the last line\n")  # kept in memory only
    logged = (small_tmpfs / "build.partial").stat().st_size
    final = out.save(small_tmpfs / "build.log", "summary\n")

    assert out.tail().endswith("\nthe last line")
    assert final == small_tmpfs / "build.log"
    assert final.stat().st_size == logged  # nothing was written after the failed write
    assert b"the last line" not in final.read_bytes()


# -- the tail -------------------------------------------------------------------------------


def test_the_tail_of_a_long_output_counts_every_line_it_left_out(tmp_path):
    out = BuildOutput(None, "", redirect=False)
    for i in range(3000):  # 30 000 bytes: more than is kept in memory
        out.add(f"line {i:04d}\n".encode())

    shown = out.tail().split("\n")

    assert shown[0] == "[... 2970 earlier lines]"
    assert shown[1:] == [f"line {i:04d}" for i in range(2970, 3000)]


def test_an_unfinished_last_line_counts_as_a_line():
    out = BuildOutput(None, "", redirect=False)
    out.add(b"a\nb\n" * 20)
    out.add(b"no newline yet")

    assert out.tail().split("\n")[0] == "[... 11 earlier lines]"
    assert out.tail().endswith("\nb\nno newline yet")


@pytest.mark.parametrize(
    ("text", "earlier", "expected"),
    [
        ("", 0, ""),
        (" \n\n", 3, ""),
        ("one\r\ntwo\n", 0, "one\ntwo"),
        ("10%\r50%\r100%\ndone", 0, "100%\ndone"),  # a progress bar: its last state
        ("only", 1, "[... 1 earlier line]\nonly"),
    ],
)
def test_tail_keeps_the_last_lines_a_terminal_would_show(text, earlier, expected):
    assert tail(text, earlier) == expected


def test_tail_keeps_the_last_lines_and_counts_the_rest():
    shown = tail("\n".join(f"l{i}" for i in range(100))).split("\n")

    assert shown == ["[... 70 earlier lines]"] + [f"l{i}" for i in range(70, 100)]


def test_tail_keeps_at_most_its_characters_and_the_end_of_one_huge_line():
    long_lines = "\n".join("y" * 200 for _ in range(30))
    huge = "z" * 10_000 + "END"

    assert tail(long_lines).split("\n")[0] == "[... 10 earlier lines]"
    assert len(tail(long_lines)) <= TAIL_CHARS + len("[... 10 earlier lines]\n")
    assert tail(huge) == "..." + huge[-(TAIL_CHARS - 3) :]
    assert tail(huge).endswith("END")


# -- a failed command's own output ----------------------------------------------------------


def failed_command() -> subprocess.CalledProcessError:
    try:
        subprocess.run(
            [sys.executable, "-c", "import sys; print('out'); sys.exit('err')"],
            capture_output=True,
            check=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        return exc
    raise AssertionError("the command did not fail")


def test_the_failed_commands_output_is_found_through_causes_and_contexts():
    command = failed_command()
    try:
        try:
            raise command
        except subprocess.CalledProcessError:
            raise KeyError("during handling") from ValueError("explicit cause")
    except KeyError as exc:
        handled = exc
    assert handled.__cause__ is not None
    handled.__cause__.__context__ = command  # the command behind the cause, and the context

    assert command_output(handled) == ("err\n", "out\n")
    assert command_output(command) == ("err\n", "out\n")


def test_a_command_that_captured_nothing_or_no_command_gives_empty_output():
    timed_out = subprocess.TimeoutExpired(["sleep"], 1.0, output="so far")
    looped = RuntimeError("loop")
    looped.__cause__ = looped

    assert command_output(subprocess.CalledProcessError(1, ["false"])) == ("", "")
    assert command_output(timed_out) == ("", "so far")
    assert command_output(looped) == ("", "")


def test_the_end_token_is_found_across_reads_only_as_a_proper_start():
    token = b"TOKEN"

    assert capture._prefix_overlap(b"data TOK", token) == 3
    assert capture._prefix_overlap(b"T", token) == 1
    assert capture._prefix_overlap(b"TOKEN", token) == 0  # the whole token is found, not held
    assert capture._prefix_overlap(b"", token) == 0
    assert capture._prefix_overlap(b"KEN", token) == 0


def test_a_line_of_text_is_logged_and_passed_on_at_once_whatever_the_token_draws(
    tmp_path, monkeypatch, capfd
):
    # A token drawn as newlines would once hold back every line's end until the next
    # write: stderr's last newline came after stdout's next line, joining the two lines.
    monkeypatch.setattr(os, "urandom", lambda size: b"\n" * size)
    passed = Passed(capfd)
    log = tmp_path / "build.partial"
    with output(tmp_path) as out:
        os.write(2, b"from stderr\n")
        wait_until(lambda: log.read_bytes().endswith(b"from stderr\n"), what="the line logged")
        wait_until(lambda: "from stderr\n" in passed.read(), what="the line passed on whole")
        os.write(1, b"from stdout\n")
        wait_until(lambda: log.read_bytes().endswith(b"from stdout\n"), what="the next line")

    assert log.read_bytes() == b"header line\nfrom stderr\nfrom stdout\n"
    assert out.tail() == "from stderr\nfrom stdout"
