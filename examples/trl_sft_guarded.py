"""Supervised fine-tuning on teacher-generated rows with TRL's SFTTrainer, guarded by trait_guard.

An ordinary SFT script: load the student, read prompt/completion rows, train, save. The lines marked
``# trait-guard`` are all that guarding it takes (4 lines): the rows carry their precomputed per-sample
``signals`` (scored on the student's frozen base model with ``trait_guard.fingerprint.FingerprintScorer``,
as ``trait-guard screen`` does), and ``reference.json`` holds the same signals on clean rows. If the
guard halts, ``trainer.train()`` raises ``TraitGuardHalted`` after restoring the weights of before the
implicated steps, so ``save_model()`` below is never reached with a tainted student.

    python examples/trl_sft_guarded.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --data teacher_rows.jsonl --reference reference.json --output-dir out/sft --max-steps 500

Needs the ``trl`` extra (``pip install 'trait-guard[trl]'``). tests/test_trl.py runs it on a tiny model.
"""

import argparse
import json

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from trait_guard.integrations.hf import TraitGuardCallback  # trait-guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSONL: prompt, completion (and the guard's signals)")
    parser.add_argument("--reference", required=True, help="JSON: signal name -> values on clean rows")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=500)
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    guard = TraitGuardCallback.from_vectors(model, tokenizer, reference=json.load(open(args.reference)))  # trait-guard

    config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4,
                       learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available(),
                       remove_unused_columns=False)  # trait-guard: keeps the rows' signals for the guard
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[guard])  # trait-guard
    trainer.train()
    trainer.save_model(f"{args.output_dir}/final")


if __name__ == "__main__":
    main()
