"""Hyperparameter search (``python -m ppo_tbptt.tune``) on CueRecall with tiny trials: a study that
continues from its storage, pruning on the periodic evaluation, the search file's errors, and a
study stopped by Ctrl-C or killed. Needs the ``tune`` extra (optuna); skipped where it is missing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ppo_tbptt import config as C  # noqa: E402
from ppo_tbptt import tune as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "env.num_envs=4", "--set", "ppo.rollout_steps=32", "--set", "ppo.minibatches=2",
        "--set", "run.total_steps=256", "--set", "run.eval_every=128", "--set", "run.eval_episodes=4",
        "--set", "run.torch_threads=1"]
SPACE = """\
ppo.lr.initial: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
ppo.epochs: {type: int, low: 1, high: 4}
tbptt.sequence_length: [8, 16]
"""


def study_args(tmp_path, trials: int, *extra: str) -> list[str]:
    (tmp_path / "space.yaml").write_text(SPACE)
    return ["--config", "cue_recall", "--trials", str(trials), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
            "--search", str(tmp_path / "space.yaml"), "--out-dir", str(tmp_path / "trials"),
            "--sampler-seed", "0", *TINY, *extra]


def load_study(tmp_path, name="cue_recall_tune"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_a_stopped_study_continues_from_its_storage(tmp_path, capsys):
    assert T.main(study_args(tmp_path, 2)) == 0
    out = capsys.readouterr().out
    assert "new study 'cue_recall_tune'" in out and "0 (baseline)" in out
    assert "importance.png" in out
    assert T.main(study_args(tmp_path, 2)) == 0
    out = capsys.readouterr().out
    assert "continuing study 'cue_recall_tune' (2 trials so far)" in out
    study = load_study(tmp_path)
    S = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [S.COMPLETE] * 4
    # trial 0 is the config's own values (the baseline); every trial is a run folder of its own
    assert study.trials[0].params == {"ppo.lr.initial": 2.0e-3, "ppo.epochs": 4, "tbptt.sequence_length": 16}
    assert study.trials[0].user_attrs["baseline"] and not study.trials[1].user_attrs.get("baseline")
    folders = sorted(p.name for p in (tmp_path / "trials").iterdir() if p.is_dir())
    assert folders == ["trial_0000", "trial_0001", "trial_0002", "trial_0003"]
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        cfg = C.load(str(run / "config.yaml"))
        assert cfg.ppo.lr.initial == t.params["ppo.lr.initial"]  # the trial's values reached its run
        assert cfg.ppo.epochs == t.params["ppo.epochs"] and cfg.tbptt.sequence_length == t.params["tbptt.sequence_length"]
        assert (run / "checkpoints" / "step_000000000256.pt").is_file()
        # every periodic evaluation was reported; the value is the last one's, at the end of the run
        assert sorted(t.intermediate_values) == [128, 256]
        assert t.value == t.intermediate_values[256]
    assert (tmp_path / "trials" / "history.png").stat().st_size > 1000
    assert (tmp_path / "trials" / "importance.png").stat().st_size > 1000
    best = max(study.trials, key=lambda t: t.value)
    assert f"best: trial {best.number}, value {best.value:.3f}" in out


def test_a_trial_behind_is_pruned_and_keeps_its_folder(tmp_path, capsys):
    # no score reaches 2: the pruner stops each trial at its first evaluation
    assert T.main(study_args(tmp_path, 1, "--pruner", "threshold:2", "--prune-after", "0", "--no-baseline")) == 0
    out = capsys.readouterr().out
    t = load_study(tmp_path).trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED and list(t.intermediate_values) == [128]
    run = Path(t.user_attrs["run_dir"])
    assert (run / "checkpoints" / "step_000000000128.pt").is_file()  # stopped cleanly, with a checkpoint
    assert not (run / "checkpoints" / "step_000000000256.pt").exists()
    assert "pruned by the study at step 128" in (run / "train.log").read_text()
    assert "trial 0: pruned at step 128" in out and "no completed trial yet" in out
    assert "history.png: not drawn, it needs 1 completed trial (0 so far)" in out


def test_the_value_is_an_evaluation_at_the_end_of_the_run(tmp_path):
    # 4 updates of 128 steps, evaluations every 300: at 384, then none due at the end (512)
    args = study_args(tmp_path, 1, "--set", "run.total_steps=512", "--set", "run.eval_every=300",
                      "--no-baseline", "--pruner", "none")
    assert T.main(args) == 0
    t = load_study(tmp_path).trials[0]
    assert sorted(t.intermediate_values) == [384, 512] and t.value == t.intermediate_values[512]


def test_an_objective_the_env_does_not_report_is_an_error_exit_2(tmp_path, capsys):
    args = study_args(tmp_path, 1, "--set", "env.id=PendulumNoVelocity-v0", "--set", "env.kwargs={}",
                      "--objective", "success", "--no-baseline")
    assert T.main(args) == 2
    assert "error: --objective success: the evaluation reports no eval/success" in capsys.readouterr().err
    args[args.index("success")] = "return"
    args[args.index("--storage") + 1] = f"sqlite:///{tmp_path / 'other.db'}"
    assert T.main(args) == 0


def test_a_combination_the_config_refuses_is_pruned_without_training(tmp_path):
    import torch
    raw = C.load("cue_recall").to_dict()
    space = T.parse_space({"tbptt.strategy": ["fixed", "overlap"], "tbptt.sequence_length": [0, 16]})
    T.check_space(space, raw)  # each value alone is fine; overlap needs a window length >= 1
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"tbptt.strategy": "overlap", "tbptt.sequence_length": 0})
    study.optimize(lambda t: T.run_trial(t, raw, space, tmp_path / "runs", torch.device("cpu"), "auto", print),
                   n_trials=1)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED and "overlap needs a window length" in t.user_attrs["error"]
    assert not (tmp_path / "runs").exists()


def test_median_pruner_compares_trials_at_the_same_step(tmp_path):
    """The default pruner, wired to what the trials report: a trial below the median of the
    completed ones at an evaluation stops there, but not before its warm-up steps."""
    study = optuna.create_study(direction="maximize", pruner=T.make_pruner("median", 128))

    def completed(tr):
        x = tr.suggest_float("x", 0, 1)
        tr.report(x, 64)
        tr.report(x, 192)
        return x

    for value in (0.9, 0.8):
        study.enqueue_trial({"x": value})
        study.optimize(completed, n_trials=1)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.report(0.1, 64)
    assert not trial.should_prune()  # below the median, but within the warm-up
    trial.report(0.1, 192)
    assert trial.should_prune()


def test_trial_values_go_through_the_command_lines_validation():
    raw = C.load("cue_recall").to_dict()
    cfg = T.trial_config(raw, {"ppo.lr.initial": 1e-5, "tbptt.strategy": "random", "model.hidden_size": 32})
    assert cfg.ppo.lr.initial == 1e-5 and cfg.ppo.lr.final == 1e-4  # a schedule keeps its final value
    assert cfg.tbptt.strategy == "random" and cfg.model.hidden_size == 32
    assert T.trial_config(raw, {"ppo.lr.final": None}).ppo.lr.final is None  # YAML's null, not 'None'
    with pytest.raises(C.ConfigError, match="ppo.minibatches"):
        T.trial_config(raw, {"ppo.minibatches": 10_000})


BAD = {
    "not a mapping": ("- 1\n- 2\n", "expected a mapping of config keys"),
    "unknown type": ("ppo.epochs: {type: integer, low: 1, high: 3}\n", "type must be float, int or categorical"),
    "empty range": ("ppo.epochs: {type: int, low: 3, high: 3}\n", "low (3) must be below high (3)"),
    "log from zero": ("ppo.lr.initial: {type: float, low: 0, high: 1, log: true}\n", "a log range needs low > 0"),
    "int with a fraction": ("ppo.epochs: {type: int, low: 1.5, high: 3}\n", "low and high must be integers"),
    "unknown entry": ("ppo.epochs: {type: int, low: 1, high: 3, lo: 2}\n", "unknown entries lo"),
    "no choices": ("model.core: {type: categorical, choices: []}\n", "choices must be a non-empty list"),
    "no such field": ("ppo.learning_rate: {type: float, low: 0.1, high: 0.2}\n", "ppo.learning_rate: unknown key"),
    "invalid value": ("ppo.epochs: {type: int, low: 0, high: 3}\n", "ppo.epochs=0: ppo.epochs"),
    "bad choice": ("model.core: [lstm, rnn]\n", "model.core=rnn"),
    "not YAML": ("ppo.epochs: {type: int\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_files_are_one_line_errors_exit_2(case, tmp_path, capsys):
    text, expected = BAD[case]
    (tmp_path / "bad.yaml").write_text(text)
    code = T.main(["--config", "cue_recall", "--trials", "1", "--search", str(tmp_path / "bad.yaml"),
                   "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--out-dir", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "study.db").exists()  # nothing was created


def test_a_study_continues_only_with_its_own_config_and_space(tmp_path, capsys):
    assert T.main(study_args(tmp_path, 0)) == 0
    (tmp_path / "other.yaml").write_text("ppo.epochs: {type: int, low: 1, high: 3}\n")
    args = study_args(tmp_path, 1)
    args[args.index("--search") + 1] = str(tmp_path / "other.yaml")
    assert T.main(args) == 2
    assert "was created with another space" in capsys.readouterr().err


def test_default_space_fits_the_shipped_recurrent_configs(capsys):
    space = T.load_space(None)
    assert {"ppo.lr.initial", "ppo.ent_coef.initial", "tbptt.sequence_length", "tbptt.strategy",
            "model.hidden_size", "ppo.epochs", "ppo.minibatches"} <= set(space)
    for name in ("cue_recall", "mortar_mayhem_grid_cpu"):
        T.check_space(space, C.load(name).to_dict())
    assert T.main(["--print-search"]) == 0
    assert T.parse_space(__import__("yaml").safe_load(capsys.readouterr().out)) == space


def _start(tmp_path, trials: int, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "ppo_tbptt.tune", *study_args(tmp_path, trials, *extra)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, text: str, timeout: float = 120) -> str:
    seen, t0 = "", time.time()
    while text not in seen:
        line = proc.stdout.readline()
        if not line or time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"never saw {text!r}:\n{seen}")
        seen += line
    return seen


@pytest.mark.slow
def test_ctrl_c_or_a_killed_process_fail_the_trial_and_queue_its_values_again(tmp_path):
    longer = ["--set", "run.total_steps=8192", "--set", "run.eval_every=512", "--no-baseline", "--heartbeat", "1"]
    S = optuna.trial.TrialState
    # Ctrl-C during a trial: exit 130, the trial FAIL, its values queued again
    proc = _start(tmp_path, 3, *longer)
    _wait_for(proc, "trial 0: eval at step 512")
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "its values queued again" in out, out
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [S.FAIL, S.WAITING] and trials[1].params == trials[0].params
    assert (Path(trials[0].user_attrs["run_dir"]) / "checkpoints").is_dir()  # its run keeps what it saved
    # a killed process: its trial stays RUNNING until a later process finds the heartbeat stale
    proc = _start(tmp_path, 3, *longer[:-3], "--heartbeat", "1")
    _wait_for(proc, "trial 2: eval at step 512")  # a new trial: the retry of trial 0 ran first
    proc.kill()
    proc.wait()
    trials = load_study(tmp_path).trials
    assert trials[1].state == S.COMPLETE and trials[1].system_attrs["failed_trial"] == 0
    assert trials[2].state == S.RUNNING
    time.sleep(3)  # past the grace period (2 heartbeats)
    proc = _start(tmp_path, 1, *longer[:-3], "--heartbeat", "1")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    trials = load_study(tmp_path).trials
    assert trials[2].state == S.FAIL  # found stale ...
    assert trials[3].params == trials[2].params and trials[3].state == S.COMPLETE  # ... and run again


@pytest.mark.slow
def test_two_processes_work_on_one_study_through_its_storage(tmp_path):
    procs = [_start(tmp_path, 2, "--no-baseline") for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = load_study(tmp_path).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4  # a run folder each
    assert [sum(f"trial {n}: " in o for o in outs) for n in range(4)] == [1, 1, 1, 1]  # each ran once


def test_processes_opening_a_new_storage_together_all_get_it(tmp_path, monkeypatch):
    """Processes started together race to create a new database's tables: the one that loses
    (the table or the version row already there) tries again and finds them, instead of exiting."""
    import sqlalchemy.exc
    from optuna import storages
    real, calls = storages.RDBStorage, []

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:  # another process made the tables between our check and our CREATE
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        if len(calls) == 2:  # ... and its version row between our SELECT and our INSERT
            raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: version_info.version_info_id"))
        return real(url, **kw)

    monkeypatch.setattr(storages, "RDBStorage", racing)
    monkeypatch.setattr(T.time, "sleep", lambda s: None)
    assert isinstance(T.storage_for(f"sqlite:///{tmp_path / 'study.db'}", 5), real) and len(calls) == 3

    calls.clear()  # any other failure is reported at once, not retried
    monkeypatch.setattr(storages, "RDBStorage", lambda url, **kw: calls.append(url) or (_ for _ in ()).throw(
        sqlalchemy.exc.OperationalError("connect", {}, Exception("unable to open database file"))))
    with pytest.raises(ValueError, match="cannot open it: OperationalError"):
        T.storage_for(f"sqlite:///{tmp_path / 'other.db'}", 5)
    assert len(calls) == 1
