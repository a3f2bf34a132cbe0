"""gymnasium's AsyncVectorEnv behind the :class:`VectorEnv` interface: the plain baseline.

One process per env (started from a forkserver, as the pool's workers), observations in shared
memory, a pickled message per env and step, and gymnasium 0.29's same-step autoreset (``final_observation`` / ``final_info``). It exists so that the
benchmark can run the same trainer on it and on the worker pool side by side; it cannot resume
(its envs cannot be restored individually).
"""
from __future__ import annotations

from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

from .vector import StepResult, VectorEnv, deliver_obs, episode_stats
from .wrappers import EnvStateError


def _has_forkserver() -> bool:
    import multiprocessing as mp
    return "forkserver" in mp.get_all_start_methods()


class GymAsyncVectorEnv(VectorEnv):
    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]]):
        self.venv = gym.vector.AsyncVectorEnv(list(env_fns), shared_memory=True, copy=True,
                                              context="forkserver" if _has_forkserver() else None)
        self.num_envs = self.venv.num_envs
        self.single_observation_space = self.venv.single_observation_space
        self.single_action_space = self.venv.single_action_space
        self.groups = [slice(0, self.num_envs)]
        self._ret = np.zeros(self.num_envs, np.float64)
        self._len = np.zeros(self.num_envs, np.int64)

    def reset(self) -> np.ndarray:
        obs, _ = self.venv.reset()
        self._ret[:] = 0
        self._len[:] = 0
        return obs

    def step_async(self, actions: np.ndarray, group: int = 0) -> None:
        self.venv.step_async(actions)

    def step_wait(self, group: int = 0, obs_out: np.ndarray | None = None) -> StepResult:
        obs, rew, term, trunc, infos = self.venv.step_wait()
        self._ret += rew
        self._len += 1
        final_obs: dict = {}
        episodes: list = []
        for i in np.flatnonzero(term | trunc):
            info = infos["final_info"][i] if "final_info" in infos else {}
            episodes.append(episode_stats(int(i), None, self._ret[i], self._len[i], info or {}))
            if trunc[i] and not term[i]:
                final_obs[int(i)] = np.asarray(infos["final_observation"][i])
            self._ret[i] = 0
            self._len[i] = 0
        return StepResult(obs if obs_out is None else deliver_obs(obs, obs_out), np.asarray(rew, np.float32), np.asarray(term, bool), np.asarray(trunc, bool),
                          final_obs, episodes)

    def get_state(self) -> dict:
        return {"envs": list(self.venv.call("get_state")), "ret": [float(x) for x in self._ret],
                "len": [int(x) for x in self._len]}

    def set_stage(self, stage: int) -> None:
        self.venv.call("set_stage", stage)

    def set_state(self, state: dict) -> np.ndarray:
        raise EnvStateError("env.vector: gym_async cannot restore env states; resume with "
                            "--set env.vector=pool or serial")

    def close(self) -> None:
        self.venv.close()
