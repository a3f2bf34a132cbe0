"""``overlap``: TBPTT(k1, k2), windows of k2 steps every k1 steps."""
from __future__ import annotations

import torch

from ..config import Config
from ..model import RecurrentActorCritic, RecurrentState
from ..rollout import Rollout
from ..sequences import SequenceBatch, gather_sequences, overlap_windows
from .base import TruncationStrategy


def window_fractions(strategy: TruncationStrategy, length: torch.Tensor, loss_from: torch.Tensor,
                     k2: int) -> None:
    """Record ``tbptt/padding_fraction`` (cells past a window's end; a prefix counts as real) and
    ``tbptt/prefix_fraction`` of windows ``[S]`` padded to ``k2`` steps."""
    cells = len(length) * k2
    strategy.add_ratio("tbptt/padding_fraction", cells - float(length.sum()), cells, replace=True)
    strategy.add_ratio("tbptt/prefix_fraction", float(loss_from.sum()), cells, replace=True)


class OverlapStrategy(TruncationStrategy):
    """TBPTT(k1, k2) with k1 = ``tbptt.stride`` and k2 = ``tbptt.sequence_length``."""

    name = "overlap"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.k2 = self.tb.sequence_length
        self.k1 = self.tb.stride if self.tb.stride > 0 else self.k2
        self._reach = float(self.k2)

    def build(self, rollout: Rollout) -> SequenceBatch:
        t0, n, length, loss_from = overlap_windows(rollout.episode_start, self.k1, self.k2)
        # mask counts prefixes as "not in the loss"; padding is only what lies past a window's end
        window_fractions(self, length, loss_from, self.k2)
        return gather_sequences(rollout, t0, n, length, self.k2, loss_from)

    def core_out(self, model: RecurrentActorCritic, batch: SequenceBatch) -> torch.Tensor:
        if not self.tb.burn_in or self.k1 == self.k2:
            return super().core_out(model, batch)
        x = model.encode(batch.obs, batch.valid)  # [S, L, F]
        S, L = x.shape[:2]
        prefix = (batch.mask > 0).float().argmax(dim=1)  # [S] first loss position = prefix length
        out = x.new_zeros(S, L, model.hidden_size)  # [S, L, H]
        for q in torch.unique(prefix).tolist():  # few distinct prefix lengths: 0, k1, 2 k1, ..., p
            sel = torch.nonzero(prefix == q).squeeze(1)
            state = batch.init_state.index(sel).as_torch()
            if q > 0:
                with torch.no_grad():
                    burn, state = model.core(x[sel, :q], state)  # burn [s, q, H]
                out[sel, :q] = burn
                state = RecurrentState.from_torch(state).detach().as_torch()
            rest, _ = model.core(x[sel, q:], state)  # [s, L - q, H]
            out[sel, q:] = rest
        return out
