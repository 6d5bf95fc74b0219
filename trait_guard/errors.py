"""The exceptions users act on, so that callers (the CLI above all) can tell bad input from a bug.

Every error that means "what you gave me is wrong, and here is the fix" derives from
:class:`TraitGuardInputError` (the CLI exits 2 with the message, no traceback). Anything else is an
unexpected failure (exit 1 with its traceback). A guard that halts training is neither: it is the
product working, reported by :class:`TraitGuardHalted` where an exception is the only way to say it
(``GuardedTrainer.train``) and by exit status 4 on the command line.
"""

from __future__ import annotations

from typing import Any

#: ``trait-guard`` exit statuses (also in README.md and ``trait-guard --help``).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_FLAGGED = 3  # `trait-guard screen`: the data was flagged
EXIT_HALTED = 4  # `trait-guard train` / `run`: the guard halted (or gated) training


class TraitGuardInputError(ValueError):
    """Bad input: a config, a data file, a model, a vector or a service the user must fix. The
    message names the fix. (A ``ValueError`` so existing ``except ValueError`` callers still catch it.)"""


class TraitGuardHalted(RuntimeError):
    """The guard halted training. ``summary`` holds what happened (step, reason, rollback)."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}


class InputFileNotFound(TraitGuardInputError, FileNotFoundError):
    """A file the user named does not exist (also a ``FileNotFoundError`` for callers that catch that)."""
