"""The GPU check's logic, in its dry-run mode on the CPU: every step runs, the report holds them."""
import json
import os
import subprocess
import sys
from pathlib import Path

from ppo_tbptt import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_one_report_with_every_step(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run", "--budget", "240"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = (out / "report.md").read_text()
    for step in ("gpu tests", "benchmark sweep", "published model vs grid fast path", "timed training run",
                 "per-minute summary"):
        assert f"| {step} | 0 |" in report, report[:2000]
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(s["config"]["num_envs"], s["config"]["rollout_steps"]) for s in sweep["layouts"]] == [(4, 16), (8, 8)]
    best = max(s["results"]["train"]["steps_per_second"] for s in sweep["layouts"])
    assert f"best end to end: {best:,.0f} steps/s" in report and "target >= 50,000 steps/s: not met" in report
    assert json.loads((out / "summary.json").read_text())
    assert (out / "runs" / "timed" / "metrics.jsonl").is_file()


def test_steps_that_no_longer_fit_are_skipped(tmp_path, monkeypatch):
    calls = []

    def fake_run(step, timeout, cwd):
        calls.append((step.name, timeout))
        import time
        time.sleep(0.6)
        return {"name": step.name, "command": "x", "exit": 0, "seconds": 0.6, "output": ""}

    monkeypatch.setattr(gpu_check, "run_step", fake_run)
    assert gpu_check.main([str(tmp_path), "--dry-run", "--budget", "2"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| per-minute summary | skipped |" in report
    assert all(t <= 2 * share for (_, t), share in zip(calls, [0.25, 0.30, 0.15, 0.25]))
    assert "not measured" in report


def test_a_failing_step_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_step", lambda step, timeout, cwd: {
        "name": step.name, "command": "x", "exit": 3 if step.name == "gpu tests" else 0, "seconds": 0.0,
        "output": "boom"})
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 1
    assert "| gpu tests | 3 |" in (tmp_path / "report.md").read_text()
