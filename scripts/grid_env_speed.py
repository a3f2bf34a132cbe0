"""Steps per second of one grid env in this process, memory-gym against ``env.backend: fast``.

``python scripts/grid_env_speed.py [SECONDS]``: for the CPU configs' and the published tasks'
reset parameters, full size and pooled 4x, one env built by ``make_env`` under the level-seed
wrapper (resets included) steps random actions for SECONDS (default 3) per backend, the two
measured one after the other; prints a Markdown table with the ratio.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

for _k, _v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
    os.environ.setdefault(_k, _v)

from ppo_tbptt import config as C  # noqa: E402
from ppo_tbptt.envs import LevelSeedWrapper, make_env, seed_stream  # noqa: E402

TASKS = [
    ("MortarMayhem-Grid-v0", {"command_count": [1], "reward_command_success": 1.0}, "1 command, reward 1.0"),
    ("MortarMayhem-Grid-v0", {}, "10 commands (published)"),
    ("MysteryPath-Grid-v0", {"show_origin": True, "show_goal": True, "reward_path_progress": 0.1},
     "origin and goal shown, progress 0.1"),
    ("MysteryPath-Grid-v0", {}, "all hidden (published)"),
]


def steps_per_second(env_id: str, reset_params: dict, backend: str, downsample: int, seconds: float) -> float:
    cfg = C.EnvConfig(id=env_id, reset_params=reset_params, downsample=downsample, backend=backend)
    env = LevelSeedWrapper(make_env(cfg), seed_stream(cfg.train_seeds, 1, 0), cfg.reset_params)
    env.reset()
    actions = np.random.default_rng(0).integers(0, 4, 4096)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(256):
            _, _, terminated, truncated, _ = env.step(actions[n % 4096])
            n += 1
            if terminated or truncated:
                env.reset()
    return n / (time.perf_counter() - t0)


def main(seconds: float) -> None:
    print("| env, reset params | obs | memory-gym | fast | ratio |\n|---|---|---:|---:|---:|")
    for env_id, params, label in TASKS:
        for downsample in (1, 4):
            ref = steps_per_second(env_id, params, "memorygym", downsample, seconds)
            fast = steps_per_second(env_id, params, "fast", downsample, seconds)
            side = 84 // downsample
            print(f"| {env_id}, {label} | {side}x{side}x3 | {ref:,.0f} | {fast:,.0f} | {fast / ref:.1f}x |",
                  flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("seconds", type=float, nargs="?", default=3.0,
                   help="seconds of stepping per backend and task (default 3)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args().seconds)
