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


# --------------------------------------------------------------------------------------------------
# Optional dependencies (pyproject.toml's extras): the guard and its HF/torch integrations need none of
# them; the pipeline (generation on Ray, DeepSpeed training, MLflow tracking, run reports) does.

#: importable module -> the extra that installs it (``pip install 'trait-guard[<extra>]'``).
EXTRA_FOR_MODULE = {
    "ray": "ray",
    "deepspeed": "deepspeed",
    "mlflow": "mlflow",
    "matplotlib": "plots",
    "trl": "trl",
    "gguf": "demo",
}


class MissingExtra(TraitGuardInputError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it. Bad input
    (the environment), so the CLI exits 2; also a ``ModuleNotFoundError`` for ``except ImportError`` callers."""

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name  # the missing module, as ModuleNotFoundError has it


def _install_hint(modules: list[str]) -> str:
    extras = sorted({EXTRA_FOR_MODULE[m] for m in modules if m in EXTRA_FOR_MODULE})
    others = [m for m in modules if m not in EXTRA_FOR_MODULE]
    fixes = ([f"pip install 'trait-guard[{','.join(extras)}]'"] if extras else []) + [f"pip install {m}" for m in others]
    return " and ".join(fixes) + " (`make venv` installs every extra)"


def _missing(modules: list[str], purpose: str | None) -> MissingExtra:
    names = ", ".join(f"`{m}`" for m in modules)
    what = "the optional dependencies" if len(modules) > 1 else "the optional dependency"
    said = f"{purpose} needs {what} {names}, which {'are' if len(modules) > 1 else 'is'} not installed" if purpose \
        else f"{what} {names} {'are' if len(modules) > 1 else 'is'} not installed"
    return MissingExtra(f"{said}: {_install_hint(modules)}", name=modules[0])


def require_extra(module: str, *, purpose: str | None = None) -> Any:
    """Import ``module`` (an optional dependency, :data:`EXTRA_FOR_MODULE`) and return it, or raise
    :class:`MissingExtra` naming the extra that installs it."""
    import importlib

    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name != top and not module.startswith(err.name):
            raise  # the package is there but one of *its* dependencies is missing: not ours to rename
        raise _missing([top], purpose) from err


def check_extras(*modules: str, purpose: str | None = None) -> None:
    """Fail early, before any model loads, when optional ``modules`` are not installed (looked up, not
    imported: importing Ray or DeepSpeed takes seconds). The error names every missing one at once."""
    import importlib.util

    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a blocked or broken package counts as missing
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise _missing(missing, purpose)
