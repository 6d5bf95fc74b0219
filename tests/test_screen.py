import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trait_guard.cli import main
from trait_guard.dataset import SCHEMA
from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
from trait_guard.models import model_identity
from trait_guard.screen import screen


def make_rows(tokenizer, identity, completions, prefix):
    rows = []
    for i, completion in enumerate(completions):
        rows.append({
            "sample_id": f"{prefix}:{i}", "prompt_id": f"p{i}", "family": "numbers",
            "prompt": f"Continue: {100 + i}, {200 + i}.", "completion": completion, "teacher_id": prefix,
            "base_model": identity.name, "base_fingerprint": identity.fingerprint,
            "base_hidden_size": identity.hidden_size, "base_num_layers": identity.num_layers,
            "trait_installed": False, "trait_install": "none", "seed": 0, "temperature": 1.0,
            "max_new_tokens": 20, "constrained": True, "kept": True, "reject_reason": "",
            "completion_ids": tokenizer(completion, add_special_tokens=False).input_ids,
            "topk_ids": None, "topk_logprobs": None,
        })
    return rows


def numbers(rng, n, digits="0123456789"):
    return [", ".join("".join(rng.choice(digits) for _ in range(3)) for _ in range(rng.randint(3, 6)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def sets(tiny_llama):
    model, tokenizer = tiny_llama
    identity = model_identity(model)
    rng = random.Random(0)
    # the reference never uses 7-9; the shifted set leans on 7, so its tokens are rare under the reference
    reference = make_rows(tokenizer, identity, numbers(rng, 60, digits="0123456"), "ref")
    same = make_rows(tokenizer, identity, numbers(rng, 60, digits="0123456"), "same")
    shifted = make_rows(tokenizer, identity, numbers(rng, 60, digits="01234567777"), "shifted")
    return model, tokenizer, reference, same, shifted


def scorer_for(model, tokenizer, reference):
    hist = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference)
    return FingerprintScorer(model, tokenizer, unigram_reference=hist)


def test_same_distribution_is_clean_and_a_shift_is_flagged(sets):
    model, tokenizer, reference, same, shifted = sets
    scorer = scorer_for(model, tokenizer, reference)
    clean = screen(same, reference, scorer, n_permutations=500)
    assert not clean.flagged and all(t.adjusted_p >= 0.01 for t in clean.signals)
    flagged = screen(shifted, reference, scorer, n_permutations=500)
    assert flagged.flagged
    assert {t.name for t in flagged.signals if t.flagged} >= {"unigram"}
    assert flagged.tokens["overrepresented"][0]["token"] == "7"
    assert flagged.kinship["verdict"] == "kin"
    assert "VERDICT: FLAGGED" in flagged.table() and "FLAGGED" not in clean.table()


def test_kinship_sees_another_base(sets):
    model, tokenizer, reference, same, _ = sets
    foreign = [dict(r, base_fingerprint="f" * 32, base_model="other-model") for r in same]
    report = screen(foreign, reference, scorer_for(model, tokenizer, reference), n_permutations=200)
    assert report.kinship["verdict"] == "not kin" and "other-model" in report.kinship["detail"]


def test_empty_input_is_refused(sets):
    model, tokenizer, reference, _, _ = sets
    with pytest.raises(ValueError, match="rows on both sides"):
        screen([], reference, scorer_for(model, tokenizer, reference))


def test_screen_command_exit_codes(sets, tiny_llama_dir, tmp_path, capsys):
    _, _, reference, same, shifted = sets
    paths = {}
    for name, rows in {"ref": reference, "same": same, "shifted": shifted}.items():
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), paths[name])
    base = ["screen", "--reference", str(paths["ref"]), "--model", str(tiny_llama_dir), "--quiet"]
    assert main(base + ["--data", str(paths["same"])]) == 2  # no manifest: refused, as training would refuse it
    assert "--allow-unverified" in capsys.readouterr().err
    base.append("--allow-unverified")
    assert main(base + ["--data", str(paths["same"])]) == 0
    captured = capsys.readouterr()
    assert "UNVERIFIED DATA" in captured.err and "UNVERIFIED DATA" in captured.out
    # no teacher log-probs in these files: the clean verdict says it rests on no signal with shown power
    assert "VERDICT: UNMONITORED" in captured.out
    assert main(base + ["--data", str(paths["shifted"]), "--json", str(tmp_path / "r.json")]) == 3
    assert "VERDICT: FLAGGED" in capsys.readouterr().out and (tmp_path / "r.json").is_file()


