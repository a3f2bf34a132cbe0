"""env.time_limit_as_truncation: MemoryGym's time-limit ends passed on as truncations, and bootstrapped."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from ppo_tbptt import config as C
from ppo_tbptt.envs import LevelSeedWrapper, make_env, make_vector_env
from ppo_tbptt.envs.time_limit import TimeLimitAsTruncation
from ppo_tbptt.model import build_model
from ppo_tbptt.rollout import Collector

from tests.test_memorygym import grid_step_towards


class Clock(gym.Env):
    """MemoryGym's pattern: ``max_episode_steps`` set at reset, done at ``t == max_episode_steps``
    (reported as terminated); ``success_at`` ends the episode earlier with success."""

    observation_space = gym.spaces.Box(0, 255, (2,), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, max_steps: int, success_at: int = 0):
        self.max_steps, self.success_at = max_steps, success_at

    def reset(self, *, seed=None, options=None):
        self.max_episode_steps = self.max_steps
        self.t = 0
        return np.zeros(2, np.uint8), {}

    def step(self, action):
        self.t += 1
        success = int(self.t == self.success_at)
        done = bool(success) or self.t == self.max_episode_steps
        info = {"success": success} if done else {}
        return np.full(2, self.t, np.uint8), 0.0, done, False, info


def run_episode(env) -> tuple[int, bool, bool]:
    env.reset()
    while True:
        _, _, term, trunc, _ = env.step(0)
        if term or trunc:
            return env.unwrapped.t, term, trunc


def test_the_end_at_the_limit_becomes_a_truncation_and_other_ends_stay():
    assert run_episode(TimeLimitAsTruncation(Clock(5))) == (5, False, True)
    assert run_episode(TimeLimitAsTruncation(Clock(5, success_at=3))) == (3, True, False)
    assert run_episode(TimeLimitAsTruncation(Clock(5, success_at=5))) == (5, True, False)  # success on the last step
    assert run_episode(Clock(5)) == (5, True, False)  # what MemoryGym itself says
    env = TimeLimitAsTruncation(Clock(4))
    assert [run_episode(env) for _ in range(3)] == [(4, False, True)] * 3  # the count restarts at reset
    assert run_episode(TimeLimitAsTruncation(Clock(0, success_at=7))) == (7, True, False)  # no limit


def mp_grid_config(as_truncation: bool, max_steps: int = 6) -> C.Config:
    return C.from_dict({"env": {"id": "MysteryPath-Grid-v0", "num_envs": 2, "downsample": 4,
                                "reset_params": {"max_steps": max_steps},
                                "time_limit_as_truncation": as_truncation},
                        "model": {"core": "gru", "hidden_size": 8, "hidden_layer": 8},
                        "tbptt": {"sequence_length": 0},
                        "ppo": {"rollout_steps": 8, "minibatches": 1}})


@pytest.mark.parametrize("as_truncation", [False, True])
def test_mystery_path_time_limit_reaches_gae_as_configured(as_truncation):
    """Mystery Path (6-step limit, 2 envs, 8 steps): both episodes end at t = 5 by the limit. As
    MemoryGym reports them they are terminated (no bootstrap); with the option they are truncated
    and the rollout carries V(final observation) for GAE."""
    cfg = mp_grid_config(as_truncation)
    torch.manual_seed(0)
    envs = make_vector_env(cfg.env, 0)
    model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
    torch.nn.init.orthogonal_(model.value_head.weight, 3.0)
    col = Collector(envs, model, cfg.ppo.rollout_steps, torch.device("cpu"))
    try:
        r, episodes = col.collect()
    finally:
        envs.close()
    assert [e.length for e in episodes] == [6, 6] and not any(e.success for e in episodes)
    ended = r.terminated | r.truncated
    assert ended[5].all() and ended.sum() == 2
    assert bool(r.truncated[5].all()) == as_truncation and bool(r.terminated[5].all()) != as_truncation
    assert bool((r.truncation_values[5] != 0).all()) == as_truncation
    assert r.episode_start[6].all()


def test_mystery_path_success_on_the_last_step_stays_terminated():
    """An oracle that needs exactly ``n`` steps to the goal, under a limit of ``n`` steps."""
    def play(max_steps: int):
        env_cfg = C.EnvConfig(id="MysteryPath-Grid-v0", reset_params={"max_steps": max_steps},
                              time_limit_as_truncation=True)
        env = LevelSeedWrapper(make_env(env_cfg), lambda: 3, env_cfg.reset_params)
        env.reset()
        u = env.unwrapped
        path = [(n.x, n.y) for n in u.mystery_path.path]
        if path[0] != tuple(u.start):
            path = path[::-1]
        steps = 0
        while True:
            pos = tuple(u.normalized_agent_position)
            i = path.index(pos) if pos in path else 0
            _, _, term, trunc, info = env.step(grid_step_towards(u, path[min(i + 1, len(path) - 1)]))
            steps += 1
            if term or trunc:
                env.close()
                return steps, term, trunc, info["success"]

    n, term, trunc, success = play(128)
    assert (term, trunc, success) == (True, False, 1)
    assert play(n) == (n, True, False, 1)          # success on the very last allowed step
    assert play(n - 1) == (n - 1, False, True, 0)  # stopped one step short: a truncation


def test_the_option_is_refused_where_there_is_no_time_limit():
    with pytest.raises(C.ConfigError, match="env.time_limit_as_truncation: MortarMayhem-Grid-v0 has no time limit"):
        C.from_dict({"env": {"id": "MortarMayhem-Grid-v0", "time_limit_as_truncation": True}})
    C.from_dict({"env": {"id": "MysteryPath-v0", "time_limit_as_truncation": True}})
