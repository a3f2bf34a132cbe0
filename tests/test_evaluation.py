"""Held-out evaluation: statistics, the CLI's JSON, GIFs, and clean errors for bad checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval_helpers import tiny_config, train_tiny
from ppo_tbptt import checkpoint as ckpt
from ppo_tbptt import evaluate as cli
from ppo_tbptt.envs import EpisodeStats
from ppo_tbptt.evaluation import (EvalResult, command_breakdown, evaluate_policy, mean_interval, overlap,
                                  seeds_from_range, wilson_interval)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_tiny(run)
    return run


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)  # textbook value: (0.490, 0.943)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert hi == pytest.approx(1.0) and 0.8 < lo < 1.0


def test_mean_interval_and_ranges():
    m, half = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and half == pytest.approx(1.96 * 1.0 / math.sqrt(3), rel=1e-3)
    assert mean_interval([5.0]) == (5.0, 0.0)
    assert seeds_from_range((10, 20), 3) == [10, 11, 12]
    with pytest.raises(ValueError, match="fewer than"):
        seeds_from_range((10, 12), 3)
    assert overlap((0, 10), (5, 20)) == (5, 10)
    assert overlap((0, 10), (10, 20)) is None


def test_per_command_breakdown_counts_who_reached_and_who_carried_out_each_command():
    def ep(done: int, n: int):
        return EpisodeStats(0, 0, 0.0, 10, float(done == n), {"commands_completed": done / n, "command_count": n})
    # three 3-command episodes that carried out 3, 2 and 0 commands; a 1-command success; a
    # 2-command episode that failed its second
    eps = [ep(3, 3), ep(2, 3), ep(0, 3), ep(1, 1), ep(1, 2)]
    rows = command_breakdown(eps)
    assert [(r["command"], r["reached"], r["carried_out"]) for r in rows] == [(1, 5, 4), (2, 3, 2), (3, 2, 1)]
    assert rows[2]["rate"] == 0.5 and rows[2]["ci95"] == list(wilson_interval(1, 2))
    summary = EvalResult(eps, [0] * 5, False).summary()
    assert summary["per_command"] == rows
    text = cli.format_summary({**summary, "global_step": 0}, tiny_config(), "ckpt.pt", (0, 5))
    assert "per command (carried out / reached): 1: 4/5 (0.80), 2: 2/3 (0.67), 3: 1/2 (0.50)" in text
    # a task without commands has none
    assert command_breakdown([EpisodeStats(0, 0, 1.0, 5, 1.0)]) == []
    assert "per_command" not in EvalResult([EpisodeStats(0, 0, 1.0, 5, 1.0)], [0], False).summary()


def test_evaluate_policy_one_episode_per_seed_and_reproducible(trained_run):
    model, cfg, _, _ = cli.load_policy(trained_run, torch.device("cpu"))
    seeds = seeds_from_range(cfg.env.eval_seeds, 7)
    a = evaluate_policy(model, cfg.env, seeds, num_envs=3, sample_seed=5)
    b = evaluate_policy(model, cfg.env, seeds, num_envs=2, sample_seed=5)
    assert [e.seed for e in a.episodes] == seeds
    assert all(e.length == cfg.env.kwargs["delay"] + 2 for e in a.episodes)
    # deterministic actions do not depend on how episodes are spread over envs
    d1 = evaluate_policy(model, cfg.env, seeds, deterministic=True, num_envs=3)
    d2 = evaluate_policy(model, cfg.env, seeds, deterministic=True, num_envs=1)
    assert [e.ret for e in d1.episodes] == [e.ret for e in d2.episodes]
    # same sampler seed, same env count: identical
    c = evaluate_policy(model, cfg.env, seeds, num_envs=3, sample_seed=5)
    assert [e.ret for e in a.episodes] == [e.ret for e in c.episodes]
    assert len(b.episodes) == 7


def test_evaluate_does_not_touch_global_rng(trained_run):
    model, cfg, _, _ = cli.load_policy(trained_run, torch.device("cpu"))
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    evaluate_policy(model, cfg.env, seeds_from_range(cfg.env.eval_seeds, 4))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_cli_json_fields_present_and_consistent(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli.main([str(trained_run), "--episodes", "12", "--json", str(out), "--quiet"])
    assert rc == 0
    s = json.loads(out.read_text())
    for key in ("checkpoint", "env_id", "global_step", "episodes", "deterministic", "successes", "success_rate",
                "success_ci95", "return_mean", "return_ci95", "return_ci95_halfwidth", "length_mean",
                "task_stats", "seeds", "per_episode", "seed_range"):
        assert key in s, key
    cfg = tiny_config()
    assert s["episodes"] == 12 and s["deterministic"] is False
    assert s["seeds"] == list(range(cfg.env.eval_seeds[0], cfg.env.eval_seeds[0] + 12))
    assert [e["seed"] for e in s["per_episode"]] == s["seeds"]
    train_lo, train_hi = cfg.env.train_seeds
    assert all(not train_lo <= seed < train_hi for seed in s["seeds"])  # held out
    succ = [e["success"] for e in s["per_episode"]]
    assert s["successes"] == sum(succ) and s["successes"] / s["episodes"] == s["success_rate"]
    assert s["success_rate"] == pytest.approx(np.mean(succ))
    assert s["success_ci95"] == pytest.approx(list(wilson_interval(sum(succ), 12)))
    lo, hi = s["success_ci95"]
    assert lo <= s["success_rate"] <= hi
    assert s["return_mean"] == pytest.approx(np.mean([e["return"] for e in s["per_episode"]]))
    assert s["length_mean"] == cfg.env.kwargs["delay"] + 2
    assert s["global_step"] == 448
    printed = capsys.readouterr().out
    assert "success:" in printed and "95% CI" in printed


def test_cli_warns_when_seeds_overlap_training(trained_run, capsys):
    assert cli.main([str(trained_run), "--episodes", "2", "--seeds", "5:50", "--quiet"]) == 0
    assert "overlap the training seeds" in capsys.readouterr().err
    assert cli.main([str(trained_run), "--episodes", "2", "--quiet"]) == 0
    assert "overlap" not in capsys.readouterr().err


def test_cli_small_seed_range_alone_evaluates_all_of_it(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    assert cli.main([str(trained_run), "--seeds", "2000000:2000007", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["seeds"] == list(range(2000000, 2000007))


@pytest.mark.parametrize("bad", ["9:3", "x:y", "5", "1:2"])
def test_cli_bad_seed_range_exit_2(trained_run, bad, capsys):
    assert cli.main([str(trained_run), "--episodes", "2", "--seeds", bad, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_gif_has_one_frame_per_step(trained_run, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    gif = tmp_path / "episodes.gif"
    assert cli.main([str(trained_run), "--episodes", "4", "--video", str(gif), "--video-episodes", "3",
                     "--quiet"]) == 0
    episode_len = tiny_config().env.kwargs["delay"] + 2
    with Image.open(gif) as im:
        assert im.n_frames == 3 * (episode_len + 1)  # first obs + one frame per step
        assert im.size[0] >= 256  # upscaled


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_checkpoint_exit_2(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope")]) == 2
    assert "no such" in _one_line_error(capsys)
    (tmp_path / "empty_run").mkdir()
    assert cli.main([str(tmp_path / "empty_run")]) == 2
    assert "no checkpoint" in _one_line_error(capsys)


def test_truncated_checkpoint_exit_2(trained_run, tmp_path, capsys):
    good = ckpt.latest_checkpoint(trained_run).read_bytes()
    bad = tmp_path / "step_000000000001.pt"
    bad.write_bytes(good[: len(good) // 2])
    assert cli.main([str(bad)]) == 2
    assert "cannot be read" in _one_line_error(capsys)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert cli.main([str(junk)]) == 2
    _one_line_error(capsys)


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": np.random.default_rng(0)}, evil)
    assert cli.main([str(evil)]) == 2
    assert "cannot be read" in _one_line_error(capsys)


def test_mismatched_architecture_exit_2(trained_run, tmp_path, capsys):
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(trained_run))
    other = tiny_config("model.hidden_size=24")  # weights of hidden 16 under a hidden-24 config
    state["config"] = other.to_dict()
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    assert cli.main([str(path)]) == 2
    err = _one_line_error(capsys)
    assert "do not fit" in err and "shape mismatch" in err


def test_memorygym_frames_are_upright():
    """MemoryGym observations are x/y transposed; the frames of a GIF must show the level upright,
    i.e. the observation transposed back (which differs from the raw observation)."""
    from ppo_tbptt.config import load
    from ppo_tbptt.evaluation import Evaluator
    cfg = load("mortar_mayhem_grid")
    ev = Evaluator(cfg.env, 1, render=True)
    try:
        env = ev.envs[0]
        obs, _ = env.reset(seed=1_000_003)
        for a in (1, 2):
            obs, *_ = env.step(a)
        frame = ev._frame(env)
        assert frame.shape == obs.shape
        assert np.array_equal(frame, obs.transpose(1, 0, 2))
        assert not np.array_equal(frame, obs)
    finally:
        ev.close()
