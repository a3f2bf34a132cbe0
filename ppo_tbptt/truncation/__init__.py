"""Truncation strategies behind one seam: how a rollout becomes sequences and how gradients flow.

The trainer only calls :class:`TruncationStrategy` (``base.py``):

- ``before_update(model, rollout)``: once per update, after GAE (``adaptive`` re-estimates K here);
- ``build(rollout) -> SequenceBatch``: the training sequences;
- ``before_epoch(model, rollout, batch, epoch)``: ``tbptt.refresh_states`` rewrites start states;
- ``core_out(model, batch) -> out [S, L, H]``: the training forward pass up to the recurrent core
  (a strategy overrides this to change how gradients flow); ``forward(model, batch) -> (logits
  [S, L, A], values [S, L])`` puts the heads on it (the logits masked by the observations' action
  mask, as ``model.heads(out, batch.obs)`` does);
- ``metrics() -> dict`` (scalars) and ``curves() -> dict`` (1-D arrays such as phi_k).

One strategy per module (the docs' "Truncation strategies" page, docs/truncation.md, describes each):

- ``fixed.py``: TBPTT(L, L), chunks of ``sequence_length``, one recurrent call.
- ``overlap.py``: TBPTT(k1, k2), windows of k2 steps every k1 steps; the prefix carries gradient
  or is a no-gradient burn-in.
- ``randomized.py``: randomized truncation, unbiased for BPTT over the whole chunk, run as short
  pieces from their stored start states.
- ``adaptive.py``: a truncation length K chosen from the measured decay of the gradient w.r.t.
  past states (Aicher, Foti & Fox 2019).
- ``refresh.py``: recomputing stale start states with the current weights (any strategy).
"""
from __future__ import annotations

from ..config import Config
from .adaptive import (AdaptiveEstimate, AdaptiveStrategy, estimate_truncation, fit_decay,
                       grad_norm_lower_bound, lag_gradients, phi_and_partial_norms, tail_bound)
from .base import StepFn, TruncationStrategy, core_step
from .fixed import FixedStrategy
from .overlap import OverlapStrategy
from .randomized import RandomStrategy, core_run, random_pieces, scale_gradient, segment_unroll
from .refresh import refresh_start_states, staleness_kl, unroll_states

_STRATEGIES = {cls.name: cls for cls in (FixedStrategy, OverlapStrategy, RandomStrategy, AdaptiveStrategy)}


def make_strategy(cfg: Config) -> TruncationStrategy:
    """The strategy named by ``cfg.tbptt.strategy``."""
    try:
        return _STRATEGIES[cfg.tbptt.strategy](cfg)
    except KeyError:
        raise ValueError(f"unknown tbptt.strategy {cfg.tbptt.strategy!r}; known: "
                         + ", ".join(_STRATEGIES)) from None


__all__ = [
    "AdaptiveEstimate", "AdaptiveStrategy", "FixedStrategy", "OverlapStrategy", "RandomStrategy",
    "StepFn", "TruncationStrategy", "core_run", "core_step", "estimate_truncation", "fit_decay",
    "grad_norm_lower_bound", "lag_gradients", "make_strategy", "phi_and_partial_norms",
    "random_pieces", "refresh_start_states", "scale_gradient", "segment_unroll", "staleness_kl",
    "tail_bound", "unroll_states",
]
