"""Environment construction: MemoryGym and CueRecall behind one factory."""
from __future__ import annotations

import os
from typing import Callable, Iterator

import gymnasium as gym
import numpy as np

from .cue_recall import CueRecall
from .vector import EpisodeStats, SerialVectorEnv, StepResult
from .wrappers import LevelSeedWrapper

for _k, _v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
    os.environ.setdefault(_k, _v)

CUE_RECALL_ID = "CueRecall-v0"
MEMORY_GYM_IDS = (
    "MortarMayhem-v0", "MortarMayhem-Grid-v0", "MortarMayhemB-v0", "MortarMayhemB-Grid-v0",
    "MysteryPath-v0", "MysteryPath-Grid-v0", "SearingSpotlights-v0",
    "Endless-MortarMayhem-v0", "Endless-MysteryPath-v0", "Endless-SearingSpotlights-v0",
)


def make_base_env(env_id: str, kwargs: dict | None = None, render_mode: str | None = None) -> gym.Env:
    """One raw env (no seed wrapper). Raises ValueError with the known ids for an unknown id."""
    kwargs = dict(kwargs or {})
    if env_id == CUE_RECALL_ID:
        return CueRecall(render_mode=render_mode, **kwargs)
    import memory_gym  # noqa: F401  (registers the MemoryGym ids)
    try:
        return gym.make(env_id, disable_env_checker=True, render_mode=render_mode, **kwargs)
    except gym.error.Error as exc:
        raise ValueError(f"unknown env id {env_id!r} ({exc}); known: {CUE_RECALL_ID}, "
                         + ", ".join(MEMORY_GYM_IDS)) from None


def seed_stream(seed_range: tuple[int, int], run_seed: int, env_index: int) -> Callable[[], int]:
    """Level seeds drawn uniformly from ``[start, end)`` by a generator private to one env."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(run_seed), int(env_index)])))
    lo, hi = int(seed_range[0]), int(seed_range[1])

    def next_seed() -> int:
        return int(rng.integers(lo, hi))

    next_seed.rng = rng  # type: ignore[attr-defined]
    return next_seed


def seed_sequence(seeds: list[int]) -> Callable[[], int]:
    """Level seeds taken in order from a list (for evaluation); cycles if exhausted."""
    it: Iterator[int] = iter(())
    def next_seed() -> int:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(seeds)
            return next(it)
    return next_seed


def env_fn(env_cfg, next_seed: Callable[[], int], render_mode: str | None = None) -> Callable[[], gym.Env]:
    """A picklable-enough thunk building one seeded, reset-param-applying env."""
    def thunk() -> gym.Env:
        base = make_base_env(env_cfg.id, env_cfg.kwargs, render_mode)
        return LevelSeedWrapper(base, next_seed, env_cfg.reset_params)
    return thunk


def make_vector_env(env_cfg, run_seed: int, num_envs: int | None = None, seed_range=None):
    """The training vector env: ``env_cfg.num_envs`` envs, level seeds from ``env_cfg.train_seeds``."""
    n = env_cfg.num_envs if num_envs is None else num_envs
    rng = env_cfg.train_seeds if seed_range is None else seed_range
    fns = [env_fn(env_cfg, seed_stream(rng, run_seed, i)) for i in range(n)]
    if env_cfg.vector == "pool":
        from .pool import WorkerPoolVectorEnv
        return WorkerPoolVectorEnv(env_cfg, run_seed, n, rng)
    return SerialVectorEnv(fns)


__all__ = ["CueRecall", "EpisodeStats", "SerialVectorEnv", "StepResult", "LevelSeedWrapper",
           "make_base_env", "make_vector_env", "seed_stream", "seed_sequence", "env_fn", "CUE_RECALL_ID"]
