"""Does the adaptive strategy's gradient keep the bias bound it reports? Bound vs measured bias.

For each setting: estimate K as the strategy does, build its training batch, and compare the
gradient it trains with BPTT over whole episode fragments (``sequence_length: 0``) on the same
rollout, same loss (the probe's: PPO at ratio 1 without entropy, advantage normalisation or value
clipping). Reported: K, the bound the strategy logs (``tbptt/delta_hat``), and the measured relative
bias ||g - g_full|| / ||g_full|| of the parameters upstream of the state (encoder and core), split
into the recurrent weights (``weight_hh``, ``bias_hh``) and the input side (``weight_ih``,
``bias_ih``, encoder), plus the bias of plain chunks of the same K.

Data: ``stationary`` (a tiny model on i.i.d. Gaussian observations, the bound's setting) and
``cue_recall`` (``ppo_tbptt/configs/cue_recall.yaml``'s model after ``--pretrain`` updates of fixed L = 10).

    python scripts/adaptive_bias.py                      # about 30 s on one CPU core
    python scripts/adaptive_bias.py --pretrain 0 10 30 --cores lstm gru

Only the strategy's public interface is used (make_strategy, before_update, build, forward,
metrics), so pointing ``--package`` at another checkout measures that version.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def upstream_grads(model, batch, logits, values) -> dict:
    import torch
    from ppo_tbptt.ppo import LossCoefs, ppo_loss_from_outputs
    coefs = LossCoefs(clip=1e9, ent_coef=0.0, vf_coef=0.5, norm_advantages=False, clip_value_loss=False)
    out = ppo_loss_from_outputs(model, batch, logits, values, coefs)
    named = [(f"encoder.{n}", p) for n, p in model.encoder.named_parameters()]
    named += [(f"core.{n}", p) for n, p in model.core.named_parameters()]
    grads = torch.autograd.grad(out.loss, [p for _, p in named])
    return {n: g.reshape(-1) for (n, _), g in zip(named, grads)}


def rel_bias(g: dict, full: dict, keep) -> float:
    import torch
    names = [n for n in full if keep(n)]
    a = torch.cat([g[n] for n in names])
    b = torch.cat([full[n] for n in names])
    return float((a - b).norm() / b.norm())


def recurrent(name: str) -> bool:
    return name.startswith("core.") and "_hh" in name


def measure(label: str, model, rollout, cfg) -> dict:
    from ppo_tbptt.sequences import build_sequences
    from ppo_tbptt.truncation import make_strategy
    strat = make_strategy(cfg)
    strat.before_update(model, rollout)
    model.train()
    full_b = build_sequences(rollout, 0)
    full = upstream_grads(model, full_b, *model(full_b.obs, full_b.init_state, full_b.valid)[:2])
    batch = strat.build(rollout)
    trained = upstream_grads(model, batch, *strat.forward(model, batch))
    chunk_b = build_sequences(rollout, strat.K)
    chunks = upstream_grads(model, chunk_b, *model(chunk_b.obs, chunk_b.init_state, chunk_b.valid)[:2])
    return dict(data=label, core=cfg.model.core, K=strat.K, bound=strat.metrics()["tbptt/delta_hat"],
                all=rel_bias(trained, full, lambda n: True), rec=rel_bias(trained, full, recurrent),
                inp=rel_bias(trained, full, lambda n: not recurrent(n)),
                chunks=rel_bias(chunks, full, lambda n: True))


ADAPTIVE = ["tbptt.strategy=adaptive", "tbptt.target_bias=0.1", "tbptt.k_min=2", "tbptt.k_max=20",
            "tbptt.adapt_every=1", "tbptt.adapt_window=20", "tbptt.adapt_burn_in=4", "tbptt.adapt_tau=10",
            "tbptt.adapt_samples=64"]  # the truncation study's adaptive setting for delay 8


def cue_recall(core: str, pretrain: int, seed: int) -> dict:
    import torch
    from ppo_tbptt.config import load
    from ppo_tbptt.gae import compute_gae
    from ppo_tbptt.trainer import Trainer
    pre = load("cue_recall", [f"model.core={core}", "tbptt.sequence_length=10", f"run.seed={seed}",
                              "run.device=cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(pre, Path(tmp), torch.device("cpu"), log=False, quiet=True)
        try:
            for _ in range(pretrain):
                tr.train_update()
            tr.model.eval()
            rollout, _ = tr.collector.collect()
        finally:
            tr.close()
    cfg = load("cue_recall", ADAPTIVE + [f"model.core={core}", f"run.seed={seed}", "run.device=cpu"])
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                           rollout.bootstrap_value, cfg.ppo.gamma, cfg.ppo.gae_lambda, rollout.truncation_values)
    rollout.advantages.copy_(adv)
    rollout.returns.copy_(ret)
    return measure(f"cue_recall, {pretrain} updates", tr.model, rollout, cfg)


def stationary(core: str, seed: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from trunc_helpers import stationary_rollout
    model, rollout, cfg = stationary_rollout(core, recurrent_gain=1.5, seed=seed)
    cfg = cfg.replace("tbptt", strategy="adaptive", target_bias=0.1, k_min=1, k_max=40, adapt_window=40,
                      adapt_burn_in=8, adapt_tau=20, adapt_samples=64)
    return measure("stationary", model, rollout, cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cores", nargs="+", default=["lstm", "gru"])
    p.add_argument("--pretrain", nargs="+", type=int, default=[0, 10, 30],
                   help="CueRecall updates of fixed L = 10 before measuring (default 0 10 30)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--package", default=str(ROOT), help="checkout whose ppo_tbptt to measure")
    args = p.parse_args(argv)
    sys.path.insert(0, args.package)
    import torch
    torch.set_num_threads(1)
    import ppo_tbptt
    print(f"ppo_tbptt from {Path(ppo_tbptt.__file__).parent}\n")
    rows = []
    for core in args.cores:
        rows.append(stationary(core, args.seed - 1))
        rows += [cue_recall(core, n, args.seed) for n in args.pretrain]
    print("| data | core | K | bound (tbptt/delta_hat) | measured bias | recurrent weights | input side | chunks of K |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['core']} | {r['K']} | {r['bound']:.3f} | {r['all']:.3f} | {r['rec']:.3f} | "
              f"{r['inp']:.3f} | {r['chunks']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
