"""One readable PPO iteration: collect -> GAE -> sequences -> epochs x minibatches."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, dump_yaml
from .envs import make_vector_env
from .gae import compute_gae
from .logger import MetricsWriter, console, progress_line
from .model import build_model
from .ppo import LossCoefs, ppo_loss_from_outputs
from .rollout import Collector
from .sequences import minibatch_indices
from .truncation import make_strategy
from .utils import seed_everything


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    var = target.var()
    return float("nan") if var == 0 else float(1.0 - (target - pred).var() / var)


def episode_scalars(episodes: list) -> dict:
    """Means of the finished episodes' statistics under their chart names (empty if none ended)."""
    if not episodes:
        return {}
    out = {
        "charts/episodic_return": float(np.mean([e.ret for e in episodes])),
        "charts/episodic_length": float(np.mean([e.length for e in episodes])),
        "charts/episodes": float(len(episodes)),
    }
    succ = [e.success for e in episodes if e.success is not None]
    if succ:
        out["charts/success"] = float(np.mean(succ))
    for key in sorted({k for e in episodes for k in e.extra}):
        vals = [e.extra[key] for e in episodes if key in e.extra]
        out[f"charts/{key}"] = float(np.mean(vals))
    return out


class Trainer:
    """Owns the envs, model, optimizer and counters of one run."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, log: bool = True,
                 quiet: bool = False):
        self.cfg = cfg
        self.device = device
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        if cfg.run.torch_threads > 0:
            torch.set_num_threads(cfg.run.torch_threads)
        seed_everything(cfg.run.seed)
        self.envs = make_vector_env(cfg.env, cfg.run.seed)
        self.model = build_model(self.envs.single_observation_space, self.envs.single_action_space,
                                 cfg.model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.ppo.lr.initial,
                                          eps=cfg.ppo.adam_eps)
        self.collector = Collector(self.envs, self.model, cfg.ppo.rollout_steps, device,
                                   cfg.ppo.gamma, cfg.model.reset_hidden_state)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.truncation = make_strategy(cfg)
        self.batch_size = cfg.ppo.rollout_steps * self.envs.num_envs
        self.total_updates = -(-cfg.run.total_steps // self.batch_size)
        self.global_step = 0
        self.update = 0
        self.writer = MetricsWriter(self.run_dir) if log else None
        if self.writer is not None:
            self.writer.text("config", "```\n" + dump_yaml(cfg) + "\n```")

    # ---- schedules ------------------------------------------------------------------------------
    def coefs(self) -> tuple[float, LossCoefs]:
        o, total = self.cfg.ppo, self.cfg.run.total_steps
        lr = o.lr.value(self.global_step, total)
        coefs = LossCoefs(clip=o.clip.value(self.global_step, total),
                          ent_coef=o.ent_coef.value(self.global_step, total), vf_coef=o.vf_coef,
                          norm_advantages=o.norm_advantages, clip_value_loss=o.clip_value_loss)
        return lr, coefs

    # ---- one update -----------------------------------------------------------------------------
    def train_update(self) -> dict:
        cfg = self.cfg
        lr, coefs = self.coefs()
        for g in self.optimizer.param_groups:
            g["lr"] = lr

        t0 = time.perf_counter()
        self.model.eval()
        rollout, episodes = self.collector.collect()
        self.global_step += self.batch_size
        t1 = time.perf_counter()

        adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                               rollout.bootstrap_value, cfg.ppo.gamma, cfg.ppo.gae_lambda,
                               rollout.truncation_values)
        rollout.advantages.copy_(adv)
        rollout.returns.copy_(ret)
        self.truncation.before_update(self.model, rollout)
        batch = self.truncation.build(rollout)

        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        first_kl = None
        for epoch in range(cfg.ppo.epochs):
            self.truncation.before_epoch(self.model, rollout, batch, epoch)
            for mb_idx in minibatch_indices(batch.num_sequences, cfg.ppo.minibatches, self.shuffle_gen):
                mb = batch.select(mb_idx.to(self.device))
                logits, values = self.truncation.forward(self.model, mb)
                out = ppo_loss_from_outputs(self.model, mb, logits, values, coefs)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.ppo.max_grad_norm)
                self.optimizer.step()
                if first_kl is None:
                    first_kl = out.metrics["losses/approx_kl"]
                out.metrics["losses/grad_norm"] = grad_norm.detach()
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        t2 = time.perf_counter()
        self.update += 1

        scalars = {k: float(v) / count for k, v in sums.items()}
        scalars["losses/first_minibatch_kl"] = float(first_kl)
        scalars["losses/explained_variance"] = explained_variance(rollout.values.flatten(),
                                                                  rollout.returns.flatten())
        scalars.update(episode_scalars(episodes))
        scalars.update({
            "charts/learning_rate": lr, "charts/ent_coef": coefs.ent_coef, "charts/clip": coefs.clip,
            "charts/update": float(self.update),
            "tbptt/sequences_per_batch": float(batch.num_sequences),
            "tbptt/padding_fraction": 1.0 - float(batch.mask.mean()),
            "time/collect_seconds": t1 - t0, "time/update_seconds": t2 - t1,
        })
        scalars.update(self.truncation.metrics())
        if self.writer is not None:
            for tag, curve in self.truncation.curves().items():
                self.writer.curve(tag, curve, self.global_step)
        return scalars

    # ---- the loop -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{self.global_step:012d}.pt"
        ckpt.atomic_save(self.state_dict(), path)
        ckpt.prune(path.parent, self.cfg.run.keep_checkpoints)
        return path

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "global_step": self.global_step,
            "update": self.update,
        }

    def train(self) -> dict:
        cfg = self.cfg
        start = time.time()
        every = cfg.run.checkpoint_every
        next_ckpt = every if every > 0 else None
        scalars: dict = {}
        try:
            while self.global_step < cfg.run.total_steps:
                scalars = self.train_update()
                elapsed = time.time() - start
                sps = self.global_step / max(elapsed, 1e-9)
                scalars["charts/SPS"] = sps
                if self.writer is not None:
                    self.writer.scalars(self.global_step, scalars)
                if not self.quiet:
                    console(progress_line(self.update, self.total_updates, self.global_step,
                                          cfg.run.total_steps, sps, scalars, elapsed))
                if next_ckpt is not None and self.global_step >= next_ckpt:
                    self.save_checkpoint()
                    while next_ckpt <= self.global_step:
                        next_ckpt += every
            path = self.save_checkpoint()
            if not self.quiet:
                console(f"done: {self.global_step:,} steps in {time.time() - start:.1f}s; checkpoint {path}")
        finally:
            self.close()
        return scalars

    def close(self) -> None:
        self.envs.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
