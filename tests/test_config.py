import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppo_tbptt import config as C

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["mortar_mayhem_grid.yaml", "mystery_path_grid.yaml", "mortar_mayhem.yaml",
                                  "mystery_path.yaml", "cue_recall.yaml"])
def test_shipped_configs_load(name):
    cfg = C.load(name)
    assert cfg.env.num_envs >= 1
    assert isinstance(cfg.ppo.lr.initial, float)


def test_name_without_suffix_and_path():
    assert C.load("cue_recall") == C.load(str(ROOT / "ppo_tbptt" / "configs" / "cue_recall.yaml"))


def test_scientific_notation_reads_as_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ppo:\n  lr: 3e-4\n  ent_coef: {initial: 1e-3, final: 1e-6}\n")
    cfg = C.load(str(p))
    assert cfg.ppo.lr.initial == pytest.approx(3e-4)
    assert cfg.ppo.ent_coef.final == pytest.approx(1e-6)
    assert cfg.ppo.ent_coef.kind == "linear"


def test_overrides_reach_into_mappings():
    cfg = C.load("cue_recall.yaml", ["env.kwargs.delay=12", "ppo.lr=3e-4", "tbptt.sequence_length=20",
                                     "env.train_seeds=5:10"])
    assert cfg.env.kwargs == {"num_cues": 4, "delay": 12}
    assert cfg.ppo.lr.initial == pytest.approx(3e-4)
    assert cfg.env.train_seeds == (5, 10)


def test_schedules():
    s = C.Schedule(1.0, 0.0, "linear", steps=100)
    assert s.value(0, 10) == 1.0 and s.value(50, 10) == pytest.approx(0.5) and s.value(500, 10) == 0.0
    p = C.Schedule(1.0, 0.0, "polynomial", power=2.0, steps=0)
    assert p.value(5, 10) == pytest.approx(0.25)
    assert C.Schedule(0.3).value(123, 10) == 0.3


def test_every_problem_reported_together(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "env:\n  num_envs: 2\n  bogus: 1\n"
        "model:\n  core: transformer\n  hidden_size: big\n"
        "tbptt:\n  sequence_length: 8\n"
        "ppo:\n  rollout_steps: 16\n  minibatches: 5\n  gamma: 1.5\n"
        "extra_section: {}\n")
    with pytest.raises(C.ConfigError) as ei:
        C.load(str(p))
    msg = str(ei.value)
    for fragment in ("env.bogus", "model.core", "model.hidden_size", "ppo.gamma", "extra_section",
                     "ppo.minibatches: 5 minibatches but a rollout may hold only 2 envs x ceil(16 steps / tbptt.sequence_length 8) = 2 x 2 = 4"):
        assert fragment in msg, (fragment, msg)
    assert len(ei.value.problems) == 6


def test_cli_bad_config_exit_2_without_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("ppo:\n  epochs: 0\n  lr: fast\nrun:\n  device: tpu\n")
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.train", "--config", str(p),
                        "--set", "env.num_envs=-1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    for fragment in ("ppo.epochs", "ppo.lr", "run.device", "env.num_envs"):
        assert fragment in r.stderr
    assert r.stderr.count("\n  - ") == 4


def test_unknown_config_name_lists_known():
    with pytest.raises(C.ConfigError) as ei:
        C.load("no_such_config")
    assert "cue_recall.yaml" in str(ei.value)


def test_seed_range_override_stays_a_range():
    """PyYAML reads '10:20' as the base-60 integer 620; a --set range must stay 'A:B'."""
    assert yaml.safe_load("10:20") == 620  # the trap
    raw, problems = C.apply_overrides({}, ["env.train_seeds=10:20", "env.eval_seeds= 500:900 "])
    assert not problems and raw["env"] == {"train_seeds": "10:20", "eval_seeds": "500:900"}
    cfg = C.load("cue_recall", ["env.train_seeds=10:20", "env.eval_seeds=500:900"])
    assert cfg.env.train_seeds == (10, 20) and cfg.env.eval_seeds == (500, 900)


def test_eval_seeds_must_be_held_out():
    with pytest.raises(C.ConfigError, match="overlaps env.train_seeds"):
        C.load("cue_recall", ["env.train_seeds=0:100", "env.eval_seeds=50:150"])
    assert C.load("cue_recall", ["env.train_seeds=0:100", "env.eval_seeds=100:150"]).env.eval_seeds == (100, 150)


def test_non_finite_numbers_are_rejected():
    with pytest.raises(C.ConfigError) as ei:
        C.load("cue_recall", ["ppo.vf_coef=.nan", "ppo.gamma=.inf"])
    assert "ppo.vf_coef: expected a finite number" in str(ei.value)
    assert "ppo.gamma: expected a finite number" in str(ei.value)


@pytest.mark.parametrize("bad,vector", [("env.kwargs.bogus=1", "serial"), ("env.kwargs.delay=-1", "serial"),
                                        ("env.id=Nope-v0", "serial"), ("env.kwargs.bogus=1", "pool")])
def test_cli_unbuildable_env_exit_2_and_no_run_folder(tmp_path, bad, vector):
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.train", "--config", "cue_recall", "--set", bad,
                        "--set", f"env.vector={vector}", "--set", "env.num_envs=2",
                        "--set", f"run.out_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: cannot build env") and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_collect_threads_auto_gives_worker_envs_the_cores_and_a_setting_wins():
    import torch
    from ppo_tbptt.trainer import collect_threads
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pool, serial = C.load("cue_recall", ["env.vector=pool"]), C.load("cue_recall", ["env.vector=serial"])
    assert collect_threads(pool, cpu, 4) == 1  # the policy's small batches would take the workers' cores
    assert collect_threads(C.load("cue_recall", ["env.vector=gym_async"]), cpu, 4) == 1
    assert collect_threads(serial, cpu, 4) == 4  # nothing else runs: as for learning
    assert collect_threads(pool, cuda, 4) == 4
    assert collect_threads(C.load("cue_recall", ["env.vector=pool", "run.collect_threads=3"]), cpu, 4) == 3
    with pytest.raises(C.ConfigError, match="run.collect_threads: must be >= 0"):
        C.load("cue_recall", ["run.collect_threads=-1"])


def test_the_trainer_collects_with_its_collect_threads_and_learns_with_torch_threads(tmp_path):
    import torch
    from ppo_tbptt.trainer import Trainer
    cfg = C.load("cue_recall", ["env.num_envs=2", "ppo.rollout_steps=8", "ppo.minibatches=1",
                                "run.torch_threads=2", "run.collect_threads=1", "run.device=cpu"])
    before = torch.get_num_threads()
    tr = Trainer(cfg, tmp_path / "run", torch.device("cpu"), log=False, quiet=True)
    seen = []
    collect = tr.collector.collect
    tr.collector.collect = lambda: (seen.append(torch.get_num_threads()), collect())[1]
    try:
        tr.train_update()
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        tr.close()
        torch.set_num_threads(before)
