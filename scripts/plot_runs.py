"""Learning curves of several runs: success and return vs env steps and vs wall-clock time.

    python scripts/plot_runs.py runs/a runs/b --out curves.png [--labels "L=2" "L=16"] [--smooth 5]
        [--metrics success commands_completed] [--x steps] [--eval-only]

Reads each run folder's ``metrics.jsonl``. Training curves are ``charts/success`` and
``charts/episodic_return`` (the sampling policy on training levels, smoothed by a moving average of
``--smooth`` updates); where a run logged periodic evaluation, ``eval/success`` and ``eval/return``
(held-out levels) are drawn as markers in the same colour. Wall-clock time is
``time/elapsed_seconds`` (training time summed over resumed segments; falls back to the row time
stamps). Needs matplotlib: ``pip install 'ppo_tbptt[plot]'``. Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from ppo_tbptt.logger import read_metrics  # noqa: E402

PANELS = [  # (row, train tag, eval tag, y label)
    (0, "charts/success", "eval/success", "success rate"),
    (1, "charts/episodic_return", "eval/return", "episodic return"),
]
METRICS = {"success": PANELS[0][1:], "return": PANELS[1][1:]}  # --metrics names with tags of their own


def panels_for(metrics: list[str]) -> list[tuple]:
    """The rows for ``--metrics``: ``success`` and ``return`` as above; any other NAME plots
    ``charts/NAME`` and ``eval/NAME`` (e.g. ``commands_completed``, ``num_fails``)."""
    return [(i, *METRICS.get(m, (f"charts/{m}", f"eval/{m}", m.replace("_", " "))))
            for i, m in enumerate(metrics)]


def series(rows: list[dict], tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(env steps, wall-clock seconds, values) of the rows that hold a finite ``tag``."""
    t0 = rows[0].get("time", 0.0) or 0.0
    steps, secs, vals = [], [], []
    for r in rows:
        v = r.get(tag)
        if v is None or not np.isfinite(v):
            continue
        steps.append(r["global_step"])
        secs.append(r.get("time/elapsed_seconds", (r.get("time") or t0) - t0))
        vals.append(v)
    return np.asarray(steps, float), np.asarray(secs, float), np.asarray(vals, float)


def steps_label(x: float, pos=None) -> str:
    """An env-step tick label: 950, 50k, 200k, 1.5M (raw numbers overlap from six digits on)."""
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:.3g}M"
    if a >= 1e3:
        return f"{x / 1e3:.3g}k"
    return f"{x:.3g}"


def smooth(v: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over up to ``window`` points (the first points average fewer)."""
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(runs: list[Path], labels: list[str], out: Path, window: int = 5, title: str | None = None,
         metrics: list[str] | None = None, x: str = "both", eval_only: bool = False) -> Path:
    """``metrics``: the rows (default success and return); ``x``: "steps", "time" or "both"
    columns; ``eval_only``: leave out the training curves (only the periodic evaluations)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'ppo_tbptt[plot]'") from None
    data = [read_metrics(r) for r in runs]
    # a row no run has data for (success, for a task without a success flag) is left out
    wanted = panels_for(metrics) if metrics else PANELS
    if eval_only:
        wanted = [(row, None, eval_tag, ylabel) for row, _, eval_tag, ylabel in wanted]
    panels = [p for p in wanted if any(len(series(rows, tag)[2]) for rows in data for tag in p[1:3] if tag)] or wanted
    xs = {"steps": [0], "time": [1], "both": [0, 1]}[x]
    fig, axes = plt.subplots(len(panels), len(xs), figsize=(4.5 * len(xs), 3 * len(panels)), sharey="row",
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (rows, label) in enumerate(zip(data, labels)):
        color = colors[i % len(colors)]
        for row, (_, train_tag, eval_tag, ylabel) in enumerate(panels):
            steps, secs, vals = series(rows, train_tag) if train_tag else ([], [], [])
            esteps, esecs, evals = series(rows, eval_tag)
            for col, which in enumerate(xs):
                xv, ex = ((steps, esteps), (secs, esecs))[which]
                ax = axes[row, col]
                if len(vals):
                    ax.plot(xv, smooth(vals, window), color=color, lw=1.5, label=f"{label} (train)")
                if len(evals):
                    ax.plot(ex, evals, color=color, ls="-" if eval_only else "none", marker="o", ms=4,
                            label=f"{label} (eval)")
                ax.set_ylabel(ylabel if col == 0 else "")
                ax.grid(alpha=0.3)
    for row in range(len(panels)):
        for col, which in enumerate(xs):
            if which == 0:
                axes[row, col].set_xlabel("env steps")
                axes[row, col].xaxis.set_major_formatter(FuncFormatter(steps_label))
            else:
                axes[row, col].set_xlabel("wall-clock seconds")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if not handles:
        handles, names = axes[-1, 0].get_legend_handles_labels()
    ncol = min(len(names), 2 * len(xs))  # two entries fit the width of one column of panels
    legend_rows = -(-len(names) // ncol) if names else 0
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    # room for the legend: 0.2 inch a row, and 0.2 more
    fig.tight_layout(rect=(0, (0.2 + 0.2 * legend_rows) / (3 * len(panels)), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot success and return vs env steps and wall-clock time.")
    p.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl files)")
    p.add_argument("--out", default="curves.png", help="output image (default curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window in updates (default 5; 1 = none)")
    p.add_argument("--title", default=None)
    p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help="one row per metric: success, return, or any NAME logged as charts/NAME and eval/NAME "
                        "(e.g. commands_completed); default: success return")
    p.add_argument("--x", choices=("steps", "time", "both"), default="both",
                   help="x axes: env steps, wall-clock seconds, or both columns (default)")
    p.add_argument("--eval-only", action="store_true",
                   help="only the periodic held-out evaluations (eval/*), joined by lines; no training curves")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    labels = args.labels or [r.name if r.is_dir() else r.parent.name for r in runs]
    if len(labels) != len(runs):
        print(f"error: {len(labels)} labels for {len(runs)} runs", file=sys.stderr)
        return 2
    try:
        out = plot(runs, labels, Path(args.out), args.smooth, args.title, args.metrics, args.x, args.eval_only)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
