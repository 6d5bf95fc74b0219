"""Which code produced a result: the package version, the git commit (when run from a checkout), a
hash of the package's source and the versions of the libraries that compute it, recorded in every
summary and red-team result so that results from different code are never mixed (the red-team grid
reruns a run whose source differs) and those from other library versions can be told apart."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from trait_guard import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
# the libraries whose numerics or defaults a result depends on (constraints.txt pins them for `make`)
LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "ray", "mlflow", "numpy", "scipy")


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`LIBRARIES` (None: not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"package", "source_sha256", "git_commit", "git_dirty", "libraries"}`` (git fields None outside
    a checkout; ``libraries``: :func:`library_versions`, recorded, not compared by :func:`same_code`)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--", str(PACKAGE_DIR)], cwd=PACKAGE_DIR,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": __version__, "source_sha256": digest.hexdigest(), "git_commit": commit, "git_dirty": dirty,
            "libraries": library_versions()}


def same_code(recorded: dict[str, Any] | None) -> bool:
    """Whether a recorded :func:`code_version` is this code's (the source hash decides)."""
    return bool(recorded) and recorded.get("source_sha256") == code_version()["source_sha256"]


def portable_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as a result file may record it: relative to ``root`` (default: the working directory)
    when it lies inside it, else ``<outside>/`` and its name, so that no machine's folders end up
    in the repository's results. Relative paths are kept as given."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    root = Path(root or Path.cwd()).resolve()
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return f"<outside>/{path.name}"


def reproducible_command(argv: list[str] | None = None, root: str | Path | None = None) -> str:
    """The command that produced a result, for its JSON: ``python`` and ``argv`` (default ``sys.argv``)
    with every absolute path, alone or after ``--option=``, made :func:`portable_path`. A result made
    from the repository root reads as a command to paste there."""
    import sys

    def portable(arg: str) -> str:
        option, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        return option + sep + (portable_path(value, root) if value.startswith("/") else value)

    return " ".join(["python", *(portable(a) for a in (sys.argv if argv is None else argv))])
