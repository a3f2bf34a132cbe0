"""Test envs for the worker pool, reachable as ``env.id: pool_envs:Exploding-v0``."""
import os

import gymnasium as gym
import numpy as np


class Exploding(gym.Env):
    """Episodes of 5 steps; the ``explode_at``-th step after a reset raises ValueError (with
    ``poison``, a file path: only while that file exists; with ``rank``: only in the processes of
    that torchrun rank, read from the ``RANK`` environment variable its env workers inherit)."""

    observation_space = gym.spaces.Box(0, 255, (3,), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, explode_at: int = 2, poison: str | None = None, rank: int | None = None,
                 render_mode=None):
        self.explode_at = explode_at
        self.poison = poison
        if rank is not None and os.environ.get("RANK", "0") != str(rank):
            self.explode_at = -1  # another rank's env: never explodes
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, np.uint8), {}

    def step(self, action):
        self.t += 1
        if self.t == self.explode_at and (self.poison is None or os.path.exists(self.poison)):
            raise ValueError("boom")
        return np.full(3, self.t, np.uint8), 0.0, self.t >= 5, False, {}


if "Exploding-v0" not in gym.registry:
    gym.register("Exploding-v0", entry_point="pool_envs:Exploding")


class Flaky(Exploding):
    """Like Exploding, but raises only once per ``marker`` file: the first time any env of the
    process tree reaches the ``explode_at``-th step of an episode it creates the file and raises;
    afterwards (a replaced worker replaying the same steps) it steps normally."""

    def __init__(self, marker: str, explode_at: int = 3, render_mode=None):
        super().__init__(explode_at, render_mode=render_mode)
        self.marker = marker
        self.level = 0

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        self.level = int(seed or 0)
        return obs, info

    def step(self, action):
        self.t += 1
        if self.t == self.explode_at:
            try:
                open(self.marker, "x").close()
            except FileExistsError:
                pass
            else:
                raise ValueError("transient failure")
        obs = np.full(3, (self.t * 7 + self.level + int(action)) % 256, np.uint8)
        return obs, float(action == self.level % 2), self.t >= 5, False, {}


class Slow(Flaky):
    """Flaky without the failure, sleeping ``delay`` seconds per step (default: the environment
    variable SLOW_ENV_DELAY, else 0): collection that takes time but not CPU. The delay changes
    nothing else, so runs with and without it log the same metrics."""

    def __init__(self, delay: float | None = None, render_mode=None):
        super().__init__(marker="", explode_at=-1, render_mode=render_mode)
        self.delay = float(os.environ.get("SLOW_ENV_DELAY", 0)) if delay is None else float(delay)

    def step(self, action):
        if self.delay > 0:
            import time
            time.sleep(self.delay)
        return super().step(action)


for _name, _cls in (("Flaky-v0", "Flaky"), ("Slow-v0", "Slow")):
    if _name not in gym.registry:
        gym.register(_name, entry_point=f"pool_envs:{_cls}")
