"""The throughput benchmark runs every measurement and reports consistent figures (tiny, on a CPU)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall",
                        "--set", "env.vector=pool", "--set", "env.num_envs=4", "--set", "ppo.rollout_steps=16",
                        "--set", "ppo.minibatches=2", "--set", "run.torch_threads=1", "--seconds", "0.3",
                        "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    res = report["results"]
    assert list(res) == ["env_only", "async_env_only", "collect", "async_collect", "train", "async_train"]
    assert all(v["steps_per_second"] > 0 for v in res.values())
    assert res["train"]["updates"] >= 1 and res["collect"]["rollouts"] >= 1
    assert report["config"]["batch"] == 64 and "pool: " in report["config"]["vector"]
    base = res["env_only"]["steps_per_second"]
    table = r.stdout
    assert "| measurement | envs | steps/s | ratio to env-only |" in table
    for v in res.values():  # every row printed with its ratio to the env-only ceiling
        assert f"| {v['steps_per_second']:,.0f} | {v['steps_per_second'] / base:.2f} |" in table


def test_benchmark_bad_input_exit_2():
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall",
                        "--set", "env.num_envs=0"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "env.num_envs" in r.stderr and "Traceback" not in r.stderr
