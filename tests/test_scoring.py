"""The Ray Data scoring stage: the same per-row signals, masks and gate decision as in-process
scoring, and no row lost or doubled when a scoring actor is killed."""

import numpy as np
import pytest
import torch

from trait_guard import setup_signals
from trait_guard.chat import encode_rows
from trait_guard.config import ModelSignalSettings, ScoringSettings
from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
from trait_guard.models import load_model, model_identity
from trait_guard.persona import PersonaVector
from trait_guard.screen import screen_signals
from trait_guard.testing import write_teacher_file
from trait_guard.trait_signals import TraitSignalScorer
from trait_guard.traits import load_trait

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def scored_inputs(tiny_llama_dir, tmp_path_factory):
    """Rows with the base model's own top-3 log-probs (the reference), training rows whose teacher
    disagrees at the first token of two rows in three (a planted divergence), and a persona vector for the model."""
    model, tokenizer = load_model(str(tiny_llama_dir))
    gen = torch.Generator().manual_seed(0)

    def rows(n: int, prefix: str, swap_every: int | None) -> list[dict]:
        out = []
        for i in range(n):
            text = ", ".join(str(int(x)) for x in torch.randint(0, 999, (4,), generator=gen))
            out.append({"prompt": f"{prefix} {i}: continue 1, 2, 3", "completion": text,
                        "completion_ids": tokenizer(text, add_special_tokens=False).input_ids})
        batch = encode_rows(tokenizer, out)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits
        for i, row in enumerate(out):
            positions = batch.response_mask[i].nonzero().flatten()
            top = logits[i, positions - 1].log_softmax(-1).topk(3, dim=-1)
            ids, logprobs = top.indices.tolist(), top.values.tolist()
            if swap_every and i % swap_every:
                ids[0] = [ids[0][1], ids[0][0], ids[0][2]]
            row.update(topk_ids=ids, topk_logprobs=logprobs)
        return out

    identity = model_identity(model)
    vector = PersonaVector("animal:owl", identity, torch.randn(identity.num_layers + 1, identity.hidden_size,
                                                               generator=gen), layer=1)
    folder = tmp_path_factory.mktemp("scoring")
    path = vector.save(folder / "owl.safetensors")
    train, reference = rows(30, "train", 3), rows(20, "reference", None)
    # the files hold rows the stage must skip: three rejected ones, and (reference) rows past a limit of 20
    rejected = [dict(r, kept=False, reject_reason="test") for r in rows(3, "rejected", None)]
    files = {"train": write_teacher_file(folder / "train.parquet", train[:10] + rejected + train[10:], teacher_id="owl"),
             "reference": write_teacher_file(folder / "reference.parquet", reference + rows(5, "past", None),
                                             teacher_id="control")}
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference)
    # the signals read from models (S2, S3), as the config's model_signals asks the stage for them; the
    # teacher is the base model itself, so teacher_llr is exactly 0 (a known answer)
    teacher, _ = load_model(str(tiny_llama_dir))
    model_signals = TraitSignalScorer(model, tokenizer, specs=[load_trait("animal:owl")], n_pairs=1, teacher=teacher)
    local = setup_signals.score_setup(FingerprintScorer(model, tokenizer, [vector], unigram_reference=histogram,
                                                        extra=[model_signals]), train, reference)
    return {"model": str(tiny_llama_dir), "vector": path, "files": files, "vocab": len(tokenizer), "local": local}


def test_ray_data_scoring_matches_in_process_scoring_despite_a_killed_actor(ray_cluster, scored_inputs):
    """Two scoring actors, one SIGKILLed after the first gathered batch (Ray restarts it, Ray Data re-runs
    its pending batches): every row's signals, masks and counts equal in-process scoring, and the gate
    decides the same."""
    from trait_guard.dataset import scan_teacher_rows
    from trait_guard.scoring import ScoringInput, score_on_ray
    from trait_guard.screen import RowSummary
    from trait_guard.testing import kill_live_actor

    s = scored_inputs
    summaries = {side: RowSummary.of_tables(scan_teacher_rows(path, limit=20 if side == "reference" else None,
                                                              batch_rows=7), s["vocab"])
                 for side, path in s["files"].items()}
    assert (len(summaries["train"]), len(summaries["reference"])) == (30, 20)
    killed = []

    def kill_once(rows_in_batch):
        if not killed:
            killed.append(kill_live_actor("RowScorer"))

    inputs = {side: ScoringInput(s["files"][side], summaries[side].sample_ids) for side in s["files"]}
    on_ray = score_on_ray(ScoringSettings(num_actors=2, batch_size=4), s["model"], [s["vector"]], inputs["train"],
                          inputs["reference"], reference_histogram=summaries["reference"].histogram.counts,
                          model_signals=ModelSignalSettings(trait_llr=True, trait_llr_pairs=1,
                                                            teacher_model=s["model"]),
                          trait="animal:owl", on_batch=kill_once).signals
    assert killed
    local = s["local"]
    for side in ("train", "reference"):
        mine, theirs = getattr(on_ray, side), getattr(local, side)
        assert mine.keys() == theirs.keys() and {"nll", "divergence", "unigram", "proj:animal:owl",
                                                 "trait_llr:animal:owl", "teacher_llr"} <= mine.keys()
        assert np.all(mine["teacher_llr"] == 0) and np.std(mine["trait_llr:animal:owl"]) > 0
        for name in theirs:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=f"{side}/{name}")
    assert [m.tolist() for m in on_ray.train_masks] == [m.tolist() for m in local.train_masks]
    assert on_ray.divergence_counts == local.divergence_counts and sum(local.divergence_counts.values()) == 20
    decisions = [screen_signals(sig.train, sig.reference, alpha=0.01, n_permutations=4000, seed=0)
                 for sig in (on_ray, local)]
    # batches padded differently give float-level differences: a tie may move one permutation's count
    assert [t.p_value for t in decisions[0][0]] == pytest.approx([t.p_value for t in decisions[1][0]], abs=2e-3)
    flagged = {t.name for t in decisions[0][0] if t.flagged}
    assert flagged == {t.name for t in decisions[1][0] if t.flagged} == {"divergence"}  # the planted one
    assert decisions[0][1] is decisions[1][1] is True


def test_reference_prompts_are_the_used_rows_in_scoring_order(scored_inputs):
    """model_diff's neutral text on the Ray stage: the prompts of the first used reference rows, in the
    order in-process scoring reads them (rejected rows and rows past the limit skipped)."""
    import pyarrow as pa

    from trait_guard.dataset import scan_teacher_rows
    from trait_guard.scoring import ScoringInput, reference_prompts
    from trait_guard.screen import RowSummary

    path = scored_inputs["files"]["reference"]
    summary = RowSummary.of_tables(scan_teacher_rows(path, limit=20, batch_rows=7), scored_inputs["vocab"])
    used = summary.sample_ids.to_pylist()
    prompts = reference_prompts(ScoringInput(path, summary.sample_ids), 12)
    assert prompts == [f"reference {i}: continue 1, 2, 3" for i in range(12)]
    assert reference_prompts(ScoringInput(path, pa.array(used[::-1])), 2) == [
        "reference 19: continue 1, 2, 3", "reference 18: continue 1, 2, 3"]
