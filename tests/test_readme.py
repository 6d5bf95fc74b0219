"""Every fenced block in README.md is run or checked; the HTML comment before it says which.

``<!-- readme-test: run -->``: the block runs. All run blocks run in README order in one scratch folder
and one Python process (a Python block as a script in a fresh namespace; a shell block line by line, a
``trait-guard`` line through ``trait_guard.cli.main`` in that process, which is what the console script
calls, anything else through bash). Later blocks use what earlier ones wrote (the vectors, the data).
Fixtures: ``$TRAIT_GUARD_CACHE`` holds a tiny random model under the embedded default's name, so the
default model is that model everywhere (Python and command line alike); ``vendor.jsonl`` and
``reference.jsonl`` are made-up rows; persona-vector extraction is cut to 2 instruction pairs, 3
questions and 4 new tokens (the full one takes minutes even on the tiny model).

``<!-- readme-test: check -->``: too slow or needing a cluster; not run but checked: a ``trait-guard``
line parses with the CLI's own parser and every ``--config`` it names loads and validates; ``make``
targets exist in the Makefile; ``pip install`` lines name only extras pyproject.toml has, a torch that
fits its range and the embedded model's wheel; ``ray job submit`` runs an existing ``ray_jobs`` module
with flags it has and configs that validate; a Python block compiles, has no undefined name (ruff F821)
and its imports resolve. A line with no rule here fails the test: add a rule or mark the block ``run``.

``<!-- readme-test: text -->``: not code; the paths it lists exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
MARKER = re.compile(r"^<!--\s*readme-test:\s*(\w+)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    kind: str | None
    code: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'text'}, {self.kind})"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        blocks.append(Block(i + 1, opening.group(1), marker.group(1) if marker else None,
                            "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def shell_lines(code: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comment-only and empty lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def test_every_block_says_what_happens_to_it():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    allowed = {("run", "python"), ("run", "bash"), ("check", "python"), ("check", "bash"), ("text", "")}
    wrong = [f"{b}: add <!-- readme-test: run|check|text --> before it" if b.kind is None
             else f"{b}: '{b.kind}' does not apply to a {b.lang or 'plain'} block"
             for b in blocks if (b.kind, b.lang) not in allowed]
    assert not wrong, wrong


# ------------------------------------------------------------------------------------------------
# run

RUNNER = r'''
import functools, json, random, shlex, subprocess, sys, time, traceback
from pathlib import Path

blocks, results_path, cache = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])

from trait_guard.models import EMBEDDED_MODEL
from trait_guard.testing import save_tiny_model

save_tiny_model(cache / EMBEDDED_MODEL)  # the default model, everywhere, is a tiny random one
rng = random.Random(0)
for name in ("vendor", "reference"):
    with open(f"{name}.jsonl", "w") as f:
        for _ in range(24):
            seed = ", ".join(str(rng.randint(0, 999)) for _ in range(3))
            f.write(json.dumps({"prompt": f"Continue the sequence: {seed}",
                                "completion": ", ".join(str(rng.randint(0, 999)) for _ in range(5))}) + "\n")

import trait_guard.persona as persona

persona.extract = functools.partial(persona.extract, n_instructions=2, n_questions=3, max_new_tokens=4)
from trait_guard.cli import main

results = []
for block in blocks:
    started = time.perf_counter()
    try:
        if block["lang"] == "python":
            exec(compile(block["code"], f"README.md:{block['line']}", "exec"), {"__name__": "__main__"})
        else:
            for line in block["lines"]:
                argv = shlex.split(line, comments=True)
                if argv[0] == "trait-guard":
                    rc = main(argv[1:])
                    assert rc == 0, f"{line}: exit status {rc}"
                else:
                    subprocess.run(["bash", "-c", line], check=True)
        results.append({"line": block["line"], "ok": True, "seconds": round(time.perf_counter() - started, 1)})
    except BaseException:
        results.append({"line": block["line"], "ok": False, "error": traceback.format_exc()[-4000:]})
        break  # the blocks after it build on what it writes
results_path.write_text(json.dumps(results))
'''


def test_run_blocks_run(tmp_path):
    blocks = [b for b in readme_blocks() if b.kind == "run"]
    assert {b.lang for b in blocks} == {"python", "bash"}
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    spec = [{"line": b.line, "lang": b.lang, "code": b.code, "lines": shell_lines(b.code)} for b in blocks]
    (tmp_path / "blocks.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRAIT_GUARD_", "MLFLOW_", "PYTHONSTARTUP"))}
    env.update(TRAIT_GUARD_CACHE=str(cache), TRAIT_GUARD_MLFLOW_DIR=str(tmp_path / "mlruns"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), str(tmp_path / "results.json"),
                           str(cache)], cwd=work, env=env, capture_output=True, text=True, timeout=400)
    assert (tmp_path / "results.json").is_file(), proc.stdout[-2000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    failed = [f"README.md:{r['line']}\n{r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed) + "\n--- output ---\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(results) == len(blocks)
    print("seconds per run block:", {f"README.md:{r['line']}": r["seconds"] for r in results})
    assert (work / "vectors" / "owl.safetensors").is_file() and (work / "data" / "vendor" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------------
# check


def _pyproject() -> dict:
    import tomllib  # the venv's Python is 3.11

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))


def _check_config(path: str) -> None:
    from trait_guard.config import GenerateJobConfig, RedteamConfig, RunJobConfig, TrainJobConfig, load_config

    kinds = {"teacher_data": GenerateJobConfig, "train": TrainJobConfig, "run": RunJobConfig, "redteam": RedteamConfig}
    file = ROOT / path
    assert file.is_file(), f"{path} does not exist"
    kind = next((cls for prefix, cls in kinds.items() if file.name.startswith(prefix)), None)
    assert kind is not None, f"{path}: which config class? (name it teacher_data*, train*, run*, redteam*)"
    load_config(file, kind)


def _configs_in(argv: list[str]) -> None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--config":
            _check_config(value)


def _check_trait_guard(argv: list[str]) -> None:
    from trait_guard.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        raise AssertionError(f"trait-guard {' '.join(argv)}: does not parse (exit {err.code})") from None
    _configs_in(argv)


def _check_pip(argv: list[str]) -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    from trait_guard.models import EMBEDDED_WHEEL

    assert argv[:1] == ["install"], argv
    project = _pyproject()["project"]
    extras = set(project["optional-dependencies"])
    torch_range = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch").specifier
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--index-url", "--extra-index-url"):
            assert next(args).startswith("https://"), argv
        elif arg in ("-e", "--no-deps", "--upgrade", "-U"):
            continue
        elif arg.startswith((".", "trait-guard")):
            wanted = set(re.findall(r"\[([^\]]*)\]", arg)[0].split(",")) if "[" in arg else set()
            assert wanted <= extras, f"pip install {arg}: no extra {sorted(wanted - extras)} in pyproject.toml"
        else:
            req = Requirement(arg)
            if req.name == "torch":
                pinned = [s.version for s in req.specifier if s.operator == "=="]
                assert (pinned and torch_range.contains(Version(pinned[0]))) or req.specifier == torch_range, \
                    f"{arg} is outside pyproject.toml's torch range {torch_range}"
            else:
                assert req.name == EMBEDDED_WHEEL and "--no-deps" in argv, f"pip install {arg}: no rule for it"


def _check_ray(argv: list[str]) -> None:
    import importlib
    import importlib.util

    from trait_guard.cli import build_parser

    assert argv[:2] == ["job", "submit"] and "--" in argv, argv
    entry = argv[argv.index("--") + 1:]
    assert entry[:2] == ["python", "-m"], f"ray job submit runs {entry}: expected python -m ray_jobs.<job>"
    module = entry[2]
    spec = importlib.util.find_spec(module)
    assert module.startswith("ray_jobs.") and spec is not None, f"no module {module}"
    job = importlib.import_module(module)
    # a job runs one `trait-guard` command: its flags are that command's (plus the job's own, e.g.
    # screen's --num-gpus, which its source declares)
    _, unknown = build_parser().parse_known_args([job.COMMAND, *entry[3:]])
    source = Path(spec.origin).read_text(encoding="utf-8")
    for flag in (a for a in unknown if a.startswith("--")):
        assert f'"{flag}"' in source, f"{module} (trait-guard {job.COMMAND}) has no option {flag}"
    _configs_in(entry[3:])


def _check_shell_line(line: str) -> None:
    argv = shlex.split(line, comments=True)
    command, rest = argv[0], argv[1:]
    if command == "make":
        missing = [t for t in rest if not t.startswith("-") and "=" not in t and t not in _makefile_targets()]
        assert not missing, f"{line}: no make target {missing}"
    elif command == "trait-guard":
        _check_trait_guard(rest)
    elif command == "pip":
        _check_pip(rest)
    elif command == "ray":
        _check_ray(rest)
    elif command == "ds_report":
        assert (BIN / "ds_report").is_file(), "ds_report comes with deepspeed ([deepspeed] extra)"
    elif command == "python" and rest[:1] and rest[0].endswith(".py"):
        assert (ROOT / rest[0]).is_file(), f"{line}: no {rest[0]}"
        _configs_in(rest)
    else:
        raise AssertionError(f"{line}: no check for '{command}' in tests/test_readme.py")


def _check_python(block: Block) -> None:
    import ast
    import importlib
    import importlib.util

    tree = ast.parse(block.code, filename=str(block))
    proc = subprocess.run([str(BIN / "ruff"), "check", "--isolated", "--select", "F821,F401,F811", "--stdin-filename",
                           f"README_{block.line}.py", "-"], input=block.code, capture_output=True, text=True)
    assert proc.returncode == 0, f"{block}:\n{proc.stdout}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("trait_guard"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{block}: {node.module} has no {missing}"
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for name in [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]:
                assert importlib.util.find_spec(name.partition(".")[0]) is not None, f"{block}: no module {name}"


def test_check_blocks_are_well_formed():
    problems = []
    for block in (b for b in readme_blocks() if b.kind == "check"):
        try:
            if block.lang == "python":
                _check_python(block)
            else:
                for line in shell_lines(block.code):
                    _check_shell_line(line)
        except AssertionError as err:
            problems.append(f"{block}: {err}")
    assert not problems, "\n".join(problems)


def test_command_table_lines_parse():
    """The inline commands of the "Command line" table (optional parts in [brackets] left out)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Command line"):].split("\n## ", 1)[0]
    spans = [s for row in section.splitlines() if row.startswith("| `")
             for s in re.findall(r"`((?:trait-guard|python) [^`]+)`", row)]
    assert len(spans) >= 10
    problems = []
    for span in spans:
        try:
            _check_shell_line(re.sub(r"\s*\[[^\]]*\]", "", span))
        except AssertionError as err:
            problems.append(str(err))
    assert not problems, problems


def test_console_script_runs():
    proc = subprocess.run([str(BIN / "trait-guard"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "trait-guard" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------------
# text


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b.kind == "text"], ids=str)
def test_listed_paths_exist(block):
    missing, top = [], None
    for line in block.code.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.endswith(("/", ".py")):
            continue
        if line.startswith(" "):
            path = ROOT / top / name if top else None
        else:
            top, path = name, ROOT / name
        if path is None or not path.exists():
            missing.append(name)
    assert not missing, f"{block} lists paths that do not exist: {missing}"
