"""``adaptive``: a truncation length K chosen from the measured decay of the gradient w.r.t. past
states (Aicher, Foti & Fox 2019): the estimator (pure functions), the gradient probe, the strategy."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..model import RecurrentActorCritic
from ..rollout import Rollout
from ..sequences import SequenceBatch, build_sequences, gather_sequences
from .base import StepFn, TruncationStrategy, core_step


def lag_gradients(step: StepFn, x: torch.Tensor, state: list, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                  burn_in: int = 0, reset: torch.Tensor | None = None) -> torch.Tensor:
    """Gradients of a last-step loss w.r.t. the recurrent state at every lag.

    ``x [B, burn_in + W, F]``, ``state`` tensors ``[K, B, H]`` (the state fed into the first step),
    ``loss_fn(h_last [B, 1, H]) -> [B]`` the per-window loss at the last step, ``reset [B, burn_in
    + W]`` (optional) true where the state is zeroed before the step (an episode start). The first
    ``burn_in`` steps run without gradient. Returns ``G [B, W, D]``: ``G[b, k]`` is d loss_b / d
    (state after step ``W - 1 - k`` of the window), h and c concatenated (D = K*H or 2*K*H).
    """
    B, total = x.shape[:2]
    W = total - burn_in
    if W < 1:
        raise ValueError(f"window of {total} steps leaves nothing after a burn-in of {burn_in}")

    def zero_at_reset(st: list, t: int) -> list:
        if reset is None:
            return st
        keep = (~reset[:, t]).to(x.dtype)[None, :, None]  # [1, B, 1]
        return [s * keep for s in st]

    with torch.no_grad():
        for t in range(burn_in):
            _, state = step(x[:, t:t + 1], zero_at_reset(state, t))
    state = [s.detach().requires_grad_(True) for s in state]  # a leaf: the graph starts here
    produced = []
    for t in range(burn_in, total):
        _, state = step(x[:, t:t + 1], zero_at_reset(state, t))
        produced.append(state)
    # The loss reads the top layer's h of the last state (equal to the core's output at that step),
    # so lag 0 is the state the loss sees directly. Windows are independent: summing their losses
    # keeps each window's gradient in its own batch column.
    loss = loss_fn(state[0][-1].unsqueeze(1)).sum()  # h [K, B, H] -> [B, H] -> [B, 1, H]
    flat = [s for st in produced for s in st]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    per_step = len(produced[0])
    cols = []
    for j in range(W):
        gs = [g if g is not None else torch.zeros_like(s)
              for g, s in zip(grads[j * per_step:(j + 1) * per_step], produced[j])]
        cols.append(torch.cat([g.transpose(0, 1).reshape(B, -1) for g in gs], dim=1))  # [K, B, H] -> [B, K*H]
    return torch.stack(cols[::-1], dim=1)  # [B, W, D], lag k = 0 first


def phi_and_partial_norms(G: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``G [B, W, D]`` -> ``phi [W]`` (mean over windows of ||G[:, k]||) and ``partial [W]``
    (``partial[K - 1]`` = mean over windows of ||sum_{k < K} G[:, k]||)."""
    phi = G.norm(dim=-1).mean(0)  # [W]
    partial = G.cumsum(dim=1).norm(dim=-1).mean(0)  # [W]
    return phi.detach().cpu().double().numpy(), partial.detach().cpu().double().numpy()


def fit_decay(phi: np.ndarray, tau: int) -> tuple[float, float]:
    """Least-squares fit of ``log phi_k = a + k log beta`` on lags ``k >= tau`` with ``phi_k > 0``.

    Returns ``(a, beta)``. When fewer than two lags >= tau carry any gradient, the tail is taken as
    empty: ``beta = 0`` (and ``a = log phi_tau`` or ``-inf``).
    """
    k = np.arange(tau, len(phi))
    y = np.asarray(phi, dtype=np.float64)[tau:]
    ok = np.isfinite(y) & (y > 0)
    if ok.sum() < 2:
        return (float(np.log(y[0])) if len(y) and y[0] > 0 else -math.inf), 0.0
    slope, intercept = np.polyfit(k[ok], np.log(y[ok]), 1)
    return float(intercept), float(np.exp(slope))


def tail_bound(phi: np.ndarray, beta: float, tau: int, K: int) -> float:
    """Bound on the gradient mass that truncation at K drops (the README's "Truncation
    strategies" gives the recipe).

    ``sum_{k=K}^{tau-1} phi_k + phi_tau / (1 - beta)`` for K < tau, ``phi_tau beta^(K - tau) /
    (1 - beta)`` for K >= tau; infinite when ``beta >= 1``.
    """
    phi_tau = float(phi[tau])
    if beta >= 1.0:
        return math.inf if phi_tau > 0 else (float(np.sum(phi[K:tau])) if K < tau else 0.0)
    geo = phi_tau / (1.0 - beta)
    if K < tau:
        return float(np.sum(phi[K:tau])) + geo
    return geo * beta ** (K - tau)


def grad_norm_lower_bound(partial: np.ndarray, tails: np.ndarray) -> float:
    """``max_K (||sum_{k<K} dL/dh_{T-k}|| - tail(K))`` over K = 1..W; ``partial [W]``, ``tails [W]``
    with ``tails[K - 1] = tail_bound(..., K)``."""
    with np.errstate(invalid="ignore"):
        return float(np.max(partial - tails))


