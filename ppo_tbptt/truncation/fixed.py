"""``fixed``: TBPTT(L, L), chunks of ``tbptt.sequence_length`` in one recurrent call."""
from __future__ import annotations

from ..rollout import Rollout
from ..sequences import SequenceBatch, build_sequences
from .base import TruncationStrategy


class FixedStrategy(TruncationStrategy):
    """Chunks of ``tbptt.sequence_length`` steps (<= 0: whole episode fragments) from their stored
    start states, one recurrent call per minibatch. L = 1 is BPTT(1, 1)."""

    name = "fixed"

    def build(self, rollout: Rollout) -> SequenceBatch:
        batch = build_sequences(rollout, self.tb.sequence_length)
        self._reach = float(batch.length)
        return batch
