"""Does the adaptive strategy's gradient keep the bias bound it reports? Bound vs expected bias.

For each case and seed: fix the weights, draw ``--rollouts`` rollouts, and on each let the
strategy estimate K (``before_update``), build its batch and run its forward, as the trainer
does; compute the gradient of the loss the trainer trains (PPO with its clipping, entropy bonus
and advantage normalisation, at the weights that collected the rollout: the first minibatch of
the first epoch, with one minibatch over the whole batch; gradient-norm clipping left out) w.r.t.
the parameters a truncation can cut (encoder and core), and the same for BPTT over whole episode
fragments (``sequence_length: 0``). The expected bias is ``||mean g - mean g_full|| / ||mean
g_full||`` over the rollouts; the bound is the mean of the logged ``tbptt/delta_hat``. Also
reported: the K chosen (min-max), the expected bias split into the recurrent weights and the input
side (``weight_ih``, ``bias_ih``, encoder), the mean single-rollout bias, and the expected bias of
fixed chunks of the median K. ``--force-K K`` trains K instead: the bound at K against the bias at K.

Cases (all with episode starts): ``stationary`` (a tiny model on i.i.d. Gaussian observations,
episodes starting at rate 0.1), ``cue_recall`` (``ppo_tbptt/configs/cue_recall.yaml``'s model after
``--pretrain`` updates of fixed L = 10; ``cue_recall_gru`` with a GRU), ``mm_grid``
(``ppo_tbptt/configs/mortar_mayhem_grid_cpu.yaml``'s model after ``--pretrain-grid`` updates of that
config, 8 envs x 128 steps).

    python scripts/adaptive_bias.py                         # stationary and cue_recall, 3 seeds, 2 targets
    python scripts/adaptive_bias.py --cases mm_grid --rollouts 4
    python scripts/adaptive_bias.py --package /path/to/other/checkout   # measure that version
    python scripts/adaptive_bias.py --cost --cases cue_recall mm_grid   # time per update vs fixed L = K

Only the strategy's public interface is used (make_strategy, before_update, build, forward,
metrics), so ``--package`` measures another checkout's strategy on the same data.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STUDY = ["tbptt.strategy=adaptive", "tbptt.k_min=2", "tbptt.k_max=20", "tbptt.adapt_every=1",
         "tbptt.adapt_window=20", "tbptt.adapt_burn_in=4", "tbptt.adapt_tau=10",
         "tbptt.adapt_samples=64"]  # the truncation study's adaptive setting for delay 8
GRID = ["tbptt.strategy=adaptive", "tbptt.k_min=2", "tbptt.k_max=64", "tbptt.adapt_every=1",
        "tbptt.adapt_window=48", "tbptt.adapt_burn_in=8", "tbptt.adapt_tau=24", "tbptt.adapt_samples=64"]
GRID_SIZE = ["env.num_envs=8", "ppo.rollout_steps=128", "env.vector=serial"]


def coefs_of(cfg):
    from ppo_tbptt.ppo import LossCoefs
    o = cfg.ppo
    return LossCoefs(clip=o.clip.value(0, cfg.run.total_steps), ent_coef=o.ent_coef.value(0, cfg.run.total_steps),
                     vf_coef=o.vf_coef, norm_advantages=o.norm_advantages, clip_value_loss=o.clip_value_loss)


def upstream_grad(model, batch, logits, values, coefs):
    """d (the trained loss over the whole batch) / d (encoder and core parameters), flattened
    with the recurrent weights (``weight_hh``, ``bias_hh``) first."""
    import torch
    from ppo_tbptt.ppo import ppo_loss_from_outputs
    out = ppo_loss_from_outputs(model, batch, logits, values, coefs)
    named = sorted(list(model.encoder.named_parameters()) + [(f"core.{n}", p) for n, p in model.core.named_parameters()],
                   key=lambda item: "_hh" not in item[0])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, [p for _, p in named])])


def recurrent_size(model) -> int:
    return sum(p.numel() for n, p in model.core.named_parameters() if "_hh" in n)


def expected_bias(model, rollouts, cfg, force_K: int = 0) -> dict:
    """The row of one case; ``force_K`` > 0 trains that K instead of the chosen one (its logged
    bound is then the bound at that K)."""
    import numpy as np
    from ppo_tbptt.sequences import build_sequences
    from ppo_tbptt.truncation import make_strategy
    coefs = coefs_of(cfg)
    model.train()
    full, trained, Ks, bounds, singles = [], [], [], [], []
    for rollout in rollouts:
        strat = make_strategy(cfg)
        strat.before_update(model, rollout)
        if force_K:
            strat.K = force_K
        batch = strat.build(rollout)
        Ks.append(strat.K)
        bounds.append(strat.metrics()["tbptt/delta_hat"])
        fb = build_sequences(rollout, 0)
        full.append(upstream_grad(model, fb, *model(fb.obs, fb.init_state, fb.valid)[:2], coefs))
        trained.append(upstream_grad(model, batch, *strat.forward(model, batch), coefs))
        singles.append(float((trained[-1] - full[-1]).norm() / full[-1].norm()))
    K_med = int(np.median(Ks))
    chunks = []
    for rollout in rollouts:
        cb = build_sequences(rollout, K_med)
        chunks.append(upstream_grad(model, cb, *model(cb.obs, cb.init_state, cb.valid)[:2], coefs))
    mean = lambda gs: sum(gs) / len(gs)  # noqa: E731
    g_full = mean(full)
    rel = lambda g: float((g - g_full).norm() / g_full.norm())  # noqa: E731
    R = recurrent_size(model)
    part = lambda g, sl: float((g[sl] - g_full[sl]).norm() / g_full[sl].norm())  # noqa: E731
    g_tr = mean(trained)
    return dict(K=f"{min(Ks)}-{max(Ks)}" if min(Ks) != max(Ks) else str(Ks[0]), bound=float(np.mean(bounds)),
                bias=rel(g_tr), single=float(np.mean(singles)), chunks=rel(mean(chunks)), K_med=K_med,
                rec=part(g_tr, slice(0, R)), inp=part(g_tr, slice(R, None)))


def with_gae(rollout, cfg):
    from ppo_tbptt.gae import compute_gae
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                           rollout.bootstrap_value, cfg.ppo.gamma, cfg.ppo.gae_lambda, rollout.truncation_values)
    rollout.advantages.copy_(adv)
    rollout.returns.copy_(ret)
    return rollout


def trained_rollouts(name: str, pre_overrides: list, pretrain: int, n: int):
    """The model after ``pretrain`` updates of the config ``name``, and ``n`` rollouts it collects."""
    import torch
    from ppo_tbptt.config import load
    from ppo_tbptt.trainer import Trainer
    pre = load(name, pre_overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(pre, Path(tmp), torch.device("cpu"), log=False, quiet=True)
        try:
            for _ in range(pretrain):
                tr.train_update()
            tr.model.eval()
            rollouts = [with_gae(copy.deepcopy(tr.collector.collect()[0]), pre)  # (the collector reuses its buffer)
                        for _ in range(n)]
        finally:
            tr.close()
    return tr.model, rollouts


_DATA: dict = {}


def case(data: str, seed: int, target: float, args, pretrain: int) -> dict:
    """One row: the data of (``data``, ``seed``) are drawn once for all targets."""
    from ppo_tbptt.config import load
    if data == "stationary":
        sys.path.insert(0, str(ROOT / "tests"))
        from trunc_helpers import stationary_rollout
        rollouts = []
        for r in range(args.rollouts):
            model_r, rollout, cfg = stationary_rollout(args.stationary_core, recurrent_gain=1.5, seed=seed,
                                                       p_start=0.1, data_seed=1000 * seed + r)
            model = model if r else model_r  # the same weights (seed) for every rollout
            rollouts.append(rollout)  # (cheap: drawn again for every target)
        cfg = cfg.replace("tbptt", strategy="adaptive", target_bias=target, k_min=1, k_max=40, adapt_window=40,
                          adapt_burn_in=8, adapt_tau=20, adapt_samples=64)
        label = f"stationary ({args.stationary_core}, p 0.1)"
    elif data.startswith("cue_recall"):
        core = data.split("_")[-1] if data.count("_") == 2 else "lstm"
        if (data, seed, pretrain) not in _DATA:
            _DATA[data, seed, pretrain] = trained_rollouts("cue_recall", [
                "tbptt.sequence_length=10", f"run.seed={seed}", "run.device=cpu", f"model.core={core}"],
                pretrain, args.rollouts)
        model, rollouts = _DATA[data, seed, pretrain]
        cfg = load("cue_recall", STUDY + [f"tbptt.target_bias={target}", f"run.seed={seed}", "run.device=cpu",
                                          f"model.core={core}"])
        label = f"cue_recall ({cfg.model.core}, {pretrain} updates)"
    else:
        if (data, seed) not in _DATA:
            _DATA[data, seed] = trained_rollouts("mortar_mayhem_grid_cpu.yaml",
                                                 GRID_SIZE + [f"run.seed={seed}", "run.device=cpu"],
                                                 args.pretrain_grid, args.rollouts)
        model, rollouts = _DATA[data, seed]
        cfg = load("mortar_mayhem_grid_cpu.yaml",
                   GRID_SIZE + GRID + [f"tbptt.target_bias={target}", f"run.seed={seed}", "run.device=cpu"])
        label = f"MortarMayhem-Grid ({cfg.model.core} {cfg.model.hidden_size}, {args.pretrain_grid} updates)"
    cfg = cfg.replace("tbptt", adapt_samples=args.samples)
    return dict(data=label, seed=seed, target=target, **expected_bias(model, rollouts, cfg, args.force_K))


def cost(data: str, seed: int, updates: int, args) -> list[dict]:
    """CPU seconds per update (collection and learning, one thread; the first update left out) of
    adaptive (target 0.1, K re-estimated every 5 updates) and of fixed chunks of the K it chose
    last, each trained from the same start; and the learning phase's wall-clock seconds."""
    import numpy as np
    import torch
    from ppo_tbptt.config import load
    from ppo_tbptt.trainer import Trainer
    if data.startswith("cue_recall"):
        core = data.split("_")[-1] if data.count("_") == 2 else "lstm"
        name, base, adapt = "cue_recall", [f"model.core={core}"], STUDY + ["tbptt.adapt_every=5"]
    else:
        name = "mortar_mayhem_grid_cpu.yaml"
        base, adapt = GRID_SIZE, GRID + ["tbptt.adapt_every=5"]
    rows = []
    K = None
    for strategy in ("adaptive", "fixed"):
        over = (adapt + ["tbptt.target_bias=0.1"] if strategy == "adaptive"
                else ["tbptt.strategy=fixed", f"tbptt.sequence_length={K}"])
        cfg = load(name, base + over + [f"run.seed={seed}", "run.device=cpu", "run.torch_threads=1"])
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(cfg, Path(tmp), torch.device("cpu"), log=False, quiet=True)
            try:
                secs, learn, Ks = [], [], []
                for _ in range(updates):
                    t = time.process_time()  # one torch thread: CPU time, which other load does not move
                    s = tr.train_update()
                    secs.append(time.process_time() - t)
                    learn.append(s["time/update_seconds"])
                    Ks.append(int(s["tbptt/K"]))
            finally:
                tr.close()
        if strategy == "adaptive":
            K = Ks[-1]
        rows.append(dict(data=data, strategy=strategy if strategy == "adaptive" else f"fixed L={K}",
                         K=f"{min(Ks)}-{max(Ks)}", update=float(np.mean(secs[1:])), learn=float(np.mean(learn[1:]))))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["stationary", "cue_recall"],
                   choices=["stationary", "cue_recall", "cue_recall_gru", "mm_grid"],
                   help="cue_recall: the config's LSTM; cue_recall_gru: with a GRU")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.05])
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per case and seed (default 8)")
    p.add_argument("--pretrain", nargs="+", type=int, default=[10, 30],
                   help="CueRecall updates of fixed L = 10 first (default 10 30)")
    p.add_argument("--pretrain-grid", type=int, default=10, help="MortarMayhem-Grid updates (its config) first")
    p.add_argument("--force-K", type=int, default=0,
                   help="train this K instead of the chosen one: the bound at K against the bias at K")
    p.add_argument("--samples", type=int, default=64, help="tbptt.adapt_samples, the probe's windows (default 64)")
    p.add_argument("--stationary-core", default="gru", choices=["lstm", "gru"])
    p.add_argument("--cost", action="store_true", help="time per update of adaptive vs fixed L = K instead")
    p.add_argument("--updates", type=int, default=11, help="with --cost: updates per strategy (default 11)")
    p.add_argument("--package", default=str(ROOT), help="checkout whose ppo_tbptt to measure")
    args = p.parse_args(argv)
    sys.path.insert(0, args.package)
    import torch
    torch.set_num_threads(1)
    import ppo_tbptt
    print(f"ppo_tbptt from {Path(ppo_tbptt.__file__).parent}\n")
    if args.cost:
        print("| data | seed | strategy | K | CPU s per update | learn s (wall) |\n|---|---|---|---|---|---|")
        for data in args.cases:
            for seed in args.seeds:
                for r in cost(data, seed, args.updates, args):
                    print(f"| {r['data']} | {seed} | {r['strategy']} | {r['K']} | {r['update']:.3f} | {r['learn']:.3f} |",
                          flush=True)
        return 0
    print("| data | seed | target | K | bound (mean tbptt/delta_hat) | expected bias | recurrent weights | input side "
          "| single-rollout bias | chunks of median K |\n|---|---|---|---|---|---|---|---|---|---|")
    for data in args.cases:
        for pretrain in args.pretrain if data.startswith("cue_recall") else [0]:
            for seed in args.seeds:
                for target in args.targets:
                    r = case(data, seed, target, args, pretrain)
                    flag = " **over**" if r["bias"] > r["bound"] + 1e-6 else ""
                    print(f"| {r['data']} | {r['seed']} | {r['target']:g} | {r['K']} | {r['bound']:.3f} | "
                          f"{r['bias']:.3f}{flag} | {r['rec']:.3f} | {r['inp']:.3f} | {r['single']:.3f} | "
                          f"{r['chunks']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
