"""benchmarks/guard_replay.py's core on synthetic signals with known answers (no model, a few seconds)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta, binomtest

from trait_guard.sequential import EProcessDetector

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "guard_replay.py"


@pytest.fixture(scope="module")
def replay():
    spec = importlib.util.spec_from_file_location("guard_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["guard_replay"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("guard_replay", None)


def signals(rng, n, shift=0.0):
    """Per-sample signals like the scorer's: llr and nll (Gaussian), divergence exactly 0 (the base
    model's own data); ``shift`` moves llr up by that many standard deviations."""
    return {"llr": rng.normal(shift, 1.0, n), "nll": rng.normal(4.0, 0.5, n), "divergence": np.zeros(n)}


@pytest.fixture(scope="module")
def args(replay):
    return replay.parse_args(["--pool", "unused", "--n-permutations", "500", "--signals", "divergence", "llr", "nll"])


def test_partition_is_disjoint_reproducible_and_floor_sized(replay):
    index = replay.partition(1000, 128, replay.dataset_rng(0, 128, "control-b"))
    assert index.shape == (7, 128)  # floor(1000 / 128) datasets
    flat = index.ravel()
    assert len(np.unique(flat)) == flat.size  # no row in two datasets
    assert flat.min() >= 0 and flat.max() < 1000
    again = replay.partition(1000, 128, replay.dataset_rng(0, 128, "control-b"))
    assert np.array_equal(index, again)
    other = replay.partition(1000, 128, replay.dataset_rng(0, 128, "owl"))
    assert not np.array_equal(index, other)  # each teacher its own permutation
    assert replay.partition(10, 32, np.random.default_rng(0)).shape == (0, 32)


@pytest.mark.parametrize(("k", "n"), [(0, 300), (1, 300), (3, 75), (9, 9), (5, 37)])
def test_bounds_match_scipy(replay, k, n):
    lo, hi = replay.exact_interval(k, n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    # the exact interval's ends are Beta quantiles (Clopper-Pearson)
    assert hi == pytest.approx(1.0 if k == n else beta.ppf(0.975, k + 1, n - k))
    assert lo == pytest.approx(0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1))
    upper = replay.upper_bound(k, n)
    assert upper == pytest.approx(1.0 if k == n else beta.ppf(0.95, k + 1, n - k))
    assert lo <= k / n <= upper <= hi  # one-sided 95% bound sits inside the two-sided 95% interval
    if k == 0:
        assert upper == pytest.approx(1 - 0.05 ** (1 / n))  # about 3/n: the "rule of three"
    entry = replay.rate(k, n)
    assert entry["k"] == k and entry["n"] == n and entry["rate"] == pytest.approx(k / n)
    assert replay.rate(0, 0)["rate"] is None


def test_gate_flags_a_planted_shift_in_every_dataset_at_128(replay, args):
    rng = np.random.default_rng(1)
    reference = signals(rng, 2000)
    shifted = signals(rng, 1280, shift=1.0)
    result = replay.replay_teacher("shifted", "trait", shifted, reference, 128, args, ["divergence", "llr", "nll"])
    assert result["datasets"] == 10
    assert result["gate"]["k"] == 10  # a 1-sd shift over 128 samples: p at the permutation floor
    assert result["gate"]["by_signal"]["llr"] == 10  # every flag names the shifted signal
    assert sum(result["gate"]["by_signal"].values()) <= 11  # (an unshifted one at chance, alpha 0.01)
    assert result["stream"]["k"] == 10 and result["stream"]["by_signal"] == {"llr": 10}
    delay = result["stream"]["delay"]
    assert delay["alarmed"] == 10 and 1 <= delay["min"] <= delay["median"] <= delay["max"] <= 128
    assert delay["mean_ci95"][0] <= delay["mean"] <= delay["mean_ci95"][1]
    assert result["gate_or_stream"]["k"] == 10


def test_clean_datasets_are_rarely_flagged(replay, args):
    rng = np.random.default_rng(2)
    reference = signals(rng, 2000)
    clean = signals(rng, 1280)
    result = replay.replay_teacher("clean", "clean", clean, reference, 128, args, ["divergence", "llr", "nll"])
    assert result["datasets"] == 10
    assert result["gate"]["k"] <= 1 and result["stream"]["k"] <= 1  # alpha = 0.01 per dataset
    assert result["stream"]["constant_checks"] == ["divergence"]  # constant reference: the exact check
    assert set(result["gate"]["at_levels"]) == {"0.05", "0.1"}
    assert result["gate"]["at_levels"]["0.05"]["k"] <= result["gate"]["at_levels"]["0.1"]["k"]


