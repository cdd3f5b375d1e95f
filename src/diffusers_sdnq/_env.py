"""Settings read from ``DIFFUSERS_SDNQ_*`` environment variables.

They are read while diffusers, transformers or PEFT are being imported (the start-up hook sets the package up at
that moment), where an exception would break the user's ``import transformers``. So a value that cannot be read
never raises: it is reported once per process, naming the variable and the value, and the default is used.
"""

from __future__ import annotations

import os
import warnings

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")

_reported: set[tuple[str, str]] = set()


class SDNQEnvironmentWarning(UserWarning):
    """A ``DIFFUSERS_SDNQ_*`` environment variable holds a value that cannot be read; its default is used."""


def report_bad_value(name: str, value: str, expected: str, default: str) -> None:
    """Warn once per (variable, value) that ``value`` of ``name`` was ignored."""
    if (name, value) in _reported:
        return
    _reported.add((name, value))
    warnings.warn(f"{name}={value!r} cannot be read (expected {expected}); using {default} instead",
                  SDNQEnvironmentWarning, stacklevel=3)


def env_flag(name: str, default: bool) -> bool:
    """A yes/no variable: ``1/true/yes/on`` or ``0/false/no/off`` (any case); unset or unreadable: ``default``."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False if word else default
    report_bad_value(name, raw, "1/true/yes/on or 0/false/no/off", f"the default ({'on' if default else 'off'})")
    return default
