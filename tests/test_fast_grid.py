"""``env.backend: fast`` against memory-gym itself: the same bytes, rewards, ends and infos.

Every comparison steps a memory-gym env and a fast env, both built by ``make_env`` (with the
project's wrappers: true Mortar Mayhem success, ``env.downsample``) under a LevelSeedWrapper, with
the same level seeds and actions, and requires exact equality at every step: observation bytes
(``np.array_equal``), reward (value and type), terminated, truncated and the info dict (keys,
values, value types). Actions come from a random policy mixed with oracles reading the reference
env's state (one that carries out the Mortar Mayhem commands, one that walks the Mystery Path),
so successes, partial successes and every failure path are covered.
"""
from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

from test_memorygym import grid_step_towards
from ppo_tbptt import config as C
from ppo_tbptt.envs import EnvConfigError, LevelSeedWrapper, make_env, make_vector_env
from ppo_tbptt.envs import fast_grid

MM, MP = "MortarMayhem-Grid-v0", "MysteryPath-Grid-v0"


def pair(env_id, reset_params=None, downsample=1, render_mode=None):
    """(memory-gym env, fast env), each as training builds it."""
    out = []
    for backend in ("memorygym", "fast"):
        cfg = C.EnvConfig(id=env_id, reset_params=dict(reset_params or {}), downsample=downsample, backend=backend)
        out.append(LevelSeedWrapper(make_env(cfg, render_mode), lambda: 0, cfg.reset_params))
    return out


def difference(a, b) -> str | None:
    """What differs between two ``reset()`` or ``step()`` results (None: bit-identical)."""
    if len(a) != len(b):
        return f"result length {len(a)} != {len(b)}"
    oa, ob = np.asarray(a[0]), np.asarray(b[0])
    if oa.shape != ob.shape or oa.dtype != ob.dtype or not np.array_equal(oa, ob):
        where = np.argwhere(oa != ob)[:3].tolist() if oa.shape == ob.shape else "shape"
        return f"observation differs ({oa.shape} {oa.dtype} vs {ob.shape} {ob.dtype}; at {where})"
    for k, (x, y) in enumerate(zip(a[1:], b[1:]), start=1):
        if isinstance(x, dict):
            if x != y or {n: type(v) for n, v in x.items()} != {n: type(v) for n, v in y.items()}:
                return f"info differs: {x!r} vs {y!r}"
        elif x != y or type(x) is not type(y):
            what = ("reward", "terminated", "truncated")[k - 1] if len(a) == 5 else f"item {k}"
            return f"{what} differs: {x!r} ({type(x).__name__}) vs {y!r} ({type(y).__name__})"
    return None


def mm_oracle(u, rng, eps):
    """Carry out the reference env's current command (random with probability ``eps``)."""
    if rng.random() < eps:
        return int(rng.integers(4))
    if u._command_visualization:
        return 0
    return grid_step_towards(u, u._target_pos)


def mp_oracle(u, rng, eps):
    """Walk the reference env's hidden path towards the goal (random with probability ``eps``)."""
    if rng.random() < eps:
        return int(rng.integers(4))
    path = [(n.x, n.y) for n in u.mystery_path.path]  # goal first
    pos = tuple(u.normalized_agent_position)
    i = path.index(pos) if pos in path else len(path) - 1
    return grid_step_towards(u, path[max(i - 1, 0)])


ORACLES = {MM: mm_oracle, MP: mp_oracle}


def compare(ref, fast, seeds, eps, rng, max_steps=400, render=False) -> tuple[str | None, dict]:
    """Play one episode per level seed on both envs with the same actions; the first difference
    (with seed and step) or None, and counts of what was covered."""
    seen = {"steps": 0, "episodes": 0, "success": 0, "reward": 0}
    oracle = ORACLES[ref.unwrapped.spec.id]
    for seed in seeds:
        a, b = ref.reset(seed=int(seed)), fast.reset(seed=int(seed))
        for t in range(max_steps + 1):
            diff = difference(a, b)
            if diff is None and render:
                ra, rb = ref.render(), fast.render()
                if not np.array_equal(ra, rb):
                    diff = "render() differs"
            if diff is not None:
                return f"level seed {seed}, step {t}: {diff}", seen
            if t and (a[2] or a[3]):
                seen["episodes"] += 1
                seen["success"] += int(a[4].get("success", 0) == 1)
                break
            action = oracle(ref.unwrapped, rng, eps)
            a, b = ref.step(action), fast.step(action)
            seen["steps"] += 1
            seen["reward"] += int(a[1] != 0)
    return None, seen


