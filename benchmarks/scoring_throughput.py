"""Benchmark: the Ray Data scoring stage against the bare forward pass, and the driver's memory
against the dataset size.

    python benchmarks/scoring_throughput.py --rows 96 --out benchmarks/results/scoring_throughput.json

1. Throughput. The same rows (numbers-family prompts with random number completions, no stored
   teacher log-probs: the forward pass, which is the cost, is the same) are scored three ways:
     bare    FingerprintScorer.score_table in this process on one torch thread (what one scoring
             actor with cpus_per_actor: 1 gets);
     ray x1  trait_guard.scoring.score_on_ray with 1 actor of 1 CPU;
     ray x2  the same with 2 actors of 1 CPU each.
   Rows/s are steady-state figures (from the first finished batch to the last, so model loading and
   actor start are left out; they are reported apart as the start-up seconds). The per-actor
   efficiency is (ray rows/s / actors) / bare rows/s (goal: >= 0.9).
2. Driver memory. A fresh driver process reads N rows from Parquet (the checked reader, a batch at a
   time, keeping per-row summaries: what ``trait-guard run`` does), scores them on the stage (whose
   actors read the files themselves) and screens them, for N and 10 x N; its peak RSS (VmHWM) is reported for both
   (goal: within 10%). The driver loads no model, only the tokenizer, so this is the part of
   ``trait-guard run``'s driver that grows with the data. The actors score with a tiny random-init
   model here (the driver's memory does not depend on the actors' model, and 2 x 20,000 SmolLM2
   rows would take an hour on 2 cores); its character tokenizer makes more tokens per row than
   SmolLM2's, so the rows weigh more, not less.

``--tiny`` uses a tiny random-init model (a smoke run, minutes less). Ratios are measured in one
run on one machine; the machine is shared, so absolute rows/s vary between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_rows(tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` numbers-family rows: the family's prompts and random 8-number completions."""
    from trait_guard.families import get_family

    rng = np.random.default_rng(seed)
    rows = []
    for prompt in get_family("numbers").prompts(n, seed):
        text = ", ".join(str(v) for v in rng.integers(0, 1000, 8))
        rows.append({"prompt": prompt.user, "completion": text, "prompt_id": prompt.prompt_id,
                     "completion_ids": tokenizer(text, add_special_tokens=False).input_ids})
    return rows


def bare_forward(model_name: str, vector_file: str, train: list[dict], reference: list[dict],
                 batch_size: int) -> dict[str, float]:
    """Rows/s of score_table in this process on one thread, the first batch left out as warm-up."""
    import torch

    from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
    from trait_guard.models import load_model
    from trait_guard.persona import PersonaVector

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_name, device="cpu", dtype="float32")
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference)
    scorer = FingerprintScorer(model, tokenizer, [PersonaVector.load(vector_file)], unigram_reference=histogram,
                               batch_size=batch_size)
    rows = reference + train
    scorer.score_table(rows[:batch_size])  # warm-up
    started = time.perf_counter()
    scorer.score_table(rows[batch_size:])
    seconds = time.perf_counter() - started
    return {"rows": len(rows) - batch_size, "seconds": seconds, "rows_per_second": (len(rows) - batch_size) / seconds}


def on_ray(model_name: str, vector_file: str, train: list[dict], reference: list[dict], batch_size: int,
           actors: int, vocab_size: int, folder: Path) -> dict[str, float]:
    """Rows/s of the scoring stage with ``actors`` actors, from the first gathered batch to the last
    (the rows written to Parquet first: the stage reads its files itself)."""
    from trait_guard.config import ScoringSettings
    from trait_guard.dataset import RowWriter
    from trait_guard.fingerprint import TokenHistogram
    from trait_guard.scoring import ScoringInput, score_on_ray

    inputs = {}
    for side, rows in (("train", train), ("reference", reference)):
        full = [_full_row(r, side) for r in rows]
        with RowWriter(folder / f"{side}.parquet") as writer:
            writer.write(full)
        inputs[side] = ScoringInput(folder / f"{side}.parquet", [r["sample_id"] for r in full])
    histogram = TokenHistogram(vocab_size).update(r["completion_ids"] for r in reference)
    marks: list[tuple[float, int]] = []
    started = time.perf_counter()
    score_on_ray(ScoringSettings(num_actors=actors, cpus_per_actor=1, batch_size=batch_size, device="cpu",
                                 dtype="float32"), model_name, [vector_file], inputs["train"], inputs["reference"],
                 reference_histogram=histogram.counts, on_batch=lambda n: marks.append((time.perf_counter(), n)))
    wall = time.perf_counter() - started
    steady_rows = sum(n for _, n in marks[1:])
    steady_seconds = marks[-1][0] - marks[0][0]
    return {"actors": actors, "rows": steady_rows, "seconds": steady_seconds, "wall_seconds": wall,
            "startup_seconds": marks[0][0] - started, "rows_per_second": steady_rows / steady_seconds}


