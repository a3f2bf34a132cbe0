"""``adaptive``: a truncation length K chosen from the measured decay of the gradient w.r.t. past
states (Aicher, Foti & Fox 2019), trained so that the bias bound it reports holds.

The estimate (pure functions below): with the current weights, put a loss at the last step of B
windows sampled from the rollout and measure phi_k, the mean norm of its gradient w.r.t. the state
k steps back; fit their geometric decay beta on lags k >= tau. ``tail(h)`` bounds the gradient
mass that a loss term loses when its gradient reaches back only h steps; a lower bound on the full
gradient's norm is ``max_K (||mean over windows of sum_{k<K} G_k|| - tail(K))``, the norm of the
*mean* gradient as the authors take it (a mean of per-window norms is larger and made the bound too
optimistic). ``tail(h) / lower bound`` is the relative bias of one loss term with h steps of history.

What is trained: that bound assumes every loss term backpropagates K steps. Chunks of K do not do
that: position j of a chunk reaches back j + 1 steps, so averaged over a chunk the bias is far above
delta(K) (measured on CueRecall: reported 0.06-0.10 against a target of 0.1, actual 0.17-0.81).
Here K is the *history* every loss term keeps: training uses TBPTT(k1, K + k1 - 1) windows (the
overlap strategy's, prefix with gradient), loss blocks of k1 = ``tbptt.stride`` steps (0: k1 = K),
each preceded by the K - 1 steps before it, so the loss at block position j backpropagates
K + j steps (the authors' buffer scheme in the other direction: every loss term, rather than every
state, sees K steps). Windows never reach past their episode-fragment start; a term whose window
starts there has all the history the rollout holds and no bias against BPTT over whole fragments
(``sequence_length: 0``), the best a rollout allows (nothing before t = 0 is stored). The bound on
the trained gradient, logged as ``tbptt/delta_hat``, is the mean over the batch's loss terms of
``tail(history) / lower bound`` (0 for the terms with their whole fragment): by the triangle
inequality it bounds the relative bias of the mean of their gradients. K is the smallest value in
[k_min, k_max] whose trained bound on the rollout is below ``target_bias``.

What the bound covers: phi_k measures gradients w.r.t. the *state*; a parameter's gradient
through lag k is that times the step's own Jacobian, which the method takes to be alike at every
step. With stationary inputs it is, and the trained gradient's measured bias stays under the bound
(``tests/test_truncation.py``). On CueRecall, whose only informative input is the cue, the input
weights' and the encoder's gradient enters at one step alone: once the agent uses its memory the
measured bias of those parameters exceeds the bound (0.32-0.46 against 0.06-0.10), while the
recurrent weights' stays near it (0.08-0.18). ``scripts/adaptive_bias.py`` measures both.

The price: each window holds K + k1 - 1 steps for k1 loss steps, so the recurrent core and the
encoder run (K + k1 - 1) / k1 times as many steps as fixed chunks (about 2x with k1 = K); a
larger ``tbptt.stride`` lowers that factor, 1 is the costliest (every term exactly K steps).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..model import RecurrentActorCritic
from ..rollout import Rollout
from ..sequences import SequenceBatch, gather_sequences, overlap_windows
from ..utils import stream_seed
from .base import StepFn, TruncationStrategy, core_step
from .overlap import window_fractions

LOWER_BOUND_Z = 1.645
"""The normal quantile of the lower confidence bound on the gradient's norm (one-sided, 95%)."""


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


def surviving_lags(reset: torch.Tensor, burn_in: int) -> torch.Tensor:
    """``reset [B, burn_in + W]`` (true where the state is zeroed before the step) -> ``alive [B,
    W]``: true where the gradient of the last step's loss reaches lag k, i.e. no episode starts
    in the window's last k steps (lag 0 always)."""
    W = reset.shape[1] - burn_in
    cut = reset[:, burn_in:].flip(1).to(torch.int64).cumsum(1) > 0  # [B, W] a start at or after lag k-1
    alive = torch.ones_like(cut)
    alive[:, 1:] = ~cut[:, :W - 1]
    return alive