MM_PARAMS = [
    {"command_count": [1], "reward_command_success": 1.0},  # mortar_mayhem_grid_cpu.yaml
    {},  # the published task: 10 commands, 0.1 each
    {"command_count": [1, 2, 3], "reward_command_success": 1.0},
    {"command_count": [4], "explosion_delay": [3, 6], "explosion_duration": [1, 2], "command_show_duration": [1, 3],
     "command_show_delay": [0, 1]},
    {"command_count": [2], "allowed_commands": 9, "arena_size": 6, "reward_command_failure": -0.5,
     "reward_episode_success": 1.0},
    {"command_count": [3], "arena_size": 3, "visual_feedback": False},
]
MP_PARAMS = [
    {"show_origin": True, "show_goal": True, "reward_path_progress": 0.1},  # mystery_path_grid_cpu.yaml
    {},  # the published task: path, origin and goal hidden
    {"show_origin": True, "show_goal": False, "reward_goal": 2.0, "cardinal_origin_choice": [2, 3]},
    {"show_goal": True, "max_steps": 24, "reward_fall_off": -0.1, "reward_step": -0.01,
     "cardinal_origin_choice": [1]},
    {"visual_feedback": False, "reward_path_progress": 0.05, "cardinal_origin_choice": [0]},
]


@pytest.mark.parametrize("env_id,params,downsample", [(MM, p, 1 + 3 * (k % 2)) for k, p in enumerate(MM_PARAMS)]
                         + [(MP, p, 4 - 3 * (k % 2)) for k, p in enumerate(MP_PARAMS)])
def test_fast_backend_matches_memorygym(env_id, params, downsample):
    ref, fast = pair(env_id, params, downsample)
    rng = np.random.default_rng(len(str(params)))
    seen = {"steps": 0, "success": 0, "episodes": 0}
    for eps, seeds in ((0.0, range(0, 4)), (0.1, range(100, 106)), (1.0, range(500, 510))):
        diff, s = compare(ref, fast, seeds, eps, rng)
        assert diff is None, f"{env_id} {params} downsample {downsample}: {diff}"
        seen = {k: seen[k] + s[k] for k in seen}
    assert seen["episodes"] == 20 and seen["success"] >= 3 and seen["steps"] >= 150, seen
    ref.close()


def test_render_matches_memorygym_and_other_modes_are_refused():
    for env_id in (MM, MP):
        ref, fast = pair(env_id, {"command_count": [2]} if env_id == MM else {"show_goal": True},
                         render_mode="rgb_array")
        diff, seen = compare(ref, fast, range(3), 0.3, np.random.default_rng(1), render=True)
        assert diff is None and seen["steps"] > 20, diff
        assert fast.render().shape == (84, 84, 3)
    cfg = C.EnvConfig(id=MM, backend="fast")
    with pytest.raises(EnvConfigError, match="rgb_array"):
        make_env(cfg, "human")


@pytest.mark.parametrize("what,downsample", [("pixel", 1), ("pixel", 4), ("reward", 1), ("terminated", 1),
                                             ("info", 4)])
