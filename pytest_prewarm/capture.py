"""What a build writes: streamed to its log file, passed on, and cut to a tail for its error.

A build's output goes to a log file as it is written, and still to where it went before
(a tee), so the builder's own test shows it under pytest's "Captured stdout/stderr" as it
always did. What can be captured depends on the thread the build runs in:

- **The main thread** (a test, a fixture or a marker asking for a template): file
  descriptors 1 and 2 point at pipes while the build runs, so a subprocess that inherits
  them is captured, and ``sys.stdout`` / ``sys.stderr`` are wrapped, so Python-level writes
  are captured too (pytest's capture sends those to its own file, past fds 1 and 2).
  Within one test phase pytest touches neither, so swapping them and putting them back
  is safe. What another thread writes to fds 1/2 meanwhile lands in this build's log as
  well (and still reaches its destination); other threads' Python-level writes are passed
  on but not logged.
- **Any other thread** (an eager build runs in a background thread while tests run in the
  main thread): nothing is redirected. pytest points ``sys.stdout`` and fds 1/2 at another
  test's capture at every test phase, so a redirect would be undone by pytest or, when
  put back, would undo pytest's; it would also take the running test's output. The log
  and the error then hold what the exception carries (below), not the build's stdout.

In both cases the output of a failed subprocess that the builder captured itself
(``subprocess.CalledProcessError`` or ``TimeoutExpired`` anywhere in the exception's
chain, with its ``stderr`` and ``stdout``) is shown: see ``command_output``.

Limits: writes to ``sys.stdout.buffer`` and unflushed C stdio buffers of the builder's own
process pass by the Python-level wrapper (fd-level capture still sees what reaches fds
1/2). A subprocess that outlives the build and keeps the inherited fds writes, after the
build, to the pipes it inherited: that output is passed on to the original destination but
not logged. The standard library only: no pytest, no other module of the package.
"""

from __future__ import annotations

import _thread
import contextlib
import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

TAIL_LINES = 30  # at most this many lines of each output in an error message
TAIL_CHARS = 4096  # and at most this many characters
_KEEP = 4 * TAIL_CHARS  # bytes of the newest output kept in memory for the tail
_DRAIN_SECONDS = 5.0  # how long stop() waits for the pipes to hand over what was written
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def tail(text: str, earlier: int = 0) -> str:
    """The last lines of ``text``, at most TAIL_LINES and TAIL_CHARS, after a note of how
    many were left out. ``earlier`` lines known to precede ``text`` count as left out."""
    text = text.replace("\r\n", "\n").rstrip()
    if not text:
        return ""
    # A progress bar rewrites its line with "\r": keep what a terminal would show last.
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    kept: list[str] = []
    size = 0
    for line in reversed(lines[-TAIL_LINES:]):
        if size + len(line) + 1 > TAIL_CHARS:
            if not kept:  # one huge line: its end
                kept.append("..." + line[-(TAIL_CHARS - 3) :])
            break
        kept.append(line)
        size += len(line) + 1
    kept.reverse()
    left_out = earlier + len(lines) - len(kept)
    if left_out:
        kept.insert(0, f"[... {left_out} earlier line{'' if left_out == 1 else 's'}]")
    return "\n".join(kept)


def _decode(data: object) -> str:
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode("utf-8", "replace")
    return data if isinstance(data, str) else ""


