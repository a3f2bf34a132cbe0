"""``python -m ppo_tbptt.benchmark --config NAME --runs 1,2,4 [--seconds S] [--set ...]``

Several training runs side by side on this machine, as seeds or tuning trials are run in
parallel: for each count k, k processes of ``python -m ppo_tbptt.train`` (seeds ``run.seed``,
``run.seed + 1``, ...; no evaluation, no periodic checkpoints) start together. Once every one has
logged its first (warm-up) update, a window of ``--seconds`` is timed; when every run has logged an
update past its end, all of them are stopped (SIGTERM). A run's rate is its env steps inside the
window over the window's length, its step count read from its ``metrics.jsonl`` rows (the end of
each update) and interpolated linearly between them, so all k rates cover the same seconds.

The table gives each run's rate, their total, the total over the rate of one run alone, and each
run's share: its rate over (alone rate / k). k runs that split the machine evenly and lose nothing
in total have shares of 1.0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .benchmark_ranks import PACKAGE_ROOT, parse_counts

POLL_SECONDS = 0.25


def steps_at(rows: list[dict], t: float) -> float:
    """The env step count at wall time ``t``, linear between the metrics rows around it (rows
    are logged at the end of each update, in time order). ValueError outside the rows' span."""
    if not rows or t < rows[0]["time"] or t > rows[-1]["time"]:
        raise ValueError(f"time {t} is outside the logged updates")
    for a, b in zip(rows, rows[1:]):
        if a["time"] <= t <= b["time"]:
            span = b["time"] - a["time"]
            frac = (t - a["time"]) / span if span > 0 else 1.0
            return a["global_step"] + frac * (b["global_step"] - a["global_step"])
    return float(rows[-1]["global_step"])


def window_rate(rows: list[dict], t0: float, t1: float) -> dict:
    """Env steps per second of one run between wall times ``t0`` and ``t1``, with the mean
    collect and learn seconds of the updates that ended inside the window."""
    steps = steps_at(rows, t1) - steps_at(rows, t0)
    inside = [r for r in rows if t0 < r["time"] <= t1]
    out = {"steps_per_second": steps / (t1 - t0), "steps": steps, "updates_in_window": len(inside)}
    if inside:
        out["collect_seconds_per_update"] = sum(r["time/collect_seconds"] for r in inside) / len(inside)
        out["update_seconds_per_update"] = sum(r["time/update_seconds"] for r in inside) / len(inside)
    return out


def _rows(run_dir: Path) -> list[dict]:
    from .logger import read_metrics
    try:
        return read_metrics(run_dir)
    except ValueError:  # not written yet
        return []


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def side_by_side(config: str, overrides: list[str], seed: int, k: int, seconds: float,
                 start_timeout: float = 600.0, log=print) -> dict:
    """Start ``k`` training runs of ``config`` together, time ``seconds`` once all have logged an
    update, stop them; the rate of each in that window (:func:`window_rate`)."""
    with tempfile.TemporaryDirectory(prefix="ppo_tbptt_runs_") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(PACKAGE_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        procs, dirs, logs = [], [], []
        log(f"{k} run{'s' if k != 1 else ''} side by side: training {config} ...")
        try:
            for i in range(k):
                sets = [*overrides, f"run.seed={seed + i}", "run.total_steps=1000000000000",
                        f"run.max_seconds={seconds + start_timeout}", "run.checkpoint_every=0",
                        "run.eval_every=0", f"run.out_dir={tmp}"]
                # --exact: the config as given, not its run.cpu_config substitute on a machine without CUDA
                cmd = [sys.executable, "-m", "ppo_tbptt.train", "--config", config, "--exact",
                       "--run-name", f"run{i}", *[a for s in sets for a in ("--set", s)]]
                logs.append(tmp / f"run{i}.stderr")
                dirs.append(tmp / f"run{i}")
                with open(logs[-1], "w") as err:
                    procs.append(subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=err))

            def wait_until(done, timeout: float, what: str) -> list[list[dict]]:
                deadline = time.monotonic() + timeout
                while True:
                    rows = [_rows(d) for d in dirs]
                    if done(rows):
                        return rows
                    for i, p in enumerate(procs):
                        if p.poll() is not None:
                            raise RuntimeError(f"run {i} of {k} exited with code {p.returncode} before {what}:\n"
                                               f"{_tail(logs[i])}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{k} runs: no {what} within {timeout:g} s")
                    time.sleep(POLL_SECONDS)

            wait_until(lambda rows: all(rows), start_timeout, "its first update")
            t0 = time.time()
            t1 = t0 + seconds
            time.sleep(seconds)
            rows = wait_until(lambda rows: all(r[-1]["time"] >= t1 for r in rows), start_timeout,
                              "an update past the window")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        runs = [window_rate(r, t0, t1) for r in rows]
        return {"runs": runs, "total_steps_per_second": sum(r["steps_per_second"] for r in runs),
                "seconds": seconds}


def run_runs_benchmark(config: str, overrides: list[str], cfg, counts: list[int], seconds: float,
                       machine: str, log=print) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = {str(k): side_by_side(config, overrides, cfg.run.seed, k, seconds, log=log) for k in counts}
    alone = results.get("1", {}).get("total_steps_per_second")
    for k, res in results.items():
        if alone:
            res["total_vs_alone"] = res["total_steps_per_second"] / alone
            res["shares"] = [r["steps_per_second"] / (alone / int(k)) for r in res["runs"]]
    return {"machine": machine, "load_average_before": load,
            "config": {"name": config, "overrides": overrides, "num_envs": cfg.env.num_envs,
                       "rollout_steps": cfg.ppo.rollout_steps, "vector": cfg.env.vector,
                       "torch_threads": cfg.run.torch_threads},
            "environment": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
            "results": results}


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def format_runs(report: dict) -> str:
    c = report["config"]
    env = " ".join(f"{k}={v}" for k, v in report["environment"].items()) or "no thread variables set"
    load = report["load_average_before"]
    lines = [f"machine: {report['machine']}",
             f"config: {c['name']} {' '.join(c['overrides'])} ({c['num_envs']} envs x {c['rollout_steps']} steps, "
             f"env.vector {c['vector']}); {env}" + (f"; load average before: {load:.2f}" if load is not None else ""),
             "", "| runs | steps/s of each run | total steps/s | total vs alone | each run's share of alone / k |",
             "|---:|---|---:|---:|---|"]
    for k, res in report["results"].items():
        each = " / ".join(f"{r['steps_per_second']:,.0f}" for r in res["runs"])
        vs = f"{res['total_vs_alone']:.2f}" if "total_vs_alone" in res else "-"
        shares = " / ".join(f"{s:.2f}" for s in res["shares"]) if "shares" in res else "-"
        lines.append(f"| {k} | {each} | {res['total_steps_per_second']:,.0f} | {vs} | {shares} |")
    return "\n".join(lines)


def main_runs(args, cfg, device, overrides: list[str]) -> int:
    """``benchmark --runs``: exit 2 for bad input, 1 if a training run fails."""
    from .benchmark import machine_description
    if args.only or args.sweep or args.compare or args.ranks:
        print("error: --runs measures end-to-end training; it does not combine with --only, --sweep, "
              "--compare or --ranks", file=sys.stderr)
        return 2
    try:
        counts = parse_counts(args.runs, "--runs", "run counts")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        report = run_runs_benchmark(args.config, overrides, cfg, counts, args.seconds,
                                    machine_description(device), log)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_runs(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
