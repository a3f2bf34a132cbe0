"""Environment construction: MemoryGym and CueRecall behind one factory."""
from __future__ import annotations

import copy
import functools
import importlib
import os
from typing import Callable

import gymnasium as gym
import numpy as np

from .classic import PENDULUM_NO_VELOCITY_ID, PendulumNoVelocity
from .cue_recall import CueRecall
from .vector import EnvConfigError, EnvError, EpisodeStats, SerialVectorEnv, StepResult, VectorEnv
from .memorygym import (EXTRA_RESET_PARAMS, MEMORY_GYM_IDS, MORTAR_MAYHEM_IDS, MYSTERY_PATH_IDS,
                        MortarMayhemTrueSuccess, MysteryPathRepeatedFalls)
from .spaces import FlatBox, FlattenObservation, UnsupportedSpaceError, action_layout, flatten_observations
from .time_limit import TimeLimitAsTruncation
from .wrappers import DownsampleObservation, EnvStateError, LevelSeedWrapper

for _k, _v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
    os.environ.setdefault(_k, _v)

CUE_RECALL_ID = "CueRecall-v0"


def make_base_env(env_id: str, kwargs: dict | None = None, render_mode: str | None = None) -> gym.Env:
    """One raw env (no seed wrapper). Raises ValueError with the known ids for an unknown id."""
    kwargs = dict(kwargs or {})
    if env_id == CUE_RECALL_ID:
        return CueRecall(render_mode=render_mode, **kwargs)
    import memory_gym  # noqa: F401  (registers the MemoryGym ids)
    if render_mode is not None:  # only when wanted: gym.make hands it to constructors that may take none
        kwargs["render_mode"] = render_mode
    try:
        return gym.make(env_id, disable_env_checker=True, **kwargs)
    except gym.error.Error as exc:
        raise ValueError(f"unknown env id {env_id!r} ({exc}); known: {CUE_RECALL_ID}, "
                         f"{PENDULUM_NO_VELOCITY_ID}, " + ", ".join(MEMORY_GYM_IDS)
                         + ", any registered gymnasium id, or module:EnvId") from None


@functools.lru_cache(maxsize=None)
def _reset_param_defaults(env_id: str) -> dict | None:
    if env_id == CUE_RECALL_ID:
        return dict(CueRecall.default_reset_parameters)
    if env_id in MEMORY_GYM_IDS:
        import memory_gym  # noqa: F401  (registers the MemoryGym ids)
    try:
        entry = gym.spec(env_id).entry_point
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)
    except Exception:  # unknown id, or an entry point that does not import: nothing declared
        return None
    defaults = getattr(entry, "default_reset_parameters", None)
    if not isinstance(defaults, dict):
        return None
    return {**defaults, **EXTRA_RESET_PARAMS.get(env_id, {})}


def reset_param_defaults(env_id: str) -> dict | None:
    """The reset parameters an env id declares, with their defaults (an env class's
    ``default_reset_parameters``, MemoryGym's convention; CueRecall-v0 declares ``delay``), and
    those this package adds to it (Mystery Path's ``reward_repeat_fall``), read without building
    the env; None if it declares none."""
    found = _reset_param_defaults(env_id)
    return None if found is None else copy.deepcopy(found)


class SeedStream:
    """Level seeds drawn uniformly from ``[start, end)`` by a generator private to one env.

    Callable (``next_seed()``); ``get_state()``/``set_state()`` expose the generator position as
    plain data so a checkpoint can restore it.
    """

    def __init__(self, seed_range: tuple[int, int], run_seed: int, env_index: int):
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(run_seed), int(env_index)])))
        self.lo, self.hi = int(seed_range[0]), int(seed_range[1])

    def __call__(self) -> int:
        return int(self.rng.integers(self.lo, self.hi))

    def get_state(self) -> dict:
        return {"bit_generator": copy.deepcopy(self.rng.bit_generator.state)}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = copy.deepcopy(state["bit_generator"])


