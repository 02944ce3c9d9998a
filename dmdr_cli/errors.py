"""User-facing errors. Anything raised as ``DmdrError`` becomes one red line and exit code 2.

Torch-free on purpose: the command layer imports it before anything heavy.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DmdrError(Exception):
    """A problem the user can fix. ``str(err)`` is the one line shown; ``hint`` says what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line: message, then the hint
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(DmdrError):
    """Unknown key, wrong type, unknown preset, invalid value."""


class ModelNotFoundError(DmdrError):
    """Base-model weights are not on this machine."""


class CheckpointError(DmdrError):
    """A checkpoint is missing, corrupt or from another model."""


class InputError(DmdrError):
    """Bad prompt file, bad output path and similar."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
