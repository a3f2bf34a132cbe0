"""Refreshing stale start states: stored states come from the weights that collected the rollout;
later epochs can recompute them with the current weights (``tbptt.refresh_states``)."""
from __future__ import annotations

import torch

from ..model import RecurrentActorCritic, RecurrentState
from ..rollout import Rollout
from ..sequences import SequenceBatch


@torch.no_grad()
def unroll_states(model: RecurrentActorCritic, rollout: Rollout, reset_hidden_state: bool) -> RecurrentState:
    """Re-run the core over the whole rollout with the current weights.

    Returns the state fed INTO every step, h/c ``[T, K, N, H]`` (the layout of ``rollout.state_h``).
    Step 0 keeps the stored state (it was carried in from the previous rollout); at later episode
    starts the state is zeroed when ``reset_hidden_state``, as the collector did.
    """
    T = rollout.num_steps
    x = model.encode(rollout.obs.transpose(0, 1))  # [T, N, ...] -> [N, T, ...] -> [N, T, F]
    state = RecurrentState(rollout.state_h[0], None if rollout.state_c is None else rollout.state_c[0])
    hs, cs = [], []
    for t in range(T):
        if t > 0 and reset_hidden_state:
            state = state.masked(~rollout.episode_start[t])
        hs.append(state.h)
        cs.append(state.c)
        _, s = model.core(x[:, t:t + 1], state.as_torch())
        state = RecurrentState.from_torch(s)
    h = torch.stack(hs)  # [T, K, N, H]
    c = None if rollout.state_c is None else torch.stack(cs)
    return RecurrentState(h, c)


@torch.no_grad()
def staleness_kl(model: RecurrentActorCritic, obs: torch.Tensor, stored: RecurrentState,
                 refreshed: RecurrentState) -> float:
    """Mean over sequences of KL(pi(. | refreshed) || pi(. | stored)) at the first step.

    ``obs [S, 1, ...]``, states ``[K, S, H]``. Computed in float64 and clipped at 0 per sequence:
    near a uniform policy the KLs are ~1e-8, where float32 rounding alone can make them negative.
    """
    new_logits = model(obs, refreshed)[0][:, 0].double()  # [S, A]
    old_logits = model(obs, stored)[0][:, 0].double()
    kl = model.dist(new_logits).kl(model.dist(old_logits))  # [S]
    return float(kl.clamp_min(0.0).mean())


def can_be_stale(rollout: Rollout, t: torch.Tensor, n: torch.Tensor, reset_hidden_state: bool) -> torch.Tensor:
    """Which start states ``(t [S], n [S])`` a refresh can change: not those at t = 0 (the carried-in
    state is kept: the rollout holds nothing before it), nor, when states are reset, those at an
    episode start (zero before and after). Returns ``[S]`` bool."""
    out = t > 0
    if reset_hidden_state:
        out = out & ~rollout.episode_start[t, n]
    return out


def refresh_start_states(model: RecurrentActorCritic, rollout: Rollout, batch: SequenceBatch,
                         reset_hidden_state: bool) -> float | None:
    """Rewrite ``batch.init_state`` with states recomputed by the current weights; return the
    staleness KL between the policy at the sequences' first steps from the old and new states,
    averaged over the sequences whose start state can be stale (:func:`can_be_stale`; None if
    there are none). The others would only dilute it with exact zeros."""
    states = unroll_states(model, rollout, reset_hidden_state)
    N = rollout.num_envs
    first = batch.index[:, 0]  # [S] flat time-major index t * N + n of each sequence's first step
    t, n = first // N, first % N
    h = states.h[t, :, n].transpose(0, 1).contiguous()  # [S, K, H] -> [K, S, H]
    c = None if states.c is None else states.c[t, :, n].transpose(0, 1).contiguous()
    refreshed = RecurrentState(h, c)
    stale = torch.nonzero(can_be_stale(rollout, t, n, reset_hidden_state)).squeeze(1)  # [S']
    kl = None
    if stale.numel() > 0:
        kl = staleness_kl(model, batch.obs[stale, :1], batch.init_state.index(stale), refreshed.index(stale))
    batch.init_state = refreshed
    return kl
