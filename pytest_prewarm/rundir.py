"""Where a run's default lock dir goes: a name in the system temp dir, decided at start-up.

The controller names the path for its workers in every xdist run, including runs that use
no template, so this is a leaf: naming the path must not load the lock dir code
(``lockdir``, which creates, checks and sweeps these dirs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# Per-run default dirs live directly in the system temp dir, not under pytest-of-USER:
# pytest's numbered-dir cleanup deletes unknown "pytest-*" folders there, which would wipe
# a lock dir under a running suite.
RUN_DIR_PREFIX = "pytest-prewarm-run-"


def run_dir_path(run_id: str) -> Path:
    """Where this run's default lock dir goes: decided at start-up, created on first use."""
    return Path(tempfile.gettempdir()) / f"{RUN_DIR_PREFIX}{run_id}"
