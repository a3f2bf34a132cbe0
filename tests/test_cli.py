"""The command lines as a new user meets them: messages, exit codes, what reaches the console."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from eval_helpers import TINY
from ppo_tbptt import train as train_cli


def train(tmp_path: Path, *extra: str, name: str | None = "r", args: tuple = ()) -> int:
    """``python -m ppo_tbptt.train --config cue_recall`` with the tiny settings, in this process."""
    sets = [a for o in TINY + [f"run.out_dir={tmp_path}", *extra] for a in ("--set", o)]
    return train_cli.main(["--config", "cue_recall", *sets, *(["--run-name", name] if name is not None else []), *args])


def test_periodic_evaluation_prints_a_line_per_evaluation(tmp_path, capsys):
    assert train(tmp_path, "run.total_steps=256", "run.eval_every=128", "run.eval_episodes=4") == 0
    lines = capsys.readouterr().out.splitlines()
    evals = [i for i, line in enumerate(lines) if line.startswith("eval at step")]
    assert len(evals) == 2
    assert lines[evals[0] - 1].startswith("update 2/4 | step 128/256")  # right after its update
    first = lines[evals[0]]
    assert first.startswith("eval at step 128 (4 held-out episodes) | success ") and "(95% CI " in first
    assert "| return " in first and "| length " in first and first.endswith("new best: checkpoints/best.pt")
    assert lines[evals[1]].startswith("eval at step 256 (4 held-out episodes)")
    assert "eval at step 256" in (tmp_path / "r" / "train.log").read_text()


def test_total_steps_round_up_to_whole_updates_visibly(tmp_path, capsys):
    """64 env steps per update (4 envs x 16): 10 trains one update, 100 trains two; the start says
    so and the percentages end at 100%, not 1024%."""
    assert train(tmp_path, "run.total_steps=10", name="a") == 0
    out = capsys.readouterr().out
    assert ("note: run.total_steps = 10 is less than one update of 64 env steps: training 1 update = "
            "64 steps") in out
    assert "update 1/1 | step 64/64 (100.0%)" in out and "done: 64 steps" in out
    assert train(tmp_path, "run.total_steps=100", name="b") == 0
    out = capsys.readouterr().out
    assert ("note: run.total_steps = 100 is not a whole number of updates of 64 env steps: training "
            "2 updates = 128 steps") in out
    assert "update 2/2 | step 128/128 (100.0%)" in out
    assert train(tmp_path, "run.total_steps=128", name="c") == 0
    assert "note:" not in capsys.readouterr().out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_resume_errors_name_the_config_field_and_what_a_resume_may_change(tmp_path, capsys):
    assert train(tmp_path, "run.total_steps=64") == 0
    run = str(tmp_path / "r")
    capsys.readouterr()
    assert train_cli.main(["--resume", run, "--set", "env.num_envs=2"]) == 2
    err = one_line_error(capsys)
    assert "env.num_envs: the run has 4, the resume asks for 2; a resume cannot change it" in err
    assert "a resume may change run.*, ppo.*, tbptt.*" in err
    assert train_cli.main(["--resume", run, "--set", "model.hidden_size=24", "--set", "env.kwargs.delay=5"]) == 2
    err = one_line_error(capsys)
    assert "model.hidden_size: the run has 16, the resume asks for 24" in err and "env.kwargs: the run has" in err
    # the memoryless ablation: same weights, but a resume that switches it would splice two experiments
    assert train_cli.main(["--resume", run, "--set", "model.memoryless=true"]) == 2
    assert "model.memoryless: the run has False, the resume asks for True" in one_line_error(capsys)
    assert train_cli.main(["--resume", run, "--set", "ppo.nope=1"]) == 2  # an unknown field: as for a new run
    assert "ppo.nope: unknown key" in one_line_error(capsys)
    # what may change does: another learning rate, the envs in a pool, a longer run
    assert train_cli.main(["--resume", run, "--set", "ppo.lr=1e-4", "--set", "env.vector=pool",
                           "--set", "env.envs_per_worker=2", "--set", "run.total_steps=128"]) == 0


def test_extending_a_run_keeps_its_schedules_and_records_the_config(tmp_path, capsys):
    """cue_recall anneals lr 2e-3 -> 1e-4 and the entropy coefficient 0.01 -> 1e-4 over
    run.total_steps. Trained to 128 steps and extended to 256, the schedules must not jump back
    (they would: lr 1.05e-3 at step 128 over the new total); config.yaml records the pinned
    horizon and the new total."""
    import yaml

    from eval_helpers import metric_rows
    assert train(tmp_path, "run.total_steps=128") == 0
    run = tmp_path / "r"
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--set", "run.total_steps=256"]) == 0
    out, err = capsys.readouterr()
    assert ("note: run.total_steps 128 -> 256: ppo.lr, ppo.ent_coef keep the horizon of 128 steps they had "
            "(steps: 128 in config.yaml)") in out
    assert "warning" not in err
    rows = metric_rows(run)
    assert [r["global_step"] for r in rows] == [64, 128, 192, 256]
    assert rows[1]["charts/learning_rate"] > 1e-4 * 1.5  # still annealing in the first part
    for r in rows[2:]:  # at the end of the schedule: final values, not back up
        assert r["charts/learning_rate"] == pytest.approx(1e-4) and r["charts/ent_coef"] == pytest.approx(1e-4)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["total_steps"] == 256 and saved["ppo"]["lr"]["steps"] == 128
    assert saved["ppo"]["ent_coef"]["steps"] == 128
    # re-planning a schedule on purpose is allowed, and said loudly
    assert train_cli.main(["--resume", str(run), "--set", "run.total_steps=512",
                           "--set", "ppo.lr.steps=512"]) == 0
    out, err = capsys.readouterr()
    assert "warning: ppo.lr at step 256 changes from 0.0001 to 0.00105: the resume changes its schedule" in err
    assert "note: run.total_steps" not in out  # both carry their horizon now: nothing to pin
    assert metric_rows(run)[4]["charts/learning_rate"] == pytest.approx(2e-3 + 0.5 * (1e-4 - 2e-3))


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    assert train(tmp_path, "run.total_steps=128") == 0
    run = str(tmp_path / "r")
    capsys.readouterr()
    assert train_cli.main(["--resume", run]) == 0  # (a job script that resumes until done: exit 0)
    out = capsys.readouterr().out
    assert out.startswith(f"nothing to train: {run} has trained 128 env steps of its run.total_steps 128; "
                          f"to train further: python -m ppo_tbptt.train --resume {run} --set run.total_steps=N "
                          "(N > 128)")
    assert "starting" not in out and "done" not in out  # no env was started
    assert train_cli.main(["--resume", run, "--set", "run.total_steps=64"]) == 2
    err = one_line_error(capsys)
    assert "run.total_steps=64 is not above the 128 env steps" in err and "N > 128" in err


def test_bad_out_dir_is_one_error_line(tmp_path, capsys):
    """An existing file, a file as a parent, an unreachable parent, a folder no one may write to."""
    import os
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [(a_file, ["is a file, not a folder"]), (a_file / "runs", ["is a file, not a folder"]),
             ("/proc/self/no/such/runs", ["No such file or directory"]),
             ("/sys/ppo_tbptt_runs", ["Operation not permitted", "Permission denied"])]
    if os.geteuid() != 0:  # (root may write anywhere)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked, ["Permission denied"]))
    for out_dir, why in cases:
        assert train(tmp_path, f"run.out_dir={out_dir}") == 2, out_dir
        err = one_line_error(capsys)
        assert err.startswith(f"error: run.out_dir='{out_dir}': cannot create the run folder "), err
        assert any(w in err for w in why), err


def test_run_names_that_leave_the_out_dir_are_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    for name in ["../escaped", "a/b", "/abs", "..", ".", "", " x"]:
        assert train(out, name=name) == 2, name
        err = one_line_error(capsys)
        assert err.startswith(f"error: --run-name {name!r}: must be a single folder name inside run.out_dir"), err
    assert train(out, "run.name=../up") == 2  # a config field: reported with the config's problems
    err = capsys.readouterr().err
    assert "run.name: a prefix of the run folder's name must not leave run.out_dir" in err and "Traceback" not in err
    assert not (tmp_path / "escaped").exists() and not out.exists()  # nothing was created anywhere


ENTRY_POINTS = ["train", "evaluate", "summary", "benchmark", "export", "tune"]


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_every_entry_point_has_version_and_plain_help(command, capsys):
    import importlib

    import ppo_tbptt
    mod = importlib.import_module(f"ppo_tbptt.{command}")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"ppo_tbptt {ppo_tbptt.__version__}"
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and f"python -m ppo_tbptt.{command}" in text
    assert "``" not in text and "--version" in text


@pytest.mark.parametrize("command", ["train", "evaluate", "benchmark"])
def test_device_takes_what_run_device_takes(command, capsys):
    import importlib
    mod = importlib.import_module(f"ppo_tbptt.{command}")
    first = {"train": ["--config", "cue_recall"], "evaluate": ["runs/x"], "benchmark": ["--config", "cue_recall"]}
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert mod.parse_args([*first[command], "--device", device]).device == device
    with pytest.raises(SystemExit) as exc:
        mod.parse_args([*first[command], "--device", "gpu"])
    assert exc.value.code == 2 and "expected auto (cuda if present), cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_evaluate_and_train_both_default_to_auto():
    from ppo_tbptt import evaluate
    assert evaluate.parse_args(["runs/x"]).device == "auto"
    assert train_cli.load("cue_recall").run.device == "cpu"  # (cue_recall asks for the CPU itself)
    assert train_cli.load("mortar_mayhem_grid").run.device == "auto"


def test_python_m_ppo_tbptt_lists_the_commands_instead_of_training(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: python -m ppo_tbptt COMMAND")
    assert all(f"  {c}" in r.stderr for c in ENTRY_POINTS) and not list(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt", "--version"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ppo_tbptt ")
    from ppo_tbptt.__main__ import main
    assert main(["nope"]) == 2
    with pytest.raises(SystemExit) as exc:  # a command runs with the rest of the arguments
        main(["summary", "--version"])
    assert exc.value.code == 0


def test_list_configs_names_every_shipped_config(capsys):
    from ppo_tbptt.config import CONFIG_DIR
    assert train_cli.main(["--list-configs"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert names and all(f"  {n}  " in out for n in names)
    assert re.search(r"mortar_mayhem_grid\.yaml +MortarMayhem-Grid-v0, 32 envs x 512 steps, GRU 512", out)
    assert "invalid" not in out


def test_print_config_shows_the_resolved_config_without_training(tmp_path, capsys):
    import yaml
    out_dir = tmp_path / "runs"
    assert train_cli.main(["--config", "cue_recall", "--set", "ppo.lr=1e-3", "--set", f"run.out_dir={out_dir}",
                           "--device", "cpu", "--print-config"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)  # plain YAML: usable as a --config file
    assert cfg["ppo"]["lr"]["initial"] == 1e-3 and cfg["env"]["id"] == "CueRecall-v0"
    assert text.startswith("# ") and "--set ppo.lr=1e-3" in text.splitlines()[0]
    assert not out_dir.exists()  # no run folder, nothing trained
    (tmp_path / "again.yaml").write_text(text)
    assert train_cli.load(str(tmp_path / "again.yaml")).ppo.lr.initial == 1e-3
    assert train_cli.main(["--config", "cue_recall", "--set", "ppo.nope=1", "--print-config"]) == 2
    assert "ppo.nope: unknown key" in capsys.readouterr().err
    # a resume: what it would use, with its notes
    assert train(tmp_path, "run.total_steps=64") == 0
    capsys.readouterr()
    assert train_cli.main(["--resume", str(tmp_path / "r"), "--set", "run.total_steps=128", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "# note: run.total_steps 64 -> 128" in text and yaml.safe_load(text)["ppo"]["lr"]["steps"] == 64
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_000000000064.pt"]


def test_published_grid_configs_train_their_cpu_variant_without_cuda(capsys, monkeypatch):
    """Without CUDA, `--config mortar_mayhem_grid.yaml` (run.device auto) resolves to its
    run.cpu_config and says so; --exact or an explicit --device cpu keep the config as it is."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, sub in (("mortar_mayhem_grid.yaml", "mortar_mayhem_grid_cpu.yaml"),
                      ("mystery_path_grid.yaml", "mystery_path_grid_cpu.yaml")):
        assert train_cli.main(["--config", name, "--print-config"]) == 0
        out = capsys.readouterr().out
        assert f"no CUDA device: training {sub} instead of {name}" in out and "--exact" in out
        assert "downsample: 4" in out and "hidden_size: 256" in out
        for extra in (["--exact"], ["--device", "cpu"]):
            assert train_cli.main(["--config", name, "--print-config", *extra]) == 0
            out = capsys.readouterr().out
            assert "no CUDA device" not in out and "hidden_size: 512" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_cli.main(["--config", "mortar_mayhem_grid.yaml", "--print-config"]) == 0
    assert "hidden_size: 512" in capsys.readouterr().out  # with a GPU: the published settings


def test_cpu_substitute_trains_and_names_itself(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = train_cli.main(["--config", "mortar_mayhem_grid", "--set", f"run.out_dir={tmp_path}",
                           "--set", "env.num_envs=2", "--set", "env.vector=serial", "--set", "ppo.rollout_steps=16",
                           "--set", "ppo.minibatches=1", "--set", "run.total_steps=32", "--set", "run.eval_every=0",
                           "--set", "run.torch_threads=1", "--run-name", "sub"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("no CUDA device: training mortar_mayhem_grid_cpu.yaml") < out.index("run folder:")
    saved = (tmp_path / "sub" / "config.yaml").read_text()
    assert "downsample: 4" in saved and "command_count" in saved


def test_a_cpu_config_that_does_not_exist_is_a_config_error():
    from ppo_tbptt import config as C
    with pytest.raises(C.ConfigError, match="run.cpu_config"):
        C.load("cue_recall", ["run.cpu_config=nope.yaml"])
