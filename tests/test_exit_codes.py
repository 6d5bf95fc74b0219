"""`trait-guard` exit statuses through the real command: 0 passed, 4 halted (0 with --allow-halt),
2 bad input with the fix named, 1 an unexpected failure with its traceback."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from trait_guard.cli import main
from trait_guard.config import GenerateJobConfig, validate_config
from trait_guard.dataset import SCHEMA
from trait_guard.generation import generate_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tiny_llama_dir, tmp_path_factory):
    """The tiny model's own numbers (reference and a clean set) and a set whose completions are all one
    odd string (the gate must stop it before any update)."""
    root = tmp_path_factory.mktemp("exit-codes")
    generate_local(validate_config({
        "output_dir": str(root), "generation": {"n_prompts": 32, "chunk_size": 16, "max_new_tokens": 8},
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 3}]}, GenerateJobConfig),
        progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rows = [r for r in pq.read_table(root / "control-b.parquet").to_pylist() if r["kept"]]
    for row in rows:
        row.update(completion="x y x y x y", teacher_id="shifted")
        row["completion_ids"] = tokenizer("x y x y x y", add_special_tokens=False).input_ids
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "shifted.parquet")
    return root


def _config(tmp_path, tiny_llama_dir, data, train):
    path = tmp_path / f"{train}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / train), "student": {"model": str(tiny_llama_dir)},
        "data": {"train": str(data / f"{train}.parquet"), "reference": str(data / "control.parquet"),
                 "allow_unverified": train == "shifted"},
        "guard": {"signals": ["nll", "unigram"]}, "optim": {"batch_size": 4, "max_steps": 2},
        "deepspeed": {"enabled": False}, "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    return path


def test_a_halted_run_exits_4_unless_allowed(tiny_llama_dir, data, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, data, "shifted")
    assert main(["train", "--config", str(config), "--local"]) == 4
    captured = capsys.readouterr()
    assert "GATED before the first update" in captured.out and "--allow-halt" in captured.err
    assert main(["train", "--config", str(config), "--local", "--allow-halt"]) == 0


def test_a_clean_run_exits_0_and_says_when_it_watched_no_powered_signal(tiny_llama_dir, data, tmp_path, capsys):
    assert main(["train", "--config", str(_config(tmp_path, tiny_llama_dir, data, "control-b")), "--local"]) == 0
    out = capsys.readouterr().out
    assert "UNMONITORED after 2 of 2 steps" in out and "not 'passed'" in out


def test_bad_input_exits_2_naming_the_fix(tiny_llama_dir, data, tmp_path, capsys):
    config = yaml.safe_load(_config(tmp_path, tiny_llama_dir, data, "control-b").read_text())
    config["optim"]["batch_size"] = 1000
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--local"]) == 2
    assert "lower optim.batch_size" in capsys.readouterr().err


def test_an_unexpected_failure_exits_1_with_its_traceback(tiny_llama_dir, data, tmp_path):
    """A bug is not reported as bad input: the real command, with the training replaced by one that
    fails the way a bug would, exits 1 and prints the traceback."""
    config = _config(tmp_path, tiny_llama_dir, data, "control-b")
    script = ("import sys\nimport trait_guard.train as train\nfrom trait_guard import cli\n"
              "def broken(config):\n    return {}['missing']\n"
              "train.run_training = broken\n"
              f"sys.exit(cli.main(['train', '--config', {str(config)!r}, '--local']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'missing'" in done.stderr
