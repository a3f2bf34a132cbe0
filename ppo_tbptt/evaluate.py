"""``python -m ppo_tbptt.evaluate PATH [--episodes N] [--seeds A:B] [--deterministic] ...``

PATH is a run folder (its latest checkpoint) or a checkpoint file; the config comes from the
checkpoint. Level seeds default to the held-out ``env.eval_seeds``; a range that overlaps
``env.train_seeds`` gives a warning. A run with a curriculum is evaluated on its target task (the
last stage) unless ``--stage N`` names another. Exit code 2 on bad input (missing, truncated or mismatched
checkpoint, bad seed range).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .cli import DEVICE_HELP, add_common, device_arg
from .config import ConfigError, from_dict
from .evaluation import evaluate_policy, overlap, seeds_from_range
from .utils import format_duration, resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.evaluate",
                                description="Evaluate a checkpoint on held-out levels.")
    p.add_argument("path", help="run folder (uses its latest checkpoint) or a checkpoint file")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes, one level seed each (default 100, or all of a smaller --seeds range)")
    p.add_argument("--seeds", default=None, metavar="A:B",
                   help="half-open level seed range (default: the config's held-out env.eval_seeds)")
    p.add_argument("--stage", type=int, default=None, metavar="N",
                   help="with a curriculum: evaluate stage N (0 = the first) instead of the target task, "
                        "the last stage")
    p.add_argument("--deterministic", action="store_true",
                   help="take the most probable action (default: sample from the policy)")
    p.add_argument("--device", type=device_arg, default="auto",
                   help=f"{DEVICE_HELP} (default auto, as for training)")
    p.add_argument("--num-envs", type=int, default=None, help="envs stepped side by side (default: config's)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the action sampler (default 0)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the figures and the seeds used")
    p.add_argument("--video", default=None, metavar="OUT.gif", help="animated GIF of the first episodes")
    p.add_argument("--video-episodes", type=int, default=3, help="episodes in the GIF (default 3)")
    p.add_argument("--fps", type=float, default=6.0, help="GIF frames per second (default 6)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)
    return p.parse_args(argv)


def parse_range(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected A:B with integers A < B") from None
    if lo < 0 or hi <= lo:
        raise ValueError(f"--seeds {text!r}: need 0 <= A < B")
    return lo, hi


def load_policy(path: str | Path, device: torch.device):
    """(model, config, checkpoint dict, checkpoint path) from a run folder or checkpoint file.

    Raises CheckpointError (missing/truncated/foreign/mismatched) or ConfigError."""
    from .envs import make_env
    from .model import build_model
    file = ckpt.latest_checkpoint(Path(path))
    state = ckpt.load_checkpoint(file)
    try:
        cfg = from_dict(state["config"])
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint {file}: its config is invalid: "
                                   + "; ".join(exc.problems)) from None
    env = make_env(cfg.env)
    try:
        model = build_model(env.observation_space, env.action_space, cfg.model)
    finally:
        env.close()
    ckpt.load_model_weights(model, state["model"], file)
    return model.to(device), cfg, state, file


class Progress:
    """A one-line progress bar on stderr: episodes done, running success rate, ETA."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.time()
        self.succ: list[float] = []

    def __call__(self, done: int, total: int, finished: list) -> None:
        self.succ.extend(e.success for e in finished if e.success is not None)
        if not self.enabled:
            return
        tty = sys.stderr.isatty()
        if not tty and done != total and done % max(1, total // 10):
            return  # a log file gets about ten lines, not one carriage-return line per episode
        frac = done / total
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        elapsed = time.time() - self.start
        eta = elapsed / done * (total - done) if done else float("nan")
        rate = f"success {sum(self.succ) / len(self.succ):.2f}" if self.succ else ""
        sys.stderr.write(f"{chr(13) if tty else ''}[{bar}] {done}/{total} episodes  {rate}  "
                         f"ETA {format_duration(eta)} ")
        if done == total or not tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def format_summary(s: dict, cfg, file: Path, seed_range: tuple[int, int]) -> str:
    lines = [f"checkpoint: {file}  (env {cfg.env.id}, step {s.get('global_step', '?'):,})",
             f"episodes:   {s['episodes']} on level seeds {seed_range[0]}:{seed_range[1]} "
             f"({'deterministic' if s['deterministic'] else 'sampled'} actions)"]
    if "stage" in s:
        what = "the target task" if s["target"] else "not the target task"
        lines.append(f"stage:      {s['stage']} ({what}; training was in stage {s['training_stage']}): "
                     + ", ".join(f"{k}: {v}" for k, v in s["reset_params"].items()))
    if s["success_rate"] is not None:
        lo, hi = s["success_ci95"]
        lines.append(f"success:    {s['success_rate']:.3f}  (95% CI {lo:.3f} - {hi:.3f}, Wilson)")
    lines.append(f"return:     {s['return_mean']:.3f} ± {s['return_ci95_halfwidth']:.3f}  (95% CI)")
    lines.append(f"length:     {s['length_mean']:.1f} steps")
    for k, v in s["task_stats"].items():
        lines.append(f"{k}: {v['mean']:.3f} ± {v['ci95_halfwidth']:.3f}")
    if s.get("per_command"):
        lines.append("per command (carried out / reached): " + ", ".join(
            f"{c['command']}: {c['carried_out']}/{c['reached']} ({c['rate']:.2f})" for c in s["per_command"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        return fail(str(exc))
    try:
        model, cfg, state, file = load_policy(args.path, device)
    except (ckpt.CheckpointError, ValueError) as exc:
        return fail(str(exc))
    try:
        seed_range = parse_range(args.seeds) if args.seeds else tuple(cfg.env.eval_seeds)
        episodes = args.episodes
        if episodes is None:
            episodes = min(100, seed_range[1] - seed_range[0]) if args.seeds else 100
        seeds = seeds_from_range(seed_range, episodes)
    except ValueError as exc:
        return fail(str(exc))
    if args.num_envs is not None and args.num_envs < 1:
        return fail(f"--num-envs must be >= 1, got {args.num_envs}")
    from . import curriculum
    stage = curriculum.target_stage(cfg) if args.stage is None else args.stage
    try:
        env_cfg = curriculum.stage_env(cfg, stage)
    except ValueError as exc:
        return fail(f"--stage: {exc}")
    used = (seeds[0], seeds[-1] + 1)
    common = overlap(used, tuple(cfg.env.train_seeds))
    if common:
        print(f"warning: level seeds {used[0]}:{used[1]} overlap the training seeds "
              f"{cfg.env.train_seeds[0]}:{cfg.env.train_seeds[1]} (common part {common[0]}:{common[1]}); "
              "these levels are not held out", file=sys.stderr)
    record = max(0, min(args.video_episodes, len(seeds))) if args.video else 0
    if args.video:
        try:
            from .video import _require_pillow
            _require_pillow()
        except RuntimeError as exc:
            return fail(str(exc))
    result = evaluate_policy(model, env_cfg, seeds, deterministic=args.deterministic, device=device,
                             num_envs=args.num_envs, sample_seed=args.sample_seed, record=record,
                             progress=Progress(len(seeds), enabled=not args.quiet))
    summary = result.summary()
    summary = {"checkpoint": str(file), "env_id": cfg.env.id, "global_step": int(state.get("global_step", 0)),
               "seed_range": list(used), "reset_params": env_cfg.reset_params, **summary}
    if curriculum.enabled(cfg):
        summary.update(stage=stage, target=stage == curriculum.target_stage(cfg),
                       training_stage=(state.get("curriculum") or {}).get("stage"))
    print(format_summary(summary, cfg, file, used))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}")
    gif = None
    if args.video:
        from .video import episode_frames, write_gif
        gif = path = write_gif(episode_frames(result.frames, seeds), args.video, fps=args.fps)
        print(f"wrote {path} ({len(result.frames)} episodes)")
    if cfg.run.track:  # a tracked run: its wandb run gets the results too
        from .tracking import TrackingError, track_evaluation
        try:
            line = track_evaluation(cfg, file, summary, gif)
        except TrackingError as exc:
            print(f"warning: the results are not tracked: {exc}", file=sys.stderr)
        else:
            if line:
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
