"""``python -m ppo_tbptt.benchmark --config NAME --ranks 1,2 [--seconds S] [--set ...]``

End-to-end training throughput as 1, 2, ... data-parallel ranks on this machine: for each rank
count W, ``torchrun --standalone --nproc_per_node=W -m ppo_tbptt.train`` trains the config (the
same ``env.num_envs`` in total, split over the ranks) for ``--seconds`` (``run.max_seconds``);
the rate is the env steps of every rank over the wall time between the first and the last
update's metrics row, so process start-up and the first (warm-up) update are left out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def parse_counts(text: str, flag: str = "--ranks", what: str = "rank counts") -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ValueError naming ``flag`` for anything else."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected {what} such as 1,2 — got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"{flag}: expected {what} >= 1 such as 1,2 — got {text!r}")
    return counts


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ValueError for anything else."""
    return parse_counts(text)


def rate_from_rows(rows: list[dict]) -> dict:
    """Steps per second between the first and the last metrics row (updates 2..n)."""
    if len(rows) < 2:
        raise ValueError("fewer than 2 updates were logged: raise --seconds")
    steps = rows[-1]["global_step"] - rows[0]["global_step"]
    seconds = rows[-1]["time"] - rows[0]["time"]
    later = rows[1:]
    return {"steps_per_second": steps / seconds, "steps": steps, "seconds": seconds, "updates": len(later),
            "collect_seconds_per_update": sum(r["time/collect_seconds"] for r in later) / len(later),
            "update_seconds_per_update": sum(r["time/update_seconds"] for r in later) / len(later)}


def measure(config: str, overrides: list[str], world: int, seconds: float, log=print) -> dict:
    """Train ``config`` as ``world`` torchrun ranks for ``seconds``; the rate of :func:`rate_from_rows`."""
    from .logger import read_metrics
    with tempfile.TemporaryDirectory(prefix="ppo_tbptt_ranks_") as tmp:
        sets = [*overrides, "run.total_steps=1000000000000", f"run.max_seconds={seconds}",
                "run.checkpoint_every=0", "run.eval_every=0", f"run.out_dir={tmp}"]
        # --exact: the config as given, not its run.cpu_config substitute on a machine without CUDA
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "ppo_tbptt.train", "--config", config, "--exact", "--run-name", "bench",
               *[a for s in sets for a in ("--set", s)]]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(PACKAGE_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        log(f"ranks {world}: training {config} for {seconds:g} s ...")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=seconds + 600)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{world} ranks: training exited with code {done.returncode}:\n{tail}")
        out = rate_from_rows(read_metrics(Path(tmp) / "bench"))
        out["wall_seconds"] = time.perf_counter() - t0
        return out


def run_ranks_benchmark(config: str, overrides: list[str], cfg, ranks: list[int], seconds: float,
                        machine: str, log=print) -> dict:
    results = {}
    for w in ranks:
        results[str(w)] = measure(config, overrides, w, seconds, log)
        results[str(w)]["envs_per_rank"] = cfg.env.num_envs // w
    return {"machine": machine, "config": {"name": config, "overrides": overrides, "num_envs": cfg.env.num_envs,
                                           "rollout_steps": cfg.ppo.rollout_steps, "vector": cfg.env.vector,
                                           "torch_threads": cfg.run.torch_threads}, "results": results}


def format_ranks(report: dict) -> str:
    c = report["config"]
    lines = [f"machine: {report['machine']}",
             f"config: {c['name']} {' '.join(c['overrides'])} ({c['num_envs']} envs in all x "
             f"{c['rollout_steps']} steps, env.vector {c['vector']})", "",
             "| ranks | envs per rank | steps/s | collect / learn s per update | vs 1 rank |",
             "|---|---|---|---|---|"]
    res = report["results"]
    base = res.get("1", next(iter(res.values())))["steps_per_second"]
    for w, r in res.items():
        lines.append(f"| {w} | {r['envs_per_rank']} | {r['steps_per_second']:,.0f} | "
                     f"{r['collect_seconds_per_update']:.3f} / {r['update_seconds_per_update']:.3f} | "
                     f"{r['steps_per_second'] / base:.2f}x |")
    return "\n".join(lines)


def main_ranks(args, cfg, device, overrides: list[str]) -> int:
    """``benchmark --ranks``: exit 2 for bad input, 1 if a training run fails."""
    from .benchmark import machine_description
    from .distributed import config_problems
    if args.only or args.sweep or args.compare:
        print("error: --ranks measures end-to-end training; it does not combine with --only, --sweep or "
              "--compare", file=sys.stderr)
        return 2
    try:
        ranks = parse_ranks(args.ranks)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = [p for w in ranks for p in config_problems(cfg, w)]
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        report = run_ranks_benchmark(args.config, overrides, cfg, ranks, args.seconds,
                                     machine_description(device), log)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_ranks(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