class SeedSequence:
    """Level seeds taken in order from a list (for evaluation); cycles if exhausted."""

    def __init__(self, seeds):
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("SeedSequence needs at least one seed")
        self.pos = 0

    def __call__(self) -> int:
        seed = self.seeds[self.pos % len(self.seeds)]
        self.pos += 1
        return seed

    def get_state(self) -> dict:
        return {"pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = int(state["pos"])


def seed_stream(seed_range: tuple[int, int], run_seed: int, env_index: int) -> SeedStream:
    """Level seeds drawn uniformly from ``[start, end)`` by a generator private to one env."""
    return SeedStream(seed_range, run_seed, env_index)


def seed_sequence(seeds: list[int]) -> SeedSequence:
    """Level seeds taken in order from a list (for evaluation); cycles if exhausted."""
    return SeedSequence(seeds)


def make_env(env_cfg, render_mode: str | None = None) -> gym.Env:
    """One env as training and evaluation see it, without the level-seed wrapper: the raw env
    (memory-gym's, or with ``env.backend: fast`` its exact port in :mod:`ppo_tbptt.envs.fast_grid`),
    Mortar Mayhem's success recomputed (:class:`MortarMayhemTrueSuccess`), Mystery Path's repeated
    falls counted (:class:`MysteryPathRepeatedFalls`), observations
    average-pooled by ``env.downsample``, observations other than a Box flattened into one
    (:mod:`ppo_tbptt.envs.spaces`). Raises EnvConfigError if it cannot be built or its spaces are
    not supported."""
    fast = getattr(env_cfg, "backend", "memorygym") == "fast"
    try:
        if fast:
            from .fast_grid import make_fast_env
            env = make_fast_env(env_cfg.id, env_cfg.kwargs, render_mode)
        else:
            env = make_base_env(env_cfg.id, env_cfg.kwargs, render_mode)
    except (TypeError, ValueError) as exc:  # the id is unknown or the constructor rejects kwargs
        raise EnvConfigError(f"cannot build env {env_cfg.id!r} with env.kwargs {env_cfg.kwargs}: "
                             f"{type(exc).__name__}: {exc}") from exc
    if env_cfg.id in MORTAR_MAYHEM_IDS:
        env = MortarMayhemTrueSuccess(env)
    if env_cfg.id in MYSTERY_PATH_IDS:
        env = MysteryPathRepeatedFalls(env)
    if getattr(env_cfg, "time_limit_as_truncation", False):
        env = TimeLimitAsTruncation(env)
    factor = getattr(env_cfg, "downsample", 1)
    if factor > 1:
        try:
            if fast:  # the same frames, pooled where the sprites are
                from .fast_grid import PooledObservation
                env = PooledObservation(env, factor)
            else:
                env = DownsampleObservation(env, factor)
        except ValueError as exc:
            env.close()
            raise EnvConfigError(f"env.downsample: {exc}") from None
    try:  # Tuple / Dict / Discrete observations become one flat Box; unsupported spaces stop here
        action_layout(env.action_space)
        env = flatten_observations(env)
    except UnsupportedSpaceError as exc:
        env.close()
        raise EnvConfigError(f"env {env_cfg.id!r}: {exc}") from None  # (the pool reports this class by name)
    return env


def env_fn(env_cfg, next_seed: Callable[[], int], render_mode: str | None = None,
           stages=None) -> Callable[[], gym.Env]:
    """A picklable-enough thunk building one seeded, reset-param-applying env (:func:`make_env`);
    ``stages``: its curriculum stage sampler (see :class:`LevelSeedWrapper`), if any."""
    def thunk() -> gym.Env:
        return LevelSeedWrapper(make_env(env_cfg, render_mode), next_seed, env_cfg.reset_params, stages)
    return thunk


def env_groups(env_cfg, device: str | None = None) -> int:
    """``env.groups``, with 0 resolved: 2 for a pool feeding a GPU policy (the GPU computes one
    group's actions while the CPU cores step the other's envs), else 1 (on a CPU the policy and the
    workers share the cores, and one larger batch per step is faster: measured on 2 cores, 1,718
    against 1,014 steps/s with the MortarMayhem-Grid model)."""
    if env_cfg.groups > 0:
        return env_cfg.groups
    return 2 if env_cfg.vector == "pool" and device is not None and str(device).startswith("cuda") else 1


def make_vector_env(env_cfg, run_seed: int, num_envs: int | None = None, seed_range=None,
                    device: str | None = None, first_env: int = 0, workers: int | None = None,
                    curriculum=None):
    """The training vector env: ``env_cfg.num_envs`` envs, level seeds from ``env_cfg.train_seeds``.

    ``env_cfg.vector``: ``serial`` (this process), ``pool`` (worker processes, shared memory) or
    ``gym_async`` (gymnasium's AsyncVectorEnv, the baseline the benchmark compares with). Env ``i``
    draws its level seeds from the same generator whichever is used. ``device`` (the policy's)
    resolves ``env.groups: 0`` (see :func:`env_groups`). ``first_env``: the global index of this
    vector env's first env, when it holds one slice of a larger set (one rank of a distributed
    run): its env ``i`` draws the level seeds of global env ``first_env + i``. ``workers``: the
    pool's process count for ``env.envs_per_worker: 0`` (default: the usable CPU cores).
    ``curriculum`` (a config's ``curriculum`` section): with stages, env ``i`` gets the stage
    sampler of global env ``first_env + i`` (:func:`ppo_tbptt.curriculum.stage_sampler`) and the
    vector env's ``set_stage`` moves them all."""
    from ..curriculum import stage_sampler
    n = env_cfg.num_envs if num_envs is None else num_envs
    rng = env_cfg.train_seeds if seed_range is None else seed_range
    groups = env_groups(env_cfg, device)
    if env_cfg.vector == "pool":
        from .pool import WorkerPoolVectorEnv
        return WorkerPoolVectorEnv(env_cfg, run_seed, n, rng, env_cfg.envs_per_worker, groups,
                                   first_env=first_env, workers=workers, curriculum=curriculum)
    fns = [env_fn(env_cfg, seed_stream(rng, run_seed, first_env + i),
                  stages=stage_sampler(curriculum, env_cfg, run_seed, first_env + i)) for i in range(n)]
    if env_cfg.vector == "gym_async":
        from .gym_async import GymAsyncVectorEnv
        return GymAsyncVectorEnv(fns)
    return SerialVectorEnv(fns, groups=groups)


__all__ = ["CueRecall", "PendulumNoVelocity", "PENDULUM_NO_VELOCITY_ID", "DownsampleObservation", "MortarMayhemTrueSuccess", "MEMORY_GYM_IDS", "MORTAR_MAYHEM_IDS", "make_env", "EnvConfigError", "EnvError", "EpisodeStats", "SerialVectorEnv", "StepResult", "VectorEnv", "LevelSeedWrapper", "EnvStateError",
           "SeedStream", "SeedSequence", "FlatBox", "FlattenObservation", "UnsupportedSpaceError",
           "env_groups", "make_base_env", "reset_param_defaults", "make_vector_env", "seed_stream", "seed_sequence", "env_fn", "CUE_RECALL_ID"]