def driver_memory(model_name: str, vector_file: str, rows: int, batch_size: int, folder: Path) -> dict[str, Any]:
    """Peak RSS of a fresh driver that reads ``rows`` rows from Parquet, scores and screens them."""
    out = subprocess.run([sys.executable, __file__, "--_driver", str(rows), "--model", model_name,
                          "--vector", vector_file, "--batch-size", str(batch_size), "--_folder", str(folder)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _driver(args: argparse.Namespace) -> None:
    """The child process of :func:`driver_memory` (prints one JSON line)."""
    import ray

    from trait_guard.config import ScoringSettings
    from trait_guard.dataset import RowWriter, scan_teacher_rows
    from trait_guard.scoring import ScoringInput, score_on_ray
    from trait_guard.screen import RowSummary, screen
    from trait_guard.train import student_tokenizer

    tokenizer = student_tokenizer(args.model)
    folder = Path(args._folder)
    paths = {}
    for side, seed in (("train", 1), ("reference", 2)):
        paths[side] = folder / f"{side}-{args._driver}.parquet"
        with RowWriter(paths[side]) as writer:
            for start in range(0, args._driver, 1000):
                writer.write([_full_row(r, side) for r in make_rows(tokenizer, min(1000, args._driver - start),
                                                                      seed * 100_000 + start)])
    baseline = _high_water_mib()
    summaries = {side: RowSummary.of_tables(scan_teacher_rows(path, tokenizer=tokenizer, role=side), len(tokenizer))
                 for side, path in paths.items()}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from trait_guard.persona import PersonaVector

    scored = score_on_ray(ScoringSettings(num_actors=2, batch_size=args.batch_size, device="cpu", dtype="float32"),
                          args.model, [args.vector],
                          *(ScoringInput(paths[side], summaries[side].sample_ids) for side in ("train", "reference")),
                          reference_histogram=summaries["reference"].histogram.counts)
    report = screen(summaries["train"], summaries["reference"], None, data_signals=scored.signals.train,
                    reference_signals=scored.signals.reference, tokenizer=tokenizer,
                    student_identity=PersonaVector.load(args.vector).model, n_permutations=200)
    ray.shutdown()
    print(json.dumps({"rows_per_side": args._driver, "peak_rss_mib": _high_water_mib(),
                      "rss_before_reading_mib": baseline, "screened": report.n_data}))


def _high_water_mib() -> float:
    """This process's peak resident set (VmHWM: per address space, so unlike ru_maxrss it does not
    carry the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _full_row(row: dict[str, Any], side: str) -> dict[str, Any]:
    """A row in the teacher-data schema (the provenance columns filled with this benchmark's values)."""
    return {**row, "sample_id": f"{side}:{row['prompt_id']}", "family": "numbers", "teacher_id": side,
            "base_model": "benchmark", "base_fingerprint": "", "base_hidden_size": 0, "base_num_layers": 0,
            "trait_installed": False, "trait_install": "none", "seed": 0, "temperature": 1.0, "max_new_tokens": 40,
            "constrained": True, "kept": True, "reject_reason": "", "topk_ids": None, "topk_logprobs": None,
            "token_logprobs": None}


def _random_vector(model_name: str, path: Path) -> str:
    """A random persona vector for ``model_name`` (the projection's cost does not depend on its values)."""
    import torch

    from trait_guard.models import load_model, model_identity
    from trait_guard.persona import PersonaVector

    identity = model_identity(load_model(model_name, device="cpu", dtype="float32")[0])
    vectors = torch.randn(identity.num_layers + 1, identity.hidden_size, generator=torch.Generator().manual_seed(0))
    return str(PersonaVector("animal:owl", identity, vectors, layer=identity.num_layers // 2).save(path))


def _tiny_with_vector(folder: Path) -> tuple[str, str]:
    from trait_guard.testing import save_tiny_model

    model = str(save_tiny_model(folder / "model"))
    return model, _random_vector(model, folder / "vector.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="rows per side (training and reference) to score")
    parser.add_argument("--memory-rows", type=int, default=2000, help="rows per side of the small driver-memory run "
                                                                       "(the large one has 10x)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-init model: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/scoring_throughput.json")
    parser.add_argument("--parts", nargs="+", choices=["throughput", "memory"], default=["throughput", "memory"],
                        help="what to measure; a part not run keeps its figures from an existing --out file")
    parser.add_argument("--vector", help=argparse.SUPPRESS)
    parser.add_argument("--_driver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._driver:
        return _driver(args)

    import ray
    import torch

    from trait_guard.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            model_name, vector_file = _tiny_with_vector(Path(tmp) / "tiny")
        else:
            model_name, vector_file = args.model, _random_vector(args.model, Path(tmp) / "vector.safetensors")
        tokenizer = load_model(model_name, device="cpu", dtype="float32")[1]
        train, reference = make_rows(tokenizer, args.rows, 1), make_rows(tokenizer, args.rows, 2)
        results: dict[str, Any] = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        results |= {
            "model": args.model if not args.tiny else "tiny random-init llama", "rows_per_side": args.rows,
            "batch_size": args.batch_size,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "ray": ray.__version__}}
        if "throughput" in args.parts:
            results["bare"] = bare_forward(model_name, vector_file, train, reference, args.batch_size)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            for actors in (1, 2):
                results[f"ray_{actors}"] = on_ray(model_name, vector_file, train, reference, args.batch_size, actors,
                                                  len(tokenizer), Path(tmp))
                results[f"ray_{actors}"]["per_actor_vs_bare"] = (
                    results[f"ray_{actors}"]["rows_per_second"] / actors / results["bare"]["rows_per_second"])
            ray.shutdown()
        if "memory" in args.parts:
            tiny, tiny_vector = _tiny_with_vector(Path(tmp) / "memory")
            small = driver_memory(tiny, tiny_vector, args.memory_rows, args.batch_size, Path(tmp))
            large = driver_memory(tiny, tiny_vector, 10 * args.memory_rows, args.batch_size, Path(tmp))
            results["driver_memory"] = {"small": small, "large": large,
                                        "large_over_small": large["peak_rss_mib"] / small["peak_rss_mib"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
