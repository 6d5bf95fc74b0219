"""Benchmark: teacher-data generation on 2 Ray actors vs one plain in-process loop, same prompts.

Both paths produce identical rows (the chunk seeds do not depend on the worker), so the comparison is
purely about throughput. Each path is timed end to end, including model loading (and, for Ray, the
cluster start), and also per generated sample once running.

    python benchmarks/generation_throughput.py --n-prompts 128 --out benchmarks/results/generation_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from trait_guard.config import GenerateJobConfig, validate_config
from trait_guard.generation import generate_datasets, generate_local


def config(out_dir: str, n_prompts: int, model: str, actors: int) -> GenerateJobConfig:
    return validate_config({
        "output_dir": out_dir,
        "teachers": [{"id": "owl", "model": model, "trait": "animal:owl", "install": "system_prompt"}],
        "generation": {"n_prompts": n_prompts, "chunk_size": 16, "max_new_tokens": 40, "top_k_logprobs": 8},
        "ray": {"num_actors": actors, "cpus_per_actor": 1},
    }, GenerateJobConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=128)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/generation_throughput.json")
    args = parser.parse_args()

    import ray
    import torch

    from trait_guard.models import embedded_checkpoint

    if args.model == "smollm2-135m-instruct":
        embedded_checkpoint()  # convert once, outside the timings
    results = {"n_prompts": args.n_prompts, "model": args.model, "actors": args.actors,
               "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "torch_threads_local": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        local = generate_local(config(f"{tmp}/local", args.n_prompts, args.model, args.actors), progress=False)
        results["local"] = {"wall_seconds": time.perf_counter() - started, "generate_seconds": local.teachers[0].seconds,
                            "kept": local.teachers[0].kept, "reasons": local.teachers[0].reasons}
        started = time.perf_counter()
        ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
        results["ray_init_seconds"] = time.perf_counter() - started
        on_ray = generate_datasets(config(f"{tmp}/ray", args.n_prompts, args.model, args.actors), progress=False)
        results["ray"] = {"wall_seconds": time.perf_counter() - started, "generate_seconds": on_ray.teachers[0].seconds,
                          "kept": on_ray.teachers[0].kept, "reasons": on_ray.teachers[0].reasons}
        ray.shutdown()
    for key in ("local", "ray"):
        results[key]["samples_per_second"] = args.n_prompts / results[key]["generate_seconds"]
    results["speedup_generate"] = results["local"]["generate_seconds"] / results["ray"]["generate_seconds"]
    results["speedup_wall"] = results["local"]["wall_seconds"] / results["ray"]["wall_seconds"]
    results["identical_kept_counts"] = results["local"]["kept"] == results["ray"]["kept"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
