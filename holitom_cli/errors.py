"""The one exception hierarchy of holitom.

Every failure a user can cause is a :class:`HolitomError` whose message says what went wrong, and whose
``hint`` says what to do about it. The CLI prints ``Error: <message>`` and the hint on stderr and exits 1.
"""

from __future__ import annotations


class HolitomError(Exception):
    """Base class: a failure a user can cause and fix."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(HolitomError, ValueError):
    """An invalid setting (compression, sampling or generation option)."""


class VideoError(HolitomError):
    """A video that is missing, unreadable, corrupt, truncated or has no frames."""


class ModelError(HolitomError):
    """A model that cannot be found, downloaded, loaded, or is of an unsupported architecture."""
