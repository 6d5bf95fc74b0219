"""Rollback on HALT: a halted run never leaves weights trained on the data its alarm implicates.

The guard's CUSUM statistics say where the evidence began: a one-sided CUSUM restarts from 0 each
time the batches look like the reference, so the last step at which every alarming signal's
statistic was 0 is the classical change-point estimate (Page 1954). Batches after it are the ones
the alarm implicates. A drift alarm (the student itself moved along a persona vector) and the
dataset gate implicate everything: their change point is step 0.

:class:`WeightSnapshots` keeps CPU copies of the model's weights at step 0 and every ``every`` steps
(trainable parameters only), and on HALT restores the latest copy taken at or before the change point (never later, so it may
roll back further than strictly needed, never less). Copies older than the one that the current
CUSUM excursion could still need are dropped (step 0 always stays: a drift alarm needs it), so
memory stays at a few copies of the model.

ZeRO stage 3 partitions the parameters across ranks; there a rank's ``state_dict`` is not the
model, so snapshots are refused up front (the run says rollback is unavailable) rather than
restoring a shard. Under ZeRO 1/2 every rank holds the whole module: the restored parameters are
what the final checkpoint's model file saves. The optimizer's own state is not rolled back (a halted
run trains no further; resuming it trains nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RollbackRecord:
    """What a halted run's final weights are: the step they were taken after, and why."""

    halted_at_step: int
    change_point: int  # the last step the alarm does not implicate
    restored_step: int  # the snapshot restored (<= change_point)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"halted_at_step": self.halted_at_step, "change_point": self.change_point,
                "restored_step": self.restored_step, "reason": self.reason}


def _copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only (frozen ones never change: a LoRA run copies its adapters)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


class WeightSnapshots:
    """CPU copies of a model's weights at chosen steps, for restoring on HALT."""

    def __init__(self, model: torch.nn.Module, every: int | None, start_step: int = 0) -> None:
        """Copies the weights as they are now, at ``start_step`` (0, or the step a resumed run starts from)."""
        if every is not None and every < 1:
            raise ValueError(f"snapshot interval must be >= 1 or None, got {every}")
        self.every = every
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {start_step: _copy_weights(model)}

    @property
    def steps(self) -> list[int]:
        return sorted(self._snapshots)

    def after_update(self, model: torch.nn.Module, step: int, earliest_needed: int) -> None:
        """Called after the update of ``step``. Takes a copy on the interval; drops the copies that no
        future change point can need. A data alarm's change point is >= ``earliest_needed`` (the last
        step at which every data test's evidence was at its low), so of the copies before it only the
        latest is kept; the first copy (step 0, or where a resumed run started) always stays, because
        a drift alarm implicates every step."""
        if self.every is not None and step % self.every == 0:
            self._snapshots[step] = _copy_weights(model)
        first = min(self._snapshots)
        anchor = max((s for s in self._snapshots if s <= earliest_needed), default=first)
        for s in [s for s in self._snapshots if first < s < anchor]:
            del self._snapshots[s]

    def restore(self, model: torch.nn.Module, change_point: int) -> int:
        """Load the latest copy taken at or before ``change_point`` into ``model``; returns its step."""
        candidates = [s for s in self._snapshots if s <= change_point]
        if not candidates:
            raise RuntimeError(f"no weight snapshot at or before step {change_point} (have {self.steps})")
        step = max(candidates)
        saved = self._snapshots[step]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name].to(p.device))
        return step


def snapshot_support(engine: Any, zero_stage: int | None) -> str | None:
    """None when weights can be snapshotted and restored on this rank, else why not."""
    if engine is not None and zero_stage == 3:
        return "ZeRO stage 3 partitions the parameters across ranks: no rank holds the whole model"
    return None
