"""Which code made a result, and the command that made it (trait_guard.version)."""

from importlib import metadata
from pathlib import Path

from trait_guard.version import code_version, portable_path, reproducible_command, same_code


def test_code_version_is_stable_and_recognizes_itself():
    version = code_version()
    assert len(version["source_sha256"]) == 64 and same_code(version)
    assert not same_code({**version, "source_sha256": "0" * 64}) and not same_code(None)
    # library versions are recorded (as installed), not compared: other versions are still this code
    assert version["libraries"]["torch"] == metadata.version("torch")
    assert version["libraries"]["transformers"] == metadata.version("transformers")
    assert same_code({**version, "libraries": {"torch": "0.0"}})


def test_library_labels_name_installed_versions_only():
    from trait_guard.redteam import libraries_label

    assert libraries_label({"libraries": {"torch": "2.13.0", "ray": None, "peft": "0.21"}}) == "torch 2.13.0, peft 0.21"
    assert libraries_label({"source_sha256": "0" * 64}) == "unrecorded" and libraries_label(None) == "unrecorded"
    assert libraries_label(code_version()).startswith(f"torch {metadata.version('torch')}, transformers ")


def test_recorded_commands_carry_no_machine_paths(tmp_path):
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    outside = tmp_path / "scratch" / "out.json"
    command = reproducible_command([str(root / "benchmarks" / "x.py"), "outputs/grid", "--out", str(outside),
                                    f"--grid={root / 'outputs' / 'g'}", "--sizes", "32", "64"], root=root)
    assert command == "python benchmarks/x.py outputs/grid --out <outside>/out.json --grid=outputs/g --sizes 32 64"
    assert str(tmp_path) not in command
    assert portable_path("outputs/a") == "outputs/a"  # relative paths stay as given
    assert portable_path(Path.cwd() / "outputs" / "a") == "outputs/a"  # the working directory is the default root
