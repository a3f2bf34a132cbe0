"""Vectorised stepping with same-step autoreset and episode statistics.

Every vector env here has the same small interface (``VectorEnv``):

``reset() -> obs [N, ...]``
``step(actions [N, ...]) -> StepResult``
``close()``
``get_state() -> plain data`` and ``set_state(state) -> obs [N, ...]`` (for bit-exact resume)

``StepResult.obs`` already holds the first observation of a new episode for every env whose
episode ended in this step (same-step autoreset, as gymnasium 0.29). For truncated envs the last
observation of the old episode is in ``final_obs`` (so the learner can bootstrap from it).
``episodes`` lists one :class:`EpisodeStats` per finished episode.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

#: Numeric keys of an env's end-of-episode info that are reported as task statistics.
TASK_STAT_KEYS = ("commands_completed", "num_fails")


@dataclasses.dataclass
class EpisodeStats:
    """Statistics of one finished episode."""

    env_index: int
    seed: int | None
    ret: float
    length: int
    success: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepResult:
    obs: np.ndarray           # [N, ...] next observations (new episode's first obs after an end)
    reward: np.ndarray        # [N] float32
    terminated: np.ndarray    # [N] bool
    truncated: np.ndarray     # [N] bool
    final_obs: dict           # env index -> last obs of a truncated episode
    episodes: list            # list[EpisodeStats]


def episode_stats(env_index: int, seed, ret: float, length: int, info: dict) -> EpisodeStats:
    success = info.get("success")
    extra = {k: float(info[k]) for k in TASK_STAT_KEYS if k in info}
    return EpisodeStats(env_index, seed, float(ret), int(length),
                        None if success is None else float(success), extra)


class SerialVectorEnv:
    """Steps N envs one after another in this process (no IPC; fine for cheap envs and tests)."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]]):
        if not env_fns:
            raise ValueError("SerialVectorEnv needs at least one env")
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        shape = self.single_observation_space.shape
        self._obs = np.zeros((self.num_envs, *shape), self.single_observation_space.dtype)
        self._ret = np.zeros(self.num_envs, np.float64)
        self._len = np.zeros(self.num_envs, np.int64)

    def _seed_of(self, i: int):
        return getattr(self.envs[i], "current_seed", None)

    def reset(self) -> np.ndarray:
        for i, env in enumerate(self.envs):
            self._obs[i], _ = env.reset()
        self._ret[:] = 0
        self._len[:] = 0
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> StepResult:
        n = self.num_envs
        rew = np.zeros(n, np.float32)
        term = np.zeros(n, bool)
        trunc = np.zeros(n, bool)
        final_obs: dict = {}
        episodes: list = []
        for i, env in enumerate(self.envs):
            obs, r, te, tr, info = env.step(actions[i])
            rew[i] = r
            term[i] = te
            trunc[i] = tr
            self._ret[i] += r
            self._len[i] += 1
            if te or tr:
                episodes.append(episode_stats(i, self._seed_of(i), self._ret[i], self._len[i], info))
                if tr and not te:
                    final_obs[i] = np.asarray(obs).copy()
                obs, _ = env.reset()
                self._ret[i] = 0
                self._len[i] = 0
            self._obs[i] = obs
        return StepResult(self._obs.copy(), rew, term, trunc, final_obs, episodes)

    def get_state(self) -> dict:
        """Plain data: each env's replayable state plus the running episode returns and lengths."""
        return {"envs": [env.get_state() for env in self.envs],
                "ret": [float(x) for x in self._ret], "len": [int(x) for x in self._len]}

    def set_state(self, state: dict) -> np.ndarray:
        """Restore what :meth:`get_state` returned; returns the current observations ``[N, ...]``."""
        from .wrappers import EnvStateError
        envs = state.get("envs") if isinstance(state, dict) else None
        if not isinstance(envs, list) or len(envs) != self.num_envs:
            got = len(envs) if isinstance(envs, list) else "no"
            raise EnvStateError(f"vector env state holds {got} env states, but there are {self.num_envs} envs")
        for i, (env, st) in enumerate(zip(self.envs, envs)):
            obs = env.set_state(st)
            if obs is None:
                obs, _ = env.reset()
            self._obs[i] = obs
        self._ret[:] = np.asarray(state["ret"], np.float64)
        self._len[:] = np.asarray(state["len"], np.int64)
        return self._obs.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()
