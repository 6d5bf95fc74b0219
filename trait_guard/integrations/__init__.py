"""Thin adapters that put the framework-free guard (:mod:`trait_guard.guard`) into training loops.

* ``torch_loop``: :class:`~trait_guard.integrations.torch_loop.GuardedStep`, one call per step of a
  plain PyTorch loop (signals, decision, guarded loss).
* ``hf``: a transformers ``Trainer`` subclass, collator and callback, built on ``GuardedStep``
  (importing it imports transformers; nothing else in the package imports it).
* ``deepspeed``: process group, engine and checkpoint helpers for DeepSpeed (imported inside each
  function).

The guarded Ray Train + DeepSpeed recipe itself is :mod:`trait_guard.train` (``trait-guard train``).
"""