@dataclasses.dataclass
class AdaptiveEstimate:
    K: int
    beta: float
    delta_hat: float        # delta_hat at the chosen K
    lower_bound: float
    phi: np.ndarray         # [W]
    delta: np.ndarray       # [k_max] delta_hat(K) for K = 1..k_max


def estimate_truncation(phi: np.ndarray, partial: np.ndarray, tau: int, target: float,
                        k_min: int, k_max: int) -> AdaptiveEstimate:
    """Fit beta, bound delta_hat(K) = tail(K) / lower bound, pick the smallest K in [k_min, k_max]
    with delta_hat(K) < target (k_max if none does)."""
    phi = np.asarray(phi, dtype=np.float64)
    partial = np.asarray(partial, dtype=np.float64)
    W = len(phi)
    _, beta = fit_decay(phi, tau)
    tails_w = np.array([tail_bound(phi, beta, tau, K) for K in range(1, W + 1)])  # [W]
    lb = grad_norm_lower_bound(partial, tails_w)
    Ks = np.arange(1, max(k_max, 1) + 1)
    tails = np.array([tail_bound(phi, beta, tau, int(K)) for K in Ks])  # [k_max]
    delta = tails / lb if lb > 0 else np.full(len(Ks), math.inf)
    chosen = k_max
    for K in range(k_min, k_max + 1):
        if delta[K - 1] < target:
            chosen = K
            break
    return AdaptiveEstimate(K=chosen, beta=beta, delta_hat=float(delta[chosen - 1]), lower_bound=lb,
                            phi=phi, delta=delta)


class AdaptiveStrategy(TruncationStrategy):
    """Fixed chunks of a length K re-estimated every ``tbptt.adapt_every`` updates."""

    name = "adaptive"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        start = self.tb.sequence_length if self.tb.sequence_length > 0 else self.tb.k_max
        self.K = int(min(max(start, self.tb.k_min), self.tb.k_max))
        self.updates = 0
        self.estimate: AdaptiveEstimate | None = None
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 104729)

    def before_update(self, model: RecurrentActorCritic, rollout: Rollout) -> None:
        super().before_update(model, rollout)
        if self.updates % self.tb.adapt_every == 0:
            self.estimate = self.measure(model, rollout)
            self.K = self.estimate.K
        self.updates += 1

    def measure(self, model: RecurrentActorCritic, rollout: Rollout) -> AdaptiveEstimate:
        """Sample windows from the rollout, probe phi_k with the current weights, choose K."""
        tb = self.tb
        T, N = rollout.num_steps, rollout.num_envs
        W, burn = tb.adapt_window, tb.adapt_burn_in
        total = W + burn
        if total > T:
            raise ValueError(f"adaptive window {W} + burn-in {burn} exceeds the rollout's {T} steps")
        B = tb.adapt_samples
        t0 = torch.randint(0, T - total + 1, (B,), generator=self.generator).to(rollout.obs.device)
        n = torch.randint(0, N, (B,), generator=self.generator).to(rollout.obs.device)
        length = torch.full_like(t0, total)
        seq = gather_sequences(rollout, t0, n, length, total)  # [B, total, ...]
        reset = rollout.episode_start.reshape(-1)[seq.index].clone()  # [T*N] -> [B, total]
        reset[:, 0] = False  # the stored first state already has any reset applied
        if not self.reset_hidden_state:
            reset = None
        last = seq.index[:, -1]

        def loss_fn(out_last: torch.Tensor) -> torch.Tensor:
            logits, values = model.heads(out_last[:, 0])  # [B, A], [B]
            logp = model.dist(logits).log_prob(rollout.actions.reshape(T * N, -1)[last])  # [B]
            adv = rollout.advantages.reshape(-1)[last]
            ret = rollout.returns.reshape(-1)[last]
            return -adv * logp + 0.5 * self.cfg.ppo.vf_coef * (values - ret) ** 2

        was_training = model.training
        model.eval()
        with torch.enable_grad():
            x = model.encode(seq.obs)  # [B, total, F]
            G = lag_gradients(core_step(model.core), x.detach(), seq.init_state.tensors(), loss_fn,
                              burn, reset)  # [B, W, D]
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        phi, partial = phi_and_partial_norms(G)
        return estimate_truncation(phi, partial, tb.adapt_tau, tb.target_bias, tb.k_min, tb.k_max)

    def build(self, rollout: Rollout) -> SequenceBatch:
        batch = build_sequences(rollout, self.K)
        self._reach = float(self.K)
        return batch

    def metrics(self) -> dict:
        out = super().metrics()
        if self.estimate is not None:
            out["tbptt/beta"] = self.estimate.beta
            out["tbptt/delta_hat"] = self.estimate.delta_hat
        return out

    def curves(self) -> dict:
        return {} if self.estimate is None else {"tbptt/phi_k": self.estimate.phi}

    def state_dict(self) -> dict:
        """K, the update counter (when to re-estimate), the window sampler and the last estimate
        (its beta, delta_hat and phi_k are logged on every update until the next estimate)."""
        est = None
        if self.estimate is not None:
            est = {f.name: getattr(self.estimate, f.name) for f in dataclasses.fields(AdaptiveEstimate)}
            est = {k: torch.from_numpy(np.asarray(v, np.float64)) if isinstance(v, np.ndarray) else v
                   for k, v in est.items()}
        return {**super().state_dict(), "K": int(self.K), "updates": int(self.updates),
                "generator": self.generator.get_state(), "estimate": est}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.K = int(state["K"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])
        est = state.get("estimate")
        self.estimate = None if est is None else AdaptiveEstimate(
            **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in est.items()})
