"""The seam every truncation strategy implements, and the recurrent step it may unroll."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import Config
from ..model import RecurrentActorCritic, RecurrentState
from ..rollout import Rollout
from ..sequences import SequenceBatch
from .refresh import refresh_start_states

# A recurrent step: (x_t [B, 1, F], state tensors, each [K, B, H]) -> (out [B, 1, H], new state tensors)
StepFn = Callable[[torch.Tensor, list], tuple]


def core_step(core: torch.nn.Module) -> StepFn:
    """Wrap an ``nn.LSTM``/``nn.GRU`` (batch_first) as a :data:`StepFn` over state tensor lists."""

    def step(x_t: torch.Tensor, state: list) -> tuple:
        s = (state[0], state[1]) if len(state) == 2 else state[0]
        out, s = core(x_t, s)
        return out, RecurrentState.from_torch(s).tensors()

    return step


class TruncationStrategy:
    """The seam between the trainer and a truncation strategy.

    A strategy decides how a rollout is cut into sequences (:meth:`build`) and how gradients flow
    through them (:meth:`core_out`; the default is one recurrent call per minibatch from the
    sequences' detached start states). The shared hooks refresh stale start states
    (``tbptt.refresh_states``), report ``tbptt/K`` and checkpoint the strategy's state."""

    name = ""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tb = cfg.tbptt
        self.reset_hidden_state = cfg.model.reset_hidden_state
        self._ratios: dict[str, list[float]] = {}  # tag -> [numerator, denominator] of this update
        self._reach = float(self.tb.sequence_length)

    # -- hooks -------------------------------------------------------------------------------------
    def before_update(self, model: RecurrentActorCritic, rollout: Rollout) -> None:
        """Called once per update after GAE, before :meth:`build`."""
        self._ratios = {}

    def build(self, rollout: Rollout) -> SequenceBatch:
        """The training sequences of this update (after :meth:`before_update`)."""
        raise NotImplementedError

    def before_epoch(self, model: RecurrentActorCritic, rollout: Rollout, batch: SequenceBatch,
                     epoch: int) -> None:
        """With ``tbptt.refresh_states``, recompute start states before every epoch after the first
        (in the first the weights are still those that collected the rollout)."""
        if self.tb.refresh_states and epoch > 0:
            kl = refresh_start_states(model, rollout, batch, self.reset_hidden_state)
            if kl is not None:
                self.add_ratio("tbptt/staleness_kl", kl, 1.0)

    def core_out(self, model: RecurrentActorCritic, batch: SequenceBatch) -> torch.Tensor:
        """The training forward up to the recurrent core: its outputs ``[S, L, H]``. The default
        is one recurrent call from the sequences' detached start states."""
        out, _ = model.run_core(model.encode(batch.obs, batch.valid), batch.init_state, batch.valid)
        return out

    def forward(self, model: RecurrentActorCritic, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward: ``logits [S, L, A]``, ``values [S, L]``."""
        return model.heads(self.core_out(model, batch), batch.obs)

    def add_ratio(self, tag: str, numerator: float, denominator: float, replace: bool = False) -> None:
        """Add to (``replace``: set) a figure of this update that is a ratio of sums over the
        rollout (see :meth:`ratios`)."""
        acc = [0.0, 0.0] if replace else self._ratios.get(tag, [0.0, 0.0])
        self._ratios[tag] = [acc[0] + float(numerator), acc[1] + float(denominator)]

    def ratios(self) -> dict:
        """``tag -> (numerator, denominator)``: the figures of :meth:`metrics` that are ratios of
        sums over this process's rollout; a data-parallel run sums both over the ranks, so that
        they describe the whole run's rollout (``tbptt/staleness_kl``: the mean over epochs and
        ranks of the refresh's KL)."""
        return {k: (v[0], v[1]) for k, v in self._ratios.items()}

    def metrics(self) -> dict:
        """Scalars for this update: ``tbptt/K`` (how far back gradients reach), staleness if
        measured, and the strategy's other :meth:`ratios`."""
        out = {"tbptt/K": self._reach}
        out.update({k: (n / d if d else math.nan) for k, (n, d) in self.ratios().items()})
        return out

    def curves(self) -> dict:
        """1-D arrays to log as curves (tag -> values indexed by lag)."""
        return {}

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """State that later updates depend on, as tensors and plain data (loads with
        ``torch.load(weights_only=True)``). Per-update instruments are rebuilt every update."""
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. A state saved by another strategy is rejected."""
        if state.get("name") != self.name:
            raise ValueError(f"truncation state of strategy {state.get('name')!r} does not fit "
                             f"strategy {self.name!r}")