def test_comparison_reports_one_pixel_one_reward_one_done(what, downsample, monkeypatch):
    """The comparison is as sharp as claimed: one changed pixel channel, reward, end or info value
    at one step of one episode (as training receives it) is reported with its level seed and step."""
    ref, fast = pair(MM, {"command_count": [1]}, downsample)
    step = fast.step
    calls = {"n": 0}

    def perturbed(action):
        obs, reward, done, trunc, info = step(action)
        calls["n"] += 1
        if (done if what in ("terminated", "info") else calls["n"] == 7):
            if what == "pixel":
                obs = obs.copy()
                obs[obs.shape[0] // 2, 3, 1] ^= 1
            elif what == "reward":
                reward = reward + 1e-12
            elif what == "terminated":
                done = False
            else:
                info = {**info, "commands_completed": info["commands_completed"] + 1e-12}
        return obs, reward, done, trunc, info

    monkeypatch.setattr(fast, "step", perturbed)
    diff, _ = compare(ref, fast, [3], 0.0, np.random.default_rng(0))
    assert diff is not None and diff.startswith("level seed 3, step"), diff
    assert {"pixel": "observation", "reward": "reward", "terminated": "terminated", "info": "info"}[what] in diff
    monkeypatch.undo()
    assert compare(ref, fast, [3], 0.0, np.random.default_rng(0))[0] is None


def test_vector_env_state_moves_between_backends_and_resumes_exactly():
    """A serial vector env's state (level seeds, replayed actions) taken on memory-gym restores on
    the fast backend, and both go on identically: checkpoints resume across backends."""
    base = C.EnvConfig(id=MM, num_envs=3, downsample=4, reset_params={"command_count": [1, 2]})
    ref = make_vector_env(base, run_seed=5)
    fast = make_vector_env(dataclasses.replace(base, backend="fast"), run_seed=5)
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 4, (60, 3))
    assert np.array_equal(ref.reset(), fast.reset())
    for a in acts[:30]:
        ref.step(a)
        fast.step(a)
    moved = make_vector_env(dataclasses.replace(base, backend="fast"), run_seed=99)
    np.testing.assert_array_equal(moved.set_state(ref.get_state()), fast.set_state(fast.get_state()))
    for a in acts[30:]:
        r, f, m = ref.step(a), fast.step(a), moved.step(a)
        for x in (f, m):
            assert np.array_equal(r.obs, x.obs) and np.array_equal(r.reward, x.reward)
            assert np.array_equal(r.terminated, x.terminated) and r.episodes == x.episodes
    for v in (ref, fast, moved):
        v.close()


def test_pool_with_fast_backend_gives_the_serial_memorygym_rollout():
    base = C.EnvConfig(id=MP, num_envs=4, downsample=4, vector="serial",
                       reset_params={"show_origin": True, "show_goal": True, "reward_path_progress": 0.1})
    ref = make_vector_env(base, run_seed=3)
    pool = make_vector_env(dataclasses.replace(base, backend="fast", vector="pool", envs_per_worker=2), run_seed=3)
    try:
        assert np.array_equal(ref.reset(), pool.reset())
        rng = np.random.default_rng(0)
        for _ in range(150):
            a = rng.integers(0, 4, 4)
            r, p = ref.step(a), pool.step(a)
            assert np.array_equal(r.obs, p.obs) and np.array_equal(r.reward, p.reward)
            assert np.array_equal(r.terminated, p.terminated) and r.episodes == p.episodes
    finally:
        pool.close()
        ref.close()


def test_evaluation_is_the_same_on_both_backends():
    """Evaluation (one episode per held-out seed, a fixed sampled policy, recorded frames)."""
    import torch
    from ppo_tbptt.evaluation import evaluate_policy
    from ppo_tbptt.model import build_model
    cfg = C.EnvConfig(id=MM, num_envs=2, downsample=4, reset_params={"command_count": [1]})
    env = make_env(cfg)
    torch.manual_seed(0)
    model = build_model(env.observation_space, env.action_space,
                        C.ModelConfig(hidden_size=8, hidden_layer=8, encoder="mlp"))
    out = [evaluate_policy(model, dataclasses.replace(cfg, backend=b), range(1_000_000, 1_000_006), record=2)
           for b in ("memorygym", "fast")]
    assert [e.__dict__ for e in out[0].episodes] == [e.__dict__ for e in out[1].episodes]
    assert len(out[0].frames) == 2
    for fa, fb in zip(out[0].frames, out[1].frames):
        assert len(fa) == len(fb) and all(np.array_equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(fa, fb))


def test_backend_fast_is_only_for_the_grid_ids(capsys):
    assert C.load("mortar_mayhem_grid_cpu", ["env.backend=fast"]).env.backend == "fast"
    with pytest.raises(C.ConfigError, match=r"env.backend: 'fast' implements only MortarMayhem-Grid-v0"):
        C.load("mortar_mayhem", ["env.backend=fast"])
    with pytest.raises(C.ConfigError, match=r"env.backend: must be 'memorygym' or 'fast', got 'numpy'"):
        C.load("mortar_mayhem_grid_cpu", ["env.backend=numpy"])
    from ppo_tbptt import train as train_cli
    assert train_cli.main(["--config", "cue_recall", "--set", "env.backend=fast"]) == 2
    assert "env.backend: 'fast' implements only" in capsys.readouterr().err