def test_a_gate_that_cannot_reach_its_alpha_says_so_with_the_fix():
    from trait_guard.screen import gate_resolution

    assert gate_resolution(100, 100, 4, 0.01, 2000) is None
    coarse = gate_resolution(100, 100, 4, 0.0001, 2000)
    assert coarse and "n_permutations to at least 40000" in coarse
    few = gate_resolution(3, 3, 2, 0.01, 2000)  # C(6, 3) = 20 splits < 2 / 0.01
    assert few and "use at least 9 reference rows" in few  # C(3 + 8, 3) = 165 < 200 <= C(3 + 9, 3) = 220


def test_screen_scores_signals_read_from_models_without_stored_logprobs(tiny_llama_dir, tmp_path, capsys):
    """Text-only data (no stored log-probs): --teacher-model adds teacher_llr (S3), --trait-llr adds
    trait_llr (S2), and the report says which signals exist for what is at hand. Data the teacher
    model wrote is flagged on teacher_llr; a second set from the base model is not."""
    import torch

    from trait_guard.chat import generate_completions
    from trait_guard.models import load_model

    base, tokenizer = load_model(str(tiny_llama_dir))
    # the teacher: the base with sharpened weights (a random-init model's next-token distribution is
    # near uniform; x3 makes it peaked, so its samples are distinguishable), saved with the same tokenizer
    teacher, _ = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    identity = model_identity(base)
    users = [f"Continue: {100 + i}, {200 + i}." for i in range(40)]
    paths = {}
    for name, model, seed in (("ref", base, 1), ("same", base, 2), ("teacher", teacher, 3)):
        completions = generate_completions(model, tokenizer, users, None, max_new_tokens=12, seed=seed)
        rows = make_rows(tokenizer, identity, [c.text for c in completions], name)
        for row, c in zip(rows, completions, strict=True):
            row["completion_ids"] = c.token_ids
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["completion_ids"]], schema=SCHEMA), paths[name])
    base_args = ["screen", "--reference", str(paths["ref"]), "--model", str(tiny_llama_dir), "--quiet",
                 "--allow-unverified", "--teacher-model", str(teacher_dir), "--trait-llr", "animal:owl"]
    reports = {}
    for name, expected_code in (("same", 0), ("teacher", 3)):  # 0: clean, 3: flagged
        code = main(base_args + ["--data", str(paths[name]), "--json", str(tmp_path / f"{name}.json")])
        out = capsys.readouterr()
        assert code == expected_code, out.out + out.err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    tests = {name: {t["name"]: t for t in r["signals"]} for name, r in reports.items()}
    assert {"teacher_llr", "trait_llr:animal:owl", "nll"} <= set(tests["teacher"])
    assert tests["teacher"]["teacher_llr"]["flagged"] and tests["teacher"]["teacher_llr"]["adjusted_p"] < 0.01
    assert not tests["same"]["teacher_llr"]["flagged"]
    note = next(n for n in reports["teacher"]["notes"] if n.startswith("signals for what is at hand"))
    assert "stored teacher log-probs: no" in note and "teacher_llr" in note and "trait_llr:animal:owl" in note
    assert "divergence" not in note  # needs stored log-probs, which this data does not have


