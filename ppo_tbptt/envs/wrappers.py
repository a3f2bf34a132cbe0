"""Wrappers that make a single env behave as training needs."""
from __future__ import annotations

from typing import Callable

import gymnasium as gym


class LevelSeedWrapper(gym.Wrapper):
    """Re-applies a level seed and the reset parameters on *every* reset.

    MemoryGym's reset options are not sticky, and vector autoreset passes none, so this wrapper owns
    them: each reset draws the next level seed from ``next_seed()`` and passes ``reset_params`` as
    options. ``current_seed`` tells which level is running.
    """

    def __init__(self, env: gym.Env, next_seed: Callable[[], int], reset_params: dict | None = None):
        super().__init__(env)
        self._next_seed = next_seed
        self._reset_params = dict(reset_params or {})
        self.current_seed: int | None = None

    def reset(self, *, seed=None, options=None):
        self.current_seed = int(self._next_seed()) if seed is None else int(seed)
        opts = dict(self._reset_params)
        if options:
            opts.update(options)
        return self.env.reset(seed=self.current_seed, options=opts or None)