def phi_and_partial_norms(G: torch.Tensor, alive: torch.Tensor | None = None,
                          z: float = LOWER_BOUND_Z) -> tuple[np.ndarray, np.ndarray]:
    """``G [B, W, D]`` (``alive [B, W]``, optional: where the gradient survives to lag k, see
    :func:`surviving_lags`) -> ``phi [W]`` and ``partial [W]``.

    ``phi[k]``: the mean of ``||G[:, k]||`` over the windows whose gradient survives to lag k
    (NaN where none does): the gradient at lag k of a loss term whose fragment reaches that far,
    the quantity :func:`trained_bias_bound` charges to the terms it knows reach that far.

    ``partial[K - 1]``: a one-sided lower confidence bound (level about 1 - alpha with ``z`` the
    normal quantile, 1.645: 95%) on ``||E sum_{k<K} G_k||``, the norm of the expected truncated
    gradient. The norm of the sample mean ``x_bar`` over the B windows is inflated by their noise
    (``E ||x_bar||^2 = ||mu||^2 + tr(Sigma) / B``): ``U = ||x_bar||^2 - tr(S) / B`` (S the
    sample covariance) is unbiased for ``||mu||^2``, with variance about ``4 mu' Sigma mu / B +
    2 tr(Sigma^2) / B^2`` (estimated with ``x_bar`` and S, which only widens it); the bound is
    ``sqrt(max(0, U - z sd(U)))``. With one window no variance is known and the bound is 0."""
    G = G.detach().double()
    B, W = G.shape[:2]
    norms = G.norm(dim=-1)  # [B, W]
    if alive is None:
        phi = norms.mean(0)
    else:
        a = alive.to(G.device, torch.float64)
        count = a.sum(0)  # [W]
        phi = torch.where(count > 0, (norms * a).sum(0) / count.clamp_min(1.0),
                          torch.full_like(count, math.nan))
    if B < 2:
        return phi.cpu().numpy(), np.zeros(W)
    X = G.cumsum(dim=1).transpose(0, 1)  # [W, B, D]: per window, sum_{k<K} G_k for K = 1..W
    mean = X.mean(1)  # [W, D]
    Xc = X - mean[:, None]  # [W, B, D]
    gram = Xc @ Xc.transpose(1, 2) / (B - 1)  # [W, B, B]: nonzero eigenvalues those of S
    tr_s = gram.diagonal(dim1=1, dim2=2).sum(-1)  # [W]
    tr_s2 = (gram * gram).sum((1, 2))  # [W] = ||S||_F^2
    proj = torch.einsum("wbd,wd->wb", Xc, mean)  # [W, B]
    m_s_m = (proj * proj).sum(1) / (B - 1)  # [W] = x_bar' S x_bar
    U = (mean * mean).sum(-1) - tr_s / B
    sd = (4.0 * m_s_m / B + 2.0 * tr_s2 / B ** 2).sqrt()
    partial = (U - z * sd).clamp_min(0.0).sqrt()
    return phi.cpu().numpy(), partial.cpu().numpy()


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
    """Bound on the gradient mass that truncation at K drops (the docs' "Truncation
    strategies" page gives the recipe).

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
    delta_hat: float        # the bound at K: per term (estimate_truncation), or on the trained gradient
    lower_bound: float
    phi: np.ndarray         # [W]
    delta: np.ndarray       # [k_max] per-term delta_hat(K) = tail(K) / lower_bound for K = 1..k_max


def fill_lags(phi: np.ndarray) -> np.ndarray:
    """``phi`` with each NaN (a lag no probe window reached) replaced by the last measured value
    before it, which bounds it from above as long as the gradient does not grow with the lag."""
    out = np.asarray(phi, dtype=np.float64).copy()
    for k in range(1, len(out)):
        if not np.isfinite(out[k]):
            out[k] = out[k - 1]
    return out


def estimate_truncation(phi: np.ndarray, partial: np.ndarray, tau: int, target: float,
                        k_min: int, k_max: int) -> AdaptiveEstimate:
    """Fit beta on the measured lags (NaN: not reached, left out), bound the per-term delta_hat(K)
    = tail(K) / lower bound (the relative bias of a loss term whose gradient reaches back K steps
    of an unbounded history), pick the smallest K in [k_min, k_max] with delta_hat(K) < target
    (k_max if none does). The estimate's ``phi`` is filled (:func:`fill_lags`). The lower
    bound's tails use the same phi: it averages only over windows that reach lag k, so it bounds
    the mean over all windows (where a window cut by an episode start adds 0) from above, and
    the lower bound stays one."""
    _, beta = fit_decay(phi, tau)
    phi = fill_lags(phi)
    partial = np.asarray(partial, dtype=np.float64)
    W = len(phi)
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


def lag_mass(phi: np.ndarray, beta: float, tau: int, max_lag: int) -> np.ndarray:
    """``m [max_lag + 1]``: the bound on a loss term's state-gradient norm at each lag, given that
    its fragment reaches that far: the measured ``phi_k`` for k < tau, ``phi_tau beta^(k - tau)``
    beyond (finite for any beta: lags never exceed the rollout)."""
    phi = fill_lags(phi)
    k = np.arange(max_lag + 1)
    head = phi[np.minimum(k, tau)]
    return np.where(k < tau, head, phi[tau] * float(beta) ** np.maximum(k - tau, 0).astype(np.float64))


def fragment_start(episode_start: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` -> ``[T, N]``: the first step of the episode fragment each step belongs to
    (t = 0 or its episode's start)."""
    T, N = episode_start.shape
    es = episode_start.clone()
    es[0] = True
    steps = torch.arange(T, device=es.device)[:, None].expand(T, N)
    return torch.cummax(torch.where(es, steps, torch.zeros_like(steps)), dim=0).values


