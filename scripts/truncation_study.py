"""How far back must gradients reach for a memory task? A truncation study on CueRecall.

Trains the CueRecall config (cue shown at step 0, query at step ``delay + 1``) once per strategy
setting and seed, and reports the success rate at the end of training (mean of ``charts/success``
over the last ``--tail`` updates: the sampling policy, on the training levels) and what an update
cost (CPU seconds of the training process per update, collection and learning; one torch thread
per run, so other load on the machine does not count). Writes ``results.jsonl`` (one line per
run), ``table.md``, ``truncation_study.png`` (success against gradient reach) and
``truncation_study_compute.png`` (success against CPU seconds per update).

Two budgets: equal nominal reach at an equal number of env steps (``--steps``, the default), or
equal compute (``--seconds S``): each run first times a few updates of its own setting and then
trains for as many updates as fit in S CPU-seconds (its schedules run over those steps), so a
strategy that costs more per update sees fewer env steps.

    python scripts/truncation_study.py --jobs 2            # defaults (88 runs): about 6 minutes on 2 CPU cores
    python scripts/truncation_study.py --jobs 2 --seconds 30 --out runs/truncation_study_compute
    python scripts/truncation_study.py --seeds 1 --steps 20000 --out runs/study_smoke
    python scripts/truncation_study.py --only fixed,random --jobs 2
    python scripts/truncation_study.py --replot --out runs/truncation_study   # redraw from results.jsonl

Each setting is a list of ``--set``-style overrides on ``ppo_tbptt/configs/cue_recall.yaml``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def settings(delay: int) -> list[dict]:
    """(family, label, reach, overrides). ``reach`` is the gradient reach plotted on the x axis:
    the chunk length (fixed), the loss block k1 plus a gradient-carrying prefix (overlap), the mean
    piece length (random), the history K every loss term keeps (adaptive, measured per run). The
    query needs ``delay + 1`` steps of reach."""
    need = delay + 2  # episode length: a chunk this long holds a whole episode
    half = max(2, need // 2)
    out = []
    for L in sorted({2, half, need}):
        out.append(dict(family="fixed", label=f"fixed L={L}", reach=L,
                        overrides=["tbptt.strategy=fixed", f"tbptt.sequence_length={L}"]))
    for k2, burn in ((half, False), (need, False), (need, True)):
        label = f"overlap k1=2 k2={k2}" + (" burn-in" if burn else "")
        out.append(dict(family="overlap (burn-in)" if burn else "overlap", label=label,
                        reach=2 if burn else k2,
                        overrides=["tbptt.strategy=overlap", "tbptt.stride=2", f"tbptt.sequence_length={k2}",
                                   f"tbptt.burn_in={'true' if burn else 'false'}"]))
    for m in (2, half, need):
        out.append(dict(family="random", label=f"random mean={m}", reach=m,
                        overrides=["tbptt.strategy=random", "tbptt.sequence_length=0", f"tbptt.mean_length={m}"]))
    out.append(dict(family="random", label=f"random mean={need} segment={half}", reach=need,
                    overrides=["tbptt.strategy=random", "tbptt.sequence_length=0", f"tbptt.mean_length={need}",
                               f"tbptt.segment_length={half}"]))
    out.append(dict(family="adaptive", label="adaptive target=0.1", reach=None,
                    overrides=["tbptt.strategy=adaptive", "tbptt.target_bias=0.1", "tbptt.k_min=2",
                               f"tbptt.k_max={2 * need}", "tbptt.adapt_every=5",
                               f"tbptt.adapt_window={2 * need}", "tbptt.adapt_burn_in=4",
                               f"tbptt.adapt_tau={need}", "tbptt.adapt_samples=64"]))
    return out


def config_for(job: dict, steps: int):
    from ppo_tbptt.config import load
    return load("cue_recall", list(job["overrides"]) + [
        f"run.seed={job['seed']}", f"run.total_steps={steps}", "run.device=cpu",
        f"env.kwargs={{num_cues: {job['num_cues']}, delay: {job['delay']}}}",
    ])


def seconds_per_update(job: dict, updates: int = 4) -> float:
    """CPU seconds per update of this setting, from ``updates`` updates after one to warm up."""
    import torch
    from ppo_tbptt.trainer import Trainer
    cfg = config_for(job, job["steps"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), torch.device("cpu"), log=False, quiet=True)
        try:
            trainer.train_update()
            t0 = time.process_time()
            for _ in range(updates):
                trainer.train_update()
            return (time.process_time() - t0) / updates
        finally:
            trainer.close()


def run_one(job: dict) -> dict:
    """Train one (setting, seed) and return its summary. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    from ppo_tbptt.trainer import Trainer

    steps = job["steps"]
    if job.get("seconds"):  # equal compute: as many updates as fit in the CPU-seconds budget
        batch = config_for(job, steps).ppo.rollout_steps * config_for(job, steps).env.num_envs
        steps = batch * max(1, int(job["seconds"] / seconds_per_update(job)))
    cfg = config_for(job, steps)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), torch.device("cpu"), log=False, quiet=True)
        history = []
        try:
            while trainer.global_step < cfg.run.total_steps:
                cpu0 = time.process_time()
                s = trainer.train_update()
                s["cpu"] = time.process_time() - cpu0
                history.append({k: s.get(k) for k in ("charts/success", "tbptt/K", "tbptt/beta",
                                                      "tbptt/delta_hat", "time/update_seconds", "cpu")})
        finally:
            trainer.close()
    cpu = float(np.sum([h["cpu"] for h in history]))
    tail = [h["charts/success"] for h in history[-job["tail"]:] if h["charts/success"] is not None]
    Ks = [h["tbptt/K"] for h in history if h["tbptt/K"] is not None]
    return dict(label=job["label"], family=job["family"], reach=job["reach"], seed=job["seed"],
                steps=trainer.global_step, success=float(np.mean(tail)) if tail else float("nan"),
                final_K=Ks[-1] if Ks else None, mean_K=float(np.mean(Ks)) if Ks else None,
                seconds=time.time() - start, cpu_seconds=cpu,
                cpu_per_update=float(np.median([h["cpu"] for h in history])),  # (the first carries warm-up)
                learn_per_update=float(np.median([h["time/update_seconds"] for h in history])),
                budget_seconds=job.get("seconds") or None)


