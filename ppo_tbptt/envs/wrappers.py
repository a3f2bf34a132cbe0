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

    ``stages`` (a :class:`ppo_tbptt.curriculum.StageSampler`, for a curriculum): each reset plays
    the reset parameters of the stage it draws instead of ``reset_params``; the episode's stage is
    ``episode_stage`` and goes into the info of its last step as ``curriculum_stage``;
    :meth:`set_stage` moves the env to another stage (from its next reset on). The sampler's state
    is part of :meth:`get_state`.
    """

    def __init__(self, env: gym.Env, next_seed: Callable[[], int], reset_params: dict | None = None,
                 stages=None):
        super().__init__(env)
        self._next_seed = next_seed
        self.reset_params = dict(reset_params or {})
        self.stages = stages
        self.episode_stage: int | None = None
        self.current_seed: int | None = None
        self._options: dict | None = None
        self._actions: list = []

    def set_stage(self, stage: int) -> None:
        """Play curriculum stage ``stage`` from the next reset on (the episode running keeps its own)."""
        if self.stages is None:
            raise RuntimeError("set_stage: this env was built without curriculum stages")
        self.stages.set_stage(stage)

    def reset(self, *, seed=None, options=None):
        self.current_seed = int(self._next_seed()) if seed is None else int(seed)
        if self.stages is not None:
            self.episode_stage, params = self.stages.draw()
            opts = dict(params)
        else:
            opts = dict(self.reset_params)
        if options:
            opts.update(options)
        self._options = opts or None
        self._actions = []
        return self.env.reset(seed=self.current_seed, options=self._options)

    def step(self, action):
        self._actions.append(_plain_action(action))
        obs, reward, terminated, truncated, info = self.env.step(action)
        if (terminated or truncated) and self.episode_stage is not None:
            info = dict(info)
            info["curriculum_stage"] = self.episode_stage
        return obs, reward, terminated, truncated, info

    # ---- replayable state ------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Plain data (ints, lists, dicts) that :meth:`set_state` turns back into this exact episode."""
        gen = self._next_seed.get_state() if hasattr(self._next_seed, "get_state") else None
        out = {"seed": self.current_seed, "options": self._options, "actions": list(self._actions),
               "seed_generator": gen}
        if self.stages is not None:
            out["stages"] = self.stages.get_state()
            out["episode_stage"] = self.episode_stage
        return out

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
        if state.get("stages") is not None:
            if self.stages is None:
                raise EnvStateError("env state carries curriculum stages, but this env has none")
            self.stages.set_state(state["stages"])
        if self.stages is not None and "stages" in state:
            self.episode_stage = state.get("episode_stage")
        if seed is None:
            self.current_seed, self._options, self._actions = None, None, []
            return None
        self.current_seed = int(seed)
        self._options = None if options is None else dict(options)
        obs, _ = self.env.reset(seed=self.current_seed, options=self._options)
        space = self.env.action_space
        for i, a in enumerate(actions):
            # lists (and a 0-d Box's float) back to the arrays of the space's dtype the env took
            act = np.asarray(a, dtype=space.dtype) if isinstance(a, list) or isinstance(space, gym.spaces.Box) else a
            obs, _, terminated, truncated, _ = self.env.step(act)
            if terminated or truncated:  # a recorded episode is still running
                raise EnvStateError(f"replay of level seed {seed} ended after {i + 1} of "
                                    f"{len(actions)} recorded actions; the env is not deterministic")
        self._actions = list(actions)
        return obs


class DownsampleObservation(gym.ObservationWrapper):
    """Average-pool image observations ``[H, W, C]`` by ``factor`` in both directions, rounding to
    the observation dtype: MemoryGym's grid envs draw 5x5 or 7x7 tiles of 14 or 12 pixels into
    84x84, so a factor of 4 (21x21x3, 16x fewer numbers) keeps every tile, the agent's heading and
    the command symbols apart. Runs where the env runs (a pool worker), so the learner receives,
    stores and encodes the small image."""

    def __init__(self, env: gym.Env, factor: int):
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3:
            raise ValueError(f"downsampling needs image observations [H, W, C], got {space}")
        h, w, c = space.shape
        if factor < 1 or h % factor or w % factor:
            raise ValueError(f"factor {factor} must divide the image size {h}x{w}")
        self.factor = int(factor)
        self._c = c
        # Pooling as two products with 0/1 matrices, rows then (column, channel) pairs: on a
        # CPU several times faster than numpy's strided reductions. Exact for integer images
        # (sums of at most factor^2 * 255 are exact in float32).
        f32 = np.float32
        self._rows = np.kron(np.eye(h // factor, dtype=f32), np.ones((1, factor), f32))  # [h/f, h]
        cols = np.kron(np.eye(w // factor, dtype=f32), np.ones((factor, 1), f32))  # [w, w/f]
        self._cols = np.kron(cols, np.eye(c, dtype=f32))  # [w*c, (w/f)*c]
        self._integer = np.issubdtype(space.dtype, np.integer)
        low = self._pool(np.broadcast_to(space.low, space.shape).astype(space.dtype))
        high = self._pool(np.broadcast_to(space.high, space.shape).astype(space.dtype))
        self.observation_space = gym.spaces.Box(low, high, (h // factor, w // factor, c), space.dtype)

    def _pool(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        h, w = obs.shape[0] // self.factor, obs.shape[1] // self.factor
        x = obs.reshape(obs.shape[0], -1).astype(np.float32)  # [H, W*C]
        total = (self._rows @ x) @ self._cols  # [H/f, (W/f)*C] block sums
        n = float(self.factor * self.factor)
        if self._integer:
            mean = np.floor((total + n / 2) / n)  # the mean rounded half up
            return mean.astype(obs.dtype).reshape(h, w, self._c)
        return (total / n).astype(obs.dtype).reshape(h, w, self._c)

    def observation(self, observation):
        return self._pool(observation)
