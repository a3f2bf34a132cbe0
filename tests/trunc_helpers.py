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