def test_paired_projection_difference_sees_a_lean_that_the_prompt_spread_hides(replay, args):
    """S1 in the gate: each prompt's answers sit at their own level on the persona direction (spread 3
    sd), and the trait teacher leans 0.8 sd above the reference's answers to the same prompts. With the
    rows' prompt keys the gate tests ``proj_diff:owl`` and flags every dataset of 64; the unpaired
    ``proj:owl`` flags far fewer; a clean teacher answering the same prompts is rarely flagged."""
    rng = np.random.default_rng(5)
    n_prompts = 400
    level = rng.normal(0.0, 3.0, n_prompts)

    def answers(prompts, lean):
        return {"proj:owl": level[prompts] + lean + rng.normal(0.0, 1.0, len(prompts)), "nll": rng.normal(4.0, 0.5, len(prompts))}

    ref_prompts, clean_prompts, owl_prompts = (rng.integers(0, n_prompts, n) for n in (2000, 640, 640))
    scored = {"control": answers(ref_prompts, 0.0), "clean": answers(clean_prompts, 0.0), "owl": answers(owl_prompts, 0.8)}
    keys = {"control": ref_prompts.astype(str), "clean": clean_prompts.astype(str), "owl": owl_prompts.astype(str)}
    paired = replay.parse_args(["--pool", "unused", "--n-permutations", "500", "--signals", "nll", "--clean", "clean",
                                "--trait", "owl", "--gate-signals", "proj*", "--sizes", "64"])
    assert replay.gate_names(["nll", "proj:owl"], paired=True) == ["nll", "proj:owl", "proj_diff:owl"]
    assert replay.gate_names(["nll", "proj:owl"], paired=False) == ["nll", "proj:owl"]
    results = {r["teacher"]: r for r in replay.replay(scored, paired, progress=False, keys=keys)}
    owl, clean = results["owl"], results["clean"]
    assert owl["datasets"] == 10 and owl["gate"]["by_signal"].get("proj_diff:owl") == 10
    assert owl["gate"]["by_signal"].get("proj:owl", 0) <= 5  # 0.8 sd against a 3-sd spread: the unpaired test is weak
    assert clean["gate"]["k"] <= 1
    unpaired = {r["teacher"]: r for r in replay.replay(scored, paired, progress=False)}  # no keys: no proj_diff
    assert "proj_diff:owl" not in unpaired["owl"]["gate"]["by_signal"]
    assert unpaired["owl"]["gate"]["k"] < owl["gate"]["k"]


def test_separation_is_oriented_bagged_disjointly_and_null_on_clean_data(replay):
    """AUROC against the reference: a 0.5-sd shift up in llr gives the normal-theory per-sample AUROC
    Phi(0.5 / sqrt 2) = 0.64 and Phi(0.5 * 4 / sqrt 2) = 0.92 from bag means of 16; a shift *down* in nll (its suspicious
    direction is up) gives below 0.5; a clean teacher's interval holds 0.5."""
    from scipy.stats import norm

    rng = np.random.default_rng(9)
    scored = {"control": signals(rng, 2000), "clean": signals(rng, 2000), "owl": signals(rng, 2000, shift=0.5)}
    scored["owl"]["nll"] = scored["owl"]["nll"] - 0.25  # 0.5 sd below the reference
    many = replay.parse_args(["--pool", "unused", "--clean", "clean", "--trait", "owl"])
    rows = {(r["teacher"], r["signal"], r["bag_size"]): r for r in replay.separation(scored, many, (1, 16), n_boot=300)}
    owl = rows[("owl", "llr", 1)]
    assert owl["bags"] == [2000, 2000] and abs(owl["auroc"] - norm.cdf(0.5 / np.sqrt(2))) < 0.03
    assert owl["ci95"][0] < owl["auroc"] < owl["ci95"][1]
    assert rows[("owl", "llr", 16)]["bags"] == [125, 125] and abs(rows[("owl", "llr", 16)]["auroc"] - norm.cdf(2 / np.sqrt(2))) < 0.05
    assert rows[("owl", "nll", 1)]["auroc"] < 0.4  # oriented: lower nll is the unsuspicious direction
    clean = rows[("clean", "llr", 1)]
    assert clean["role"] == "clean" and clean["ci95"][0] < 0.5 < clean["ci95"][1]
    assert rows[("clean", "divergence", 1)]["auroc"] == 0.5  # all zeros on both sides: ties
    table = replay.markdown_separation_table(list(rows.values()), 16)
    assert table.splitlines()[0] == "| signal | clean (clean) | owl (trait) |" and "| llr (up) | " in table


