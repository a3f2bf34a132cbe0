"""Classic-control tasks made partially observable, so that solving them needs memory.

``PendulumNoVelocity-v0``: gymnasium's Pendulum-v1 swing-up (a torque in [-2, 2], 200 steps,
reward -(angle^2 + 0.1 velocity^2 + 0.001 torque^2)) observing only the angle as (cos, sin), not
the angular velocity: the policy has to infer the velocity from consecutive observations, as in
the "Pendulum-P" tasks of the POMDP literature. Dynamics, reward and reset are Pendulum-v1's.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.pendulum import PendulumEnv

PENDULUM_NO_VELOCITY_ID = "PendulumNoVelocity-v0"


class PendulumNoVelocity(PendulumEnv):
    def __init__(self, render_mode: str | None = None, g: float = 10.0):
        super().__init__(render_mode=render_mode, g=g)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def _get_obs(self) -> np.ndarray:
        theta = self.state[0]
        return np.array([np.cos(theta), np.sin(theta)], dtype=np.float32)


if PENDULUM_NO_VELOCITY_ID not in gym.registry:
    gym.register(PENDULUM_NO_VELOCITY_ID, entry_point="ppo_tbptt.envs.classic:PendulumNoVelocity",
                 max_episode_steps=200)
