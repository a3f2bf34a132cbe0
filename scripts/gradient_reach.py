"""How far back the recurrent core's gradient reaches, per variant of a config and per trained run.

    python scripts/gradient_reach.py --config mortar_mayhem_grid_cpu [--set ...] \
        [--variant chrono=model.chrono_init=128 ...] [--run NAME=RUN_DIR ...] [--gaps 5 10 20 30 40] [--seeds 3]

Plays one episode of the config's env per sequence with random actions (the env's reset
parameters and level seeds; a curriculum's last stage, the target task), encodes its observations
(the terminal one left out: the policy never acts on it) with the untrained model of each variant,
and runs the core over them as training does (``run_core``, with gradients: on a CPU the training
kernels). For each gap k it prints the Frobenius norm of the Jacobian of the policy's logits at
the episode's last step, centred within each action dimension (the softmax ignores a shift of all
of them), with respect to the core's input (the encoder's features) k steps earlier, divided by
the same norm for k = 1: the relative size of the gradient that reaches the input k steps back
(it may rise again with k where a trained model reads an early step). The variants are built
from the same seeds (``model.chrono_init`` draws after every other weight, so a chrono/zero pair
starts from networks that differ in the core's input biases alone). Median over ``--sequences``
episodes and the spread (min-max) over ``--seeds`` initialisations. ``--run NAME=RUN_DIR`` adds a
trained model (its newest checkpoint, or a checkpoint file) as a row, on the same episodes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_tbptt import config as C  # noqa: E402  (before torch: it sets OpenMP's waiting)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ppo_tbptt.envs import make_env  # noqa: E402
from ppo_tbptt.checkpoint import CheckpointError  # noqa: E402
from ppo_tbptt.evaluate import load_policy  # noqa: E402
from ppo_tbptt.model import build_model  # noqa: E402


def episodes(cfg: C.Config, count: int, min_length: int) -> list[np.ndarray]:
    """``count`` episodes' observations (each ``[L, ...]``, L >= ``min_length``) with random actions."""
    params = {**cfg.env.reset_params, **(cfg.curriculum.stages[-1] if cfg.curriculum.stages else {})}
    env_cfg = cfg.env
    env = make_env(env_cfg)
    env.action_space.seed(0)
    out, seed = [], env_cfg.train_seeds[0]
    try:
        while len(out) < count:
            if seed - env_cfg.train_seeds[0] >= 2000 * count:
                raise SystemExit(f"error: {env_cfg.id}: {len(out)} of {2000 * count} episodes with random actions "
                                 f"last {min_length} steps or more; give smaller --gaps")
            obs, _ = env.reset(seed=seed, options=params or None)
            seed += 1
            frames = [obs]
            while True:
                obs, _, term, trunc, _ = env.step(env.action_space.sample())
                if term or trunc:  # (the terminal observation: no action is taken on it)
                    break
                frames.append(obs)
            if len(frames) >= min_length:
                out.append(np.stack(frames))
    finally:
        env.close()
    return out


def centred_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """The logits less their mean within each action dimension (a Gaussian's mean as it is)."""
    if model.nvec is None:
        return logits
    return torch.cat([g - g.mean(-1, keepdim=True) for g in logits.split(list(model.nvec), -1)], -1)


def reach(model, obs: list[np.ndarray], gaps: list[int]) -> list[float]:
    """Per gap k: |J(k)|_F / |J(1)|_F, J(k) = d centred logits[last] / d core input[last - k], the
    median over the episodes ``obs``."""
    shares = []
    for o in obs:
        x = model.encode(torch.as_tensor(o[None])).detach().requires_grad_()  # [1, L, F]
        out, _ = model.run_core(x, model.initial_state(1))
        logits, _ = model.heads(out[:, -1])
        y = centred_logits(model, logits)[0]  # [A]
        sq = torch.zeros(x.shape[1])
        for j in range(y.shape[0]):
            grad, = torch.autograd.grad(y[j], x, retain_graph=j + 1 < y.shape[0])
            sq += grad[0].pow(2).sum(-1)  # [L]
        norms = sq.sqrt()
        last = norms.shape[0] - 1
        shares.append([float(norms[last - k] / norms[last - 1]) for k in gaps])
    return [statistics.median(s[i] for s in shares) for i in range(len(gaps))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="mortar_mayhem_grid_cpu")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]")
    p.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR_OR_CHECKPOINT",
                   help="a trained model as a row as well (its env must be the config's)")
    p.add_argument("--gaps", type=int, nargs="+", default=[5, 10, 20, 30, 40])
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    try:
        base = C.load(args.config, args.set)
        variants = {"config": base}
        for v in args.variant:
            name, _, sets = v.partition("=")
            variants[name] = C.load(args.config, args.set + sets.split(","))
    except C.ConfigError as exc:
        p.error(str(exc))
    if any(cfg.model.memoryless for cfg in variants.values()):
        p.error("model.memoryless: the ablation's gradient reaches no earlier step (nothing to measure)")
    env = make_env(base.env)
    space = (env.observation_space, env.action_space)
    env.close()
    trained = {}
    for item in args.run:
        name, _, path = item.partition("=") if "=" in item else ("", "", item)
        try:
            model, cfg, _, file = load_policy(path, torch.device("cpu"))
        except (CheckpointError, C.ConfigError) as exc:
            p.error(str(exc))
        if cfg.env.id != base.env.id or model.obs_shape != space[0].shape:
            p.error(f"{file} trained {cfg.env.id} on observations of shape {model.obs_shape}, not the "
                    f"config's {base.env.id} (shape {space[0].shape})")
        trained[name or str(file)] = model
    obs = episodes(base, args.sequences, max(args.gaps) + 1)
    rows = {}
    for name, cfg in variants.items():
        rows[name] = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            rows[name].append(reach(build_model(space[0], space[1], cfg.model), obs, args.gaps))
    for name, model in trained.items():
        rows[name] = [reach(model, obs, args.gaps)]
    print(f"{args.config}: {len(obs)} episodes of {min(len(o) for o in obs)}-{max(len(o) for o in obs)} steps, "
          f"random actions; |d centred logits[last] / d core input[last - k]|_F relative to k = 1, median over "
          f"episodes" + (f", range over {args.seeds} initialisations (untrained variants)" if args.seeds > 1 else ""))
    print("| variant | " + " | ".join(f"k = {k}" for k in args.gaps) + " |")
    print("|---|" + "---:|" * len(args.gaps))
    for name, runs in rows.items():
        cells = []
        for i in range(len(args.gaps)):
            vals = sorted(r[i] for r in runs)
            cells.append(f"{statistics.median(vals):.1e}" + (f" ({vals[0]:.0e}-{vals[-1]:.0e})" if len(vals) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