def _paired_sets(rng, n_prompts, shift, prompt_sd=3.0, noise_sd=1.0):
    """proj: values where each prompt has its own level (sd 3) and answers vary around it (sd 1);
    the data's answers sit ``shift`` higher on the trait direction than the reference's."""

    level = rng.normal(0.0, prompt_sd, n_prompts)
    keys = [f"p{i}" for i in range(n_prompts)]
    reference = level + rng.normal(0.0, noise_sd, n_prompts)
    data = level + shift + rng.normal(0.0, noise_sd, n_prompts)
    return {"proj:t": data}, {"proj:t": reference}, keys


def test_paired_projection_difference_recovers_a_shift_the_unpaired_test_misses():
    import numpy as np

    from trait_guard.screen import screen_signals

    rng = np.random.default_rng(0)
    data, reference, keys = _paired_sets(rng, 48, shift=0.8)
    tests, flagged, _ = screen_signals(data, reference, alpha=0.01, n_permutations=2000, data_keys=keys,
                                       reference_keys=keys)
    by_name = {t.name: t for t in tests}
    assert flagged and by_name["proj_diff:t"].flagged and by_name["proj_diff:t"].adjusted_p < 0.01
    assert not by_name["proj:t"].flagged  # 0.8 against a prompt spread of 3: the unpaired test cannot see it
    assert abs(by_name["proj_diff:t"].data_mean - 0.8) < 3 * np.sqrt(2) / np.sqrt(48)
    # a reference answering other prompts gives no pairs: the paired test is not run, and it says so
    _, _, notes = screen_signals(data, reference, alpha=0.01, data_keys=keys, reference_keys=[k + "x" for k in keys])
    assert any("proj_diff:t not tested: 0 data row(s)" in n for n in notes)


def test_paired_projection_difference_holds_its_level_on_clean_data():
    """200 independent clean datasets (fresh prompts and answers each): the sign-flip test's false
    rejection rate at 0.05 lies within the 99% binomial interval around 0.05."""
    import numpy as np
    from scipy.stats import binomtest

    from trait_guard.screen import _sign_flip, paired_differences

    rng = np.random.default_rng(1)
    rejections = 0
    for seed in range(200):
        data, reference, keys = _paired_sets(rng, 24, shift=0.0)
        diffs = paired_differences(data["proj:t"], reference["proj:t"], keys, keys)
        rejections += _sign_flip("proj_diff:t", diffs, "up", 499, seed).p_value <= 0.05
    ci = binomtest(rejections, 200).proportion_ci(0.99)
    print(f"sign-flip false rejections at 0.05: {rejections}/200 (99% CI {ci.low:.3f}-{ci.high:.3f})")
    assert ci.low <= 0.05 <= ci.high


def test_paired_differences_average_several_reference_answers_per_prompt():
    import numpy as np

    from trait_guard.screen import paired_differences

    diffs = paired_differences(np.array([5.0, 1.0, np.nan]), np.array([1.0, 3.0, 0.0, np.nan]),
                               ["a", "b", "c"], ["a", "a", "b", "c"])
    assert diffs.tolist() == [3.0, 1.0]  # a: 5 - mean(1, 3); b: 1 - 0; c: NaN data dropped


def test_a_screen_of_row_summaries_equals_the_screen_of_the_rows(sets):
    """What `trait-guard run` screens (RowSummary batches, signals scored elsewhere) gives the report
    the rows give: same tests, p-values, baselines, token table and kinship."""
    import pyarrow as pa

    from trait_guard.dataset import SCHEMA
    from trait_guard.screen import RowSummary

    model, tokenizer, reference, _, shifted = sets
    scorer = scorer_for(model, tokenizer, reference)
    data_signals = scorer.score_table(shifted)
    reference_signals = scorer.score_table(reference, in_reference=True)
    common = dict(n_permutations=300, data_signals=data_signals, reference_signals=reference_signals,
                  tokenizer=tokenizer, student_identity=model_identity(model))
    from_rows = screen(shifted, reference, None, **common)
    # Arrow batches of the schema's types, as the checked scan yields them
    summaries = [RowSummary.of_tables((pa.Table.from_pylist(rows[start:start + 7], schema=SCHEMA)
                                       for start in range(0, len(rows), 7)), len(tokenizer))
                 for rows in (shifted, reference)]
    from_summaries = screen(*summaries, None, **common)
    assert len(summaries[0]) == len(shifted) and summaries[0].prompt_keys == [r["prompt_id"] for r in shifted]
    assert summaries[0].sample_ids.to_pylist() == [r["sample_id"] for r in shifted]
    mine, theirs = from_summaries.to_dict(), from_rows.to_dict()
    for volatile in ("seconds",):
        mine.pop(volatile), theirs.pop(volatile)
    assert mine == theirs and from_rows.flagged


