"""Lease mode: whatever is planted among the claims is never followed and never wedges the lock.

A holder's claim is only ever made by link() from a regular file holding its record. A
symlink (dangling, or naming a record or a directory elsewhere), a FIFO, a directory or a
socket at a claim's name was planted: nobody holds through it, so the next waiter passes
it over at once, well inside the stale window, and nothing reads, times or touches what a
link names. The waiters are real processes (tests/_workers.py) on a real lock dir.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from _workers import Arena, wait_until

from pytest_prewarm.layout import Layout, template_id
from pytest_prewarm.lease import LeaseLock
from pytest_prewarm.liveness import own_record
from pytest_prewarm.names import canonical_key

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="liveness proofs come from Linux /proc"
)

STALE = 3.0  # the waiter's stale window: a planted claim must not cost it
PLANTS = [
    "dangling symlink",
    "symlink to a live record",
    "symlink to a dir",
    "fifo",
    "dir",
    "socket",
]


def plant(claim: Path, kind: str, elsewhere: Path) -> None:
    elsewhere.mkdir()
    if kind == "dangling symlink":
        claim.symlink_to(elsewhere / "nonexistent")
    elif kind == "symlink to a live record":
        # Followed, it would read as this very process: alive, never to be taken over.
        record = elsewhere / "record.json"
        record.write_text(own_record("planted", "run").to_json())
        claim.symlink_to(record)
    elif kind == "symlink to a dir":
        claim.symlink_to(elsewhere, target_is_directory=True)
    elif kind == "fifo":
        os.mkfifo(claim)
    elif kind == "dir":
        claim.mkdir()
    else:
        # Bound by a relative name: the full path is longer than sun_path allows.
        here = os.getcwd()
        os.chdir(claim.parent)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(claim.name)
        finally:
            os.chdir(here)


@pytest.mark.parametrize("kind", PLANTS)
def test_a_planted_top_claim_is_passed_over_at_once_and_never_followed(tmp_path, processes, kind):
    arena = Arena(tmp_path / "arena", processes)
    layout = Layout(arena.lock_dir)
    layout.ensure()
    lease_dir = layout.lease_dir(template_id("db", canonical_key("k", name="db")))
    lease_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    plant(lease_dir / "claim.99", kind, elsewhere)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in elsewhere.iterdir())

    arena.start("waiter", mode="lease", stale_after=STALE, heartbeat=0.2, timeout=8.0)
    waiter = arena.result("waiter")

    assert waiter["ok"], waiter
    assert waiter["origin"] == "built"
    (built,) = [e for e in waiter["events"] if e["outcome"] == "built"]
    # Not after the stale window (the old judgement of a directory), nor never (a dangling
    # link has no mtime to time, so it was "look again" forever).
    assert built["wait_seconds"] < STALE
    assert json.loads((lease_dir / "claim.100").read_text())["worker"] == "waiter"
    assert (lease_dir / "claim.100.released").exists()
    # What a planted link names is neither changed nor removed.
    assert sorted((p.name, p.stat().st_mtime_ns) for p in elsewhere.iterdir()) == before


def test_a_planted_claim_below_the_top_is_removed_without_following_it(tmp_path):
    lease_dir = tmp_path / "db.lease"
    lease_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    plant(lease_dir / "claim.1", "symlink to a dir", elsewhere)
    (elsewhere / "keep").write_text("not ours")
    lease = LeaseLock(lease_dir, "db", stale_after=60.0, heartbeat=10.0)
    for _ in range(2):  # claim.2 over the planted link, then claim.3, which forgets gen 1
        assert lease.try_acquire(own_record("gw0", "run")) is not None
        lease.release()

    assert not os.path.lexists(lease_dir / "claim.1")
    assert (elsewhere / "keep").read_text() == "not ours"


def test_a_planted_dangling_release_marker_counts_as_a_release(tmp_path):
    lease_dir = tmp_path / "db.lease"
    lease_dir.mkdir(mode=0o700)
    # A live holder (this process), whose release marker is a link to nowhere: asked
    # "is it released?", exists() followed the link and answered no.
    (lease_dir / "claim.1").write_text(own_record("gw1", "run").to_json())
    (lease_dir / "claim.1.released").symlink_to(tmp_path / "nonexistent")
    lease = LeaseLock(lease_dir, "db", stale_after=60.0, heartbeat=10.0)

    acquired = lease.try_acquire(own_record("gw0", "run"))

    assert acquired is not None
    lease.release()
    assert (lease_dir / "claim.2.released").exists()


def test_a_heartbeat_never_touches_what_a_link_planted_at_its_claim_names(tmp_path):
    lease_dir = tmp_path / "db.lease"
    target = tmp_path / "victim"
    target.write_text("not ours")
    os.utime(target, ns=(0, 0))
    lease = LeaseLock(lease_dir, "db", stale_after=0.5, heartbeat=0.01)
    assert lease.try_acquire(own_record("gw0", "run")) is not None
    try:
        claim = lease_dir / "claim.1"
        claim.unlink()
        claim.symlink_to(target)  # our claim, swapped for a link while we build

        wait_until(lease.lost, 5.0, "the heartbeat to notice")

        assert lease.lost() == f"our claim {claim} was replaced by a symbolic link"
        assert target.stat().st_mtime_ns == 0
    finally:
        lease.release()