def table(results: list[dict], args) -> str:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    budget = (f"{args.seconds:g} CPU-seconds of training per run (equal compute)" if args.seconds
              else f"{args.steps:,} env steps per run")
    lines = [f"CueRecall (num_cues={args.num_cues}, delay={args.delay}: the query is {args.delay + 1} "
             f"steps after the cue; chance = {1 / args.num_cues:.2f}), {budget}, "
             f"seeds {args.seed0}..{args.seed0 + args.seeds - 1}; success = mean training success over "
             f"the last {args.tail} updates; CPU s/update = the median CPU time of the training process per "
             "update (collection and learning, one thread), learn s = the median learning phase (wall-clock).", "",
             "| setting | gradient reach | success (mean ± std) | per seed | K (adaptive: mean, final) "
             "| env steps | CPU s/update | learn s/update |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        s = np.array([r["success"] for r in rs])
        reach = rs[0]["reach"] if rs[0]["reach"] is not None else "adaptive"
        k = (f"{np.mean([r['mean_K'] for r in rs]):.1f}, {np.mean([r['final_K'] for r in rs]):.1f}"
             if rs[0]["family"] == "adaptive" else "")
        cpu = np.mean([r.get("cpu_per_update", np.nan) for r in rs])
        learn = np.mean([r.get("learn_per_update", np.nan) for r in rs])
        lines.append(f"| {label} | {reach} | {np.nanmean(s):.2f} ± {np.nanstd(s):.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in s)} | {k} | {np.mean([r['steps'] for r in rs]):,.0f} | "
                     f"{cpu:.3f} | {learn:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], args, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'ppo_tbptt[plot]'): skipping the figure")
        return False
    fig, ax = plt.subplots(figsize=(7.6, 4.0), dpi=110)
    fams = ["fixed", "overlap", "overlap (burn-in)", "random", "adaptive"]
    marker = {"fixed": "o-", "overlap": "s-", "overlap (burn-in)": "x", "random": "^-", "adaptive": "*"}
    for fam in fams:
        rs = [r for r in results if r["family"] == fam]
        if not rs:
            continue
        if fam == "adaptive":
            xs = [r["mean_K"] for r in rs]
            ax.plot(xs, [r["success"] for r in rs], marker[fam], ms=11, ls="none", label="adaptive (x = mean K)")
            continue
        reaches = sorted({r["reach"] for r in rs})
        mean = [np.nanmean([r["success"] for r in rs if r["reach"] == x]) for x in reaches]
        std = [np.nanstd([r["success"] for r in rs if r["reach"] == x]) for x in reaches]
        ax.errorbar(reaches, mean, yerr=std, fmt=marker[fam], capsize=3, label=fam, ms=7)
    ax.axvline(args.delay + 1, color="grey", ls=":", lw=1)
    ax.text(args.delay + 1.1, 0.02, "cue-to-query\ndistance", fontsize=8, color="grey")
    ax.axhline(1 / args.num_cues, color="grey", ls="--", lw=1)
    ax.text(0.3, 1 / args.num_cues + 0.02, "chance", fontsize=8, color="grey")
    ax.set_xlabel("how far back the gradient reaches (steps)")
    ax.set_ylabel(f"success after {args.steps // 1000}k steps")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(0, None)
    ax.set_title(f"CueRecall, delay {args.delay}: {args.seeds} seed(s) per setting", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

    # the same runs against what an update cost
    fig, ax = plt.subplots(figsize=(7.6, 4.0), dpi=110)
    for fam in fams:
        rs = [r for r in results if r["family"] == fam and r.get("cpu_per_update") is not None]
        by_label: dict[str, list] = {}
        for r in rs:
            by_label.setdefault(r["label"], []).append(r)
        for i, (label, group) in enumerate(by_label.items()):
            x = np.mean([r["cpu_per_update"] for r in group])
            y = [r["success"] for r in group]
            ax.errorbar([x], [np.nanmean(y)], yerr=[np.nanstd(y)], fmt=marker[fam][0], capsize=3, ms=7,
                        color=f"C{fams.index(fam)}", label=fam if i == 0 else None)
            ax.annotate(label.split(" ", 1)[1] if " " in label else label, (x, np.nanmean(y)), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(1 / args.num_cues, color="grey", ls="--", lw=1)
    ax.set_xlabel("CPU seconds per update (collection + learning, one thread)")
    ax.set_ylabel("success at the end of training")
    ax.set_ylim(-0.03, 1.03)
    budget = f"{args.seconds:g} CPU-s per run" if args.seconds else f"{args.steps // 1000}k steps per run"
    ax.set_title(f"CueRecall, delay {args.delay}: success against cost per update ({budget})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_compute.png"))
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="seeds per setting (default 8)")
    p.add_argument("--seed0", type=int, default=1, help="first seed")
    p.add_argument("--steps", type=int, default=61_440, help="env steps per run (default 61,440: cue_recall.yaml's budget)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="equal compute instead: train each run for this many CPU-seconds (its own cost per "
                        "update, timed first, sets its step count)")
    p.add_argument("--delay", type=int, default=8, help="CueRecall delay (default 8)")
    p.add_argument("--num-cues", type=int, default=4, help="CueRecall cues (default 4)")
    p.add_argument("--tail", type=int, default=5, help="updates averaged for the final success")
    p.add_argument("--only", default="", help="comma-separated families to run (fixed,overlap,random,adaptive)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (one thread each)")
    p.add_argument("--out", default="runs/truncation_study", help="output folder")
    p.add_argument("--replot", action="store_true",
                   help="train nothing: redraw table.md and the figure from --out's results.jsonl")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.jobs < 1 or args.delay < 0 or args.num_cues < 2 or args.seconds < 0:
        p.error("--seeds, --steps and --jobs must be >= 1, --delay >= 0, --num-cues >= 2, --seconds >= 0")

    out = Path(args.out)
    if args.replot:
        path = out / "results.jsonl"
        if not path.is_file():
            p.error(f"--replot: no {path}")
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        args.seeds = len({r["seed"] for r in results})
        args.seed0 = min(r["seed"] for r in results)
        args.steps = results[0]["steps"]
        args.seconds = results[0].get("budget_seconds") or 0.0
        md = table(results, args)
        (out / "table.md").write_text(md)
        print(md)
        if plot(results, args, out / "truncation_study.png"):
            print(f"figure: {out / 'truncation_study.png'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    chosen = [s for s in settings(args.delay) if not only or s["family"].split(" ")[0] in only]
    jobs = [dict(s, seed=args.seed0 + i, steps=args.steps, delay=args.delay, num_cues=args.num_cues,
                 tail=args.tail, seconds=args.seconds) for s in chosen for i in range(args.seeds)]
    each = f"{args.seconds:g} CPU-seconds" if args.seconds else f"{args.steps:,} steps"
    print(f"{len(jobs)} runs ({len(chosen)} settings x {args.seeds} seeds), {each} each, "
          f"{args.jobs} job(s) -> {out}", flush=True)
    start = time.time()
    results = []
    with open(out / "results.jsonl", "w") as f:
        if args.jobs == 1:
            it = map(run_one, jobs)
        else:
            pool = ProcessPoolExecutor(max_workers=args.jobs)
            it = pool.map(run_one, jobs)
        for r in it:
            results.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"[{len(results)}/{len(jobs)} {time.time() - start:5.0f}s] {r['label']:<28} seed {r['seed']}: "
                  f"success {r['success']:.2f} ({r['seconds']:.0f}s)", flush=True)
        if args.jobs > 1:
            pool.shutdown()
    md = table(results, args)
    (out / "table.md").write_text(md)
    print(md)
    if plot(results, args, out / "truncation_study.png"):
        print(f"figure: {out / 'truncation_study.png'}")
    print(f"total {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