# ---- the sweep (slow): every reset parameter the configs use, thousands of episodes -----------------
SWEEP_MM = ([{"command_count": [c]} for c in range(1, 11)]
            + [{"command_count": [c], "reward_command_success": 1.0} for c in (1, 2, 5, 10)]
            + [{"command_count": [1, 2, 3]}, {"command_count": list(range(1, 11)), "reward_command_success": 1.0}]
            + MM_PARAMS)
SWEEP_MP = ([{"show_origin": o, "show_goal": g, "reward_path_progress": r}
             for o in (False, True) for g in (False, True) for r in (0.0, 0.1)]
            + [{"reward_goal": 0.5, "cardinal_origin_choice": [c]} for c in range(4)]
            + [{"max_steps": m} for m in (16, 64, 128)] + MP_PARAMS)


@pytest.mark.slow
@pytest.mark.parametrize("env_id,sweep", [(MM, SWEEP_MM), (MP, SWEEP_MP)])
def test_sweep_matches_memorygym(env_id, sweep):
    total = {"steps": 0, "episodes": 0, "success": 0}
    for k, params in enumerate(sweep):
        for downsample in (1, 4):
            ref, fast = pair(env_id, params, downsample)
            rng = np.random.default_rng(k)
            for eps, n in ((0.0, 16), (0.05, 16), (0.3, 16), (1.0, 16)):
                seeds = rng.integers(0, 10_000_000, n)
                diff, seen = compare(ref, fast, seeds, eps, rng)
                assert diff is None, f"{env_id} {params} downsample {downsample} eps {eps}: {diff}"
                total = {key: total[key] + seen[key] for key in total}
    print(env_id, total)
    assert total["steps"] > 40_000 and total["success"] > 500, total


def test_piece_keeps_opaque_black_pixels_and_drops_colour_keyed_ones():
    """A piece is what a draw call sets whatever lies below: a black pixel drawn is part of it,
    a colour-keyed (transparent) one is not."""
    import pygame
    sprite = pygame.Surface((4, 4))
    sprite.fill((0, 0, 255))
    sprite.set_colorkey((0, 0, 255))
    sprite.fill((0, 0, 0), (0, 0, 2, 1))  # two opaque black pixels
    sprite.fill((9, 8, 7), (3, 3, 1, 1))
    piece = fast_grid.Piece(lambda s: s.blit(sprite, (10, 20)))
    frame = np.full((84, 84, 3), 200, np.uint8)
    piece.paste(frame.reshape(-1))
    changed = np.argwhere((frame != 200).any(axis=2)).tolist()
    assert changed == [[10, 20], [11, 20], [13, 23]] and frame[13, 23].tolist() == [9, 8, 7]
    assert frame[10, 20].tolist() == [0, 0, 0] and piece.index.size == 9


def test_training_logs_the_same_metrics_on_either_backend_and_resumes_across_them(tmp_path):
    """A short MortarMayhem-Grid run logs identical metrics with memory-gym and with the port, and
    a memory-gym run interrupted after one update and resumed with ``env.backend=fast`` too."""
    import torch
    from eval_helpers import interrupt_after, metric_rows
    from ppo_tbptt.trainer import Trainer
    sets = ["env.vector=serial", "env.num_envs=2", "model.hidden_size=16", "model.hidden_layer=16",
            "ppo.rollout_steps=48", "ppo.epochs=1", "ppo.minibatches=2", "run.total_steps=288",
            "run.checkpoint_every=96", "run.eval_every=0", "run.device=cpu", "run.torch_threads=1"]

    def run(name, backend, stop_after=0):
        trainer = Trainer(C.load("mortar_mayhem_grid_cpu", sets + [f"env.backend={backend}"]), tmp_path / name,
                          torch.device("cpu"), quiet=True)
        interrupt_after(trainer, stop_after)
        trainer.train(handle_signals=False)
        trainer.close()

    run("memorygym", "memorygym")
    run("fast", "fast")
    run("switched", "memorygym", stop_after=1)
    resumed = Trainer.from_run(tmp_path / "switched", overrides=["env.backend=fast"], quiet=True)
    assert resumed.cfg.env.backend == "fast" and resumed.global_step == 96
    resumed.train(handle_signals=False)
    resumed.close()
    full = metric_rows(tmp_path / "memorygym")
    assert len(full) == 3 and all("charts/success" in r for r in full), full[0].keys()
    assert metric_rows(tmp_path / "fast") == full
    assert metric_rows(tmp_path / "switched") == full
