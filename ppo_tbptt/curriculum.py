"""A curriculum over an env's reset parameters (the config's ``curriculum`` section).

A stage is a mapping of overrides of ``env.reset_params``: stage ``k`` plays ``env.reset_params``
updated by ``curriculum.stages[k]``; the last stage is the target task. Two parts:

- :class:`StageSampler`, one per env, beside its :class:`~ppo_tbptt.envs.LevelSeedWrapper` (in the
  pool's worker processes, too): the env's current stage, and which stage each episode plays. With
  ``curriculum.share`` > 0 an episode plays an earlier stage (uniformly drawn) with that
  probability, from a generator private to the env (seeded by ``run.seed`` and the global env
  index). Its state is part of the env's replayable state, so checkpoints and a pool's
  replacement workers carry it.
- :class:`Promotion`, in the trainer: after each update it takes the finished training episodes
  (every rank's, gathered on rank 0), keeps the true ``success`` of the last ``curriculum.window``
  episodes that played the current stage (episodes tagged with an earlier stage do not count), and
  says when to move on: a full window whose mean reaches ``curriculum.threshold``, after at least
  ``curriculum.min_updates`` updates in the stage. The trainer then moves every env (every rank's:
  rank 0's decision is broadcast) to the next stage at that update boundary.
"""
from __future__ import annotations

import collections
import copy
import dataclasses

import numpy as np


def enabled(cfg) -> bool:
    """Whether the config trains a curriculum."""
    return cfg.curriculum.stages is not None


def num_stages(cfg) -> int:
    """The number of stages (1 without a curriculum: the task itself)."""
    return len(cfg.curriculum.stages) if enabled(cfg) else 1


def target_stage(cfg) -> int:
    """The index of the target task (the last stage)."""
    return num_stages(cfg) - 1


def stage_params(cfg, stage: int | None = None) -> dict:
    """The reset parameters stage ``stage`` plays (None: the target). Raises ValueError for a stage
    the config does not have."""
    n = num_stages(cfg)
    stage = n - 1 if stage is None else int(stage)
    if not 0 <= stage < n:
        raise ValueError(f"stage {stage}: the config has stage{'s 0..' if n > 1 else ' '}{n - 1}"
                         + ("" if enabled(cfg) else " (no curriculum)"))
    out = dict(cfg.env.reset_params)
    if enabled(cfg):
        out.update(cfg.curriculum.stages[stage])
    return out


def stage_env(cfg, stage: int | None = None):
    """``cfg.env`` with the reset parameters of stage ``stage`` (None: the target task)."""
    return dataclasses.replace(cfg.env, reset_params=stage_params(cfg, stage))


def describe(params: dict) -> str:
    """Reset parameters as one short line."""
    return ", ".join(f"{k}: {v}" for k, v in params.items()) or "the env's defaults"


class StageSampler:
    """One env's curriculum stage and the stage of each of its episodes (see the module docstring).

    ``stages``: each stage's complete reset parameters; ``share``: the probability that an episode
    plays an earlier stage. Picklable; :meth:`get_state` is plain data."""

    def __init__(self, stages: list[dict], share: float, run_seed: int, env_index: int):
        self.stages = [dict(s) for s in stages]
        self.share = float(share)
        self.stage = 0
        # a stream of its own: the level-seed stream of the same env is SeedSequence([seed, index])
        self.rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([int(run_seed), int(env_index), 0x5747])))

    def set_stage(self, stage: int) -> None:
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"stage {stage} out of range 0..{len(self.stages) - 1}")
        self.stage = int(stage)

    def draw(self) -> tuple[int, dict]:
        """The stage the next episode plays and its reset parameters: the current stage, or with
        probability ``share`` an earlier one (uniformly). One or two draws per episode once past
        stage 0, none before (so stage 0 plays exactly as without mixing)."""
        stage = self.stage
        if self.share > 0 and stage > 0 and self.rng.random() < self.share:
            stage = int(self.rng.integers(stage))
        return stage, dict(self.stages[stage])

    def get_state(self) -> dict:
        return {"stage": self.stage, "bit_generator": copy.deepcopy(self.rng.bit_generator.state)}

    def set_state(self, state: dict) -> None:
        self.set_stage(int(state["stage"]))
        self.rng.bit_generator.state = copy.deepcopy(state["bit_generator"])


def stage_sampler(curriculum, env_cfg, run_seed: int, env_index: int) -> StageSampler | None:
    """The sampler of global env ``env_index`` for a config's ``curriculum`` section (None without
    stages); the stages' parameters are ``env_cfg.reset_params`` updated by each stage."""
    if curriculum is None or curriculum.stages is None:
        return None
    stages = [{**env_cfg.reset_params, **s} for s in curriculum.stages]
    return StageSampler(stages, curriculum.share, run_seed, env_index)


class Promotion:
    """When to leave the current stage (see the module docstring). ``history`` lists each stage
    reached: ``{"stage", "step", "elapsed"}`` (env step and training seconds when it began)."""

    def __init__(self, curriculum, num_stages: int):
        self.window, self.threshold = int(curriculum.window), float(curriculum.threshold)
        self.min_updates = int(curriculum.min_updates)
        self.num_stages = int(num_stages)
        self.stage = 0
        self.updates_in_stage = 0
        self.successes: collections.deque = collections.deque(maxlen=self.window)
        self.history: list[dict] = [{"stage": 0, "step": 0, "elapsed": 0.0}]
        self.missing_success = 0  # current-stage episodes without a success flag (counted as 0)

    @property
    def final(self) -> bool:
        return self.stage >= self.num_stages - 1

    def observe(self, episodes: list) -> int:
        """One update's finished training episodes: those of the current stage enter the window (an
        episode without a success flag as a failure). Returns how many of them had no flag."""
        self.updates_in_stage += 1
        missing = 0
        for e in episodes:
            if e.stage != self.stage:
                continue
            missing += e.success is None
            self.successes.append(0.0 if e.success is None else float(e.success))
        self.missing_success += missing
        return missing

    def window_success(self) -> float | None:
        return float(np.mean(self.successes)) if self.successes else None

    def ready(self) -> bool:
        """Whether to move to the next stage now."""
        return (not self.final and len(self.successes) >= self.window
                and self.updates_in_stage >= self.min_updates
                and float(np.mean(self.successes)) >= self.threshold)

    def advance(self, step: int, elapsed: float) -> int:
        """Enter the next stage (at env step ``step``, ``elapsed`` training seconds); its number."""
        self.stage += 1
        self.updates_in_stage = 0
        self.successes.clear()
        self.history.append({"stage": self.stage, "step": int(step), "elapsed": float(elapsed)})
        return self.stage

    def scalars(self) -> dict:
        out = {"curriculum/stage": float(self.stage),
               "curriculum/window_episodes": float(len(self.successes))}
        if self.successes:
            out["curriculum/window_success"] = self.window_success()
        return out

    def state_dict(self) -> dict:
        return {"stage": self.stage, "updates_in_stage": self.updates_in_stage,
                "successes": list(self.successes), "history": copy.deepcopy(self.history),
                "missing_success": self.missing_success}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.updates_in_stage = int(state["updates_in_stage"])
        self.successes = collections.deque((float(x) for x in state["successes"]), maxlen=self.window)
        self.history = copy.deepcopy(list(state["history"]))
        self.missing_success = int(state.get("missing_success", 0))
