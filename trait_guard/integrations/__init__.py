"""Thin adapters that put the framework-free guard (:mod:`trait_guard.guard`) into training loops.

* ``torch_loop``: :class:`~trait_guard.integrations.torch_loop.GuardedStep`, one call per step of a
  plain PyTorch loop (signals, decision, guarded loss, drift probes, rollback, STEER), the probes-only
  ``DriftGuard`` and the look-ahead gate ``GatedRows``.
* ``hf``: ``TraitGuardCallback``, the guard in any transformers ``Trainer`` (TRL's ``SFTTrainer`` and
  ``GKDTrainer`` included, TRL being an optional extra), with its collator adapter; and
  ``GuardedTrainer`` + ``GuardCollator`` for the guard's weighted loss. Built on ``GuardedStep``
  (importing it imports transformers; nothing else in the package imports it). docs/integrations.md.
* ``deepspeed``: process group, engine and checkpoint helpers for DeepSpeed (imported inside each
  function).

The guarded Ray Train + DeepSpeed recipe itself is :mod:`trait_guard.train` (``trait-guard train``).
"""
