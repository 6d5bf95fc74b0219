"""How strongly each trait adapter of a red-team grid carries its trait: the panel log-odds of the
target (held-out panel questions, docs/redteam.md "Measure v2") under base + adapter, beside the base
model's. A replicate whose students show no transfer may have a weak teacher, or a strong teacher whose
data did not carry it: this tells the two apart.

    .venv/bin/python benchmarks/teacher_strength.py outputs/redteam_cpu/adapters/owl \\
        --out benchmarks/results/redteam_v2_teacher_strength.json

--keep adds to an earlier output: the adapters it lists whose folders are gone stay as measured then.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from trait_guard.adapters import load_adapter, read_adapter_meta
    from trait_guard.evaluate import spec_panel_logodds
    from trait_guard.models import load_model
    from trait_guard.traits import load_trait
    from trait_guard.version import reproducible_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", help="a folder of per-replicate adapter folders (s0/, s1/, ...)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base model (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=32, help="held-out panel questions (default: %(default)s)")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the adapters --out already lists that are not measured now (their folders gone, "
                             "e.g. on a fresh machine); the base model and the adapters found are measured again")
    args = parser.parse_args(argv)

    folders = sorted(p for p in Path(args.adapters).iterdir() if (p / "trait_guard_adapter.json").is_file())
    if not folders:
        print(f"{args.adapters} holds no adapter folder", file=sys.stderr)
        return 1
    trait = read_adapter_meta(folders[0])["trait"]
    earlier = json.loads(Path(args.out).read_text()) if args.keep and Path(args.out).is_file() else None
    if earlier is not None and (earlier.get("trait"), earlier.get("model")) != (trait, args.model):
        print(f"{args.out} holds {earlier.get('trait')} on {earlier.get('model')}, not {trait} on {args.model}: "
              "nothing to keep there (pass another --out)", file=sys.stderr)
        return 1
    spec = load_trait(trait)
    base, tokenizer = load_model(args.model)
    results = {"base": spec_panel_logodds(base, tokenizer, spec, args.questions).to_dict()}
    for folder in folders:
        model, _ = load_model(args.model)
        results[folder.name] = spec_panel_logodds(load_adapter(model, folder), tokenizer, spec, args.questions).to_dict()
    for name, r in results.items():
        print(f"{name:>6}: panel log-odds {r['mean']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]")
    measured = {k: {"mean": r["mean"], "ci95": [r["ci_low"], r["ci_high"]], "questions": len(r["per_question"]),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} for k, r in results.items()}
    kept = {k: v for k, v in (earlier or {}).get("panel_logodds", {}).items() if k not in measured}
    Path(args.out).write_text(json.dumps({
        "command": reproducible_command(), "trait": trait, "model": args.model,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "panel_logodds": dict(sorted({**kept, **measured}.items(), key=lambda kv: _order(kv[0])))}, indent=1) + "\n")
    return 0


def _order(name: str) -> tuple[int, int]:
    """base first, then s0, s1, ... by replicate number."""
    return (0, 0) if name == "base" else (1, int(name[1:]) if name[1:].isdigit() else 10**9)


if __name__ == "__main__":
    sys.exit(main())
