"""Evaluation on held-out level seeds: episodes, summary statistics with 95% intervals, frames.

Used by ``python -m ppo_tbptt.evaluate`` and by the trainer's periodic evaluation. Evaluation never
touches the global RNGs (level seeds are explicit, sampling uses a private ``torch.Generator``), so
evaluating during training does not change what training does next.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

from .envs import make_env
from .envs.vector import env_actions, episode_stats
from .envs.wrappers import LevelSeedWrapper
from .model import RecurrentActorCritic

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0 and 1 and for small n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval (0 for a single value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    half = z * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else 0.0
    return (float(v.mean()), half)


def no_seed() -> int:
    raise RuntimeError("evaluation envs are always reset with an explicit level seed")


def command_breakdown(episodes) -> list[dict]:
    """For tasks of commands carried out in order (Mortar Mayhem: ``commands_completed`` and
    ``command_count`` per episode): for each command k, how many episodes reached it (carried out
    the k-1 before it and had at least k) and how many carried it out, with a Wilson 95% interval.
    Which command fails shows what a memory holds: an agent that keeps two commands of three
    carries out the first two and guesses the third. Empty for other tasks."""
    done = [(round(e.extra["commands_completed"] * e.extra["command_count"]), int(e.extra["command_count"]))
            for e in episodes if "commands_completed" in e.extra and "command_count" in e.extra]
    out = []
    for k in range(1, max((n for _, n in done), default=0) + 1):
        reached = sum(1 for c, n in done if n >= k and c >= k - 1)
        carried = sum(1 for c, n in done if n >= k and c >= k)
        if reached:
            lo, hi = wilson_interval(carried, reached)
            out.append({"command": k, "reached": reached, "carried_out": carried, "rate": carried / reached,
                        "ci95": [lo, hi]})
    return out


@dataclasses.dataclass
class EvalResult:
    """Finished episodes in episode order (episode i ran on level ``seeds[i]``) and their frames."""

    episodes: list                 # list[EpisodeStats]
    seeds: list                    # level seeds, one per episode
    deterministic: bool
    frames: list = dataclasses.field(default_factory=list)
    """For each recorded episode: a list of ``(rgb [H, W, 3] uint8, step, reward, return)``."""

    def summary(self) -> dict:
        """The reported figures (plain data): success with a Wilson 95% interval, return ± 95%, ..."""
        eps = self.episodes
        n = len(eps)
        out: dict = {"episodes": n, "deterministic": self.deterministic}
        succ = [e.success for e in eps if e.success is not None]
        if succ:
            k = float(np.sum(succ))
            lo, hi = wilson_interval(k, len(succ))
            out.update(successes=int(k), success_rate=k / len(succ), success_ci95=[lo, hi])
        else:
            out.update(successes=None, success_rate=None, success_ci95=None)
        m, half = mean_interval([e.ret for e in eps])
        out.update(return_mean=m, return_ci95_halfwidth=half, return_ci95=[m - half, m + half],
                   return_std=float(np.std([e.ret for e in eps], ddof=1)) if n > 1 else 0.0,
                   length_mean=float(np.mean([e.length for e in eps])) if n else float("nan"))
        stats = {}
        for key in sorted({k for e in eps for k in e.extra}):
            sm, sh = mean_interval([e.extra[key] for e in eps if key in e.extra])
            stats[key] = {"mean": sm, "ci95_halfwidth": sh}
        out["task_stats"] = stats
        per_command = command_breakdown(eps)
        if per_command:
            out["per_command"] = per_command
        out["seeds"] = [int(s) for s in self.seeds]
        out["per_episode"] = [
            {"seed": e.seed, "return": e.ret, "length": e.length, "success": e.success, **e.extra}
            for e in eps]
        return out

    def scalars(self, prefix: str = "eval/") -> dict:
        """Chart scalars: ``eval/success``, ``eval/success_low``, ``eval/return``, ``eval/length`` ..."""
        s = self.summary()
        out = {f"{prefix}return": s["return_mean"], f"{prefix}length": s["length_mean"],
               f"{prefix}episodes": float(s["episodes"])}
        if s["success_rate"] is not None:
            out[f"{prefix}success"] = s["success_rate"]
            out[f"{prefix}success_low"], out[f"{prefix}success_high"] = s["success_ci95"]
        for k, v in s["task_stats"].items():
            out[f"{prefix}{k}"] = v["mean"]
        return out


def seeds_from_range(seed_range: tuple[int, int], episodes: int) -> list[int]:
    """The first ``episodes`` level seeds of ``[start, end)``; ValueError if the range is too small."""
    lo, hi = int(seed_range[0]), int(seed_range[1])
    if episodes < 1:
        raise ValueError(f"need at least one episode, got {episodes}")
    if hi - lo < episodes:
        raise ValueError(f"seed range {lo}:{hi} holds {hi - lo} seeds, fewer than the {episodes} "
                         "episodes asked for (one level per episode)")
    return list(range(lo, lo + episodes))


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    """The common part of two half-open ranges, or None."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class Evaluator:
    """Holds ``num_envs`` evaluation envs (kept open: closing a pygame env closes every pygame env in
    the process) and runs a policy on a list of level seeds, one episode per seed."""

    def __init__(self, env_cfg, num_envs: int, render: bool = False):
        if num_envs < 1:
            raise ValueError(f"Evaluator needs at least one env, got {num_envs}")
        mode = "rgb_array" if render else None
        self.env_id = env_cfg.id
        self.envs = [LevelSeedWrapper(make_env(env_cfg, mode), no_seed, env_cfg.reset_params)
                     for _ in range(num_envs)]
        self.render = render

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []

    def _frame(self, env) -> np.ndarray:
        img = np.asarray(env.render(), dtype=np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img  # MemoryGym's render() is upright already (its observations are x/y transposed)

    @torch.no_grad()
    def run(self, model: RecurrentActorCritic, seeds: Sequence[int], deterministic: bool = False,
            device: torch.device | str = "cpu", sample_seed: int = 0, record: int = 0,
            progress: Callable[[int, int, list], None] | None = None,
            reset_params: dict | None = None) -> EvalResult:
        """One episode per level seed. Episode i runs on env ``i % k``; its frames are kept if
        ``i < record`` (needs ``render=True``). ``progress(done, total, episodes)`` after each episode.
        ``reset_params``: play these reset parameters in this run instead of the env config's
        (e.g. a curriculum stage; the envs need not be rebuilt)."""
        device = torch.device(device)
        if record and not self.render:
            raise ValueError("recording frames needs an Evaluator built with render=True")
        seeds = [int(s) for s in seeds]
        total = len(seeds)
        k = min(len(self.envs), total)
        envs = self.envs[:k]
        queues = [list(range(j, total, k)) for j in range(k)]  # episode indices per env
        gen = torch.Generator(device=device).manual_seed(int(sample_seed))
        was_training = model.training
        model.eval()
        own_params = [env.reset_params for env in envs]
        if reset_params is not None:
            for env in envs:
                env.reset_params = dict(reset_params)

        obs = np.zeros((k, *model.obs_shape), dtype=envs[0].observation_space.dtype)
        current = [-1] * k
        ret = np.zeros(k, np.float64)
        length = np.zeros(k, np.int64)
        done_eps: dict[int, object] = {}
        frames: dict[int, list] = {}
        state = model.initial_state(k, device)

        def start(j: int) -> bool:
            if not queues[j]:
                current[j] = -1
                return False
            i = queues[j].pop(0)
            current[j] = i
            o, _ = envs[j].reset(seed=seeds[i])
            obs[j] = o
            ret[j] = 0.0
            length[j] = 0
            if i < record:
                frames[i] = [(self._frame(envs[j]), 0, 0.0, 0.0)]
            return True

        active = np.array([start(j) for j in range(k)])
        try:
            while active.any():
                x = torch.from_numpy(obs).to(device)
                logits, _, new_state = model(x.unsqueeze(1), state)  # [k, 1, A]
                logits = logits[:, 0]
                if deterministic:
                    actions = model.dist(logits).mode()
                elif model.continuous:
                    actions = model.dist(logits).sample(gen)  # [k, D]
                else:
                    parts = torch.split(logits, model.nvec, dim=-1)
                    actions = torch.stack([torch.multinomial(torch.softmax(p, -1), 1, generator=gen)[:, 0]
                                           for p in parts], dim=-1)  # [k, D]
                acts = env_actions(actions.cpu().numpy(), envs[0].action_space)  # Box: clipped
                ended = torch.zeros(k, dtype=torch.bool)
                for j in np.flatnonzero(active):
                    o, r, te, tr, info = envs[j].step(acts[j])
                    ret[j] += r
                    length[j] += 1
                    i = current[j]
                    if i in frames:
                        frames[i].append((self._frame(envs[j]), int(length[j]), float(r), float(ret[j])))
                    if te or tr:
                        done_eps[i] = episode_stats(i, seeds[i], ret[j], length[j], info)
                        ended[j] = True
                        active[j] = start(j)
                        if progress is not None:
                            progress(len(done_eps), total, [done_eps[i]])
                    else:
                        obs[j] = o
                state = new_state.masked(~ended.to(device))
        finally:
            model.train(was_training)
            for env, params in zip(envs, own_params):
                env.reset_params = params
        episodes = [done_eps[i] for i in range(total)]
        for i, e in enumerate(episodes):
            e.env_index = i
        return EvalResult(episodes, seeds, deterministic, [frames[i] for i in sorted(frames)])


def evaluate_policy(model: RecurrentActorCritic, env_cfg, seeds: Sequence[int],
                    episodes: int | None = None, deterministic: bool = False,
                    device: torch.device | str = "cpu", num_envs: int | None = None,
                    sample_seed: int = 0, record: int = 0,
                    progress: Callable[[int, int, list], None] | None = None) -> EvalResult:
    """Run ``episodes`` episodes (default: one per seed) on the first level seeds of ``seeds``.

    ``num_envs`` envs step side by side (default ``min(env_cfg.num_envs, episodes)``); the hidden
    state starts at zero in every episode. ``record`` keeps the frames of the first episodes.
    """
    seeds = list(seeds)
    n = len(seeds) if episodes is None else int(episodes)
    if n < 1 or n > len(seeds):
        raise ValueError(f"episodes must be in [1, {len(seeds)}] (one level seed each), got {n}")
    seeds = seeds[:n]
    k = min(num_envs or env_cfg.num_envs, n)
    ev = Evaluator(env_cfg, k, render=record > 0)
    try:
        return ev.run(model, seeds, deterministic, device, sample_seed, record, progress)
    finally:
        ev.close()
