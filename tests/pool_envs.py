"""Test envs for the worker pool, reachable as ``env.id: pool_envs:Exploding-v0``."""
import gymnasium as gym
import numpy as np


class Exploding(gym.Env):
    """Episodes of 5 steps; the ``explode_at``-th step after a reset raises ValueError."""

    observation_space = gym.spaces.Box(0, 255, (3,), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, explode_at: int = 2, render_mode=None):
        self.explode_at = explode_at
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, np.uint8), {}

    def step(self, action):
        self.t += 1
        if self.t == self.explode_at:
            raise ValueError("boom")
        return np.full(3, self.t, np.uint8), 0.0, self.t >= 5, False, {}


if "Exploding-v0" not in gym.registry:
    gym.register("Exploding-v0", entry_point="pool_envs:Exploding")