def command_output(exc: BaseException) -> tuple[str, str]:
    """``(stderr, stdout)`` of the failed subprocess in ``exc``'s chain, as text.

    The first ``CalledProcessError`` or ``TimeoutExpired`` found in ``exc``, its causes and
    contexts counts; ``("", "")`` when there is none, or it captured nothing.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen or len(seen) > 50:
            continue
        seen.add(id(current))
        if isinstance(current, subprocess.CalledProcessError | subprocess.TimeoutExpired):
            return _decode(current.stderr), _decode(current.stdout)
        todo += [current.__cause__, current.__context__]
    return "", ""


class BuildOutput:
    """The output of one build: streamed to ``path`` (if given), and its tail kept in memory.

    ``redirect`` says whether the streams may be redirected (the main thread; see the
    module's docstring). Use it as a context manager around the builder's call, then call
    ``save`` (failure) or ``discard`` (success, or a build that was interrupted).
    """

    def __init__(self, path: Path | None, header: str, *, redirect: bool) -> None:
        self.path = path
        self._redirect = redirect
        self._lock = threading.Lock()
        self._recent = bytearray()
        self._newlines = 0
        self._written = 0
        self._last = b"\n"
        self._fd: int | None = None
        self._closed = False
        self._fd_tees: list[_FdTee] = []
        self._stream_tees: list[tuple[str, _StreamTee]] = []
        if path is not None:
            try:
                self._fd = os.open(
                    path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _NOFOLLOW | _CLOEXEC,
                    0o600,
                )
                self._write_file(header.encode("utf-8", "backslashreplace"))
            except OSError:
                self._close_file()
                self.path = None

    # -- capturing ---------------------------------------------------------------------------

    def __enter__(self) -> BuildOutput:
        if self._redirect:
            self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self) -> None:
        _flush_streams()  # what was written before the build is not the build's
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                self._fd_tees.append(_FdTee(fd, self))
        captured = {tee.fd for tee in self._fd_tees}
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if current is None:
                continue
            # A stream that writes to a captured fd (pytest -s) is captured there already.
            tee = _StreamTee(current, self, record=_fileno(current) not in captured)
            setattr(sys, name, tee)
            self._stream_tees.append((name, tee))

    def stop(self) -> None:
        """Put the streams back and collect what the pipes still hold (bounded)."""
        _flush_streams()
        while self._stream_tees:
            name, tee = self._stream_tees.pop()
            tee.recording = False
            if getattr(sys, name) is tee:  # never undo what someone set after us
                setattr(sys, name, tee.target)
        while self._fd_tees:
            self._fd_tees.pop().stop()

    def add(self, data: bytes) -> None:
        """Record ``data`` as written by the build (from any thread)."""
        if not data:
            return
        with self._lock:
            if self._closed:
                return
            self._recent += data
            if len(self._recent) > _KEEP:
                del self._recent[: len(self._recent) - _KEEP]
            self._newlines += data.count(b"\n")
            self._written += len(data)
            self._last = data[-1:]
            self._write_file(data)

    # -- results -----------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return self._written == 0

    def tail(self) -> str:
        """The last lines the build wrote (see ``tail``), with how many came before."""
        with self._lock:
            recent, newlines, written = bytes(self._recent), self._newlines, self._written
            ends_line = self._last == b"\n"
        text = recent.decode("utf-8", "replace")
        if written > len(recent):  # the first kept line is cut: drop it
            text = text.split("\n", 1)[1] if "\n" in text else ""
        total = newlines + (0 if ends_line else 1)
        shown = len(text.rstrip("\n").split("\n")) if text.strip("\n") else 0
        return tail(text, earlier=max(total - shown, 0))

    def save(self, final: Path, summary: str) -> Path | None:
        """Append ``summary``, move the log to ``final``; its path, or None if it failed."""
        self.stop()
        with self._lock:
            if self._fd is not None:
                self._write_file(summary.encode("utf-8", "backslashreplace"))
            self._closed = True
            self._close_file()
        if self.path is None:
            return None
        try:
            os.replace(self.path, final)
        except OSError:
            self.discard()
            return None
        self.path = None
        return final

    def discard(self) -> None:
        """Remove the partial log: the build succeeded, its failure is not recorded, or the
        disk is full. The tail stays."""
        self.stop()
        with self._lock:
            self._closed = True
            self._close_file()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    def _write_file(self, data: bytes) -> None:
        # Never fail a build because its log cannot be written (a full disk): stop logging.
        if self._fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _fileno(stream: Any) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd if isinstance(fd, int) else None


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


class _StreamTee:
    """Stands in for sys.stdout or sys.stderr: passes every write on to ``target``, and
    records the writes of the thread that installed it."""

    def __init__(self, target: TextIO, output: BuildOutput, *, record: bool) -> None:
        self.target = target
        self.recording = record
        self._output = output
        self._thread = threading.get_ident()

    def write(self, text: str) -> int:
        written = self.target.write(text)
        if self.recording and threading.get_ident() == self._thread and isinstance(text, str):
            self._output.add(text.encode("utf-8", "backslashreplace"))
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class _FdTee:
    """Points fd ``fd`` at a pipe whose reader thread records and passes on what arrives.

    ``stop`` puts the fd back, then writes a token into the pipe: everything before it
    was written during the build. A subprocess that outlives the build may keep the pipe
    open; what it writes later is still passed on, not recorded.
    """

    def __init__(self, fd: int, output: BuildOutput) -> None:
        self.fd = fd
        self._output = output
        # The token starts with 0xFF, a byte UTF-8 never uses: the pump holds back the end
        # of a read that could be the token's start, and text must never be held (a held
        # newline would join the next line from the other fd and stall the live output).
        self._token = b"\xff" + os.urandom(15)
        self._reached = threading.Event()
        self._saved = os.dup(fd)  # where the fd went; raises OSError if fd is closed
        opened = [self._saved]
        try:
            self._read, self._write = os.pipe()
            opened += [self._read, self._write]
            os.dup2(self._write, fd)  # inheritable: subprocesses get the pipe as fd 1 or 2
        except OSError:
            for each in opened:
                os.close(each)
            raise
        # A bare thread: threading.Thread.start() waits until the new thread has been
        # scheduled, which on a loaded machine added milliseconds before every build
        # (a takeover's first build line came 6 ms later). Nothing joins the pump: stop()
        # waits on ``_reached`` instead, and the pump never keeps the interpreter alive.
        _thread.start_new_thread(self._pump, ())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.dup2(self._saved, self.fd)
        with contextlib.suppress(OSError):
            os.write(self._write, self._token)  # smaller than PIPE_BUF: one atomic write
        with contextlib.suppress(OSError):
            os.close(self._write)
        self._reached.wait(_DRAIN_SECONDS)

    def _pump(self) -> None:
        held = b""  # an end of the data that may be the start of the token
        recording = True
        try:
            while True:
                chunk = os.read(self._read, 65536)
                if not chunk:
                    break
                if not recording:
                    self._pass_on(chunk)
                    continue
                data = held + chunk
                at = data.find(self._token)
                if at >= 0:
                    self._take(data[:at])
                    recording = False
                    self._reached.set()
                    self._pass_on(data[at + len(self._token) :])
                    held = b""
                    continue
                keep = _prefix_overlap(data, self._token)
                held = data[len(data) - keep :] if keep else b""
                self._take(data[: len(data) - keep])
        except OSError:
            pass
        finally:
            if recording and held:
                self._take(held)
            self._reached.set()
            for fd in (self._read, self._saved):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _take(self, data: bytes) -> None:
        self._output.add(data)
        self._pass_on(data)

    def _pass_on(self, data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(self._saved, view) :]


def _prefix_overlap(data: bytes, token: bytes) -> int:
    """The length of the longest end of ``data`` that is a proper start of ``token``."""
    for size in range(min(len(token) - 1, len(data)), 0, -1):
        if data.endswith(token[:size]):
            return size
    return 0
