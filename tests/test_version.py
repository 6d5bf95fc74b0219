"""Which code made a result, and the command that made it (trait_guard.version)."""

from pathlib import Path

from trait_guard.version import code_version, portable_path, reproducible_command, same_code


def test_code_version_is_stable_and_recognizes_itself():
    version = code_version()
    assert len(version["source_sha256"]) == 64 and same_code(version)
    assert not same_code({**version, "source_sha256": "0" * 64}) and not same_code(None)


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
