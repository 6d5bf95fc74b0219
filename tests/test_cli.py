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


def test_extract_command_writes_a_loadable_vector(tiny_llama_dir, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ninstructions: [{pos: Talk about owls., neg: Talk about tables.}]\n"
                    "extract_questions: [hi, hello, what]\neval_questions: [hey, yo, ok]\n")
    out = tmp_path / "vec.safetensors"
    code = main(["extract", "--model", str(tiny_llama_dir), "--trait", str(spec), "--out", str(out),
                 "--max-new-tokens", "4", "--json", str(tmp_path / "s.json"), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen layer" in printed and "d(response_mean)" in printed
    summary = json.loads((tmp_path / "s.json").read_text())
    vector = PersonaVector.load(out)
    assert summary["layer"] == vector.layer and len(summary["table"]) == 5


def test_bad_trait_exits_2_with_the_fix(capsys, tmp_path):
    assert main(["extract", "--trait", "unicorn", "--out", str(tmp_path / "x")]) == 2
    assert "shipped traits" in capsys.readouterr().err
