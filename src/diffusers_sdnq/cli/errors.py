"""The CLI's error type."""

from __future__ import annotations


class CLIError(ValueError):
    """A problem with the user's input that the CLI reports as one clear message (no traceback)."""
