"""Template names and keys mapped to safe, collision-free file names."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Any

from .exceptions import PrewarmUsageError

MAX_NAME_LENGTH = 200
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def check_name(name: object) -> str:
    """Validate a template name as the user gave it; raise a clear error if unusable."""
    if not isinstance(name, str):
        raise PrewarmUsageError(
            f"template name must be a str, got {type(name).__name__} {name!r}; "
            'name templates with short strings such as "db"'
        )
    if not name or not name.strip():
        raise PrewarmUsageError('template name is empty; give it a name such as "db"')
    if "\x00" in name:
        raise PrewarmUsageError(f"template name {name!r} contains a NUL character")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        # Names are printed in the summary and in every worker's error: an escape sequence
        # or a newline there would rewrite the user's terminal or forge a line.
        raise PrewarmUsageError(
            f"template name {name!r} contains a control character; use printable "
            'characters, such as "db-v2"'
        )
    if len(name) > MAX_NAME_LENGTH:
        raise PrewarmUsageError(
            f"template name {name[:40]!r}... is {len(name)} characters long; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    return name


def file_stem(name: str) -> str:
    """A file name for ``name`` that cannot leave the lock dir or collide with another name.

    Plain names ("db", "venv-3.12") are used as they are, so the lock dir stays readable.
    Anything else ("../x", "a/b", "Ünï") is reduced to safe characters plus "~" and a hash
    of the original, so "a/b" and "a_b" stay distinct.
    """
    if _SAFE.fullmatch(name) and name not in (".", ".."):
        return name
    cleaned = _UNSAFE_CHARS.sub("_", name).strip("._-")[:40] or "template"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    # "~" never appears in a plain name (plain names are used unchanged), so no plain name
    # can equal the stem of a hashed one and share its template.
    return f"{cleaned}~{digest}"


def canonical_key(key: Any, *, name: str) -> str:
    """The key as canonical JSON; a key that is not JSON cannot be compared across runs."""
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PrewarmUsageError(
            f"key {key!r} of template {name!r} is not JSON-serialisable ({exc}); "
            "use a string, number, or a list/dict of them (for example a version string "
            "or a hash of the inputs)"
        ) from exc


def key_digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# One build of a template: a directory named ``<pid>-<8 hex>`` (see layout.py). A name read
# back from meta.json becomes a path, so only that shape is accepted: never "..", a
# separator, "data" or "meta.json".
BUILD_NAME = re.compile(r"[0-9]{1,10}-[0-9a-f]{8}")


def new_build_name() -> str:
    """A fresh build name, unique among this lock dir's builds."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_build_name(name: object) -> bool:
    """Whether ``name`` (read from a record) names a build: ``""`` is a format-1 template."""
    return isinstance(name, str) and (name == "" or BUILD_NAME.fullmatch(name) is not None)
