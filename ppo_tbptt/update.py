"""One PPO update, top to bottom: collect -> GAE -> sequences -> epochs x minibatches.

:class:`PPOUpdate` is the algorithm and nothing around it; the maths it calls lives in
:mod:`ppo_tbptt.gae` (advantages and returns over the whole rollout), :mod:`ppo_tbptt.truncation`
(how the rollout is cut into sequences and run through the model), :mod:`ppo_tbptt.sequences`
(the minibatch shuffle) and :mod:`ppo_tbptt.ppo` (the clipped loss). Schedules, evaluation,
checkpoints, stopping and the console belong to :class:`ppo_tbptt.trainer.Trainer`, which calls
an update once per iteration.

Data parallelism passes through one seam, ``ranks`` (:mod:`ppo_tbptt.parallel`): with one
process every call on it is the identity; under ``torchrun`` the same calls gather the episodes,
share the truncation estimate, normalise advantages over every rank's minibatch and average the
gradients (:mod:`ppo_tbptt.distributed`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch

from .config import Config
from .gae import compute_gae
from .ppo import LossCoefs, ppo_loss_from_outputs
from .sequences import minibatch_indices


class TrainingDiverged(FloatingPointError):
    """An update produced a non-finite loss or gradient: training stops before anything is saved."""


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - pred) / Var(target)`` (nan when the target is constant)."""
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
        out["charts/success_episodes"] = float(len(succ))  # the episodes that report success
    for key in sorted({k for e in episodes for k in e.extra}):
        vals = [e.extra[key] for e in episodes if key in e.extra]
        out[f"charts/{key}"] = float(np.mean(vals))
    return out


@dataclasses.dataclass
class UpdateResult:
    """What one update produced, for the trainer to log and act on.

    ``losses``: the minibatches' mean loss metrics (``losses/*``), the first minibatch's KL and the
    explained variance; ``episodes``: the episodes that ended while collecting (every rank's, on
    rank 0); ``batch``: the sequence statistics and timings (``tbptt/*``, ``time/*``), then the
    figures of the whole run's rollout (over every rank, and the truncation strategy's own)."""

    losses: dict
    episodes: list
    batch: dict
    finite: bool  # every loss and gradient was finite


