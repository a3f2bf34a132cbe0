"""Truncation strategies behind one seam: how a rollout becomes sequences and how gradients flow.

The trainer only calls :class:`TruncationStrategy`:

- ``before_update(model, rollout)``: once per update, after GAE (``adaptive`` re-estimates K here);
- ``build(rollout) -> SequenceBatch``: the training sequences;
- ``before_epoch(model, rollout, batch, epoch)``: ``tbptt.refresh_states`` rewrites start states;
- ``forward(model, batch) -> (logits [S, L, A], values [S, L])``: the training forward pass;
- ``metrics() -> dict`` (scalars) and ``curves() -> dict`` (1-D arrays such as phi_k).

Strategies (see DESIGN.md, "TBPTT vocabulary"):

- ``fixed``: TBPTT(L, L), chunks of ``sequence_length``, one recurrent call.
- ``overlap``: TBPTT(k1, k2), windows of k2 steps every k1 steps; the prefix carries gradient or is
  a no-gradient burn-in.
- ``random``: randomized truncation; every recurrent edge's gradient is multiplied by
  ``keep / (1 - c)`` with ``keep ~ Bernoulli(1 - c)``, so the gradient is unbiased for BPTT over the
  whole sequence and forward values are unchanged.
- ``adaptive``: fixed chunks of a length K chosen from the measured decay of the gradient w.r.t.
  past states (Aicher, Foti & Fox 2019).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from .config import Config
from .model import RecurrentActorCritic, RecurrentState
from .rollout import Rollout
from .sequences import SequenceBatch, build_sequences, gather_sequences, overlap_windows

# A recurrent step: (x_t [B, 1, F], state tensors, each [K, B, H]) -> (out [B, 1, H], new state tensors)
StepFn = Callable[[torch.Tensor, list], tuple]


def core_step(core: torch.nn.Module) -> StepFn:
    """Wrap an ``nn.LSTM``/``nn.GRU`` (batch_first) as a :data:`StepFn` over state tensor lists."""

    def step(x_t: torch.Tensor, state: list) -> tuple:
        s = (state[0], state[1]) if len(state) == 2 else state[0]
        out, s = core(x_t, s)
        return out, RecurrentState.from_torch(s).tensors()

    return step


# ------------------------------------------------------------------------------------------------
# Randomized truncation


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


# ------------------------------------------------------------------------------------------------
# Adaptive truncation: the estimator (pure functions) and the gradient probe


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
    """Bound on the gradient mass that truncation at K drops (DESIGN.md's recipe).

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


# ------------------------------------------------------------------------------------------------
# Refreshing stale start states


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

    ``obs [S, 1, ...]``, states ``[K, S, H]``.
    """
    new_logits = model(obs, refreshed)[0][:, 0]  # [S, A]
    old_logits = model(obs, stored)[0][:, 0]
    kl = model.dist(new_logits).kl(model.dist(old_logits))  # [S]
    return float(kl.mean())


def refresh_start_states(model: RecurrentActorCritic, rollout: Rollout, batch: SequenceBatch,
                         reset_hidden_state: bool) -> float:
    """Rewrite ``batch.init_state`` with states recomputed by the current weights; return the
    staleness KL between the policy at the sequences' first steps from the old and new states."""
    states = unroll_states(model, rollout, reset_hidden_state)
    N = rollout.num_envs
    first = batch.index[:, 0]  # [S] flat time-major index t * N + n of each sequence's first step
    t, n = first // N, first % N
    h = states.h[t, :, n].transpose(0, 1).contiguous()  # [S, K, H] -> [K, S, H]
    c = None if states.c is None else states.c[t, :, n].transpose(0, 1).contiguous()
    refreshed = RecurrentState(h, c)
    kl = staleness_kl(model, batch.obs[:, :1], batch.init_state, refreshed)
    batch.init_state = refreshed
    return kl


# ------------------------------------------------------------------------------------------------
# The strategies


class TruncationStrategy:
    """``fixed``: chunks of ``tbptt.sequence_length`` (<= 0: whole episode fragments), one
    recurrent call per minibatch. Subclasses change how sequences are cut or how gradients flow."""

    name = "fixed"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tb = cfg.tbptt
        self.reset_hidden_state = cfg.model.reset_hidden_state
        self._staleness: list[float] = []
        self._reach = float(self.tb.sequence_length)

    # -- hooks -------------------------------------------------------------------------------------
    def before_update(self, model: RecurrentActorCritic, rollout: Rollout) -> None:
        """Called once per update after GAE, before :meth:`build`."""
        self._staleness = []

    def build(self, rollout: Rollout) -> SequenceBatch:
        batch = build_sequences(rollout, self.tb.sequence_length)
        self._reach = float(batch.length)
        return batch

    def before_epoch(self, model: RecurrentActorCritic, rollout: Rollout, batch: SequenceBatch,
                     epoch: int) -> None:
        """With ``tbptt.refresh_states``, recompute start states before every epoch after the first
        (in the first the weights are still those that collected the rollout)."""
        if self.tb.refresh_states and epoch > 0:
            self._staleness.append(refresh_start_states(model, rollout, batch, self.reset_hidden_state))

    def forward(self, model: RecurrentActorCritic, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward: ``logits [S, L, A]``, ``values [S, L]``."""
        logits, values, _ = model(batch.obs, batch.init_state, batch.valid)
        return logits, values

    def metrics(self) -> dict:
        """Scalars for this update: ``tbptt/K`` (how far back gradients reach), staleness if measured."""
        out = {"tbptt/K": self._reach}
        if self._staleness:
            out["tbptt/staleness_kl"] = float(np.mean(self._staleness))
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
        self._padding = 1.0 - float(length.sum()) / (len(length) * self.k2)
        self._prefix = float(loss_from.sum()) / (len(length) * self.k2)
        return gather_sequences(rollout, t0, n, length, self.k2, loss_from)

    def metrics(self) -> dict:
        out = super().metrics()
        out["tbptt/padding_fraction"] = self._padding
        out["tbptt/prefix_fraction"] = self._prefix
        return out

    def forward(self, model: RecurrentActorCritic, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.tb.burn_in or self.k1 == self.k2:
            return super().forward(model, batch)
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
        return model.heads(out)


class RandomStrategy(TruncationStrategy):
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


_STRATEGIES = {cls.name: cls for cls in (TruncationStrategy, OverlapStrategy, RandomStrategy, AdaptiveStrategy)}


def make_strategy(cfg: Config) -> TruncationStrategy:
    """The strategy named by ``cfg.tbptt.strategy``."""
    try:
        return _STRATEGIES[cfg.tbptt.strategy](cfg)
    except KeyError:
        raise ValueError(f"unknown tbptt.strategy {cfg.tbptt.strategy!r}; known: "
                         + ", ".join(_STRATEGIES)) from None