def trained_lost_mass(episode_start: torch.Tensor, t0: torch.Tensor, n: torch.Tensor,
                      length: torch.Tensor, loss_from: torch.Tensor, mass: np.ndarray) -> tuple[float, int]:
    """``(lost, terms)`` for the gradient trained on windows ``[t0, t0 + length)`` of env ``n``
    whose positions ``>= loss_from`` enter the loss (all ``[S]``; ``episode_start [T, N]``;
    ``mass`` from :func:`lag_mass`, ``T`` long at least): ``terms`` loss terms, and ``lost`` the
    sum over them of the state-gradient mass truncation drops. The term at window position j and
    rollout step t keeps lags 0..j; BPTT over its whole fragment keeps lags 0..d, d = t minus its
    fragment's first step; it loses ``sum_{k=j+1}^{d} mass[k]`` (nothing when the window starts
    at the fragment's start). The episode starts enter here once, through d."""
    L = int(length.max())
    dev = t0.device
    j = torch.arange(L, device=dev)[None].expand(len(t0), L)  # [S, L]
    in_loss = (j >= loss_from[:, None]) & (j < length[:, None])  # [S, L]
    T = episode_start.shape[0]
    t = (t0[:, None] + j).clamp_max(T - 1)  # [S, L]
    d = t - fragment_start(episode_start)[t, n[:, None].expand_as(t)]  # [S, L]
    cum = torch.zeros(len(mass) + 1, dtype=torch.float64, device=dev)
    cum[1:] = torch.as_tensor(np.cumsum(mass), dtype=torch.float64, device=dev)  # cum[i] = sum_{k<i} m_k
    lost = (cum[d + 1] - cum[torch.minimum(j + 1, d + 1)]).clamp_min(0.0)  # [S, L]
    return float(lost[in_loss].sum()), int(in_loss.sum())


def ratio_bound(lost: float, terms: int, lower_bound: float) -> float:
    """``lost / terms / lower_bound``: 0 if nothing is lost, inf if something is and the lower
    bound is not positive."""
    if lost == 0.0:
        return 0.0
    return lost / max(terms, 1) / lower_bound if lower_bound > 0 else math.inf


def trained_bias_bound(episode_start: torch.Tensor, t0: torch.Tensor, n: torch.Tensor,
                       length: torch.Tensor, loss_from: torch.Tensor, mass: np.ndarray,
                       lower_bound: float) -> float:
    """The relative-bias bound of the trained gradient: the mean over loss terms of the mass
    truncation drops (:func:`trained_lost_mass`) over ``lower_bound``, the norm of a loss term's
    expected gradient. By the triangle inequality it bounds the relative bias of the mean of the
    terms' gradients."""
    lost, terms = trained_lost_mass(episode_start, t0, n, length, loss_from, mass)
    return ratio_bound(lost, terms, lower_bound)


