"""pytest-prewarm: build expensive test templates once per run, across xdist workers."""

from __future__ import annotations

from ._version import __version__
from .exceptions import (
    PrewarmBuildError,
    PrewarmError,
    PrewarmLockError,
    PrewarmTimeout,
    PrewarmUsageError,
    PrewarmWarning,
)
from .registry import template
from .store import Template

__all__ = [
    "PrewarmBuildError",
    "PrewarmError",
    "PrewarmLockError",
    "PrewarmTimeout",
    "PrewarmUsageError",
    "PrewarmWarning",
    "Template",
    "__version__",
    "template",
]
