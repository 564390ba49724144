"""Lease mode: mutual exclusion without flock, for NFS, VirtioFS, SMB and the like.

A template's lease is a directory of numbered claims, ``<id>.lease/claim.<gen>``. The
holder is the highest generation without a ``claim.<gen>.released`` marker.

- Taking the lease means creating ``claim.<gen+1>`` with ``link()``, which is atomic and
  exclusive even on NFS, from a file that already holds our owner record: there is never
  a claim without its owner.
- Reclaiming from a dead or stale holder is the same operation: whoever judged
  generation ``g`` reclaimable links ``claim.<g+1>``. Two reclaimers race for one name,
  so exactly one wins, and a judgement made on an older generation can never remove a
  newer holder's claim, because nothing is ever removed to reclaim.
- Release creates ``claim.<gen>.released``; it never touches another generation.
- The holder's heartbeat touches its claim's mtime. Waiters compare it only with what
  they saw before, timed on their own monotonic clock, never with their wall clock.

Which holder may be reclaimed is liveness's decision: dead at once, alive never, unknown
only after its heartbeat has stood still for the stale window. A top claim that is not a
regular file (a symlink, FIFO, directory, socket) was never made by a holder, so nobody
holds through it: it is passed over at once. Nothing here follows a symlink: a planted
link must not make us read, time or touch anything outside the lease dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from . import clock
from .exceptions import PrewarmLockError
from .files import write_temp
from .liveness import Liveness, Verdict, classify, prepare_classify
from .locking import Acquired, Holder
from .owner import OwnerRecord, read_record
from .trust import kind_of, make_dir, remove_tree, why_unreadable

_CLAIM = re.compile(r"claim\.(\d{1,18})")
POLL_INTERVAL = 0.05  # seconds between looks at the lease dir while waiting
# The heartbeat touches its claim, never a link's target, where the platform can say so
# (Windows cannot; there the lstat just before it is all the check).
_UTIME_FOLLOWS = os.utime not in os.supports_follow_symlinks


@dataclass
class _Seen:
    """A waiter's observation of one generation's heartbeat, on the waiter's clock."""

    gen: int
    mtime_ns: int
    since: float


