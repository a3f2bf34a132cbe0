"""The curriculum over reset parameters (ppo_tbptt.curriculum): promotion, mixing, the stage in
the envs (serial, pool, a replaced worker), in checkpoints (bit-exact resume across a promotion),
across data-parallel ranks, in evaluation, and its config errors."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from eval_helpers import metric_rows, tiny_config
from ppo_tbptt import config as C
from ppo_tbptt import curriculum as cur
from ppo_tbptt import evaluate as evaluate_cli
from ppo_tbptt import train as train_cli
from ppo_tbptt.envs import CueRecall, LevelSeedWrapper, make_vector_env, seed_stream
from ppo_tbptt.envs.vector import EpisodeStats
from ppo_tbptt.trainer import Trainer

# CueRecall (tiny_config: delay 3 unless a stage says otherwise) in three stages: delay 0, 1, 3.
# A low threshold and a small window promote within a few updates of 64 steps; half the episodes
# of later stages replay earlier ones.
STAGES = ["curriculum.stages=[{delay: 0}, {delay: 1}, {}]", "curriculum.window=8",
          "curriculum.threshold=0.2", "curriculum.share=0.5"]


def ep(stage, success, env=0):
    return EpisodeStats(env, 0, float(success), 3, float(success), {}, stage)


# ---- promotion ---------------------------------------------------------------------------------------
def test_promotion_needs_a_full_window_of_the_stage_own_episodes_at_the_threshold():
    p = cur.Promotion(C.CurriculumConfig(stages=C.StageList([{}, {}, {}]), window=4, threshold=0.75,
                                         min_updates=2), 3)
    p.observe([ep(0, 1), ep(0, 1), ep(0, 1)])
    assert not p.ready()  # 3 of 4 episodes: the window is not full
    p.observe([ep(0, 0)] + [ep(None, 1)] * 5)  # untagged episodes (no curriculum) never count
    assert p.window_success() == 0.75 and p.updates_in_stage == 2 and p.ready()  # 0.75 reaches 0.75
    q = cur.Promotion(C.CurriculumConfig(stages=C.StageList([{}, {}]), window=4, threshold=0.75,
                                         min_updates=2), 2)
    q.observe([ep(0, 1)] * 4)
    assert not q.ready()  # full and above, but only one update in the stage
    q.observe([])
    assert q.ready()
    p.observe([ep(0, 0)])  # the window slides: 1, 1, 0, 0
    assert p.window_success() == 0.5 and not p.ready()
    p.observe([ep(0, 1), ep(0, 1)])
    assert p.window_success() == 0.5 and not p.ready()  # 0, 0, 1, 1
    p.observe([ep(0, 1)])
    assert p.ready()  # 0, 1, 1, 1
    assert p.advance(1000, 12.5) == 1 and p.successes.maxlen == 4 and len(p.successes) == 0
    assert p.history[-1] == {"stage": 1, "step": 1000, "elapsed": 12.5}
    # episodes of stage 0 still finishing (started before the switch, or drawn by mixing) do not
    # count for stage 1; nor do failures of stage 0 hold it back
    p.observe([ep(0, 0)] * 10 + [ep(1, 1)] * 3)
    p.observe([ep(1, 1)])
    assert p.window_success() == 1.0 and p.ready()
    p.advance(2000, 20.0)
    p.observe([ep(2, 1)] * 10)
    p.observe([ep(2, 1)] * 10)
    assert p.final and not p.ready()  # the target is the last stage
    assert p.observe([EpisodeStats(0, 0, 0.0, 3, None, {}, 2), ep(1, 1)]) == 1  # no flag: a failure
    assert list(p.successes)[-1] == 0.0 and p.missing_success == 1
    state = json.loads(json.dumps(p.state_dict()))  # plain data
    r = cur.Promotion(C.CurriculumConfig(stages=C.StageList([{}, {}, {}]), window=4), 3)
    r.load_state_dict(state)
    assert r.state_dict() == p.state_dict() and r.scalars() == p.scalars()
    assert p.scalars() == {"curriculum/stage": 2.0, "curriculum/window_episodes": 4.0,
                           "curriculum/window_success": 0.75}


# ---- mixing ------------------------------------------------------------------------------------------
def test_mixing_draws_earlier_stages_at_the_share_deterministically_and_never_a_later_one():
    stages = [{"delay": d} for d in range(5)]
    a = cur.StageSampler(stages, 0.3, run_seed=7, env_index=2)
    assert [a.draw()[0] for _ in range(50)] == [0] * 50  # stage 0 has nothing earlier
    a.set_stage(3)
    draws = [a.draw() for _ in range(20_000)]
    stages_drawn = np.array([s for s, _ in draws])
    assert all(params == {"delay": s} for s, params in draws[:100])
    assert stages_drawn.max() == 3  # never stage 4
    earlier = stages_drawn < 3
    assert abs(earlier.mean() - 0.3) < 0.015, earlier.mean()
    counts = np.bincount(stages_drawn[earlier], minlength=3)
    assert abs(counts / counts.sum() - 1 / 3).max() < 0.03, counts  # uniform over 0, 1, 2
    b = cur.StageSampler(stages, 0.3, run_seed=7, env_index=2)
    b.set_stage(3)
    c = cur.StageSampler(stages, 0.3, run_seed=7, env_index=3)
    c.set_stage(3)
    first_b = [b.draw()[0] for _ in range(200)]
    assert first_b == list(stages_drawn[:200]) and [c.draw()[0] for _ in range(200)] != first_b
    state = json.loads(json.dumps(b.get_state()))
    more = [b.draw()[0] for _ in range(100)]
    d = cur.StageSampler(stages, 0.3, run_seed=0, env_index=0)
    d.set_state(state)
    assert d.stage == 3 and [d.draw()[0] for _ in range(100)] == more
    none = cur.StageSampler(stages, 0.0, 7, 2)
    none.set_stage(4)
    assert {none.draw()[0] for _ in range(200)} == {4}


def test_the_wrapper_plays_each_episode_in_its_stage_tags_it_and_carries_the_stage_in_its_state():
    stages = [{"delay": 0}, {"delay": 2}, {"delay": 5}]

    def env(run_seed=1):
        return LevelSeedWrapper(CueRecall(num_cues=2, delay=9), seed_stream((0, 100), run_seed, 0),
                                stages=cur.StageSampler(stages, 0.5, run_seed, 0))

    def play(e, episodes):
        out = []
        for _ in range(episodes):
            e.reset()
            stage, n = e.episode_stage, 0
            while True:
                n += 1
                _, _, te, tr, info = e.step(0)
                if te or tr:
                    break
            assert info["curriculum_stage"] == stage and n == stages[stage]["delay"] + 2
            out.append(stage)
        return out

    a = env()
    assert play(a, 5) == [0] * 5
    a.set_stage(2)
    seen = play(a, 60)
    assert set(seen) == {0, 1, 2}
    a.reset()
    a.step(0)
    state = json.loads(json.dumps(a.get_state()))
    b = env(run_seed=5)
    b.reset()
    b.set_state(state)
    assert b.stages.stage == 2 and b.episode_stage == a.episode_stage
    assert play(a, 40) == play(b, 40)


# ---- the stage in every env, and in checkpoints -----------------------------------------------------
@pytest.mark.parametrize("vector", ["serial", "pool"])
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one_across_a_promotion(tmp_path, vector):
    """Promotions at update 1 (step 64) and 4 (step 256); the run stopped after update 3 resumes in
    stage 1 with its window and logs, promotes and ends exactly as the run that went on."""
    extra = [*STAGES, f"env.vector={vector}", "env.envs_per_worker=2", "run.eval_every=128",
             "run.eval_episodes=4"]
    full = Trainer(tiny_config(*extra), tmp_path / "full", torch.device("cpu"), quiet=True)
    full.train(handle_signals=False)
    assert [h["step"] for h in full.promotion.history] == [0, 64, 256]

    part = Trainer(tiny_config(*extra), tmp_path / "part", torch.device("cpu"), quiet=True)
    original = part.train_update

    def update_then_interrupt():
        out = original()
        if part.update == 3:
            part.request_stop(signal.SIGINT)
        return out

    part.train_update = update_then_interrupt
    part.train(handle_signals=False)
    assert part.global_step == 192 and part.promotion.stage == 1
    resumed = Trainer.from_run(tmp_path / "part", quiet=True)
    assert resumed.promotion.state_dict() == part.promotion.state_dict()  # stage, window, history
    assert resumed.promotion.stage == 1 and resumed.promotion.updates_in_stage == 2
    resumed.train(handle_signals=False)
    rows = metric_rows(tmp_path / "full")
    assert metric_rows(tmp_path / "part") == rows
    assert [r["curriculum/stage"] for r in rows] == [0, 1, 1, 1, 2, 2, 2]
    assert "eval_stage/success" in rows[1] and "eval_stage/success" not in rows[5]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    log = (tmp_path / "full" / "train.log").read_text()
    assert "curriculum: stage 1 of 0..2 reached at step 64" in log and "delay: 1" in log
    assert "curriculum: stage 2 of 0..2 (the target task) reached at step 256" in log


def test_a_pool_moves_every_worker_and_a_replaced_worker_keeps_the_stage():
    """A pool's envs play the stage set_stage gives them, episode for episode as serial envs do,
    also after a worker killed after the switch was replaced (it restores the stage with its base)."""
    base = [*STAGES, "env.num_envs=4"]
    serial_cfg = tiny_config(*base)
    pool_cfg = tiny_config(*base, "env.vector=pool", "env.envs_per_worker=2")
    rng = np.random.default_rng(0)
    with make_vector_env(serial_cfg.env, 3, curriculum=serial_cfg.curriculum) as ref, \
            make_vector_env(pool_cfg.env, 3, curriculum=pool_cfg.curriculum) as pool:
        pool.on_warning = lambda m: None
        assert np.array_equal(pool.reset(), ref.reset())
        seen = []

        def steps(n):
            for _ in range(n):
                act = rng.integers(0, 3, 4)
                ra, rb = pool.step(act), ref.step(act)
                assert np.array_equal(ra.obs, rb.obs) and np.array_equal(ra.reward, rb.reward)
                key = [(e.env_index, e.seed, e.length, e.stage) for e in ra.episodes]
                assert key == [(e.env_index, e.seed, e.length, e.stage) for e in rb.episodes]
                seen.extend(key)

        steps(10)
        assert {s for *_, s in seen} == {0}
        for v in (pool, ref):
            v.set_stage(2)
        old = pool.pids[1]
        os.kill(old, signal.SIGKILL)
        steps(40)
        assert pool.restarts == 1 and pool.pids[1] != old
        late = [(i, n, s) for i, _, n, s in seen[-30:]]
        assert {s for *_, s in late} == {0, 1, 2}  # stage 2 and, mixed in, stages 0 and 1
        assert all(n == (0, 1, 3)[s] + 2 for _, n, s in late)  # each played its stage's delay
        assert any(i in (2, 3) and s == 2 for i, _, s in late)  # the replaced worker's envs too


# ---- evaluation -------------------------------------------------------------------------------------
def test_evaluation_reports_the_target_task_and_the_stage_beside_it(tmp_path, capsys):
    # the target is env.reset_params' delay 2 (4-step episodes); stage 0 plays delay 0 (2 steps)
    extra = ["env.reset_params={delay: 2}", "curriculum.stages=[{delay: 0}, {}]", "curriculum.window=1000",
             "run.total_steps=64", "run.eval_every=64", "run.eval_episodes=4", "run.checkpoint_every=64"]
    tr = Trainer(tiny_config(*extra), tmp_path / "run", torch.device("cpu"), quiet=True)
    tr.train(handle_signals=False)
    (row,) = metric_rows(tmp_path / "run")
    assert row["eval/length"] == 4 and row["eval_stage/length"] == 2 and row["eval_stage/stage"] == 0
    tr.promotion.advance(64, 1.0)
    scalars = tr.evaluate()
    assert scalars["eval/length"] == 4 and not any(k.startswith("eval_stage/") for k in scalars)
    tr.close()
    out = tmp_path / "e.json"
    for args, length, stage in (([], 4, 1), (["--stage", "0"], 2, 0)):
        assert evaluate_cli.main([str(tmp_path / "run"), "--episodes", "3", "--quiet", "--json", str(out), *args]) == 0
        s = json.loads(out.read_text())
        assert s["length_mean"] == length and s["stage"] == stage and s["target"] == (stage == 1)
        assert s["training_stage"] == 0
    assert "stage:      1 (the target task; training was in stage 0): delay: 2" in capsys.readouterr().out
    assert evaluate_cli.main([str(tmp_path / "run"), "--stage", "2", "--quiet"]) == 2
    assert "--stage: stage 2: the config has stages 0..1" in capsys.readouterr().err


# ---- config errors -------------------------------------------------------------------------------------
def test_a_bad_curriculum_is_one_config_error_listing_every_problem(capsys):
    with pytest.raises(C.ConfigError) as ei:
        tiny_config("curriculum.stages=[{dely: 1}, 3]", "curriculum.threshold=1.5", "curriculum.window=0",
                    "curriculum.share=1", "curriculum.min_updates=-1")
    assert ei.value.problems == ["curriculum.stages[1]: expected a mapping of reset parameters, got 3"]
    with pytest.raises(C.ConfigError) as ei:
        tiny_config("curriculum.stages=[{dely: 1}, {}]", "curriculum.threshold=0", "curriculum.window=0",
                    "curriculum.share=-0.1", "curriculum.min_updates=-1", "env.reset_params={delya: 2}")
    assert ei.value.problems == [
        "curriculum.window: must be >= 1 episode, got 0",
        "curriculum.threshold: a success rate in (0, 1], got 0.0",
        "curriculum.share: a probability in [0, 1), got -0.1",
        "curriculum.min_updates: must be >= 0, got -1",
        "env.reset_params.delya: not a reset parameter of CueRecall-v0 (known: delay)",
        "curriculum.stages[0].dely: not a reset parameter of CueRecall-v0 (known: delay)"]
    with pytest.raises(C.ConfigError, match=r"curriculum.stages: empty; give at least one stage"):
        tiny_config("curriculum.stages=[]")
    with pytest.raises(C.ConfigError, match=r"curriculum.stages: expected a list of mappings"):
        tiny_config("curriculum.stages={delay: 1}")
    with pytest.raises(C.ConfigError, match=r"curriculum: stages override reset parameters, and "
                                            r"PendulumNoVelocity-v0 declares none"):
        C.load("pendulum_no_velocity", ["curriculum.stages=[{}]"])
    with pytest.raises(C.ConfigError) as ei:
        C.load("mortar_mayhem_grid_cpu", ["curriculum.stages=[{command_count: 3}, {comand_count: [2]}]"])
    assert ei.value.problems[0] == ("curriculum.stages[0].command_count: MortarMayhem-Grid-v0 samples it "
                                    "per episode from a list; give a non-empty list such as [3], got 3")
    assert ei.value.problems[1].startswith("curriculum.stages[1].comand_count: not a reset parameter of "
                                           "MortarMayhem-Grid-v0 (known: agent_scale, arena_size")
    assert tiny_config("curriculum.stages=null").curriculum.stages is None  # no curriculum
    cfg = tiny_config(*STAGES)
    assert C.from_dict(cfg.to_dict()) == cfg  # a checkpoint's config round trip
    assert train_cli.main(["--config", "cue_recall", "--set", "curriculum.stages=[{delay: 1}, {dely: 2}]",
                           "--set", "curriculum.threshold=2", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "curriculum.threshold: a success rate in (0, 1], got 2.0" in err and "curriculum.stages[1].dely" in err
    assert "Traceback" not in err


def test_a_resume_cannot_change_the_stages(tmp_path):
    Trainer(tiny_config(*STAGES, "run.total_steps=64"), tmp_path / "r", torch.device("cpu"),
            quiet=True).train(handle_signals=False)
    with pytest.raises(C.ConfigError, match=r"curriculum.stages: the run has .* a resume cannot change it"):
        Trainer.from_run(tmp_path / "r", overrides=["curriculum.stages=[{delay: 0}, {}]"], quiet=True)


def test_the_grid_cpu_configs_end_in_the_published_task():
    """The last stage of the CPU configs is the task as memory-gym 1.0.2 publishes it (its default
    reset parameters), the first what the one-command / shown-path configs trained before."""
    from ppo_tbptt.envs import reset_param_defaults
    for name, first in (("mortar_mayhem_grid_cpu", {"command_count": [1], "reward_command_success": 1.0}),
                        ("mystery_path_grid_cpu", {"show_origin": True, "show_goal": True,
                                                   "reward_path_progress": 0.1})):
        cfg = C.load(name)
        defaults = reset_param_defaults(cfg.env.id)
        target = cur.stage_params(cfg)
        assert all(defaults[k] == v for k, v in target.items()), (name, target)
        assert cur.stage_params(cfg, 0) == first
        assert cfg.run.eval_every > 0 and cfg.run.checkpoint_every > 0
