"""The truncation family: overlap windows, burn-in, randomized truncation, the adaptive estimator,
start-state refresh, and each strategy inside one trainer update."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppo_tbptt.model import RecurrentState
from ppo_tbptt.sequences import build_sequences, overlap_windows
from ppo_tbptt.truncation import (
    OverlapStrategy, RandomStrategy, TruncationStrategy, estimate_truncation, fit_decay,
    lag_gradients, make_strategy, phi_and_partial_norms, random_truncation_unroll,
    refresh_start_states, scale_gradient, tail_bound,
)

from trunc_helpers import collect, tiny_config

torch.set_num_threads(1)  # small shared CPUs


def random_episode_starts(T: int, N: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, N, generator=g) < p  # [T, N]


# ------------------------------------------------------------------------------------------------
# overlap


def test_overlap_with_k1_equal_k2_reproduces_fixed():
    cfg = tiny_config("tbptt.strategy=overlap", "tbptt.sequence_length=4", "tbptt.stride=4")
    model, rollout = collect(cfg, rollouts=2)
    strat = make_strategy(cfg)
    assert isinstance(strat, OverlapStrategy)
    got = strat.build(rollout)
    ref = build_sequences(rollout, 4)
    for name in ("obs", "actions", "logprobs", "values", "advantages", "returns", "mask", "valid", "index"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.equal(got.init_state.h, ref.init_state.h)
    assert torch.equal(got.init_state.c, ref.init_state.c)
    logits, values = strat.forward(model, got)
    ref_logits, ref_values, _ = model(ref.obs, ref.init_state, ref.valid)
    assert torch.equal(logits, ref_logits) and torch.equal(values, ref_values)


@pytest.mark.parametrize("k1,k2", [(1, 3), (2, 5), (3, 8), (4, 4), (5, 7)])
def test_overlap_windows_cover_every_transition_exactly_once(k1, k2):
    T, N = 37, 5
    es = random_episode_starts(T, N, 0.12, seed=k1 * 10 + k2)
    t0, n, length, loss_from = overlap_windows(es, k1, k2)
    count = torch.zeros(T, N, dtype=torch.long)
    for a, e, ln, q in zip(t0.tolist(), n.tolist(), length.tolist(), loss_from.tolist()):
        assert 1 <= ln <= k2 and 0 <= q < ln and ln - q <= k1
        assert q <= k2 - k1
        # never crosses an episode start: only the window's first step may be one
        assert not es[a + 1:a + ln, e].any()
        count[a + q:a + ln, e] += 1
    assert torch.equal(count, torch.ones(T, N, dtype=torch.long))


def test_overlap_batch_mask_counts_each_transition_once():
    cfg = tiny_config("tbptt.strategy=overlap", "tbptt.sequence_length=5", "tbptt.stride=2")
    _, rollout = collect(cfg)
    batch = make_strategy(cfg).build(rollout)
    T, N = rollout.num_steps, rollout.num_envs
    hits = torch.zeros(T * N).index_add_(0, batch.index.reshape(-1), batch.mask.reshape(-1))  # [S*L] -> [T*N]
    assert torch.equal(hits, torch.ones(T * N))
    assert batch.length == 5 and (batch.mask[:, 0] == 0).any()  # some windows do have a prefix


@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_burn_in_prefix_gets_no_gradient(core):
    def start_state_grads(burn_in: bool):
        cfg = tiny_config("tbptt.strategy=overlap", "tbptt.sequence_length=5", "tbptt.stride=2",
                          f"tbptt.burn_in={str(burn_in).lower()}", core=core)
        model, rollout = collect(cfg, rollouts=2)
        strat = make_strategy(cfg)
        batch = strat.build(rollout)
        leaves = [s.clone().requires_grad_(True) for s in batch.init_state.tensors()]
        batch.init_state = RecurrentState(*leaves)
        logits, values = strat.forward(model, batch)
        # a loss on every loss position (mask) of every sequence
        loss = ((logits.sum(-1) + values) * batch.mask).sum()
        loss.backward()
        per_seq = sum(leaf.grad.abs().sum(dim=(0, 2)) for leaf in leaves)  # [S]
        prefix = (batch.mask > 0).float().argmax(dim=1)  # [S]
        # the encoder sees prefix observations too; its weights must get no gradient from them
        return per_seq, prefix

    g_burn, prefix = start_state_grads(True)
    g_grad, _ = start_state_grads(False)
    has_prefix = prefix > 0
    assert has_prefix.any() and (~has_prefix).any()
    assert torch.all(g_burn[has_prefix] == 0)          # the cut: nothing reaches the stored state
    assert torch.all(g_burn[~has_prefix] > 0)          # no prefix: gradient reaches the start state
    assert torch.all(g_grad[has_prefix] > 0)           # without burn-in the prefix carries gradient


def test_burn_in_does_not_change_forward_values():
    cfg = tiny_config("tbptt.strategy=overlap", "tbptt.sequence_length=6", "tbptt.stride=2",
                      "tbptt.burn_in=true")
    model, rollout = collect(cfg)
    strat = make_strategy(cfg)
    batch = strat.build(rollout)
    logits, values = strat.forward(model, batch)
    ref_logits, ref_values, _ = model(batch.obs, batch.init_state)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# randomized truncation


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(2, 3, 4, requires_grad=True)  # [K, B, H]
    scale = torch.tensor([0.0, 1.0, 2.5])
    y = scale_gradient(x, scale)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, scale[None, :, None].expand_as(x))


class LinearRNN:
    """h_t = A h_{t-1} + U x_t, a readout v, loss sum_t (v . h_t - y_t)^2 (mean over the batch)."""

    def __init__(self, H=4, F=3, L=24, radius=0.95, seed=0):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(H, H, generator=g)
        self.A = radius * A / torch.linalg.eigvals(A).abs().max()  # spectral radius 0.95: long memory
        self.U = 0.5 * torch.randn(H, F, generator=g)
        self.v = torch.randn(H, generator=g)
        self.x = torch.randn(1, L, F, generator=g)
        self.y = torch.randn(L, generator=g)
        self.H, self.L = H, L

    def grad(self, B: int, cut_prob: float = 0.0, generator=None, fixed_chunk: int = 0) -> torch.Tensor:
        A = self.A.clone().requires_grad_(True)

        def step(x_t, state):
            h = state[0][0] @ A.T + x_t[:, 0] @ self.U.T  # [B, H]
            return h.unsqueeze(1), [h.unsqueeze(0)]  # out [B, 1, H], state [1, B, H]

        x = self.x.expand(B, self.L, -1)  # the same sequence B times: B independent draws
        state = [torch.zeros(1, B, self.H)]
        if fixed_chunk:
            outs = []
            for t in range(self.L):
                if t % fixed_chunk == 0:
                    state = [s.detach() for s in state]
                out, state = step(x[:, t:t + 1], state)
                outs.append(out)
            out = torch.cat(outs, dim=1)
        else:
            out = random_truncation_unroll(step, x, state, cut_prob, generator)  # [B, L, H]
        loss = ((out @ self.v - self.y) ** 2).sum(1).mean()
        return torch.autograd.grad(loss, A)[0]


def test_random_truncation_is_unbiased_and_fixed_truncation_is_not():
    rnn = LinearRNN()
    full = rnn.grad(B=1, cut_prob=0.0)
    rel = lambda g: float((g - full).norm() / full.norm())  # noqa: E731
    mean_length = 4.0
    gen = torch.Generator().manual_seed(1)
    single = torch.stack([rnn.grad(B=1, cut_prob=1 / mean_length, generator=gen) for _ in range(20)])
    assert np.mean([rel(g) for g in single]) > 0.1  # individual estimates really are random
    averaged = rnn.grad(B=20_000, cut_prob=1 / mean_length, generator=gen)  # mean of 20k estimates
    fixed = rnn.grad(B=1, fixed_chunk=int(mean_length))
    # measured: averaged ~0.005, fixed ~0.7; the tolerance is 5% of the full gradient's norm
    assert rel(averaged) < 0.05
    assert rel(fixed) > 0.3


def test_random_strategy_forward_matches_one_recurrent_call():
    cfg = tiny_config("tbptt.strategy=random", "tbptt.sequence_length=0", "tbptt.mean_length=3")
    model, rollout = collect(cfg, rollouts=2)
    strat = make_strategy(cfg)
    assert isinstance(strat, RandomStrategy)
    batch = strat.build(rollout)
    logits, values = strat.forward(model, batch)
    ref_logits, ref_values, _ = model(batch.obs, batch.init_state)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# adaptive


def geometric(phi0: float, beta: float, W: int) -> tuple[np.ndarray, np.ndarray]:
    """phi_k = phi0 beta^k and state gradients all pointing one way, so partial sums add up."""
    phi = phi0 * beta ** np.arange(W)
    return phi, np.cumsum(phi)


def predicted_K(beta: float, W: int, target: float, k_min: int, k_max: int) -> int:
    """For exact geometric phi the recipe gives tail(K) = phi0 beta^K / (1 - beta) for every K and a
    lower bound phi0 (1 - 2 beta^W) / (1 - beta), so delta_hat(K) = beta^K / (1 - 2 beta^W)."""
    K = math.floor(math.log(target * (1 - 2 * beta ** W)) / math.log(beta)) + 1
    return int(min(max(K, k_min), k_max))


@pytest.mark.parametrize("beta", [0.6, 0.8, 0.9])
def test_adaptive_estimator_picks_the_predicted_K(beta):
    W, tau, target = 64, 20, 0.05
    phi, partial = geometric(2.0, beta, W)
    est = estimate_truncation(phi, partial, tau, target, k_min=2, k_max=100)
    assert est.beta == pytest.approx(beta, rel=1e-9)
    assert est.K == predicted_K(beta, W, target, 2, 100)
    assert est.delta_hat < target <= est.delta[est.K - 2]  # K - 1 would not do
    assert tail_bound(phi, est.beta, tau, 5) == pytest.approx(2.0 * beta ** 5 / (1 - beta), rel=1e-9)


def test_adaptive_K_grows_as_the_decay_slows_and_is_clipped():
    W, tau = 64, 20
    Ks = [estimate_truncation(*geometric(1.0, b, W), tau, 0.05, 2, 40).K for b in (0.5, 0.8, 0.9, 0.97)]
    assert Ks[0] < Ks[1] < Ks[2] and Ks[3] == 40  # 0.97 would need K = 99: clipped to k_max
    assert Ks[0] == 5  # 0.5^5 = 0.031 < 0.05 < 0.0625 = 0.5^4


def test_fit_decay_recovers_beta_from_noisy_phi():
    rng = np.random.default_rng(0)
    W, tau, beta = 100, 60, 0.93
    phi = 3.0 * beta ** np.arange(W) * np.exp(0.1 * rng.standard_normal(W))  # 10% noise
    _, fitted = fit_decay(phi, tau)
    assert fitted == pytest.approx(beta, abs=0.01)
    # no gradient beyond tau: the tail is empty rather than a fit through zeros
    phi[tau:] = 0.0
    assert fit_decay(phi, tau)[1] == 0.0
    assert tail_bound(phi, 0.0, tau, tau + 3) == 0.0


@pytest.mark.parametrize("beta", [0.7, 0.9])
def test_lag_gradients_measure_the_decay_of_a_linear_rnn(beta):
    """h_t = beta h_{t-1} + x_t, loss v . h_last: d loss / d h_{T-k} = beta^k v exactly."""
    B, H, W, burn = 3, 5, 30, 4
    v = torch.randn(H)

    def step(x_t, state):
        h = beta * state[0] + x_t[:, 0][None]  # [1, B, H]
        return h[0].unsqueeze(1), [h]

    x = torch.randn(B, burn + W, H)
    G = lag_gradients(step, x, [torch.zeros(1, B, H)], lambda h: h[:, 0] @ v, burn_in=burn)  # [B, W, H]
    phi, partial = phi_and_partial_norms(G)
    np.testing.assert_allclose(phi, float(v.norm()) * beta ** np.arange(W), rtol=1e-4)
    est = estimate_truncation(phi, partial, tau=10, target=0.05, k_min=1, k_max=W)
    assert est.beta == pytest.approx(beta, abs=1e-3)
    assert est.K == predicted_K(beta, W, 0.05, 1, W)


def test_lag_gradients_stop_at_an_episode_start():
    B, H, W = 2, 3, 8

    def step(x_t, state):
        h = 0.9 * state[0] + x_t[:, 0][None]
        return h[0].unsqueeze(1), [h]

    reset = torch.zeros(B, W, dtype=torch.bool)
    reset[0, 5] = True  # window 0: an episode starts at step 5, so lags >= 3 see no gradient
    G = lag_gradients(step, torch.randn(B, W, H), [torch.zeros(1, B, H)], lambda h: h[:, 0].sum(-1),
                      reset=reset)
    norms = G.norm(dim=-1)  # [B, W]
    assert torch.all(norms[0, :3] > 0) and torch.all(norms[0, 3:] == 0)
    assert torch.all(norms[1] > 0)


def test_adaptive_strategy_measures_on_a_rollout_and_trains_with_K():
    cfg = tiny_config("tbptt.strategy=adaptive", "tbptt.adapt_window=12", "tbptt.adapt_burn_in=2",
                      "tbptt.adapt_tau=4", "tbptt.adapt_samples=8", "tbptt.k_min=2", "tbptt.k_max=12",
                      "tbptt.adapt_every=2")
    model, rollout = collect(cfg, rollouts=2)
    strat = make_strategy(cfg)
    strat.before_update(model, rollout)
    est = strat.estimate
    assert est is not None and len(est.phi) == 12 and np.all(np.isfinite(est.phi))
    # delay 4: episodes last 6 steps and the state is reset, so no gradient reaches 6+ steps back
    assert np.all(est.phi[6:] == 0) and np.all(est.phi[:6] > 0)
    assert 2 <= strat.K <= 12
    batch = strat.build(rollout)
    assert batch.length == strat.K
    m = strat.metrics()
    assert m["tbptt/K"] == strat.K and "tbptt/beta" in m and "tbptt/delta_hat" in m
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


# ------------------------------------------------------------------------------------------------
# refresh


@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_refresh_equals_a_fresh_unroll_with_current_weights(core):
    cfg = tiny_config("tbptt.sequence_length=4", "tbptt.refresh_states=true", core=core)
    model, rollout = collect(cfg, rollouts=2)
    with torch.no_grad():  # the update moved the weights
        for p in model.core.parameters():
            p.add_(0.3 * torch.randn_like(p))
        # a sharp policy: the near-uniform untrained one has a staleness KL of ~1e-8, below the
        # float32 rounding of its sum (it read -2.8e-8 on an Intel Xeon)
        torch.nn.init.orthogonal_(model.policy_head.weight, 3.0)
    strat = make_strategy(cfg)
    batch = strat.build(rollout)
    stored = batch.init_state.clone()
    strat.before_epoch(model, rollout, batch, epoch=0)  # the first epoch keeps the stored states
    assert torch.equal(batch.init_state.h, stored.h)
    strat.before_epoch(model, rollout, batch, epoch=1)

    # an independent unroll: the model's own one-step forward, env by env, zeroing at episode starts
    T, N = rollout.num_steps, rollout.num_envs
    expect_h = torch.zeros_like(rollout.state_h)  # [T, K, N, H]
    expect_c = None if rollout.state_c is None else torch.zeros_like(rollout.state_c)
    with torch.no_grad():
        state = RecurrentState(rollout.state_h[0], None if rollout.state_c is None else rollout.state_c[0])
        for t in range(T):
            if t > 0:
                state = state.masked(~rollout.episode_start[t])
            expect_h[t] = state.h
            if expect_c is not None:
                expect_c[t] = state.c
            _, _, state = model(rollout.obs[t].unsqueeze(1), state)  # [N, ...] -> [N, 1, ...]
    first = batch.index[:, 0]
    t, n = first // N, first % N
    torch.testing.assert_close(batch.init_state.h, expect_h[t, :, n].transpose(0, 1), rtol=0, atol=1e-6)
    if expect_c is not None:
        torch.testing.assert_close(batch.init_state.c, expect_c[t, :, n].transpose(0, 1), rtol=0, atol=1e-6)
    # the states really were stale (otherwise the test shows nothing), and the KL says so
    mid = ~rollout.episode_start.reshape(-1)[first] & (t > 0)
    assert mid.any() and (stored.h[:, mid] - batch.init_state.h[:, mid]).abs().max() > 1e-3
    assert strat.metrics()["tbptt/staleness_kl"] > 0


def test_refresh_with_unchanged_weights_is_a_no_op_and_kl_zero():
    cfg = tiny_config("tbptt.sequence_length=4")
    model, rollout = collect(cfg, rollouts=2)
    batch = TruncationStrategy(cfg).build(rollout)
    stored = batch.init_state.clone()
    kl = refresh_start_states(model, rollout, batch, reset_hidden_state=True)
    torch.testing.assert_close(batch.init_state.h, stored.h, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch.init_state.c, stored.c, rtol=0, atol=1e-6)
    assert abs(kl) < 1e-8