class LeaseLock:
    """A template's lease: the ``Lock`` protocol (locking.py) without flock."""

    def __init__(
        self,
        lease_dir: Path,
        template: str,
        *,
        stale_after: float,
        heartbeat: float,
    ) -> None:
        self.lease_dir = lease_dir
        self.lock_path = lease_dir  # named in messages
        self.template = template
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._gen: int | None = None
        self._record: OwnerRecord | None = None
        self._seen: _Seen | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lost: str | None = None
        self._warmed = False
        make_dir(lease_dir)  # a real directory of ours, never a planted link

    # -- reading the state -------------------------------------------------------------------

    def _claim(self, gen: int) -> Path:
        return self.lease_dir / f"claim.{gen}"

    def _released(self, gen: int) -> bool:
        # lexists: whatever sits at the marker's name counts, and a planted symlink is
        # never followed (exists() would ask about its target, outside the lease dir).
        return os.path.lexists(self.lease_dir / f"claim.{gen}.released")

    def _not_a_claim(self, gen: int) -> str | None:
        """What sits at claim ``gen`` when it cannot be a holder's claim, else None.

        A holder's claim is only ever made by link() from a regular file that already
        holds its record, so anything else was planted: no holder can be robbed by
        passing it over, and waiting out a stale window for it would only delay every
        waiter (a dangling link even has no mtime to time). None too when it is gone.
        """
        try:
            info = os.lstat(self._claim(gen))
        except FileNotFoundError:
            return None
        if stat.S_ISREG(info.st_mode):
            return None
        return f"the claim {self._claim(gen)} is {kind_of(info.st_mode)}, which no holder makes"

    def _top(self) -> int | None:
        top = None
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.lease_dir):
                match = _CLAIM.fullmatch(name)
                if match and (top is None or int(match.group(1)) > top):
                    top = int(match.group(1))
        return top

    def holder(self) -> Holder:
        top = self._top()
        if top is None or self._released(top):
            return Holder(None, Verdict(Liveness.UNKNOWN, "the lease was just released"))
        record = read_record(self._claim(top))
        if record is None:
            why = why_unreadable(self._claim(top))
            if self._not_a_claim(top) is not None:
                return Holder(None, Verdict(Liveness.UNKNOWN, why))  # passed over at once
            takeover = (
                "a claim without a readable record is taken over only once it has stood "
                f"unchanged for the stale window of {self.stale_after:g} s, not at once"
            )
            return Holder(None, Verdict(Liveness.UNKNOWN, why), takeover)
        verdict = classify(record)
        if verdict.state is not Liveness.UNKNOWN:
            return Holder(record, verdict)  # alive: killing it makes it dead, taken at once
        takeover = (
            f"its death cannot be proven from here ({verdict.reason}), so its lease is "
            "taken over only once its heartbeat has stood still for the stale window of "
            f"{self.stale_after:g} s, not at once"
        )
        return Holder(record, verdict, takeover)

    # -- taking and giving back ------------------------------------------------------------

    def _reclaimable(self, gen: int) -> tuple[bool, OwnerRecord | None, Verdict | None]:
        """May generation ``gen``, which is not released, be taken over?"""
        planted = self._not_a_claim(gen)
        if planted is not None:
            self._seen = None
            return True, None, Verdict(Liveness.DEAD, planted)
        record = read_record(self._claim(gen))
        verdict = classify(record)
        if verdict.state is Liveness.DEAD:
            return True, record, verdict
        if verdict.state is Liveness.ALIVE:
            self._seen = None
            return False, record, verdict  # never by age: a live holder may build for hours
        try:
            # lstat: the claim's own mtime, never that of whatever a planted link names.
            info = os.lstat(self._claim(gen))
        except FileNotFoundError:
            return False, record, verdict  # cleaned up under us: look again
        if not stat.S_ISREG(info.st_mode):
            return False, record, verdict  # replaced since we looked: look again
        mtime = info.st_mtime_ns
        now = clock.monotonic()
        seen = self._seen
        if seen is None or seen.gen != gen or seen.mtime_ns != mtime:
            self._seen = _Seen(gen, mtime, now)  # the heartbeat moved: start the window again
            return False, record, verdict
        if now - seen.since >= self.stale_after:
            stale = Verdict(
                Liveness.UNKNOWN,
                f"{verdict.reason}; heartbeat still for {now - seen.since:.1f} s",
            )
            return True, record, stale
        return False, record, verdict

    def try_acquire(self, record: OwnerRecord) -> Acquired | None:
        top = self._top()
        previous: OwnerRecord | None = None
        verdict: Verdict | None = None
        if top is not None and not self._released(top):
            ok, previous, verdict = self._reclaimable(top)
            if not ok:
                return None
        target = (top or 0) + 1
        tmp = write_temp(self.lease_dir, "claim", record.to_json())
        try:
            try:
                os.link(tmp, self._claim(target))
            except FileExistsError:
                return None  # someone else took generation `target` first
        finally:
            os.unlink(tmp)
        self._gen, self._record, self._lost, self._seen = target, record, None, None
        try:
            self._stop.clear()
            self._beat = threading.Thread(
                target=self._heartbeat, args=(target,), name=f"prewarm-lease:{self.template}"
            )
            self._beat.daemon = True
            self._beat.start()
            self._forget_older(target)
        except BaseException:
            self.release()  # nothing stays held after an error
            raise
        return Acquired(previous, verdict)

    def _heartbeat(self, gen: int) -> None:
        claim = self._claim(gen)
        while not self._stop.wait(self.heartbeat):
            top = self._top()
            if top is not None and top > gen:
                self._lost = f"generation {top} was claimed while we held {gen}"
                return
            try:
                info = os.lstat(claim)
                if not stat.S_ISREG(info.st_mode):
                    # Replaced by something we did not make: touching it could reach
                    # outside the lease dir, and waiters pass it over anyway.
                    self._lost = f"our claim {claim} was replaced by {kind_of(info.st_mode)}"
                    return
                os.utime(claim, follow_symlinks=_UTIME_FOLLOWS)
            except FileNotFoundError:
                self._lost = f"our claim {claim} disappeared"
                return
            except OSError:
                continue  # a transient NFS error: try again next beat

    def confirm_held(self, what: str) -> None:
        """Raise PrewarmLockError if a successor took the lease over while we built.

        We were judged stale (our heartbeat stood still for the stale window) and someone
        else took over. Our build may be fine, but publishing now could clobber theirs;
        theirs wins.
        """
        lost = self.lost()
        if lost is not None:
            raise PrewarmLockError.lease_lost(self.template, lost, what)

    def lost(self) -> str | None:
        """Why we no longer hold the lease, or ``None`` while we still do."""
        if self._gen is None:
            return "not held"
        top = self._top()
        if top is not None and top > self._gen:
            return f"generation {top} was claimed while we held {self._gen}"
        return self._lost

    def held_by(self) -> OwnerRecord | None:
        return self._record

    def release(self, *, finished: bool = False) -> None:
        # A lease's release marker is how the next holder learns of the release at all,
        # so it is written whether or not the hold finished its work.
        gen = self._gen
        if gen is None:
            return
        self._stop.set()
        if self._beat is not None and self._beat.is_alive():
            self._beat.join()
        self._gen = self._record = self._beat = None
        # O_EXCL: a released marker is created once and never rewritten.
        with contextlib.suppress(FileExistsError):
            os.close(
                os.open(self.lease_dir / f"claim.{gen}.released", os.O_CREAT | os.O_EXCL, 0o600)
            )

    def _forget_older(self, gen: int) -> None:
        # Generations below ours can never be the top again; removing them keeps the dir
        # small. The top generation is never removed, so no waiter's view can go backwards.
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.lease_dir):
                match = re.fullmatch(r"claim\.(\d{1,18})(\.released)?", name)
                if match and int(match.group(1)) < gen - 1:
                    # remove_tree: a planted directory or link goes too, never followed.
                    remove_tree(self.lease_dir / name)

    # -- waiting -----------------------------------------------------------------------------

    def wait_for_change(self, until: float) -> None:
        if not self._warmed:
            prepare_classify()  # waiting is the time to pay for what a takeover needs
            self._warmed = True
        # No kernel object to block on across NFS clients: poll, briefly.
        delay = min(POLL_INTERVAL, until - clock.monotonic())
        if delay > 0:
            threading.Event().wait(delay)

    def stop_waiting(self) -> None:
        self._seen = None
