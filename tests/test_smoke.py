"""The CLI end to end on a real MemoryGym config, shrunk to two updates on the CPU."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--set", "env.num_envs=2", "--set", "ppo.rollout_steps=16", "--set", "ppo.minibatches=2",
        "--set", "ppo.epochs=2", "--set", "model.hidden_size=32", "--set", "model.hidden_layer=32",
        "--set", "tbptt.sequence_length=8", "--set", "run.total_steps=64",
        "--set", "run.checkpoint_every=32"]


def run_cli(tmp_path, *extra):
    return subprocess.run([sys.executable, "-m", "ppo_tbptt.train", "--config", "mortar_mayhem_grid.yaml",
                           *TINY, "--set", f"run.out_dir={tmp_path}", "--device", "cpu", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_smoke_two_updates(tmp_path):
    r = run_cli(tmp_path, "--run-name", "smoke")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "smoke"
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in rows] == [32, 64]
    for row in rows:
        for key in ("time", "charts/SPS", "losses/policy", "losses/value", "losses/entropy",
                    "losses/approx_kl", "losses/clipfrac", "losses/explained_variance"):
            assert key in row, key
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_000000000032.pt", "step_000000000064.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["global_step"] == 64 and state["update"] == 2
    assert state["config"]["env"]["id"] == "MortarMayhem-Grid-v0"
    assert "update 2/2" in r.stdout and "SPS" in r.stdout and "ETA" in r.stdout
    assert r.stdout.splitlines()[1] == "starting 2 MortarMayhem-Grid-v0 envs (env.vector: pool)"
    log = (run / "train.log").read_text()  # the console's lines, time-stamped
    assert " update 2/2 | step 64/64 (100.0%) | SPS " in log and " done: 64 steps" in log
    # never overwrite an existing run
    again = run_cli(tmp_path, "--run-name", "smoke")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_default_run_name_from_config_and_seed(tmp_path):
    r = run_cli(tmp_path, "--set", "run.total_steps=32", "--set", "run.seed=7")
    assert r.returncode == 0, r.stderr
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("mortar_mayhem_grid__s7__")
