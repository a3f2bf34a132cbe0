"""``train --fork``: a new run from another run's checkpoint, with any field changed (curriculum
stages and reset parameters too), the original left as it is."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from eval_helpers import tiny_config
from ppo_tbptt import checkpoint as ckpt
from ppo_tbptt import train as train_cli
from ppo_tbptt.config import ConfigError
from ppo_tbptt.trainer import Trainer

# stage 1 is reached after the first update (64 steps), and a 128-step run ends in it
STAGES = ["curriculum.stages=[{delay: 0}, {delay: 1}, {}]", "curriculum.window=8",
          "curriculum.threshold=0.2", "curriculum.share=0.5", "curriculum.min_updates=1"]
FORK_STAGES = "curriculum.stages=[{delay: 0}, {delay: 2}, {}]"


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("origin") / "run"
    t = Trainer(tiny_config(*STAGES, "run.total_steps=128", "run.checkpoint_every=64"), run,
                torch.device("cpu"), quiet=True)
    t.train(handle_signals=False)
    assert t.promotion.stage == 1 and t.global_step == 128
    return run


def files_of(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_fork_takes_weights_optimizer_counters_and_stage_and_plays_the_new_stages(origin, tmp_path):
    path = ckpt.latest_checkpoint(origin)
    state = ckpt.load_checkpoint(path)
    cfg = tiny_config(FORK_STAGES, "curriculum.window=8", "curriculum.threshold=0.2", "curriculum.share=0",
                      "curriculum.min_updates=1", "run.total_steps=256")
    t = Trainer(cfg, tmp_path / "fork", torch.device("cpu"), quiet=True, fork=state, fork_path=path)
    for k, v in state["model"].items():
        assert torch.equal(t.model.state_dict()[k], v), k
    assert t.optimizer.state_dict()["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert torch.equal(t.optimizer.state_dict()["state"][0]["exp_avg_sq"],
                       state["optimizer"]["state"][0]["exp_avg_sq"])
    assert (t.global_step, t.update) == (128, 2)
    p = t.promotion
    assert p.stage == 1 and p.history == state["curriculum"]["history"]
    assert len(state["curriculum"]["successes"]) > 0 and len(p.successes) == 0  # the window starts afresh
    # every env plays the fork's stage 1 from its first episode on, with a fresh recurrent state
    assert [e._options for e in t.envs.envs] == [{"delay": 2}] * cfg.env.num_envs
    assert bool(t.collector.episode_start.all()) and not t.collector.state.h.any()
    t.train(handle_signals=False)
    assert t.global_step == 256
    rows = [json.loads(line) for line in (tmp_path / "fork" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if "charts/update" in r] == [192, 256]


def test_the_cli_fork_is_a_new_folder_with_its_origin_curve_and_the_origin_untouched(origin, tmp_path, capsys):
    before = files_of(origin)
    code = train_cli.main(["--fork", str(origin), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", FORK_STAGES, "--set", "run.total_steps=192"])
    assert code == 0, capsys.readouterr().err
    assert files_of(origin) == before
    fork = tmp_path / "f"
    meta = json.loads((fork / "fork.json").read_text())
    assert meta["step"] == 128 and meta["checkpoint"].endswith("step_000000000128.pt")
    assert meta["overrides"] == [f"run.out_dir={tmp_path}", FORK_STAGES, "run.total_steps=192"]
    assert meta["metrics_from"] == str(origin.resolve())
    assert "delay: 2" in (fork / "config.yaml").read_text()
    origin_rows = (origin / "metrics.jsonl").read_text().splitlines()
    rows = (fork / "metrics.jsonl").read_text().splitlines()
    assert rows[:len(origin_rows)] == origin_rows  # the origin's curve up to the fork, then the fork's
    steps = [json.loads(r)["global_step"] for r in rows if "charts/update" in json.loads(r)]
    assert steps == [64, 128, 192]
    assert ckpt.latest_checkpoint(fork).name == "step_000000000192.pt"
    # the fork resumes like any run
    assert train_cli.main(["--resume", str(fork), "--set", "run.total_steps=256"]) == 0
    assert ckpt.latest_checkpoint(fork).name == "step_000000000256.pt"


def test_a_fork_from_an_earlier_checkpoint_file_keeps_the_origin_curve_up_to_it(origin, tmp_path, capsys):
    first = origin / "checkpoints" / "step_000000000064.pt"
    assert train_cli.main(["--fork", str(first), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", "run.total_steps=128"]) == 0, capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if "charts/update" in r] == [64, 128]
    assert json.loads((tmp_path / "f" / "fork.json").read_text())["step"] == 64


def test_fork_errors_are_one_line_and_leave_no_folder(origin, tmp_path, capsys):
    def fork(*args):
        code = train_cli.main(["--fork", *args, "--set", f"run.out_dir={tmp_path}"])
        return code, capsys.readouterr().err

    code, err = fork(str(tmp_path / "nowhere"))
    assert code == 2 and "no such run folder or checkpoint file" in err
    code, err = fork(str(origin))
    assert code == 2 and "run.total_steps=128 is not above the 128 env steps" in err
    code, err = fork(str(origin), "--set", "run.total_steps=256", "--set", "curriculum.stages=[{delay: 0}]")
    assert code == 2 and "is in stage 1, and the fork's curriculum has stages 0..0" in err
    code, err = fork(str(origin), "--set", "run.total_steps=256", "--set", "model.hidden_size=8")
    assert code == 2 and "weights do not fit the model" in err
    code, err = fork(str(origin), "--set", "run.total_steps=256", "--set", "ppo.nonsense=1")
    assert code == 2 and "ppo.nonsense" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # (the origin lives elsewhere)


def test_a_fork_into_a_shorter_curriculum_is_a_config_error(origin, tmp_path):
    path = ckpt.latest_checkpoint(origin)
    with pytest.raises(ConfigError, match=r"is in stage 1, and the fork's curriculum has stages 0..0"):
        Trainer(tiny_config("curriculum.stages=[{delay: 0}]", "run.total_steps=256"), tmp_path / "x",
                torch.device("cpu"), quiet=True, fork=ckpt.load_checkpoint(path), fork_path=path)


def test_print_config_shows_the_fork(origin, capsys):
    assert train_cli.main(["--fork", str(origin), "--set", FORK_STAGES, "--set", "run.total_steps=256",
                           "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# the config of a fork of {ckpt.latest_checkpoint(origin)} (step 128)")
    assert "delay: 2" in out and "total_steps: 256" in out
    assert train_cli.main(["--fork", str(origin), "--set", "run.total_steps=256", "--set", "ppo.lr=1e-5",
                           "--print-config"]) == 0
    assert re.search(r"# warning: ppo.lr at step 128 changes from [0-9.e-]+ to 1e-05: the fork changes its "
                     r"schedule", capsys.readouterr().out)


def test_fork_resume_and_config_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--fork", "a", "--resume", "b"])
    assert "give exactly one of --config (new run), --resume RUN_DIR or --fork" in capsys.readouterr().err


@pytest.mark.parametrize("vector", ["serial", "pool"])
def test_every_episode_of_the_fork_plays_its_stage(origin, tmp_path, vector):
    """CueRecall lasts delay + 2 steps: with no replay of earlier stages, every episode of the
    fork's first update plays the fork's stage 1 (delay 2), none the origin's (delay 1) or stage 0."""
    assert train_cli.main(["--fork", str(origin), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", FORK_STAGES, "--set", "curriculum.share=0", "--set", f"env.vector={vector}",
                           "--set", "run.total_steps=192"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("charts/update") == 3)
    assert first["charts/episodic_length"] == 4.0 and first["charts/episodes"] == 16
    assert first["curriculum/stage"] == 1


def test_a_longer_fork_keeps_the_schedules_where_they_were(origin, tmp_path, capsys):
    """The origin's lr annealed over its 128 steps: a fork to 256 goes on at the final value (the
    horizon pinned, as on resume), where spreading the schedule over 256 steps would raise it."""
    origin_rows = [json.loads(r) for r in (origin / "metrics.jsonl").read_text().splitlines()]
    last_lr = [r["charts/learning_rate"] for r in origin_rows if "charts/learning_rate" in r][-1]
    assert train_cli.main(["--fork", str(origin), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", "run.total_steps=256"]) == 0
    assert "note: run.total_steps 128 -> 256: ppo.lr, ppo.ent_coef keep the horizon" in capsys.readouterr().out
    rows = [json.loads(r) for r in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    fork_lrs = [r["charts/learning_rate"] for r in rows if r["global_step"] > 128 and "charts/learning_rate" in r]
    assert len(fork_lrs) == 2 and all(lr == pytest.approx(tiny_config().ppo.lr.final) for lr in fork_lrs)
    assert last_lr > fork_lrs[0]  # (the origin's last update ran at a higher point of its schedule)


def test_a_fork_takes_adam_eps_and_another_batch_size(origin, tmp_path):
    path = ckpt.latest_checkpoint(origin)
    cfg = tiny_config(*STAGES, "ppo.adam_eps=1e-3", "ppo.rollout_steps=32", "run.total_steps=384")
    t = Trainer(cfg, tmp_path / "f", torch.device("cpu"), quiet=True, fork=ckpt.load_checkpoint(path), fork_path=path)
    assert [g["eps"] for g in t.optimizer.param_groups] == [1e-3]
    assert (t.update, t.total_updates, t.planned_steps) == (2, 4, 384)  # 128 done, 2 updates of 128 to go
    t.train(handle_signals=False)
    assert (t.update, t.global_step) == (4, 384)


def test_a_fork_of_a_run_without_a_curriculum_starts_one_at_its_step(tmp_path):
    plain = tmp_path / "plain"
    Trainer(tiny_config("run.total_steps=128", "run.checkpoint_every=64"), plain, torch.device("cpu"),
            quiet=True).train(handle_signals=False)
    path = ckpt.latest_checkpoint(plain)
    t = Trainer(tiny_config(*STAGES, "run.total_steps=256"), tmp_path / "f", torch.device("cpu"), quiet=True,
                fork=ckpt.load_checkpoint(path), fork_path=path)
    assert t.promotion.stage == 0 and t.promotion.history == [{"stage": 0, "step": 128, "elapsed": t.elapsed}]
    assert [e._options for e in t.envs.envs] == [{"delay": 0}] * 4


def test_a_checkpoint_outside_a_run_folder_brings_no_curve(origin, tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "x.pt").write_bytes(ckpt.latest_checkpoint(origin).read_bytes())
    (loose / "metrics.jsonl").write_text('{"global_step": 1, "unrelated": 1}\n')
    assert train_cli.main(["--fork", str(loose / "x.pt"), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", "run.total_steps=192"]) == 0
    assert "note: no metrics.jsonl of the run of" in capsys.readouterr().out
    rows = [json.loads(r) for r in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert all("unrelated" not in r for r in rows) and rows[0]["global_step"] == 192
    assert json.loads((tmp_path / "f" / "fork.json").read_text())["metrics_from"] is None
