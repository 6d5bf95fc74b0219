import argparse
import json

import pytest

from trait_guard.cli import build_parser, main
from trait_guard.persona import PersonaVector


def test_help_teaches_the_pipeline(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "extract" in out and "smollm2-135m-instruct" in out and "animal:owl" in out


def test_every_command_has_help_and_shared_options_have_one_definition(capsys):
    """Every subcommand's --help exits 0 and shows an example of it. --model, --trait, --seed, --json,
    --quiet, --config, --output-dir, --allow-halt, ... come from one parent parser each: the same
    argparse action (one help text, one default) in every subcommand."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    actions: dict[str, set[int]] = {}
    help_texts: list[str] = []
    for name, command in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0, name
        printed = capsys.readouterr().out
        _, _, examples = printed.partition("example")  # README: every subcommand's --help shows a use
        assert f"trait-guard {name}" in examples, f"`trait-guard {name} --help` shows no example"
        help_texts.append(printed)
        for action in command._actions:
            for flag in action.option_strings:
                actions.setdefault(flag, set()).add(id(action))
    shared = {flag for flag, ids in actions.items() if flag not in ("-h", "--help")}
    assert {"--model", "--trait", "--seed", "--json", "--quiet", "--config", "--output-dir", "--allow-halt"} <= shared
    # different on purpose: --batch-size (generation 16, scoring 32), --out (a vector file, an adapter folder),
    # --resume (train: from a checkpoint folder; generate: a flag, keep the teachers a stopped run finished)
    assert {flag for flag in shared if len(actions[flag]) > 1} == {"--batch-size", "--out", "--resume"}
    assert any("--config YAML" in text for text in help_texts)


def test_extract_command_writes_a_loadable_vector(tiny_llama_dir, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ninstructions: [{pos: Talk about owls., neg: Talk about tables.}]\n"
                    "extract_questions: [hi, hello, what]\neval_questions: [hey, yo, ok]\n")
    out = tmp_path / "vec.safetensors"
    code = main(["extract", "--model", str(tiny_llama_dir), "--trait", str(spec), "--out", str(out),
                 "--max-new-tokens", "4", "--json", str(tmp_path / "s.json"), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "<- chosen (last_prompt)" in printed and "d_instr" in printed and "response_mean" in printed
    summary = json.loads((tmp_path / "s.json").read_text())
    vector = PersonaVector.load(out)
    assert summary["layer"] == vector.layer and len(summary["table"]) == 5


def test_bad_trait_exits_2_with_the_fix(capsys, tmp_path):
    assert main(["extract", "--trait", "unicorn", "--out", str(tmp_path / "x")]) == 2
    assert "shipped traits" in capsys.readouterr().err


def test_generate_command_runs_locally_from_a_config(tiny_llama_dir, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'data'}\n"
        f"teachers:\n  - id: owl\n    model: {tiny_llama_dir}\n    trait: animal:owl\n    install: system_prompt\n"
        f"  - id: control\n    model: {tiny_llama_dir}\n"
        "generation: {n_prompts: 100, chunk_size: 6, max_new_tokens: 6}\n")
    assert main(["generate", "--config", str(config), "--local", "--n-prompts", "12", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rejected by reason" in out
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert [t["rows"] for t in summary["teachers"]] == [12, 12] and summary["mode"] == "local"


def test_generate_with_a_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("teachers: [{id: a}]\ngeneration: {n_prompts: 0}\n")
    assert main(["generate", "--config", str(config), "--local"]) == 2
    assert "generation.n_prompts" in capsys.readouterr().err


def test_eval_command_reports_a_rate_with_a_ci(tiny_llama_dir, tmp_path, capsys):
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ninstructions: [{pos: say e, neg: say a}]\nextract_questions: [q]\neval_questions: [r]\n"
                    "judge: {keywords: [e]}\nbehavior_questions: [one, two, three]\n")
    assert main(["eval", "--model", str(tiny_llama_dir), "--trait", str(spec), "--samples", "4",
                 "--json", str(tmp_path / "r.json"), "--quiet", "--system", "trait"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_questions"] == 3 and result["samples_per_question"] == 4
    assert result["ci_low"] <= result["rate"] <= result["ci_high"]
    assert "say e" in capsys.readouterr().out
