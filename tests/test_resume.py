"""Replayable env state, bit-exact resume after an interruption, determinism, clean resume errors."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from eval_helpers import TINY, interrupt_after, metric_rows, tiny_config, train_tiny
from ppo_tbptt import checkpoint as ckpt
from ppo_tbptt import train as train_cli
from ppo_tbptt.envs import CueRecall, LevelSeedWrapper, make_base_env, make_vector_env, seed_stream
from ppo_tbptt.envs.wrappers import EnvStateError
from ppo_tbptt.logger import truncate_jsonl
from ppo_tbptt.trainer import Trainer

EVAL = ["run.eval_every=128", "run.eval_episodes=4"]


def _roll(env, actions):
    out = []
    for a in actions:
        obs, r, te, tr, _ = env.step(a)
        out.append((obs.copy(), r, te))
        if te or tr:
            obs, _ = env.reset()
            out.append((obs.copy(), "reset", env.current_seed))
    return out


@pytest.mark.parametrize("env_id,kwargs", [("CueRecall-v0", {"delay": 5}), ("MortarMayhem-Grid-v0", {}),
                                           ("MysteryPath-Grid-v0", {})])
def test_single_env_state_replays_to_the_same_future(env_id, kwargs):
    rng = np.random.default_rng(0)
    a = LevelSeedWrapper(make_base_env(env_id, kwargs), seed_stream((0, 1000), 1, 0))
    a.reset()
    space = a.action_space
    space.seed(0)
    for _ in range(4):
        a.step(space.sample())
    state = a.get_state()
    json.dumps(state)  # plain data
    b = LevelSeedWrapper(make_base_env(env_id, kwargs), seed_stream((0, 1000), 1, 99))
    b.reset()  # a different level and generator position, both overwritten by set_state
    obs_b = b.set_state(state)
    assert b.current_seed == a.current_seed
    future = [space.sample() for _ in range(int(rng.integers(30, 60)))]
    ra, rb = _roll(a, future), _roll(b, future)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]
    assert obs_b is not None
    a.close()
    b.close()


def test_bad_env_state_raises():
    env = LevelSeedWrapper(CueRecall(delay=2), seed_stream((0, 10), 1, 0))
    with pytest.raises(EnvStateError):
        env.set_state({"nope": 1})
    env.reset()
    state = env.get_state()
    state["actions"] = [0, 0, 0, 0, 0]  # longer than the episode: the replay must notice
    with pytest.raises(EnvStateError, match="ended after"):
        env.set_state(state)


def test_vector_env_state_roundtrip():
    cfg = tiny_config()
    a = make_vector_env(cfg.env, 3)
    b = make_vector_env(cfg.env, 4)
    a.reset()
    b.reset()
    rng = np.random.default_rng(1)
    for _ in range(7):
        last = a.step(rng.integers(0, 4, a.num_envs)).obs
    obs = b.set_state(a.get_state())
    assert np.array_equal(obs, last)
    acts = [rng.integers(0, 4, a.num_envs) for _ in range(20)]
    for act in acts:
        ra, rb = a.step(act), b.step(act)
        assert np.array_equal(ra.obs, rb.obs) and np.array_equal(ra.reward, rb.reward)
        assert [(e.seed, e.ret, e.length) for e in ra.episodes] == [(e.seed, e.ret, e.length) for e in rb.episodes]
    with pytest.raises(EnvStateError):
        make_vector_env(cfg.env, 3, num_envs=2).set_state(a.get_state())


def test_same_seed_twice_gives_identical_metrics(tmp_path):
    train_tiny(tmp_path / "a", *EVAL)
    train_tiny(tmp_path / "b", *EVAL)
    a, b = metric_rows(tmp_path / "a"), metric_rows(tmp_path / "b")
    assert len(a) == 448 // (4 * 16) and a == b
    assert any("eval/success" in r for r in a)
    no_eval = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in a]
    train_tiny(tmp_path / "d")  # periodic evaluation leaves training's metrics unchanged
    assert metric_rows(tmp_path / "d") == no_eval
    c = train_tiny(tmp_path / "c", "run.seed=2")
    assert metric_rows(tmp_path / "c") != no_eval
    assert c.global_step == 448


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    extra = EVAL + ["run.checkpoint_every=64"]
    train_tiny(tmp_path / "full", *extra)

    part = Trainer(tiny_config(*extra), tmp_path / "part", torch.device("cpu"), quiet=True)
    original = part.train_update

    def update_then_interrupt():
        out = original()
        if part.update == 3:
            part.request_stop(signal.SIGINT)
        return out

    part.train_update = update_then_interrupt
    part.train(handle_signals=False)
    assert part.interrupted == signal.SIGINT and part.global_step == 3 * 64
    # the interrupted process had logged further before dying: those rows must be dropped
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"global_step": 999, "time": 0.0, "charts/update": 99.0}) + "\n")
        f.write('{"global_step": 1000, "ti')  # torn last line

    resumed = Trainer.from_run(tmp_path / "part", quiet=True)
    assert resumed.global_step == 192
    resumed.train(handle_signals=False)
    full, again = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "part")
    assert len(full) == 7
    assert [r["global_step"] for r in again] == [r["global_step"] for r in full]
    assert again == full
    assert (tmp_path / "part" / "checkpoints" / "best.pt").is_file()


ADAPTIVE = ["tbptt.strategy=adaptive", "tbptt.adapt_every=2", "tbptt.adapt_window=8", "tbptt.adapt_burn_in=4",
            "tbptt.adapt_tau=4", "tbptt.adapt_samples=8", "tbptt.k_max=8", "tbptt.target_bias=0.2"]


@pytest.mark.parametrize("strategy", [["tbptt.strategy=random", "tbptt.mean_length=3"], ADAPTIVE],
                         ids=["random", "adaptive"])
def test_resume_restores_truncation_strategy_state(tmp_path, strategy):
    """The random cut sampler, and adaptive K / estimate / window sampler, travel in the checkpoint:
    interrupted mid-way between two re-estimates, the resumed run logs what the full run logs."""
    extra = strategy + ["run.total_steps=320"]
    train_tiny(tmp_path / "full", *extra)
    part = Trainer(tiny_config(*extra), tmp_path / "part", torch.device("cpu"), quiet=True)
    interrupt_after(part, 3)
    part.train(handle_signals=False)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "part"))
    assert state["truncation"]["name"] == strategy[0].split("=")[1]
    Trainer.from_run(tmp_path / "part", quiet=True).train(handle_signals=False)
    full, again = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "part")
    assert len(full) == 5 and "tbptt/K" in full[-1]
    assert again == full


def test_resume_lstm_and_gru_restore_recurrent_state(tmp_path):
    """The carried recurrent state matters: GRU with a mid-episode interruption too."""
    extra = ["model.core=gru", "env.kwargs.delay=5", "run.total_steps=320"]  # 7-step episodes
    train_tiny(tmp_path / "full", *extra)
    part = Trainer(tiny_config(*extra), tmp_path / "part", torch.device("cpu"), quiet=True)
    original = part.train_update

    def update_then_interrupt():
        out = original()
        if part.update == 2:
            part.request_stop()
        return out

    part.train_update = update_then_interrupt
    part.train(handle_signals=False)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "part"))
    assert any(s["actions"] for s in state["collector"]["envs"]["envs"])  # interrupted mid-episode
    assert state["collector"]["state_h"].abs().sum() > 0
    Trainer.from_run(tmp_path / "part", quiet=True).train(handle_signals=False)
    assert metric_rows(tmp_path / "part") == metric_rows(tmp_path / "full")


def test_truncate_jsonl(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"global_step": s}) + "\n" for s in (64, 128, 192, 256)) + '{"glo')
    assert truncate_jsonl(p, 128) == 3
    assert [json.loads(line)["global_step"] for line in p.read_text().splitlines()] == [64, 128]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_resume_cli_clean_errors(tmp_path, capsys):
    assert train_cli.main(["--resume", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys)
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=64")
    latest = ckpt.latest_checkpoint(run)
    assert train_cli.main(["--resume", str(latest)]) == 2  # a file instead of the run folder
    assert f"try --resume {run}" in _one_line_error(capsys)
    good = latest.read_bytes()
    latest.write_bytes(good[:100])
    assert train_cli.main(["--resume", str(run)]) == 2
    assert "cannot be read" in _one_line_error(capsys)
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    state["config"] = tiny_config("model.hidden_size=24").to_dict()
    ckpt.atomic_save(state, latest)
    assert train_cli.main(["--resume", str(run)]) == 2
    assert "do not fit" in _one_line_error(capsys)
    weights_only = {"model": state["model"], "config": tiny_config().to_dict()}
    ckpt.atomic_save(weights_only, latest)
    assert train_cli.main(["--resume", str(run)]) == 2
    assert "cannot resume" in _one_line_error(capsys)


def test_resume_cli_extends_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=128")
    assert train_cli.main(["--resume", str(run), "--set", "run.total_steps=256"]) == 0
    rows = metric_rows(run)
    assert [r["global_step"] for r in rows] == [64, 128, 192, 256]
    assert "resuming" in capsys.readouterr().out


def test_train_cli_needs_config_or_resume(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        train_cli.main(["--config", "cue_recall", "--resume", "runs/x"])


def test_time_limit_saves_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, capsys):
    """run.max_seconds stops after the update that reaches it, with a checkpoint; each resumed
    process has the budget again; the pieces log exactly what one uninterrupted run logs."""
    train_tiny(tmp_path / "full", "run.total_steps=256")
    run = tmp_path / "part"
    part = train_tiny(run, "run.total_steps=256", "run.max_seconds=1e-9")  # any update exceeds it
    assert part.time_limited and part.global_step == 64
    assert ckpt.latest_checkpoint(run).name == f"step_{64:012d}.pt"
    assert train_cli.main(["--resume", str(run)]) == 0  # the budget holds again: one more update
    out = capsys.readouterr().out
    assert "time limit run.max_seconds=1e-09 reached at 128 of 256 steps" in out and "--resume" in out
    assert train_cli.main(["--resume", str(run), "--set", "run.max_seconds=0"]) == 0  # no limit
    assert "done: 256 steps" in capsys.readouterr().out
    assert metric_rows(run) == metric_rows(tmp_path / "full")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["time/elapsed_seconds"] for r in rows]
    assert elapsed == sorted(elapsed) and len(elapsed) == 4  # summed over the three processes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_interrupts_resumes_and_evaluates(tmp_path):
    """The CUDA paths of a whole run: pinned observation staging, the checkpoint's device-to-host
    copies, and the restore (which re-checks that the rebuilt envs show the saved observations)."""
    extra = ["run.device=cuda", "model.core=gru", "env.kwargs.delay=5", "run.total_steps=320"] + EVAL
    part = Trainer(tiny_config(*extra), tmp_path / "part", torch.device("cuda"), quiet=True)
    interrupt_after(part, 2)
    part.train(handle_signals=False)
    assert part.global_step == 128
    raw = torch.load(ckpt.latest_checkpoint(tmp_path / "part"), weights_only=True)  # devices as saved
    assert raw["collector"]["state_h"].device.type == "cpu" and raw["collector"]["obs"].device.type == "cpu"
    assert raw["collector"]["state_h"].abs().sum() > 0
    resumed = Trainer.from_run(tmp_path / "part", quiet=True)
    assert resumed.device.type == "cuda" and resumed.global_step == 128
    resumed.train(handle_signals=False)
    rows = metric_rows(tmp_path / "part")
    assert [r["global_step"] for r in rows] == [64, 128, 192, 256, 320]
    assert all(np.isfinite(r["losses/value"]) for r in rows) and any("eval/success" in r for r in rows)
