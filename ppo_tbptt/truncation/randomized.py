"""``random``: randomized truncation (Tallec & Ollivier 2017)."""
from __future__ import annotations

import torch

from ..config import Config
from ..model import RecurrentActorCritic
from ..rollout import Rollout
from ..sequences import SequenceBatch
from .base import StepFn, core_step
from .fixed import FixedStrategy


def scale_gradient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Identity forward (bit for bit); the backward pass multiplies the gradient by ``scale``.

    ``x [K, B, H]``, ``scale [B]`` (one factor per batch entry).
    """
    s = scale.to(x.dtype)[None, :, None]  # [B] -> [1, B, 1]
    return x + (s - 1.0) * (x - x.detach())


def random_truncation_unroll(step: StepFn, x: torch.Tensor, state: list, cut_prob: float,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Step-wise unroll with randomized truncation of the recurrent edges.

    ``x [B, L, F]``, ``state`` tensors ``[K, B, H]`` -> outputs ``[B, L, H]``. For every sequence
    and every edge from step t-1 to step t a ``keep ~ Bernoulli(1 - cut_prob)`` is drawn and the
    gradient through that edge is scaled by ``keep / (1 - cut_prob)``: a path reaching k edges back
    survives with probability (1 - c)^k and is scaled by (1 - c)^-k, so its expectation is the
    full-BPTT gradient. Mean truncation length 1 / c.
    """
    if not 0.0 <= cut_prob < 1.0:
        raise ValueError(f"cut_prob must be in [0, 1), got {cut_prob}")
    B, L = x.shape[:2]
    u = torch.rand(B, L, generator=generator)  # on the CPU, so the generator's stream is device-free
    scale = ((u >= cut_prob).float() / (1.0 - cut_prob)).to(x.device)  # [B, L]
    outs = []
    for t in range(L):
        if t > 0:
            state = [scale_gradient(s, scale[:, t]) for s in state]
        out, state = step(x[:, t:t + 1], state)  # out [B, 1, H]
        outs.append(out)
    return torch.cat(outs, dim=1)  # [B, L, H]


class RandomStrategy(FixedStrategy):
    """Randomized truncation with mean length ``tbptt.mean_length`` inside chunks of
    ``tbptt.sequence_length`` (<= 0: whole episode fragments, unbiased for full BPTT)."""

    name = "random"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.cut_prob = 1.0 / self.tb.mean_length
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 7919)

    def build(self, rollout: Rollout) -> SequenceBatch:
        batch = super().build(rollout)
        self._reach = float(self.tb.mean_length)
        return batch

    def forward(self, model: RecurrentActorCritic, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x = model.encode(batch.obs, batch.valid)  # [S, L, F]
        out = random_truncation_unroll(core_step(model.core), x, batch.init_state.tensors(),
                                       self.cut_prob, self.generator)  # [S, L, H]
        return model.heads(out)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