class PPOUpdate:
    """One PPO iteration over recurrent sequences, run by calling it with the step's learning
    rate and loss coefficients.

    It holds references to the trainer's parts, so that what a test or a resume does to them
    (restoring the model, the optimizer, the shuffle generator) is what the next update uses.
    ``ranks``: the data-parallel seam (:data:`ppo_tbptt.parallel.SINGLE` for one process).
    ``first_env``: this process's first global env index. ``on_phase(name, total)`` and
    ``on_minibatch(done)``: the trainer's progress hooks (the latter may raise to abandon the
    update). ``collect_threads`` / ``learn_threads``: torch threads while collecting / learning.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, collector,
                 truncation, shuffle_gen: torch.Generator, ranks, device: torch.device, *,
                 first_env: int = 0, collect_threads: int, learn_threads: int,
                 on_phase: Callable[[str, int], None] | None = None,
                 on_minibatch: Callable[[int], None] | None = None):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.collector, self.truncation, self.shuffle_gen = collector, truncation, shuffle_gen
        self.ranks, self.device, self.first_env = ranks, device, first_env
        self.collect_threads, self.learn_threads = collect_threads, learn_threads
        self.on_phase = on_phase or (lambda name, total: None)
        self.on_minibatch = on_minibatch or (lambda done: None)
        #: env steps per update over all ranks
        self.batch_size = cfg.ppo.rollout_steps * collector.envs.num_envs * ranks.world_size

    def __call__(self, lr: float, coefs: LossCoefs) -> UpdateResult:
        """Collect a rollout, compute its advantages, cut it into sequences and run the epochs of
        minibatch steps at learning rate ``lr`` with ``coefs``."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0, wait0 = time.perf_counter(), self.collector.wait_seconds
        rollout, episodes = self.collect()
        t1 = time.perf_counter()
        self.advantages(rollout)
        batch = self.sequences(rollout)
        losses, finite = self.learn(rollout, batch, coefs)
        t2 = time.perf_counter()
        stats = {"tbptt/sequences_per_batch": float(batch.num_sequences),
                 "tbptt/padding_fraction": 1.0 - float(batch.mask.mean()),
                 "time/collect_seconds": t1 - t0, "time/update_seconds": t2 - t1,
                 "time/env_wait_seconds": self.collector.wait_seconds - wait0}
        stats.update(self.ranks.rollout_scalars(rollout, batch))  # over all ranks ({} with one)
        stats.update(self.ranks.truncation_metrics(self.truncation))  # over all ranks
        return UpdateResult(losses, episodes, stats, finite)

    def collect(self):
        """``rollout_steps`` steps of every env with the current policy, no gradients:
        ``(rollout, episodes that ended)``."""
        self.model.eval()
        self.on_phase("collect", self.batch_size)
        torch.set_num_threads(self.collect_threads)
        try:
            rollout, episodes = self.collector.collect()
        finally:
            torch.set_num_threads(self.learn_threads)
        return rollout, self.ranks.gather_episodes(episodes, self.first_env)  # all ranks' on rank 0

    def advantages(self, rollout) -> None:
        """GAE once over the whole ``[T, N]`` rollout, before it is cut: truncation cuts gradients,
        not return targets. Fills ``rollout.advantages`` and ``rollout.returns``."""
        p = self.cfg.ppo
        adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                               rollout.bootstrap_value, p.gamma, p.gae_lambda, rollout.truncation_values)
        rollout.advantages.copy_(adv)
        rollout.returns.copy_(ret)

    def sequences(self, rollout):
        """The rollout as the truncation strategy cuts it (a :class:`SequenceBatch`): each sequence
        starts from the stored recurrent state of its first step, detached."""
        self.truncation.before_update(self.model, rollout)
        self.ranks.sync_truncation(self.truncation, rollout.episode_start)
        return self.truncation.build(rollout)

    def learn(self, rollout, batch, coefs: LossCoefs) -> tuple[dict, bool]:
        """``ppo.epochs`` passes over ``batch`` in ``ppo.minibatches`` shuffled minibatches, one
        clipped gradient step each. Returns the mean metrics (``losses/*``) and whether every loss
        and gradient was finite (checked once, after the epochs, to keep the GPU streaming)."""
        p = self.cfg.ppo
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        first_kl = None
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.on_phase("learn", p.epochs * p.minibatches)
        for epoch in range(p.epochs):
            self.truncation.before_epoch(self.model, rollout, batch, epoch)
            for mb_idx in minibatch_indices(batch.num_sequences, p.minibatches, self.shuffle_gen):
                mb = batch.select(mb_idx.to(self.device))
                mb, mb_coefs = self.ranks.normalise_advantages(mb, coefs)  # over all ranks' minibatches
                core_out = self.truncation.core_out(self.model, mb)
                logits, values = self.model.heads(core_out, mb.obs)
                out = ppo_loss_from_outputs(self.model, mb, logits, values, mb_coefs)
                if self.model.recall_head is not None:  # model.recall_lags: the auxiliary recall loss
                    recall = self.model.recall_loss(core_out, mb.obs, mb.mask, self.shuffle_gen)
                    out.loss = out.loss + p.recall_coef * recall
                    out.metrics["losses/recall"] = recall.detach()
                self.optimizer.zero_grad(set_to_none=True)
                finite &= torch.isfinite(out.loss.detach())
                out.loss.backward()
                # the gradient of the loss over all ranks' minibatches, then clipped alike on every rank
                share = self.ranks.average_gradients(self.model.parameters(), mb.mask)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                finite &= torch.isfinite(grad_norm)  # a finite loss can still have non-finite gradients
                self.optimizer.step()
                out.metrics = self.ranks.weigh(out.metrics, share)
                if first_kl is None:
                    first_kl = out.metrics["losses/approx_kl"]
                out.metrics["losses/grad_norm"] = grad_norm.detach()
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                self.on_minibatch(count)
        sums, first_kl, finite = self.ranks.reduce_update(sums, first_kl, finite)
        losses = {k: float(v) / count for k, v in sums.items()}
        losses["losses/first_minibatch_kl"] = float(first_kl)
        losses["losses/explained_variance"] = explained_variance(rollout.values.flatten(),
                                                                 rollout.returns.flatten())
        return losses, bool(finite)
