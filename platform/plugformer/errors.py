"""One exception family for user errors.

Every user error says what was wrong, what was expected and how to fix it. The CLI prints
these as a short message and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys

USER_ERROR_STATUS = 2


class PlugformerError(Exception):
    """A mistake the user can fix: bad configuration, an unusable combination, a broken plugin."""

    def __init__(self, what: str, *, expected: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.expected = expected
        self.fix = fix
        super().__init__(self.message())

    def message(self) -> str:
        lines = [self.what]
        if self.expected:
            lines.append(f"Expected: {self.expected}")
        if self.fix:
            lines.append(f"Fix: {self.fix}")
        return "\n".join(lines)


class ConfigError(PlugformerError):
    """A composed configuration that cannot run."""


class UnknownComponentError(ConfigError):
    """A component name that no installed plugin registered."""


class CapabilityError(ConfigError):
    """Two chosen components that cannot work together."""


class PluginError(PlugformerError):
    """An installed plugin that failed to load or to register its components."""


class DataError(PlugformerError):
    """A data task that cannot build its splits (missing files, no network, bad sizes)."""


class NonFiniteError(PlugformerError):
    """Training produced a NaN or infinite loss or gradient norm (see callbacks.nonfinite)."""


def full_tracebacks_requested() -> bool:
    """HYDRA_FULL_ERROR=1 asks for the whole traceback instead of the short message."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_user_error(error: PlugformerError) -> int:
    """Print the short message to stderr; returns the exit status for user errors."""
    print(f"plugformer: error: {error.message()}", file=sys.stderr)
    return USER_ERROR_STATUS