class AdaptiveStrategy(TruncationStrategy):
    """Every loss term keeps at least K steps of history, K re-estimated every
    ``tbptt.adapt_every`` updates: TBPTT(k1, K + k1 - 1) windows with k1 = ``tbptt.stride``
    (0: k1 = K), the prefix carrying gradient. The module docstring says why and what it costs."""

    name = "adaptive"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        start = self.tb.sequence_length if self.tb.sequence_length > 0 else self.tb.k_max
        self.K = int(min(max(start, self.tb.k_min), self.tb.k_max))
        self.updates = 0
        self.estimate: AdaptiveEstimate | None = None
        self.generator = torch.Generator().manual_seed(stream_seed(cfg.run.seed, "adaptive truncation"))
        self.estimated = False  # whether this update re-estimated K

    def block(self, K: int) -> int:
        """k1, the loss steps per window, for history K."""
        return self.tb.stride if self.tb.stride > 0 else K

    def window_length(self, K: int) -> int:
        return K + self.block(K) - 1

    def windows(self, episode_start: torch.Tensor, K: int):
        """``(t0, n, length, loss_from)`` of the windows that give every loss term K steps."""
        return overlap_windows(episode_start, self.block(K), self.window_length(K))

    def trained_lost(self, episode_start: torch.Tensor, K: int, windows=None) -> tuple[float, int]:
        """:func:`trained_lost_mass` of history K on a rollout with these episode starts."""
        est = self.estimate
        t0, n, length, loss_from = self.windows(episode_start, K) if windows is None else windows
        mass = lag_mass(est.phi, est.beta, self.tb.adapt_tau, episode_start.shape[0])
        return trained_lost_mass(episode_start, t0, n, length, loss_from, mass)

    def trained_bound(self, episode_start: torch.Tensor, K: int, windows=None) -> float:
        """The bound on the gradient trained with history K on a rollout with these episode starts."""
        if self.estimate is None:
            return math.nan
        return ratio_bound(*self.trained_lost(episode_start, K, windows), self.estimate.lower_bound)

    def choose_K(self, episode_start: torch.Tensor) -> int:
        """The smallest K in [k_min, k_max] whose trained bound is below ``target_bias``, else k_max."""
        for K in range(self.tb.k_min, self.tb.k_max + 1):
            if self.trained_bound(episode_start, K) < self.tb.target_bias:
                return K
        return self.tb.k_max

    def before_update(self, model: RecurrentActorCritic, rollout: Rollout) -> None:
        super().before_update(model, rollout)
        self.estimated = self.updates % self.tb.adapt_every == 0
        if self.estimated:
            self.estimate = self.measure(model, rollout)
            self.choose(rollout.episode_start)
        self.updates += 1

    def choose(self, episode_start: torch.Tensor) -> None:
        """K (and the estimate's K and delta_hat) for a rollout with these episode starts: in a
        data-parallel run, rank 0 calls it again with every rank's starts side by side
        (``[T, all envs]``), so that K holds its bound over the whole run's rollout."""
        self.K = self.choose_K(episode_start)
        self.estimate = dataclasses.replace(
            self.estimate, K=self.K, delta_hat=self.trained_bound(episode_start, self.K))

    def measure(self, model: RecurrentActorCritic, rollout: Rollout) -> AdaptiveEstimate:
        """Sample windows from the rollout, probe phi_k with the current weights, fit the decay.
        (The returned estimate's K and delta_hat are the per-term ones; :meth:`before_update`
        replaces them with the trained ones.)"""
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
        alive = surviving_lags(reset, burn) if reset is not None else None
        last = seq.index[:, -1]
        o = self.cfg.ppo
        adv_all = rollout.advantages.reshape(-1)
        if o.norm_advantages:  # as the trainer does, over the rollout rather than a minibatch
            adv_all = (adv_all - adv_all.mean()) / (adv_all.std() + 1e-8)
        ent_coef = o.ent_coef.value(0, self.cfg.run.total_steps)

        def loss_fn(out_last: torch.Tensor) -> torch.Tensor:
            """The trained loss of one step at ratio 1 (no clipping acts there)."""
            logits, values = model.heads(out_last[:, 0], seq.obs[:, -1])  # [B, A] (masked), [B]
            dist = model.dist(logits)
            logp = dist.log_prob(rollout.actions.reshape(T * N, -1)[last])  # [B]
            ret = rollout.returns.reshape(-1)[last]
            return (-adv_all[last] * logp + 0.5 * o.vf_coef * (values - ret) ** 2
                    - ent_coef * dist.entropy())

        was_training = model.training
        model.eval()
        with torch.enable_grad():
            x = model.encode(seq.obs)  # [B, total, F]
            G = lag_gradients(core_step(model.core), x.detach(), seq.init_state.tensors(), loss_fn,
                              burn, reset)  # [B, W, D]
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        phi, partial = phi_and_partial_norms(G, alive)
        return estimate_truncation(phi, partial, tb.adapt_tau, tb.target_bias, tb.k_min, tb.k_max)

    def build(self, rollout: Rollout) -> SequenceBatch:
        windows = self.windows(rollout.episode_start, self.K)
        t0, n, length, loss_from = windows
        k2 = self.window_length(self.K)
        if self.estimate is not None:  # the bound as a ratio of sums (whole-run in a data-parallel run)
            lost, terms = self.trained_lost(rollout.episode_start, self.K, windows)
            lb = self.estimate.lower_bound
            self.add_ratio("tbptt/delta_hat", 0.0 if lost == 0 else (lost / lb if lb > 0 else math.inf),
                           terms, replace=True)
        window_fractions(self, length, loss_from, k2)
        self._reach = float(self.K)
        return gather_sequences(rollout, t0, n, length, k2, loss_from)

    def metrics(self) -> dict:
        """``tbptt/K`` (the history every loss term keeps), ``tbptt/window`` (steps per window),
        ``tbptt/delta_hat`` (the bias bound of this update's trained gradient), ``tbptt/beta``."""
        out = super().metrics()
        out["tbptt/window"] = float(self.window_length(self.K))
        if self.estimate is not None:
            out["tbptt/beta"] = self.estimate.beta
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
