"""Record MemoryGym trajectories under one software stack and compare them under another.

For a dependency upgrade that should not change the envs (gymnasium, pygame, numpy): every
MemoryGym id, a few level seeds, the same actions (drawn from a generator of this script's own,
not from the action space's sampler), with the default reset parameters and with the options the
shipped configs pass. Per step it keeps the observation's hash, the reward, ``terminated``,
``truncated`` and the info dict (as sorted JSON); per reset the observation's hash and the info;
and the hash of one ``render()`` frame per episode in ``rgb_array`` mode (what evaluation GIFs use).

    python scripts/memorygym_trajectories.py record mg.npz      # under the old stack
    other/python scripts/memorygym_trajectories.py compare mg.npz   # under the new one: exit 1 on a difference
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

for _k, _v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
    os.environ.setdefault(_k, _v)

import gymnasium as gym  # noqa: E402
import memory_gym  # noqa: E402,F401  (registers the ids)

IDS = ["MortarMayhem-Grid-v0", "MortarMayhem-v0", "MortarMayhemB-Grid-v0", "MortarMayhemB-v0",
       "MysteryPath-Grid-v0", "MysteryPath-v0", "SearingSpotlights-v0", "Endless-MortarMayhem-v0",
       "Endless-MysteryPath-v0", "Endless-SearingSpotlights-v0"]
OPTIONS = {  # what the shipped configs pass as reset options, per id (the default options besides)
    "MortarMayhem-Grid-v0": {"command_count": [1], "reward_command_success": 1.0},
    "MysteryPath-Grid-v0": {"show_origin": True, "show_goal": True, "reward_path_progress": 0.1},
}


def digest(x) -> str:
    if isinstance(x, dict):  # MortarMayhemB's observations: an image and the commands
        return "+".join(f"{k}:{digest(v)}" for k, v in sorted(x.items()))
    a = np.ascontiguousarray(x)
    return hashlib.sha1(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]


def plain(x):
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def action(space, rng):
    if isinstance(space, gym.spaces.Discrete):
        return int(space.start + rng.integers(space.n))
    return (rng.integers(np.iinfo(np.int64).max, size=space.nvec.shape) % space.nvec).astype(space.dtype)


def trajectory(env_id: str, options: dict | None, seeds, steps: int) -> list[str]:
    """One line per event: a reset, a step, a rendered frame."""
    env = gym.make(env_id, disable_env_checker=True, render_mode="rgb_array")
    rng = np.random.default_rng(12345)
    lines = [f"spaces {env.observation_space} {env.action_space}"]
    seeds = iter(seeds)
    seed = next(seeds)
    obs, info = env.reset(seed=seed, options=options)
    lines.append(f"reset {seed} {digest(obs)} {json.dumps(plain(info), sort_keys=True)}")
    lines.append(f"frame {digest(env.render())}")
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(action(env.action_space, rng))
        lines.append(f"step {digest(obs)} {float(reward)!r} {bool(terminated)} {bool(truncated)} "
                     f"{json.dumps(plain(info), sort_keys=True)}")
        if terminated or truncated:
            seed = next(seeds, None)
            if seed is None:
                break
            obs, info = env.reset(seed=seed, options=options)
            lines.append(f"reset {seed} {digest(obs)} {json.dumps(plain(info), sort_keys=True)}")
            lines.append(f"frame {digest(env.render())}")
    env.close()
    return lines


def record_all(steps: int) -> dict[str, list[str]]:
    out = {}
    for env_id in IDS:
        for name, options in (("default", None), ("config", OPTIONS.get(env_id))):
            if name == "config" and options is None:
                continue
            out[f"{env_id}/{name}"] = trajectory(env_id, options, [0, 1, 2, 7, 1000003], steps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("file")
    p.add_argument("--steps", type=int, default=600, help="steps per id and option set (default 600)")
    args = p.parse_args(argv)
    stack = f"gymnasium {gym.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}"
    if args.mode == "record":
        runs = record_all(args.steps)
        np.savez_compressed(args.file, stack=stack, steps=args.steps, **{k: np.array(v) for k, v in runs.items()})
        print(f"recorded {sum(len(v) for v in runs.values())} events of {len(runs)} trajectories under {stack}")
        return 0
    ref = np.load(args.file)
    runs = record_all(int(ref["steps"]))
    bad = 0
    for key, lines in runs.items():
        old = [str(s) for s in ref[key]] if key in ref.files else []
        diff = next((i for i, (a, b) in enumerate(zip(old, lines)) if a != b), None)
        if diff is None and len(old) == len(lines):
            print(f"same  {key}: {len(lines)} events")
            continue
        bad += 1
        i = min(len(old), len(lines)) if diff is None else diff
        print(f"DIFF  {key}: event {i} of {len(old)} / {len(lines)}\n  was: {old[i] if i < len(old) else '-'}"
              f"\n  now: {lines[i] if i < len(lines) else '-'}")
    print(f"{len(runs) - bad} of {len(runs)} trajectories identical: {ref['stack']} -> {stack}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
