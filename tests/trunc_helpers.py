"""Small builders shared by the tests: a tiny CueRecall config, model and collected rollout."""
from __future__ import annotations

import torch

from ppo_tbptt.config import load
from ppo_tbptt.envs import make_vector_env
from ppo_tbptt.gae import compute_gae
from ppo_tbptt.model import build_model
from ppo_tbptt.rollout import Collector


def tiny_config(*overrides: str, core: str = "lstm"):
    return load("cue_recall", [
        "env.num_envs=4", "env.kwargs={num_cues: 3, delay: 4}", "ppo.rollout_steps=24",
        "ppo.minibatches=2", "ppo.epochs=2", f"model.core={core}", "model.hidden_size=8",
        "model.hidden_layer=16", "run.total_steps=200", *overrides,
    ])


def collect(cfg, seed: int = 0, rollouts: int = 1):
    """Model and a rollout with GAE filled in. ``rollouts > 1`` collects several times so that the
    stored state at t = 0 is a carried-over, non-zero one."""
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env, seed)
    model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
    col = Collector(envs, model, cfg.ppo.rollout_steps, torch.device("cpu"),
                    cfg.model.reset_hidden_state)
    for _ in range(rollouts):
        rollout, _ = col.collect()
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                           rollout.bootstrap_value, cfg.ppo.gamma, cfg.ppo.gae_lambda,
                           rollout.truncation_values)
    rollout.advantages.copy_(adv)
    rollout.returns.copy_(ret)
    envs.close()
    return model, rollout


def stationary_rollout(core: str, T: int = 96, N: int = 8, F: int = 6, H: int = 8, seed: int = 0,
                       p_start: float = 0.0, recurrent_gain: float = 1.0, data_seed: int | None = None):
    """A tiny model and a rollout of i.i.d. Gaussian observations (no env), collected by the
    model itself: the stored states are exact, and every step's input is alike (the adaptive
    bound's setting). Rewards near 1 make the returns exceed the values everywhere, so the value
    loss pulls every window's gradient the same way. ``recurrent_gain`` scales the recurrent
    weights (slower decay). Returns ``(model, rollout, cfg)``; ``cfg`` has matching env, model
    and rollout sizes for the strategies. ``data_seed`` (default ``seed``) draws the inputs,
    episode starts and rewards: the same model with other data."""
    import gymnasium as gym
    import numpy as np

    from ppo_tbptt import config as C
    from ppo_tbptt.rollout import Rollout

    g = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    torch.manual_seed(seed)
    cfg = C.from_dict({"env": {"id": "CueRecall-v0", "num_envs": N},
                       "model": {"core": core, "hidden_size": H, "hidden_layer": H, "encoder": "mlp"},
                       "ppo": {"rollout_steps": T, "minibatches": 1, "gamma": 0.9, "gae_lambda": 0.95}})
    model = build_model(gym.spaces.Box(-5, 5, (F,), np.float32), gym.spaces.Discrete(3), cfg.model)
    with torch.no_grad():
        for name, p in model.core.named_parameters():
            if "weight_hh" in name:
                p.mul_(recurrent_gain)
    if data_seed is not None:
        torch.manual_seed(data_seed)  # the actions sampled
    r = Rollout.allocate(T, N, (F,), np.float32, 1, 1, H, core == "lstm", torch.device("cpu"))
    r.obs.copy_(torch.randn(T, N, F, generator=g))
    starts = torch.rand(T, N, generator=g) < p_start
    starts[0] = False
    r.episode_start.copy_(starts)
    state = model.initial_state(N)
    with torch.no_grad():
        for t in range(T):
            if t > 0:
                state = state.masked(~starts[t])
            r.state_h[t] = state.h
            if r.state_c is not None:
                r.state_c[t] = state.c
            a, lp, v, state = model.act(r.obs[t], state)
            r.actions[t], r.logprobs[t], r.values[t] = a, lp, v
        r.bootstrap_value.copy_(model.value(torch.randn(N, F, generator=g), state))
    r.terminated[:-1] = starts[1:]
    r.rewards.copy_(1.0 + 0.3 * torch.randn(T, N, generator=g))
    adv, ret = compute_gae(r.rewards, r.values, r.terminated, r.truncated, r.bootstrap_value,
                           cfg.ppo.gamma, cfg.ppo.gae_lambda, r.truncation_values)
    r.advantages.copy_(adv)
    r.returns.copy_(ret)
    return model, r, cfg


def geometric_probe(episode_start: torch.Tensor, W: int, B: int, beta: float, seed: int = 0):
    """The probe's view of a noise-free model whose state gradient at lag k is ``beta^k`` along
    one direction inside an episode fragment and 0 past its start: B windows of W steps sampled
    as :meth:`AdaptiveStrategy.measure` samples them. Returns ``(G [B, W, 1], alive [B, W])``."""
    from ppo_tbptt.truncation.adaptive import surviving_lags
    T, N = episode_start.shape
    g = torch.Generator().manual_seed(seed)
    t0 = torch.randint(0, T - W + 1, (B,), generator=g)
    n = torch.randint(0, N, (B,), generator=g)
    reset = episode_start[t0[:, None] + torch.arange(W)[None], n[:, None]]  # [B, W]
    reset[:, 0] = False
    alive = surviving_lags(reset, 0)
    G = (beta ** torch.arange(W, dtype=torch.float64))[None, :, None] * alive[..., None]
    return G, alive


def geometric_trained_bias(episode_start: torch.Tensor, windows, beta: float) -> float:
    """The exact relative bias, against BPTT over whole fragments, of the gradient trained on
    ``windows`` (``(t0, n, length, loss_from)``) for that model: the terms' gradients all point
    one way, so it is the mass the windows drop over the mass whole fragments keep."""
    from ppo_tbptt.truncation.adaptive import fragment_start
    t0, n, length, loss_from = windows
    fs = fragment_start(episode_start)
    lost = kept = 0.0
    for a, e, ln, lf in zip(t0.tolist(), n.tolist(), length.tolist(), loss_from.tolist()):
        for j in range(lf, ln):
            d = a + j - int(fs[a + j, e])  # the term reaches lags 0..d in its fragment, 0..j in its window
            kept += sum(beta ** k for k in range(d + 1))
            lost += sum(beta ** k for k in range(j + 1, d + 1))
    return lost / kept
