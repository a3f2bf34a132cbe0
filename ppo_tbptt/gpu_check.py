"""``python -m ppo_tbptt.gpu_check OUT_DIR [--dry-run] [--budget S]``: every GPU figure in one call.

On a machine with CUDA it runs, one after the other and within ``--budget`` seconds in all
(default 480): the ``gpu``-marked tests, a benchmark sweep of env x rollout layouts for
``mortar_mayhem_grid.yaml``, the side-by-side benchmark of the published model and the grid fast
path, and a timed training run of the published config with its per-minute summary. Every
command, its exit code, wall time and output go into ``OUT_DIR/report.md``; the machine-readable
figures into ``OUT_DIR/*.json``; the training run into ``OUT_DIR/runs``. The report ends with the
published GPU target (>= 50,000 env steps/s end to end with the published model) against the best
layout measured.

Each step gets a share of the budget as its timeout, and a step that no longer fits is skipped
(and says so), so the whole check never overruns the device's time limit. ``--dry-run`` runs the
same steps with tiny settings on whatever device there is (a CPU in CI): it checks the logic, its
figures mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

TARGET_STEPS_PER_SECOND = 50_000


@dataclasses.dataclass
class Step:
    name: str
    argv: list
    share: float          # fraction of the budget this step may take
    json_out: str | None = None


def plan(out: Path, dry_run: bool) -> list[Step]:
    """The steps, with their commands: full settings, or tiny ones for ``--dry-run``."""
    py = sys.executable
    runs = out / "runs"
    if dry_run:
        cfg = ["--config", "cue_recall", "--set", "env.vector=pool", "--set", "env.num_envs=4",
               "--set", "ppo.rollout_steps=16", "--set", "ppo.minibatches=2", "--set", "run.torch_threads=1"]
        sweep = ["4x16,8x8"]
        seconds, train_seconds = "0.3", "3"
        train_cfg = ["--config", "cue_recall", "--set", "run.torch_threads=1"]
        compare = ["--config", "cue_recall", "--compare", "cue_recall", "--set", "env.num_envs=4",
                   "--set", "ppo.rollout_steps=16", "--set", "ppo.minibatches=2", "--set", "run.torch_threads=1"]
        tests = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_model.py"]
    else:
        cfg = ["--config", "mortar_mayhem_grid"]
        sweep = ["32x512,64x256,128x128"]
        seconds, train_seconds = "10", "120"
        train_cfg = ["--config", "mortar_mayhem_grid", "--set", "env.num_envs=64", "--set", "ppo.rollout_steps=256"]
        compare = ["--config", "mortar_mayhem_grid", "--compare", "mortar_mayhem_grid_cpu"]
        tests = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    return [
        Step("gpu tests", tests, 0.25),
        Step("benchmark sweep", [py, "-m", "ppo_tbptt.benchmark", *cfg, "--sweep", *sweep, "--seconds", seconds,
                                 "--json", str(out / "sweep.json")], 0.30, "sweep.json"),
        Step("published model vs grid fast path",
             [py, "-m", "ppo_tbptt.benchmark", *compare, "--seconds", seconds, "--json", str(out / "compare.json")],
             0.15, "compare.json"),
        Step("timed training run", [py, "-m", "ppo_tbptt.train", *train_cfg, "--set", f"run.max_seconds={train_seconds}",
                                    "--set", f"run.out_dir={runs}", "--set", "run.checkpoint_every=0",
                                    "--run-name", "timed"], 0.25),
        Step("per-minute summary", [py, "-m", "ppo_tbptt.summary", str(runs / "timed"), "--every",
                                    "1" if dry_run else "60", "--json", str(out / "summary.json")], 0.05, "summary.json"),
    ]


def machine() -> str:
    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    try:
        import torch
        lines.append(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            lines.append(f"GPU: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    except Exception as exc:  # the report must still be written
        lines.append(f"torch not importable: {exc}")
    lines.append(f"CPU cores usable: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}")
    return "\n".join(lines)


def run_step(step: Step, timeout: float, cwd: Path) -> dict:
    t0 = time.monotonic()
    try:
        r = subprocess.run(step.argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        code, output = r.returncode, r.stdout + ("\n" + r.stderr if r.stderr.strip() else "")
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        output = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        output += f"\n(stopped after its {timeout:.0f} s share of the budget)"
    return {"name": step.name, "command": shlex.join(map(str, step.argv)), "exit": code,
            "seconds": time.monotonic() - t0, "output": output}


def best_end_to_end(out: Path) -> tuple[float, str] | None:
    """The fastest end-to-end layout of the sweep: (steps/s, layout)."""
    path = out / "sweep.json"
    if not path.is_file():
        return None
    sweep = json.loads(path.read_text())
    best = None
    for rep in sweep.get("layouts", []):
        rate = rep["results"]["train"]["steps_per_second"]
        layout = f"{rep['config']['num_envs']} envs x {rep['config']['rollout_steps']} steps"
        if best is None or rate > best[0]:
            best = (rate, layout)
    return best


def write_report(out: Path, results: list[dict], budget: float, dry_run: bool, header: str) -> Path:
    lines = ["# GPU check" + (" (dry run: tiny settings, figures mean nothing)" if dry_run else ""), "",
             "```", header, "```", "", f"budget {budget:.0f} s, used {sum(r['seconds'] for r in results):.0f} s", "",
             "| step | exit | seconds |", "|---|---|---:|"]
    lines += [f"| {r['name']} | {r['exit']} | {r['seconds']:.1f} |" for r in results]
    best = best_end_to_end(out)
    lines += ["", "## Target", ""]
    if best is None:
        lines.append(f"target >= {TARGET_STEPS_PER_SECOND:,} steps/s end to end: not measured (the sweep did not finish)")
    else:
        verdict = "met" if best[0] >= TARGET_STEPS_PER_SECOND else "not met"
        lines.append(f"best end to end: {best[0]:,.0f} steps/s ({best[1]}); target >= "
                     f"{TARGET_STEPS_PER_SECOND:,} steps/s: {verdict}")
    for r in results:
        lines += ["", f"## {r['name']}", "", f"`{r['command']}`", "", f"exit {r['exit']}, {r['seconds']:.1f} s", "",
                  "```", r["output"].rstrip()[-20000:], "```"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for report.md, the JSON figures and the training run (created)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    p.add_argument("--dry-run", action="store_true", help="tiny settings on any device: checks the logic only")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be > 0")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create {out}: {exc}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    header = machine()
    print(header, flush=True)
    start = time.monotonic()
    results = []
    steps = plan(out.resolve(), args.dry_run)
    for step in steps:
        left = args.budget - (time.monotonic() - start)
        timeout = min(step.share * args.budget, left)
        if timeout < 1:
            results.append({"name": step.name, "command": shlex.join(map(str, step.argv)), "exit": "skipped",
                            "seconds": 0.0, "output": "skipped: the budget is spent"})
            continue
        print(f"[{time.monotonic() - start:5.0f} s] {step.name} (up to {timeout:.0f} s) ...", flush=True)
        results.append(run_step(step, timeout, root))
        print(f"        exit {results[-1]['exit']} after {results[-1]['seconds']:.1f} s", flush=True)
        write_report(out, results, args.budget, args.dry_run, header)  # a killed check still leaves a report
    path = write_report(out, results, args.budget, args.dry_run, header)
    print(f"wrote {path}")
    failed = [r["name"] for r in results if r["exit"] not in (0, "skipped")]
    if failed:
        print(f"steps that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
