"""gymnasium's AsyncVectorEnv behind the :class:`VectorEnv` interface: the plain baseline.

One process per env (started from a forkserver, as the pool's workers), observations in shared
memory, a pickled message per env and step, and the same-step autoreset (gymnasium 0.29's only
mode, asked for by name from 1.x, whose default is the next step). It exists so that the
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


def _same_step_autoreset() -> dict:
    """gymnasium 1.x's AsyncVectorEnv argument for 0.29's autoreset ({} under 0.29: its only mode)."""
    mode = getattr(gym.vector, "AutoresetMode", None)
    return {} if mode is None else {"autoreset_mode": mode.SAME_STEP}


def _final(infos: dict, i: int) -> tuple[dict, np.ndarray | None]:
    """Env ``i``'s info and observation at the end of the episode that this step's autoreset
    ended: 0.29 keeps them per env (``final_info``, ``final_observation``); 1.x's same-step mode
    batches the info like any other (arrays with ``_key`` masks) and names the observation ``final_obs``."""
    if "final_observation" in infos:  # gymnasium 0.29
        return infos["final_info"][i] or {}, infos["final_observation"][i]
    return _unbatch(infos.get("final_info", {}), i), infos.get("final_obs", [None] * (i + 1))[i]


def _unbatch(info: dict, i: int) -> dict:
    out = {}
    for k, v in info.items():
        if k.startswith("_"):
            continue
        if isinstance(v, dict):
            out[k] = _unbatch(v, i)
        elif info.get(f"_{k}", np.ones(i + 1, bool))[i]:
            out[k] = v[i]
    return out


class GymAsyncVectorEnv(VectorEnv):
    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]]):
        self.venv = gym.vector.AsyncVectorEnv(list(env_fns), shared_memory=True, copy=True,
                                              context="forkserver" if _has_forkserver() else None,
                                              **_same_step_autoreset())
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
            info, last_obs = _final(infos, int(i))
            episodes.append(episode_stats(int(i), None, self._ret[i], self._len[i], info))
            if trunc[i] and not term[i]:
                final_obs[int(i)] = np.asarray(last_obs)
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
