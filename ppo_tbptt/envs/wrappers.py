"""Wrappers that make a single env behave as training needs."""
from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np


class EnvStateError(RuntimeError):
    """An env state that cannot be restored (wrong format, or a replay that diverged)."""


def _plain_action(action: Any) -> Any:
    """An action as plain python data (int or nested list of ints/floats)."""
    a = np.asarray(action)
    return a.item() if a.ndim == 0 else a.tolist()


class LevelSeedWrapper(gym.Wrapper):
    """Re-applies a level seed and the reset parameters on *every* reset; makes the env replayable.

    MemoryGym's reset options are not sticky, and vector autoreset passes none, so this wrapper owns
    them: each reset draws the next level seed from ``next_seed()`` and passes ``reset_params`` as
    options. ``current_seed`` tells which level is running.

    Envs built on pygame cannot be pickled, but MemoryGym and CueRecall are deterministic given the
    level seed and the actions. So the wrapper records the actions taken since the last reset, and
    :meth:`get_state` returns plain data (level seed, reset options, the seed generator's state,
    the actions) from which :meth:`set_state` rebuilds the same episode by resetting and replaying.
    A worker process can forward both calls unchanged.
    """

    def __init__(self, env: gym.Env, next_seed: Callable[[], int], reset_params: dict | None = None):
        super().__init__(env)
        self._next_seed = next_seed
        self._reset_params = dict(reset_params or {})
        self.current_seed: int | None = None
        self._options: dict | None = None
        self._actions: list = []

    def reset(self, *, seed=None, options=None):
        self.current_seed = int(self._next_seed()) if seed is None else int(seed)
        opts = dict(self._reset_params)
        if options:
            opts.update(options)
        self._options = opts or None
        self._actions = []
        return self.env.reset(seed=self.current_seed, options=self._options)

    def step(self, action):
        self._actions.append(_plain_action(action))
        return self.env.step(action)

    # ---- replayable state ------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Plain data (ints, lists, dicts) that :meth:`set_state` turns back into this exact episode."""
        gen = self._next_seed.get_state() if hasattr(self._next_seed, "get_state") else None
        return {"seed": self.current_seed, "options": self._options, "actions": list(self._actions),
                "seed_generator": gen}

    def set_state(self, state: dict):
        """Restore the seed generator, reset to the recorded level and replay the recorded actions.

        Returns the observation the env would show now (``None`` if it had never been reset).
        Raises :class:`EnvStateError` if the state is malformed or the episode ends during replay.
        """
        try:
            seed, options, actions = state["seed"], state["options"], state["actions"]
            gen = state["seed_generator"]
        except (KeyError, TypeError):
            raise EnvStateError(f"not an env state: {state!r:.200}") from None
        if gen is not None:
            if not hasattr(self._next_seed, "set_state"):
                raise EnvStateError("env state carries a seed generator state, but this env's "
                                    "seed source cannot be restored")
            self._next_seed.set_state(gen)
        if seed is None:
            self.current_seed, self._options, self._actions = None, None, []
            return None
        self.current_seed = int(seed)
        self._options = None if options is None else dict(options)
        obs, _ = self.env.reset(seed=self.current_seed, options=self._options)
        space = self.env.action_space
        for i, a in enumerate(actions):
            act = np.asarray(a, dtype=space.dtype) if isinstance(a, list) else a
            obs, _, terminated, truncated, _ = self.env.step(act)
            if terminated or truncated:  # a recorded episode is still running
                raise EnvStateError(f"replay of level seed {seed} ended after {i + 1} of "
                                    f"{len(actions)} recorded actions; the env is not deterministic")
        self._actions = list(actions)
        return obs
