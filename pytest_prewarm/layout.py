"""The lock dir's layout: every path the plugin uses inside a lock dir is derived here.

::

    locks/<id>.lock          permanent flock file, never written or deleted
    locks/<id>.owner.json    who holds (or last held) the lock
    locks/<id>.lease/        lease mode: numbered claim files (see lease.py)
    templates/<id>/<build>/  one build of the template: data/ is what the builder fills,
                             in place: the directory it fills is the one everyone gets
    templates/<id>/<build>/manifest  the tree of data/ at publication (see digest.py)
    templates/<id>/meta.json the publication: names the build that is the template, and
                             is replaced in one rename; a build it does not name is a
                             build in progress (or a dead builder's, swept by the next)
    failures/<id>/<run>.json a failed build, so the rest of that run fails fast
    failures/<id>/<run>.log  its log: what the build wrote, its traceback; kept after the
                             run (the newest few per template), since its error names it
    failures/.<id>+*.partial the log of a build in progress; the above if it fails
    events/<run>/*.jsonl     what each process of a run did, for the summary
    trash/                   dead builds and superseded ones moved aside, deleted in background
    lock-mode                the mode the first run chose; later runs must agree
    services/<id>/<inst>.json        a built template with a teardown: what it needs
    services/<id>/<inst>.claim       who runs that teardown now (see teardown.py)
    services/<id>/<inst>.users/<run> a run that uses that instance, until it ends
    services/<run>.reaper            the run's watcher (reaper.py); its .log beside it

``services/`` is made only when a template with a teardown is built: a run that uses
no service finds nothing there to read.

``<id>`` is the safe file stem of the name plus a digest of the key, so a different key
is a different template with its own lock.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from .names import file_stem, key_digest, new_build_name
from .trust import make_dir

SUBDIRS = ("locks", "templates", "failures", "trash", "events")
DATA_DIR = "data"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest"  # beside data/: its tree, as digest.py writes it
MODE_FILE = "lock-mode"
RUN_RECORD = ".run-owner.json"
# The mark of a lock dir that pytest-prewarm made or adopted (pytest marks its cache dir
# the same way). A non-empty directory without it is never used, so nothing of the
# user's is touched.
TAG_FILE = "PYTEST_PREWARM_LOCKDIR.TAG"
TAG_SIGNATURE = "Signature: pytest-prewarm lock dir"
TAG_TEXT = (
    f"{TAG_SIGNATURE}\n"
    "# This directory holds pytest-prewarm's locks and templates. It is safe to delete\n"
    "# when no pytest run is using it.\n"
)


def template_id(name: str, canonical_key: str) -> str:
    """The file stem of one (name, key) pair, unique and safe inside the lock dir."""
    return f"{file_stem(name)}.{key_digest(canonical_key)}"


class Layout:
    """Paths inside one lock dir. Creating the subdirectories is ``ensure``'s job alone."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """Create the subdirectories, each checked to be a real directory of ours."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in SUBDIRS:
            make_dir(self.root / sub)

    # -- locks -------------------------------------------------------------------------------

    def lock_file(self, tid: str) -> Path:
        return self.root / "locks" / f"{tid}.lock"

    def owner_file(self, tid: str) -> Path:
        return self.root / "locks" / f"{tid}.owner.json"

    def lease_dir(self, tid: str) -> Path:
        return self.root / "locks" / f"{tid}.lease"

    def warm_up_lock(self) -> Path:
        """A private lock file whose only use is loading filelock's code before a takeover."""
        return self.root / "locks" / ".warm-up.lock"

    # -- builds and templates ----------------------------------------------------------------

    def template_dir(self, tid: str) -> Path:
        """The template's directory: its builds and the meta.json that publishes one."""
        return self.root / "templates" / tid

    def new_build(self, tid: str) -> Path:
        """A fresh directory name for one build attempt of this process."""
        return self.template_dir(tid) / new_build_name()

    def build_dir(self, tid: str, build: str) -> Path:
        """The directory of one build (``""``: a template published by 0.1, in place)."""
        return self.template_dir(tid) / build if build else self.template_dir(tid)

    def data_dir(self, tid: str, build: str) -> Path:
        """What the builder of ``build`` filled: the template's path, in every process."""
        return self.build_dir(tid, build) / DATA_DIR

    def manifest_file(self, tid: str, build: str) -> Path:
        return self.build_dir(tid, build) / MANIFEST_FILE

    def meta_file(self, tid: str) -> Path:
        return self.template_dir(tid) / META_FILE

    def failure_file(self, tid: str, run_id: str) -> Path:
        return self.root / "failures" / tid / f"{file_stem(run_id)}.json"

    def failures_of_run(self, run_id: str) -> list[Path]:
        return list((self.root / "failures").glob(f"*/{file_stem(run_id)}.json"))

    # -- build logs --------------------------------------------------------------------------

    def build_log(self, tid: str, run_id: str) -> Path:
        """The log of this run's failed build of ``tid``, named by its error message."""
        return self.root / "failures" / tid / f"{file_stem(run_id)}.log"

    def build_logs(self, tid: str | None = None) -> list[Path]:
        """The logs of failed builds of ``tid`` (of every template without it).

        Regular files in real directories only, found with scandir and never through a
        symlink: a planted link is neither read, kept nor rotated, and nothing is opened,
        so a FIFO named like a log cannot block. (pathlib's glob took 0.2 ms a directory
        in the sweep, which looks into every leftover run dir.)
        """
        logs: list[Path] = []
        with contextlib.suppress(OSError), os.scandir(self.root / "failures") as templates:
            for template in templates:
                if (tid is None or template.name == tid) and template.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError), os.scandir(template.path) as entries:
                        logs += [
                            Path(entry.path)
                            for entry in entries
                            if entry.name.endswith(".log") and entry.is_file(follow_symlinks=False)
                        ]
        return logs

    def new_partial_log(self, tid: str) -> Path:
        """A fresh name for the log of one build in progress of this process."""
        return self.root / "failures" / f".{tid}+{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"

    def partial_logs(self, tid: str) -> list[Path]:
        return list((self.root / "failures").glob(f".{tid}+*.partial"))  # "+" is in no id

    # -- housekeeping ------------------------------------------------------------------------

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    def trash_target(self, name: str) -> Path:
        return self.trash / f"{name}.{uuid.uuid4().hex[:8]}"

    def events_dir(self, run_id: str) -> Path:
        return self.root / "events" / file_stem(run_id)

    def events_file(self, run_id: str, worker: str, pid: int) -> Path:
        return self.events_dir(run_id) / f"{file_stem(worker)}-{pid}.jsonl"

    # -- services (templates with a teardown) ------------------------------------------------

    @property
    def services_root(self) -> Path:
        return self.root / "services"

    def service_dir(self, tid: str) -> Path:
        return self.services_root / tid

    def service_record(self, tid: str, instance: str) -> Path:
        return self.service_dir(tid) / f"{instance}.json"

    def service_claim(self, tid: str, instance: str) -> Path:
        return self.service_dir(tid) / f"{instance}.claim"

    def service_users(self, tid: str, instance: str) -> Path:
        return self.service_dir(tid) / f"{instance}.users"

    def service_user(self, tid: str, instance: str, run_id: str) -> Path:
        return self.service_users(tid, instance) / f"{file_stem(run_id)}.json"

    def service_records(self) -> list[Path]:
        """Every instance record, oldest template id first; none if no service was built."""
        return sorted(self.services_root.glob("*/*.json"))

    def reaper_marker(self, run_id: str) -> Path:
        return self.services_root / f"{file_stem(run_id)}.reaper"

    def reaper_log(self, run_id: str) -> Path:
        return self.services_root / f"{file_stem(run_id)}.reaper.log"

    @property
    def mode_file(self) -> Path:
        return self.root / MODE_FILE

    @property
    def tag_file(self) -> Path:
        return self.root / TAG_FILE

    @property
    def run_record(self) -> Path:
        return self.root / RUN_RECORD