def test_stream_delay_is_the_eprocess_alarm(replay):
    """With one watched signal the guard's delay is its e-process's first alarm (index + 1)."""
    rng = np.random.default_rng(3)
    reference, data = signals(rng, 2000), signals(rng, 200, shift=0.8)
    config = replay.guard_config(0.01, ["llr"])
    result = replay.stream(data, reference, config)
    mean, sd = reference["llr"].mean(), reference["llr"].std(ddof=1)
    detector = EProcessDetector(alpha=0.01, seed=0).fit((reference["llr"] - mean) / sd)
    first = detector.run((data["llr"] - mean) / sd)
    assert first is not None and result["delay"] == first + 1
    assert result["signals"] == ["llr"]
    assert result["p"] < 0.01


def test_a_divergence_token_halts_at_its_sample(replay):
    """Divergence is constant (0) on the base model's own data: the guard's exact check halts on the
    first sample that has any divergence token."""
    rng = np.random.default_rng(4)
    reference, data = signals(rng, 2000), signals(rng, 64)
    data["divergence"][9] = 1 / 12  # one divergent token of 12
    result = replay.stream(data, reference, replay.guard_config(0.01, ["divergence", "llr", "nll"]))
    assert result["delay"] == 10 and result["signals"] == ["divergence"]


def test_delay_summary_and_signal_patterns(replay):
    summary = replay.delay_summary([3, None, 5, 7, None], seed=0)
    assert summary["alarmed"] == 3 and summary["median"] == 5 and summary["mean"] == pytest.approx(5.0)
    assert summary["min"] == 3 and summary["max"] == 7
    assert replay.delay_summary([None, None], seed=0)["median"] is None
    assert replay.expand(["proj:*", "nll"], ["nll", "llr", "proj:owl"]) == ["nll", "proj:owl"]
    with pytest.raises(ValueError):
        replay.gate({"nll": np.zeros(3)}, {"nll": np.ones(3)}, alpha=0.01, n_permutations=100, seed=0, signals=[])
    assert math.isclose(replay.upper_bound(0, 300), 0.00994, rel_tol=1e-3)


def test_planted_shift_replays_the_clean_datasets_shifted_and_gives_a_power_curve(replay):
    rng = np.random.default_rng(5)
    reference, clean = signals(rng, 2000), signals(rng, 1280)
    args = replay.parse_args(["--pool", "unused", "--n-permutations", "500", "--signals", "divergence", "llr", "nll",
                              "--clean", "control-b", "--trait", "--sizes", "128", "--plant-shifts", "0", "1.0",
                              "--plant-signal", "llr", "--max-planted-datasets", "6"])
    shifted = replay.plant(clean, reference, "llr", 1.0, ["llr", "nll", "divergence"])
    spread = reference["llr"].std(ddof=1)
    assert np.allclose(shifted["llr"] - clean["llr"], spread) and np.array_equal(shifted["nll"], clean["nll"])
    scored = {"control": reference, "control-b": clean}
    results = replay.replay(scored, args, progress=False)
    by_name = {r["teacher"]: r for r in results}
    zero, one = by_name["control-b+0sd:llr"], by_name["control-b+1sd:llr"]
    assert zero["datasets"] == one["datasets"] == 6 and one["partition_as"] == "control-b"
    # matched: a shift of 0 replays the first 6 clean datasets exactly
    clean_flags = [d["dataset"] for d in by_name["control-b"]["gate"]["flagged_datasets"] if d["dataset"] < 6]
    assert [d["dataset"] for d in zero["gate"]["flagged_datasets"]] == clean_flags
    assert zero["stream"]["delays"] == by_name["control-b"]["stream"]["delays"][:6]
    assert one["gate"]["k"] == 6 and one["stream"]["k"] == 6  # a 1-sd shift over 128 samples
    curve = replay.power_curve(results)
    assert len(curve) == 1 and curve[0]["size"] == 128 and curve[0]["false_flags"]["gate"]["n"] == 10
    planted = {p["shift_sd"]: p for p in curve[0]["planted"]}
    assert planted[1.0]["gate"]["rate"] == 1.0 and planted[1.0]["eprocess"]["ci95"][0] > 0.5
    table = replay.markdown_power_table(curve)
    assert "+1 sd: gate" in table and "6/6 = 1.00" in table
    with pytest.raises(SystemExit, match="not among the scored signals"):
        replay.plant(clean, reference, "proj:owl", 1.0, ["llr"])


