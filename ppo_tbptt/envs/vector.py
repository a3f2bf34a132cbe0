"""Vectorised stepping with same-step autoreset and episode statistics.

Every vector env here has the same small interface (:class:`VectorEnv`):

``reset() -> obs [N, ...]``
``step(actions [N, ...]) -> StepResult`` (all envs; the arrays are the caller's)
``step_async(actions [n_g, ...], group)`` and ``step_wait(group, obs_out) -> StepResult`` (one
group; ``obs_out [n_g, ...]``, if given, receives the observations: one copy, no view escapes)
``groups``: contiguous env slices that can be stepped independently; a collector that alternates
between them overlaps the policy's work for one group with the envs' stepping of another
``get_state() -> plain data`` and ``set_state(state) -> obs [N, ...]`` (for bit-exact resume)
``set_stage(stage)``: every env plays curriculum stage ``stage`` from its next reset on (envs built
with a curriculum; called between steps, at an update boundary)
``close()``

``StepResult.obs`` already holds the first observation of a new episode for every env whose
episode ended in this step (same-step autoreset, as gymnasium 0.29). For truncated envs the last
observation of the old episode is in ``final_obs`` (so the learner can bootstrap from it).
``episodes`` lists one :class:`EpisodeStats` per finished episode. Env indices in ``final_obs`` and
``episodes`` are global (0..N-1), also in a group's result.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

#: Numeric keys of an env's end-of-episode info that are reported as task statistics.
TASK_STAT_KEYS = ("commands_completed", "command_count", "num_fails", "repeated_falls", "raw_success",
                  "raw_commands_completed")


class EnvError(RuntimeError):
    """An env raised while stepping or resetting; the message names the env index and level seed."""


class EnvConfigError(ValueError):
    """The env cannot be built from the config (unknown id, constructor arguments it rejects)."""


@dataclasses.dataclass
class EpisodeStats:
    """Statistics of one finished episode."""

    env_index: int
    seed: int | None
    ret: float
    length: int
    success: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    stage: int | None = None  # the curriculum stage it played (None without a curriculum)


@dataclasses.dataclass
class StepResult:
    obs: np.ndarray           # [n, ...] next observations (new episode's first obs after an end)
    reward: np.ndarray        # [n] float32
    terminated: np.ndarray    # [n] bool
    truncated: np.ndarray     # [n] bool
    final_obs: dict           # global env index -> last obs of a truncated episode
    episodes: list            # list[EpisodeStats]

    @staticmethod
    def concat(parts: Sequence["StepResult"]) -> "StepResult":
        """The results of consecutive groups as one result over their envs."""
        if len(parts) == 1:
            return parts[0]
        final_obs: dict = {}
        for p in parts:
            final_obs.update(p.final_obs)
        return StepResult(np.concatenate([p.obs for p in parts]), np.concatenate([p.reward for p in parts]),
                          np.concatenate([p.terminated for p in parts]),
                          np.concatenate([p.truncated for p in parts]), final_obs,
                          [e for p in parts for e in p.episodes])


def episode_stats(env_index: int, seed, ret: float, length: int, info: dict) -> EpisodeStats:
    success = info.get("success")
    extra = {k: float(info[k]) for k in TASK_STAT_KEYS if k in info}
    stage = info.get("curriculum_stage")
    return EpisodeStats(env_index, seed, float(ret), int(length),
                        None if success is None else float(success), extra,
                        None if stage is None else int(stage))


def split_evenly(n: int, parts: int) -> list[slice]:
    """``[0, n)`` as ``min(parts, n)`` contiguous slices whose sizes differ by at most one."""
    parts = max(1, min(int(parts), n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def env_states(state, num_envs: int) -> list:
    """The per-env states of a vector env state (``get_state()``'s ``envs`` list), checked to hold
    one per env; raises EnvStateError otherwise."""
    from .wrappers import EnvStateError
    envs = state.get("envs") if isinstance(state, dict) else None
    if not isinstance(envs, list) or len(envs) != num_envs:
        got = len(envs) if isinstance(envs, list) else "no"
        raise EnvStateError(f"vector env state holds {got} env states, but there are {num_envs} envs")
    return envs


class EnvRunner:
    """Steps a list of envs into caller-provided arrays, with same-step autoreset and statistics.

    ``obs [n, ...]``, ``reward [n]``, ``terminated [n]``, ``truncated [n]`` and ``seeds [n]`` (the
    level seed each env is playing, -1 if unknown) are written in place: they may be views of
    shared memory (a pool worker) or plain arrays (:class:`SerialVectorEnv`). ``offset`` is the
    global index of ``envs[0]``, used in episode statistics and error messages.
    """

    def __init__(self, envs: Sequence[gym.Env], offset: int, obs: np.ndarray, reward: np.ndarray,
                 terminated: np.ndarray, truncated: np.ndarray, seeds: np.ndarray):
        self.envs = list(envs)
        self.offset = int(offset)
        self.obs, self.reward, self.terminated, self.truncated, self.seeds = obs, reward, terminated, truncated, seeds
        self._ret = np.zeros(len(self.envs), np.float64)
        self._len = np.zeros(len(self.envs), np.int64)

    def seed_of(self, i: int):
        return getattr(self.envs[i], "current_seed", None)

    def describe(self, i: int) -> str:
        seed = self.seed_of(i)
        return f"env {self.offset + i} (level seed {'unknown' if seed is None else seed})"

    def _reset_one(self, i: int):
        try:
            obs, _ = self.envs[i].reset()
        except Exception as exc:
            raise EnvError(f"{self.describe(i)}: reset raised {type(exc).__name__}: {exc}") from exc
        seed = self.seed_of(i)
        self.seeds[i] = -1 if seed is None else seed
        return obs

    def reset(self) -> None:
        for i in range(len(self.envs)):
            self.obs[i] = self._reset_one(i)
        self._ret[:] = 0
        self._len[:] = 0

    def step(self, actions, lo: int = 0, hi: int | None = None) -> tuple[dict, list]:
        """Step envs ``lo..hi-1`` with ``actions[0..hi-lo-1]``; returns ``(final_obs, episodes)``."""
        hi = len(self.envs) if hi is None else hi
        final_obs: dict = {}
        episodes: list = []
        for j, i in enumerate(range(lo, hi)):
            try:
                obs, r, te, tr, info = self.envs[i].step(actions[j])
            except Exception as exc:
                raise EnvError(f"{self.describe(i)}: step raised {type(exc).__name__}: {exc}") from exc
            self.reward[i] = r
            self.terminated[i] = te
            self.truncated[i] = tr
            self._ret[i] += r
            self._len[i] += 1
            if te or tr:
                episodes.append(episode_stats(self.offset + i, self.seed_of(i), self._ret[i],
                                              self._len[i], info))
                if tr and not te:
                    final_obs[self.offset + i] = np.array(obs, copy=True)
                obs = self._reset_one(i)
                self._ret[i] = 0
                self._len[i] = 0
            self.obs[i] = obs
        return final_obs, episodes

    def set_stage(self, stage: int) -> None:
        """Move every env to curriculum stage ``stage`` (from its next reset on)."""
        for env in self.envs:
            env.set_stage(stage)

    def get_state(self) -> dict:
        """Plain data: each env's replayable state plus the running episode returns and lengths."""
        return {"envs": [env.get_state() for env in self.envs],
                "ret": [float(x) for x in self._ret], "len": [int(x) for x in self._len]}

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state`'s data (raises EnvStateError if it does not fit these envs)."""
        envs = env_states(state, len(self.envs))
        for i, (env, st) in enumerate(zip(self.envs, envs)):
            obs = env.set_state(st)
            if obs is None:
                obs = self._reset_one(i)
            seed = self.seed_of(i)
            self.seeds[i] = -1 if seed is None else seed
            self.obs[i] = obs
        self._ret[:] = np.asarray(state["ret"], np.float64)
        self._len[:] = np.asarray(state["len"], np.int64)

    def close(self) -> None:
        for env in self.envs:
            env.close()


class VectorEnv:
    """The interface shared by the vector envs (see the module docstring)."""

    num_envs: int
    single_observation_space: gym.Space
    single_action_space: gym.Space
    groups: list[slice]

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env (all groups) and return arrays the caller owns."""
        for g, sl in enumerate(self.groups):
            self.step_async(actions[sl], g)
        return StepResult.concat([self.step_wait(g) for g in range(len(self.groups))])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def deliver_obs(obs: np.ndarray, obs_out: np.ndarray | None) -> np.ndarray:
    """``obs`` copied into ``obs_out`` (returned), or into a new array if there is none."""
    if obs_out is None:
        return obs.copy()
    np.copyto(obs_out, obs)
    return obs_out


class PendingSteps:
    """Which groups have actions in flight: step_async twice, or step_wait without step_async,
    is a caller's bug that would silently step envs with stale or overwritten actions."""

    def __init__(self):
        self.groups: set[int] = set()

    def start(self, group: int) -> None:
        if group in self.groups:
            raise RuntimeError(f"step_async for group {group} while its previous step is still pending")
        self.groups.add(group)

    def finish(self, group: int) -> None:
        if group not in self.groups:
            raise RuntimeError(f"step_wait for group {group} without a step_async")
        self.groups.discard(group)


def env_actions(actions: np.ndarray, space: gym.Space) -> np.ndarray:
    """``[n, D]`` policy actions -> what the envs of ``space`` take: ``[n]`` for Discrete, ``[n, D]``
    for MultiDiscrete, ``[n, *shape]`` in the Box's dtype and clipped to its bounds for Box (the
    rollout buffer keeps the unclipped sample: its log-prob is the one PPO needs)."""
    if isinstance(space, gym.spaces.Discrete):
        return actions[:, 0]
    if isinstance(space, gym.spaces.Box):
        a = actions.reshape(actions.shape[0], *space.shape).astype(space.dtype, copy=False)
        return np.clip(a, space.low, space.high)
    return actions


class SerialVectorEnv(VectorEnv):
    """Steps N envs one after another in this process (no IPC; fine for cheap envs and tests).

    ``groups`` splits the envs into that many slices; stepping a group runs at ``step_wait``, so
    there is no overlap here, but a grouped collector sees exactly what a pool would give it.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], groups: int = 1):
        if not env_fns:
            raise ValueError("SerialVectorEnv needs at least one env")
        envs = [fn() for fn in env_fns]
        self.num_envs = len(envs)
        self.single_observation_space = envs[0].observation_space
        self.single_action_space = envs[0].action_space
        space = self.single_observation_space
        n = self.num_envs
        self._obs = np.zeros((n, *space.shape), space.dtype)
        self._rew = np.zeros(n, np.float32)
        self._term = np.zeros(n, bool)
        self._trunc = np.zeros(n, bool)
        self._seeds = np.full(n, -1, np.int64)
        self.runner = EnvRunner(envs, 0, self._obs, self._rew, self._term, self._trunc, self._seeds)
        self.groups = split_evenly(n, groups)
        self._actions: dict[int, np.ndarray] = {}
        self._pending = PendingSteps()

    @property
    def envs(self) -> list:
        return self.runner.envs

    def reset(self) -> np.ndarray:
        self.runner.reset()
        return self._obs.copy()

    def step_async(self, actions: np.ndarray, group: int = 0) -> None:
        self._pending.start(group)
        self._actions[group] = np.asarray(actions)

    def step_wait(self, group: int = 0, obs_out: np.ndarray | None = None) -> StepResult:
        """Run the group's step (envs step here, one after another)."""
        self._pending.finish(group)
        sl = self.groups[group]
        final_obs, episodes = self.runner.step(self._actions.pop(group), sl.start, sl.stop)
        return StepResult(deliver_obs(self._obs[sl], obs_out), self._rew[sl].copy(), self._term[sl].copy(),
                          self._trunc[sl].copy(), final_obs, episodes)

    def get_state(self) -> dict:
        return self.runner.get_state()

    def set_stage(self, stage: int) -> None:
        """Move every env to curriculum stage ``stage`` (from its next reset on)."""
        self.runner.set_stage(stage)

    def set_state(self, state: dict) -> np.ndarray:
        """Restore what :meth:`get_state` returned; returns the current observations ``[N, ...]``."""
        self.runner.set_state(state)
        return self._obs.copy()

    def close(self) -> None:
        self.runner.close()
