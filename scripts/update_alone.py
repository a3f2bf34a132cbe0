"""The PPO update alone, on one recorded rollout: seconds per update, and where they go.

    python scripts/update_alone.py --config mortar_mayhem_grid_cpu --set 'env.reset_params={command_count: [10]}' \
        [--episode-length 118] [--repeats 5] [--profile] [--variant NAME=section.key=value,... ...]

Collects one rollout with the config's untrained policy (after one rollout to warm up, so it starts
mid-episode), runs GAE, then times whole updates (every epoch and minibatch: forward, loss,
backward, gradient clipping, Adam, the metrics) from the same weights, optimizer state and
shuffle seed each time. ``--episode-length L`` rewrites the rollout's episode starts to every L
steps (for timing only: it gives the sequence structure of a policy that lives L steps). Each
``--variant`` names a set of overrides (config fields, and ``adam.fused=true`` / ``adam.foreach=true`` for
torch.optim.Adam) that are measured in turn against the config as it is,
round-robin, so that the machine's drift hits every variant alike; the table gives the median and
the spread (min-max) of the repeats.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_tbptt import config as C  # noqa: E402  (before torch: it sets OpenMP's waiting, see ppo_tbptt/__init__.py)
import torch  # noqa: E402
from ppo_tbptt.gae import compute_gae  # noqa: E402
from ppo_tbptt.trainer import Trainer  # noqa: E402


def record(cfg: C.Config, episode_length: int):
    cfg = cfg.replace("env", vector="serial").replace("run", device="cpu")
    tr = Trainer(cfg, Path("/tmp/update_alone_run"), torch.device("cpu"), log=False, quiet=True)
    try:
        tr.model.eval()
        tr.collector.collect()
        rollout, _ = tr.collector.collect()
    finally:
        tr.close()
    rollout = copy.deepcopy(rollout)
    if episode_length > 0:  # every env's episodes L steps long, at staggered phases
        T, N = rollout.episode_start.shape
        phase = (torch.arange(N) * 7) % episode_length
        rollout.episode_start = ((torch.arange(T)[:, None] + phase[None]) % episode_length) == 0
        rollout.terminated = torch.cat([rollout.episode_start[1:], torch.zeros(1, N, dtype=torch.bool)])
        rollout.truncated.zero_()
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                           rollout.bootstrap_value, cfg.ppo.gamma, cfg.ppo.gae_lambda, rollout.truncation_values)
    rollout.advantages.copy_(adv)
    rollout.returns.copy_(ret)
    return rollout, tr.model.state_dict()


def make_trainer(cfg: C.Config, weights: dict) -> Trainer:
    tr = Trainer(cfg.replace("env", vector="serial", num_envs=cfg.env.num_envs).replace("run", device="cpu"),
                 Path("/tmp/update_alone_run"), torch.device("cpu"), log=False, quiet=True)
    missing, unexpected = tr.model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("recall_head.") for k in missing):  # a variant may add the head
        raise SystemExit(f"error: the variant's model does not fit the config's weights: missing {missing}, "
                         f"unexpected {unexpected}")
    tr.envs.close()
    return tr


def learn(tr: Trainer, rollout) -> dict:
    """The learning half of :meth:`Trainer.train_update` on ``rollout`` (GAE done)."""
    tr.global_step = 0
    tr.shuffle_gen.manual_seed(1)
    if hasattr(tr, "ppo_update"):  # the update's own epochs x minibatches (with every loss it has)
        _, coefs = tr.coefs()
        losses, finite = tr.ppo_update.learn(rollout, tr.ppo_update.sequences(rollout), coefs)
        assert finite
        return losses
    return _learn_inline(tr, rollout)


def _learn_inline(tr: Trainer, rollout) -> dict:
    """A copy of the trainer's epochs x minibatches loop, for a tree whose trainer has no
    ``ppo_update`` (the PPO loss alone)."""
    from ppo_tbptt.ppo import ppo_loss_from_outputs
    from ppo_tbptt.sequences import minibatch_indices
    cfg = tr.cfg
    _, coefs = tr.coefs()
    tr.truncation.before_update(tr.model, rollout)
    batch = tr.truncation.build(rollout)
    tr.model.train()
    sums, count = {}, 0
    finite = torch.ones((), dtype=torch.bool)
    for epoch in range(cfg.ppo.epochs):
        tr.truncation.before_epoch(tr.model, rollout, batch, epoch)
        for mb_idx in minibatch_indices(batch.num_sequences, cfg.ppo.minibatches, tr.shuffle_gen):
            mb = batch.select(mb_idx)
            logits, values = tr.truncation.forward(tr.model, mb)
            out = ppo_loss_from_outputs(tr.model, mb, logits, values, coefs)
            tr.optimizer.zero_grad(set_to_none=True)
            finite &= torch.isfinite(out.loss.detach())
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.ppo.max_grad_norm)
            finite &= torch.isfinite(grad_norm)
            tr.optimizer.step()
            out.metrics["losses/grad_norm"] = grad_norm.detach()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    assert bool(finite)
    return {k: float(v) / count for k, v in sums.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="mortar_mayhem_grid_cpu")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--episode-length", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]")
    p.add_argument("--rollout", metavar="FILE.pt", help="keep the recorded rollout here (and reuse it if present)")
    p.add_argument("--profile", action="store_true", help="torch.profiler's top ops of one update per variant")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = C.load(args.config, args.set)
    if args.rollout and Path(args.rollout).is_file():
        rollout, weights = torch.load(args.rollout, weights_only=False)
    else:
        rollout, weights = record(base, args.episode_length)
        if args.rollout:
            torch.save((rollout, weights), args.rollout)
    lengths = torch.diff(torch.nonzero(torch.cat([rollout.episode_start.t(), torch.ones(rollout.num_envs, 1,
                                                  dtype=torch.bool)], 1).flatten()).flatten())
    print(f"rollout: {rollout.num_steps} x {rollout.num_envs} steps, {int(rollout.episode_start.sum())} episode "
          f"starts, sequence lengths mean {lengths.float().mean():.1f} max {int(lengths.max())}; "
          f"torch threads {torch.get_num_threads()}")
    variants = {"as configured": (base, {})}
    for v in args.variant:  # config overrides, and adam.KEY=VALUE for torch.optim.Adam's arguments
        name, _, sets = v.partition("=")
        sets = [s for s in sets.split(",") if s]
        adam = {s[5:].split("=")[0]: s.split("=")[1] == "true" for s in sets if s.startswith("adam.")}
        variants[name] = (C.load(args.config, args.set + [s for s in sets if not s.startswith("adam.")]), adam)
    trainers = {}
    for name, (cfg, adam) in variants.items():
        trainers[name] = tr = make_trainer(cfg, weights)
        if adam:
            tr.optimizer = torch.optim.Adam(tr.model.parameters(), lr=cfg.ppo.lr.initial, eps=cfg.ppo.adam_eps, **adam)
    states = {name: (copy.deepcopy(tr.model.state_dict()), copy.deepcopy(tr.optimizer.state_dict()))
              for name, tr in trainers.items()}
    times = {name: [] for name in variants}
    metrics = {}
    for name, tr in trainers.items():  # warm-up (and a first check that every variant runs)
        metrics[name] = learn(tr, rollout)
    for _ in range(args.repeats):
        for name, tr in trainers.items():
            tr.model.load_state_dict(states[name][0])
            tr.optimizer.load_state_dict(states[name][1])
            t0 = time.perf_counter()
            learn(tr, rollout)
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["as configured"])
    print(f"{'variant':<28} {'s/update (median)':>18} {'min-max':>14} {'ratio':>7}  first-update kl / value loss")
    for name, ts in times.items():
        med = statistics.median(ts)
        m = metrics[name]
        print(f"{name:<28} {med:>18.3f} {min(ts):>6.3f}-{max(ts):<7.3f} {med / ref:>7.2f}  "
              f"{m['losses/approx_kl']:.3e} / {m['losses/value']:.4f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name, tr in trainers.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                learn(tr, rollout)
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


if __name__ == "__main__":
    main()