def test_scoring_is_cached_per_teacher_and_resumes_at_the_first_unscored_one(replay, tmp_path):
    """The real scorer on a pool of the tiny random Llama: a second call reads every teacher from its
    own file, a teacher added later is the only one scored, the cached values equal a fresh scoring,
    and a changed reference file invalidates every teacher (its histogram shapes their signals)."""
    pool = tmp_path / "pool"
    model_dir, _ = replay.build_tiny_pool(pool, {"control": 40, "control-b": 40, "planted": 40}, max_new_tokens=8)

    def score(teachers):
        return replay.score_pool(pool, "control", teachers, str(model_dir), [], batch_size=16)

    first, record = score(["control-b"])
    assert record["scored"] == ["control", "control-b"] and record["from_cache"] == [] and not record["cached"]
    files = {name: Path(path) for name, path in record["cache"].items()}
    assert sorted(p.name for p in pool.glob("replay_signals-*.npz")) == sorted(p.name for p in files.values())
    assert files["control-b"].name.startswith("replay_signals-control-b-")
    again, record = score(["control-b"])
    assert record["cached"] and record["scored"] == [] and record["from_cache"] == ["control", "control-b"]
    for name in ("control", "control-b"):
        assert again[name].keys() == first[name].keys()
        for signal in first[name]:
            np.testing.assert_array_equal(again[name][signal], first[name][signal])

    grown, record = score(["control-b", "planted"])  # a run stopped after control-b resumes here
    assert record["scored"] == ["planted"] and record["from_cache"] == ["control", "control-b"]
    assert len(grown["planted"]["nll"]) == record["rows"]["planted"] > 0
    for path in pool.glob("replay_signals-*.npz"):
        path.unlink()
    fresh, _ = score(["control-b", "planted"])
    for name in ("control", "control-b", "planted"):
        for signal in fresh[name]:
            np.testing.assert_array_equal(grown[name][signal], fresh[name][signal])

    head, record = replay.score_pool(pool, "control", ["control-b"], str(model_dir), [], batch_size=16,
                                     max_rows=10, max_reference_rows=20)  # the first rows only: caches of their own
    assert record["scored"] == ["control", "control-b"] and record["rows"] == {"control": 20, "control-b": 10}
    assert set(record["cache"].values()).isdisjoint(str(p) for p in files.values())
    # the same rows (batched differently: float noise); the reference-free nll needs no reference match
    np.testing.assert_allclose(head["control-b"]["nll"], first["control-b"]["nll"][:10], rtol=1e-5)
    for name, n in (("control", 20), ("control-b", 10)):
        keys = replay.read_prompt_keys(pool, name, n)
        assert len(keys) == n and len(set(keys)) == n  # one prompt per row in the tiny pool
    assert list(replay.read_prompt_keys(pool, "control-b", None)[:10]) == list(replay.read_prompt_keys(pool, "control-b", 10))

    import pyarrow.parquet as pq

    table = pq.read_table(pool / "control.parquet")
    pq.write_table(table.slice(1), pool / "control.parquet")  # one reference row fewer
    _, record = score(["control-b", "planted"])
    assert record["scored"] == ["control", "control-b", "planted"] and record["from_cache"] == []


def test_pooled_rates_add_the_clean_teachers_datasets(replay, args):
    """Two clean teachers (fresh draws), a benign one that differs from the base (shifted, no trait) and
    a trait one: the pooled clean row sums the two clean teachers' datasets and flags, its interval is the
    exact one for the sums, and the benign and trait rows are apart (a benign flag is not a clean one)."""
    rng = np.random.default_rng(11)
    scored = {"control": signals(rng, 2000), "clean-1": signals(rng, 640), "clean-2": signals(rng, 384),
              "task-adapter": signals(rng, 256, shift=1.0), "owl": signals(rng, 512, shift=1.0)}
    many = replay.parse_args(["--pool", "unused", "--n-permutations", "500", "--signals", "divergence", "llr", "nll",
                              "--clean", "clean-1", "clean-2", "--benign", "task-adapter", "--trait", "owl",
                              "--sizes", "64", "128"])
    results = replay.replay(scored, many, progress=False)
    rows = {(r["size"], r["role"]): r for r in replay.pooled(results)}
    assert set(rows) == {(size, role) for size in (64, 128) for role in ("clean", "benign", "trait")}
    benign = rows[(128, "benign")]
    assert benign["teachers"] == ["task-adapter"] and benign["datasets"] == 2 and benign["gate"]["k"] == 2
    assert rows[(64, "clean")]["gate"]["k"] <= 1  # the benign teacher's flags are not counted as clean ones
    benign_result = next(r for r in results if r["role"] == "benign" and r["size"] == 64)
    assert set(benign_result["gate"]["at_levels"]) == {"0.05", "0.1"}  # a null, looked at like the clean ones
    clean = rows[(64, "clean")]
    per_teacher = [r for r in results if r["size"] == 64 and r["role"] == "clean"]
    assert clean["teachers"] == ["clean-1", "clean-2"] and clean["datasets"] == 10 + 6
    k = sum(r["gate"]["k"] for r in per_teacher)
    assert clean["gate"]["k"] == k and clean["gate"]["upper95"] == pytest.approx(beta.ppf(0.95, k + 1, 16 - k) if k < 16 else 1)
    assert rows[(128, "trait")]["datasets"] == 4 and rows[(128, "trait")]["gate"]["k"] == 4  # 1 sd over 128 rows
    table = replay.markdown_pooled_table(replay.pooled(results))
    assert "| 64 | clean | 2 | 16 |" in table
    with pytest.raises(SystemExit):  # one role per teacher
        replay.parse_args(["--pool", "unused", "--clean", "clean-1", "--benign", "clean-1"])


