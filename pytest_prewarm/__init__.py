"""pytest-prewarm: build expensive test templates once per run, across xdist workers.

Names are loaded on first use (PEP 562): importing any module of the package loads this
file first, and a core module such as ``pytest_prewarm.liveness`` must not drag in the
request machinery (or pytest) with it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .exceptions import (
        LockDirError,
        PrewarmBuildError,
        PrewarmConfigureError,
        PrewarmError,
        PrewarmLockError,
        PrewarmTimeout,
        PrewarmUsageError,
        PrewarmWarning,
    )
    from .registry import template
    from .request import Template, TemplateFactory

_WHERE = {
    "LockDirError": ".exceptions",
    "PrewarmBuildError": ".exceptions",
    "PrewarmConfigureError": ".exceptions",
    "PrewarmWarning": ".exceptions",
    "PrewarmError": ".exceptions",
    "PrewarmLockError": ".exceptions",
    "PrewarmTimeout": ".exceptions",
    "PrewarmUsageError": ".exceptions",
    "Template": ".request",
    "TemplateFactory": ".request",
    "template": ".registry",
}

__all__ = [
    "LockDirError",
    "PrewarmBuildError",
    "PrewarmConfigureError",
    "PrewarmError",
    "PrewarmLockError",
    "PrewarmTimeout",
    "PrewarmUsageError",
    "PrewarmWarning",
    "Template",
    "TemplateFactory",
    "__version__",
    "template",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Not cached in globals(): the plugin loads the core on first use, and a module that an
    # in-process run (pytester's) imported is dropped after it; the next run must get the
    # names of the modules it loads itself, not the dropped ones.
    return getattr(import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
