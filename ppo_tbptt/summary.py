"""``python -m ppo_tbptt.summary RUN [--every SECONDS]``: a run's progress as a text table.

One row per interval of training wall-clock time (``time/elapsed_seconds``, summed over resumed
processes): env steps at the interval's end, steps/s over the interval, and the success rate and
return of the training episodes that ended in it (each episode counts once: the updates' means are
weighted by their episode counts, success by the episodes that report it), plus the latest
held-out evaluation where the run logged one. For a quick look at a run on a machine without
TensorBoard, and for reports.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .cli import add_common
from .logger import read_metrics


def _weighted(rows: list[dict], tag: str, count: str) -> float | None:
    """Mean of ``tag`` over the rows, each weighted by its ``count`` of episodes."""
    num = den = 0.0
    for r in rows:
        v, n = r.get(tag), r.get(count, r.get("charts/episodes"))
        if v is None or n is None or not math.isfinite(v):
            continue
        num += v * n
        den += n
    return num / den if den > 0 else None


def summarize(rows: list[dict], every: float) -> list[dict]:
    """Rows grouped by ``every`` seconds of training time -> one dict per non-empty interval."""
    if every <= 0:
        raise ValueError(f"--every must be > 0, got {every}")
    out: list[dict] = []
    prev_step, prev_time = 0, 0.0
    bucket: list[dict] = []

    def flush(end: int) -> None:
        nonlocal prev_step, prev_time, bucket
        last = bucket[-1]
        secs = last["time/elapsed_seconds"]
        evals = [r for r in bucket if r.get("eval/success") is not None or r.get("eval/return") is not None]
        out.append({
            "until_seconds": end * every, "elapsed_seconds": secs, "global_step": int(last["global_step"]),
            "steps_per_second": (last["global_step"] - prev_step) / max(secs - prev_time, 1e-9),
            "episodes": int(sum(r.get("charts/episodes") or 0 for r in bucket)),
            "success": _weighted(bucket, "charts/success", "charts/success_episodes"),
            "return": _weighted(bucket, "charts/episodic_return", "charts/episodes"),
            "eval_success": evals[-1].get("eval/success") if evals else None,
            "eval_return": evals[-1].get("eval/return") if evals else None,
        })
        prev_step, prev_time, bucket = int(last["global_step"]), secs, []

    current = None
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("global_step"), (int, float)):
            raise ValueError(f"metrics row {i} is not a trainer's row (an object with global_step)")
        secs = r.get("time/elapsed_seconds")
        if not isinstance(secs, (int, float)):
            raise ValueError(f"metrics row {i} lacks time/elapsed_seconds (written by the trainer at every update)")
        index = max(1, math.ceil(secs / every))  # interval (index-1)*every < secs <= index*every
        if current is not None and index != current:
            flush(current)
        current = index
        bucket.append(r)
    if bucket:
        flush(current)
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(summary: list[dict], every: float) -> str:
    unit = "min" if every % 60 == 0 else "s"
    scale = 60 if unit == "min" else 1
    lines = [f"| until ({unit}) | env steps | steps/s | episodes | success | return | eval success | eval return |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['until_seconds'] / scale:g} | {s['global_step']:,} | {s['steps_per_second']:,.0f} | "
                     f"{s['episodes']:,} | {_fmt(s['success'], '.3f')} | {_fmt(s['return'], '.3f')} | "
                     f"{_fmt(s['eval_success'], '.3f')} | {_fmt(s['eval_return'], '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.summary",
                                description="A run's progress as a text table: one row per interval of "
                                            "training time (env steps, steps/s, success, return, eval).")
    p.add_argument("run", help="run folder (or its metrics.jsonl)")
    p.add_argument("--every", type=float, default=60.0, help="interval of training time in seconds (default 60)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the rows as JSON")
    add_common(p)
    args = p.parse_args(argv)
    try:
        summary = summarize(read_metrics(Path(args.run)), args.every)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary, args.every))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