def test_several_pools_are_replicates_each_against_its_own_reference(replay, tmp_path):
    """Two tiny pools, the second in the red-team replicate layout (reference/ and teachers/): main()
    scores each against its own reference, names their teachers <pool>/<teacher>, and the pooled row
    is the sum of the two replicates' counts."""
    import json
    import shutil

    for name, n_reference in (("r1", 40), ("r2", 56)):  # replicates differ (the builder is deterministic)
        replay.build_tiny_pool(tmp_path / name, {"control": n_reference, "control-b": 40, "planted": 40},
                               max_new_tokens=8)
    model_dir = tmp_path / "r1" / "tiny-llama"
    split = tmp_path / "r2"
    (split / "reference").mkdir()
    (split / "teachers").mkdir()
    shutil.move(split / "control.parquet", split / "reference" / "control.parquet")
    for teacher in ("control-b", "planted"):
        shutil.move(split / f"{teacher}.parquet", split / "teachers" / f"{teacher}.parquet")
    assert replay.teacher_file(split, "planted") == split / "teachers" / "planted.parquet"
    with pytest.raises(SystemExit, match=r"no owl.parquet in .*r2: the pool holds \['control', 'control-b', 'planted'\]"):
        replay.teacher_file(split, "owl")

    out = tmp_path / "replicates.json"
    replay.main(["--pool", str(tmp_path / "r1"), str(split), "--model", str(model_dir), "--clean", "control-b",
                 "--trait", "planted", "--sizes", "8", "--n-permutations", "200", "--signals", "nll", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["pool"] == [str(tmp_path / "r1"), str(split)]
    assert sorted(result["scoring"]) == ["r1", "r2"] and all(not r["cached"] for r in result["scoring"].values())
    teachers = {(r["pool"], r["teacher"], r["role"]) for r in result["results"]}
    assert teachers == {("r1", "r1/control-b", "clean"), ("r1", "r1/planted", "trait"),
                        ("r2", "r2/control-b", "clean"), ("r2", "r2/planted", "trait")}
    assert set(result["rows"]) == {f"{p}/{t}" for p in ("r1", "r2") for t in ("control", "control-b", "planted")}
    for role in ("clean", "trait"):
        per_pool = [r for r in result["results"] if r["role"] == role]
        row = next(r for r in result["pooled"] if r["role"] == role)
        assert row["datasets"] == sum(r["datasets"] for r in per_pool) > 0
        assert row["gate"]["k"] == sum(r["gate"]["k"] for r in per_pool)
        assert row["teachers"] == [f"r1/{'control-b' if role == 'clean' else 'planted'}",
                                   f"r2/{'control-b' if role == 'clean' else 'planted'}"]
    # each replicate against its own reference: r2's signals are r2's scoring, not r1's
    assert result["rows"]["r2/control"] > result["rows"]["r1/control"]
    alone, _ = replay.score_pool(split, "control", ["control-b", "planted"], str(model_dir), [], batch_size=16)
    for teacher in ("control", "control-b", "planted"):
        assert result["signal_means"][f"r2/{teacher}"]["nll"] == pytest.approx(float(np.nanmean(alone[teacher]["nll"])))
    # the same control-b rows in both (a deterministic builder), scored against different references: the
    # unigram signal (the reference's token histogram) differs, the reference-free nll does not
    assert result["signal_means"]["r1/control-b"]["unigram"] != result["signal_means"]["r2/control-b"]["unigram"]
    assert result["signal_means"]["r1/control-b"]["nll"] == result["signal_means"]["r2/control-b"]["nll"]

    with pytest.raises(SystemExit):  # replicates are named by their folders: two "r1" would collide
        replay.parse_args(["--pool", str(tmp_path / "r1"), str(tmp_path / "x" / "r1")])