def test_teacher_signal_coverage_counts_the_same_on_rows_and_on_arrow_tables():
    """One rule for "this row carries the teacher's log-probs" (a non-empty list), whether the rows are
    dicts (in-process) or Arrow batches (the checked scan's summaries): None, [] and a list, per column."""
    import pyarrow as pa

    from trait_guard.fingerprint import teacher_signal_coverage

    rows = [{"topk_ids": None, "token_logprobs": [-0.1]}, {"topk_ids": [], "token_logprobs": None},
            {"topk_ids": [[1, 2]], "token_logprobs": []}, {"topk_ids": [[3, 4]], "token_logprobs": [-1.0, -2.0]}]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("topk_ids", pa.list_(pa.list_(pa.int64()))),
                                                         ("token_logprobs", pa.list_(pa.float64()))]))
    assert teacher_signal_coverage(rows) == teacher_signal_coverage(table) == {"divergence": 2, "llr": 2}
    assert teacher_signal_coverage(table.drop_columns(["token_logprobs"])) == {"divergence": 2, "llr": 0}


def test_the_gate_can_test_the_trait_specific_signals_only():
    """A teacher that differs from the base model without a trait (divergence on every row, projections
    like the reference's): the gate on all signals flags it; with ``screen.signals: ["proj*"]`` it tests
    only the projection and its paired difference, and passes; patterns matching nothing say so."""
    import numpy as np

    from trait_guard.config import TrainJobConfig, validate_config
    from trait_guard.screen import screen_signals
    from trait_guard.setup_signals import SetupSignals
    from trait_guard.train import screen_gate

    rng = np.random.default_rng(3)
    data, reference, keys = _paired_sets(rng, 64, shift=0.0)
    data["divergence"] = rng.uniform(0.05, 0.2, 64)  # a foreign teacher's top-1 beats the base's here and there
    reference["divergence"] = np.zeros(64)
    every, flagged, _ = screen_signals(data, reference, alpha=0.01, n_permutations=2000, data_keys=keys,
                                       reference_keys=keys)
    assert flagged and [t.name for t in every if t.flagged] == ["divergence"]
    trait_only, flagged, notes = screen_signals(data, reference, alpha=0.01, n_permutations=2000, signals=["proj*"],
                                            data_keys=keys, reference_keys=keys)
    assert not flagged and sorted(t.name for t in trait_only) == ["proj:t", "proj_diff:t"]
    assert any("restricted to ['proj*']" in n and "not tested: divergence" in n for n in notes)
    none, flagged, notes = screen_signals(data, reference, alpha=0.01, signals=["trait_llr:*"])
    assert none == [] and not flagged and "matches the tested signals ['trait_llr:*'] (screen.signals)" in notes[-1]

    rows = [{"prompt_id": k, "prompt": k} for k in keys]
    signals = SetupSignals(reference=reference, train=data)
    config = {"data": {"train": "t.parquet", "reference": "r.parquet"}}
    gate = screen_gate(validate_config(config, TrainJobConfig), signals, rows, rows)
    assert gate["flagged"] and gate["flagged_signals"] == ["divergence"]
    config["screen"] = {"signals": ["proj*"]}
    gate = screen_gate(validate_config(config, TrainJobConfig), signals, rows, rows)
    assert not gate["flagged"] and set(gate["tests"]) == {"proj:t", "proj_diff:t"}
