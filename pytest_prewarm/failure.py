"""The text of a failed build: its traceback without our frames, clipped, with no stale paths.

Every process that reports the failure (the builder and each waiter) shows the same text,
built here once from the builder's exception and stored in the failure record.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

from .exceptions import BUILD_DIR_MARK, DISK_FULL
from .layout import DATA_DIR


def disk_full_hint(exc: BaseException, lock_dir: Path) -> str:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return f" (the filesystem holding the lock dir {lock_dir} is full: free space there)"
    return ""


def builder_traceback(exc: BaseException) -> str:
    """The formatted traceback of what the builder raised, without this package's frames.

    "" when nothing but our frames is left: a value that is not JSON is refused by us,
    not raised by the builder's code, and its one-line message says all there is.
    """
    formatted = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    if not _without_our_frames(formatted, set()):
        return ""
    return "".join(formatted.format())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _without_our_frames(formatted: traceback.TracebackException, seen: set[int]) -> bool:
    """Drop this package's frames from ``formatted`` and its chain; whether any is left."""
    kept = [f for f in formatted.stack if os.path.dirname(f.filename) != _PACKAGE_DIR]
    formatted.stack = traceback.StackSummary.from_list(kept)
    seen.add(id(formatted))
    chained = [formatted.__cause__, formatted.__context__, *(formatted.exceptions or ())]
    for other in chained:
        if other is not None and id(other) not in seen:
            _without_our_frames(other, seen)
    return bool(kept)


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        return f"<{type(exc).__name__} whose str() failed>"


# A failure record holds the clipped texts, so it always fits what read_failure reads.
MAX_MESSAGE = 16 * 1024
MAX_TRACEBACK = 256 * 1024


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    left_out = len(text) - 2 * half
    return f"{text[:half]}\n[... {left_out} characters left out; the log has them]\n{text[-half:]}"


def staging_scrubber(root: Path, attempt: Path) -> Callable[[str], str]:
    """Replaces the staging paths of ``attempt`` (as given, and resolved) in a text."""
    relative = attempt.relative_to(root)
    pairs = []
    for base in {str(root), os.path.realpath(root)}:
        staged = os.path.join(base, relative)
        pairs.append((os.path.join(staged, DATA_DIR), BUILD_DIR_MARK))
        pairs.append((staged, f"{BUILD_DIR_MARK}/.."))
    pairs.sort(key=lambda pair: -len(pair[0]))  # the data dir before its parent

    def scrub(text: str) -> str:
        for old, new in pairs:
            text = text.replace(old, new)
        return text

    return scrub
