"""MemoryGym specifics: Mortar Mayhem's true success, Mystery Path's flag, downsampled frames."""
import numpy as np
import pytest

from ppo_tbptt import config as C
from ppo_tbptt.envs import MORTAR_MAYHEM_IDS, DownsampleObservation, LevelSeedWrapper, make_env

# GridCharacterController: rotation 0/90/180/270 faces north/west/south/east; 1 = +90, 2 = -90, 3 = forward
_HEADING = {(0, -1): 0, (-1, 0): 90, (0, 1): 180, (1, 0): 270}


def grid_step_towards(u, target) -> int:
    """The MortarMayhem-Grid action that brings the agent one move closer to ``target``."""
    x, y = u.normalized_agent_position
    dx, dy = int(np.sign(target[0] - x)), int(np.sign(target[1] - y))
    if (dx, dy) == (0, 0):
        return 0
    want = _HEADING[(dx, 0)] if dx else _HEADING[(0, dy)]
    rot = u.agent.rotation
    if rot == want:
        return 3
    return 1 if (want - rot) % 360 == 90 else 2


def mm_env(env_id="MortarMayhem-Grid-v0", **reset_params):
    env_cfg = C.EnvConfig(id=env_id, reset_params=reset_params)
    return LevelSeedWrapper(make_env(env_cfg), lambda: 0, env_cfg.reset_params)


def play_grid(env, seed, fail_command=None):
    """Follow the commands (an oracle reading the env's state); from command ``fail_command`` on
    (0-based) stand still instead. Returns the last step's info."""
    env.reset(seed=seed)
    u = env.unwrapped
    while True:
        if u._command_visualization or (fail_command is not None and u._current_command >= fail_command
                                        and not u.arena.tiles_on):
            action = 0
        else:
            action = grid_step_towards(u, u._target_pos)
        _, _, term, trunc, info = env.step(action)
        if term or trunc:
            return info


def seeds_where_last_command_moves(env, count):
    """(pygame's close() ends every env of the process, so this reuses the test's env)"""
    out = []
    for seed in range(200):
        env.reset(seed=seed)
        if env.unwrapped._commands[-1] != "stay":
            out.append(seed)
        if len(out) == count:
            break
    return out


def test_mortar_mayhem_failed_last_command_is_not_a_success():
    """The env's flag says success (the bug); the recomputed success says failure."""
    env = mm_env(command_count=[3])
    seeds = seeds_where_last_command_moves(env, 5)
    for seed in seeds:
        info = play_grid(env, seed, fail_command=2)
        assert info["raw_success"] == 1 and info["raw_commands_completed"] == 1.0  # memory-gym 1.0.2
        assert info["success"] == 0
        assert info["commands_completed"] == pytest.approx(2 / 3) and info["command_count"] == 3
        assert info["reward"] == pytest.approx(0.2)  # two commands rewarded, not the third
    env.close()


def test_mortar_mayhem_oracle_succeeds_and_early_failures_stay_failures():
    env = mm_env(command_count=[3])
    for seed in range(5):
        info = play_grid(env, seed)
        assert info["success"] == 1 == info["raw_success"] and info["commands_completed"] == 1.0
        assert info["reward"] == pytest.approx(0.3)
    for seed in seeds_where_last_command_moves(env, 10):
        env.reset(seed=seed)
        if env.unwrapped._commands[0] == "stay":
            continue
        info = play_grid(env, seed, fail_command=0)
        assert info["success"] == 0 == info["raw_success"] and info["commands_completed"] == 0.0
        assert info["command_count"] == 3
    env.close()


@pytest.mark.parametrize("env_id", MORTAR_MAYHEM_IDS)
def test_every_mortar_mayhem_id_gets_the_true_success(env_id):
    """Standing still fails a one-command episode unless the command is 'stay'."""
    env = mm_env(env_id, command_count=[1])
    noop = np.zeros(env.action_space.shape, np.int64) if env.action_space.shape else 0
    seen = set()
    for seed in range(40):
        env.reset(seed=seed)
        stay = env.unwrapped._commands[0] == "stay"
        while True:
            _, _, term, trunc, info = env.step(noop)
            if term or trunc:
                break
        assert info["success"] == int(stay), (env_id, seed, info)
        assert info["raw_success"] == 1  # the env calls every one-command episode a success
        seen.add(stay)
        if seen == {True, False}:
            break
    env.close()
    assert seen == {True, False}


def mp_env(env_id, **reset_params):
    env_cfg = C.EnvConfig(id=env_id, reset_params=reset_params)
    return LevelSeedWrapper(make_env(env_cfg), lambda: 0, env_cfg.reset_params)


def test_mystery_path_grid_success_flag_is_reaching_the_goal():
    """Mystery Path's own flag is right: 1 exactly when the episode ends on the goal tile, here
    for episodes that follow the hidden path (an oracle), stop halfway or wander at random."""
    env = mp_env("MysteryPath-Grid-v0", max_steps=48)
    rng = np.random.default_rng(0)
    outcomes = []
    for seed in range(30):
        env.reset(seed=seed)
        u = env.unwrapped
        path = [(n.x, n.y) for n in u.mystery_path.path]
        if path[0] != tuple(u.start):
            path = path[::-1]
        mode = seed % 3  # 0: follow the path, 1: follow half of it then stand, 2: random actions
        while True:
            pos = tuple(u.normalized_agent_position)
            i = path.index(pos) if pos in path else 0
            if mode == 2:
                action = int(rng.integers(4))
            elif mode == 1 and i >= len(path) // 2:
                action = 0
            else:
                action = grid_step_towards(u, path[min(i + 1, len(path) - 1)])
            _, reward, term, trunc, info = env.step(action)
            if term or trunc:
                break
        on_goal = tuple(u.normalized_agent_position) == tuple(u.end)
        assert info["success"] == int(on_goal) and "raw_success" not in info
        assert (info["reward"] >= 1.0) == on_goal  # reward_goal 1.0 is paid exactly on the goal
        if mode == 0:
            assert on_goal
        outcomes.append(on_goal)
    env.close()
    assert 0 < sum(outcomes) < len(outcomes)


def test_mystery_path_visual_reports_no_success_off_the_goal():
    env = mp_env("MysteryPath-v0", max_steps=32)
    for seed in range(5):
        env.reset(seed=seed)
        env.action_space.seed(seed)
        while True:
            _, _, term, trunc, info = env.step(env.action_space.sample())
            if term or trunc:
                break
        on_goal = tuple(env.unwrapped.normalized_agent_position) == tuple(env.unwrapped.end)
        assert info["success"] == int(on_goal) and "raw_success" not in info
    env.close()


def test_downsample_keeps_tiles_and_headings_apart():
    env_cfg = C.EnvConfig(id="MortarMayhem-Grid-v0", downsample=4, reset_params={"command_count": [1]})
    env = make_env(env_cfg)
    assert env.observation_space.shape == (21, 21, 3) and env.observation_space.dtype == np.uint8
    obs, _ = env.reset(seed=1)
    assert obs.shape == (21, 21, 3) and obs.dtype == np.uint8
    raw = env.unwrapped
    import pygame
    full = pygame.surfarray.array3d(pygame.display.get_surface()).astype(np.int64)
    expect = np.floor(full.reshape(21, 4, 21, 4, 3).mean((1, 3)) + 0.5)
    np.testing.assert_array_equal(obs, expect.astype(np.uint8))
    frames = []
    while raw._command_visualization:
        obs, *_ = env.step(0)
    for _ in range(4):  # four headings in place
        obs, *_ = env.step(1)
        frames.append(obs.astype(int))
    for i in range(4):
        for j in range(i):
            assert np.abs(frames[i] - frames[j]).max() >= 30
    env.close()


def test_downsample_rejects_sizes_it_does_not_divide():
    from ppo_tbptt.envs import EnvConfigError
    with pytest.raises(EnvConfigError, match="must divide"):
        make_env(C.EnvConfig(id="MortarMayhem-Grid-v0", downsample=5))
    with pytest.raises(ValueError, match="image observations"):
        DownsampleObservation(make_env(C.EnvConfig(id="CueRecall-v0")), 2)


def _first_fall_turns(env, seed):
    """How many left turns (action 1) before a step forward leave the path from the origin of
    level ``seed`` (None if no heading does)."""
    for turns in range(4):
        env.reset(seed=seed)
        for _ in range(turns):
            env.step(1)
        env.step(3)
        if env.unwrapped.num_fails == 1:
            return turns
    return None


@pytest.mark.parametrize("backend", ["memorygym", "fast"])
def test_mystery_path_repeated_falls_are_counted_and_only_they_pay_reward_repeat_fall(backend):
    """The same cell fallen into three times: one fall, two repeats. reward_repeat_fall (taken out
    of the options before memory-gym, which rejects unknown keys) changes the reward of exactly the
    two repeated falls; the episode's last info counts them beside the env's num_fails."""
    def episode(**params):
        env_cfg = C.EnvConfig(id="MysteryPath-Grid-v0", backend=backend,
                              reset_params={"max_steps": 24, **params})
        env = LevelSeedWrapper(make_env(env_cfg), lambda: 0, env_cfg.reset_params)
        seed, turns = next((s, t) for s in range(50) if (t := _first_fall_turns(env, s)) is not None)
        env.reset(seed=seed)
        # fall, back on the origin, the same fall, back, the same fall, then stand to the step limit
        actions = [1] * turns + [3, 0, 3, 0, 3]
        rewards, cells = [], []
        for t in range(24):
            _, reward, term, trunc, info = env.step(actions[t] if t < len(actions) else 0)
            rewards.append(reward)
            cells.append(tuple(env.unwrapped.normalized_agent_position))
            if term or trunc:
                break
        env.close()
        return turns, rewards, cells, info

    turns, plain, cells, info = episode()
    falls = [turns, turns + 2, turns + 4]
    assert cells[falls[0]] == cells[falls[1]] == cells[falls[2]] != cells[falls[0] + 1]
    assert info["num_fails"] == 3 and info["repeated_falls"] == 2
    turns2, penalised, cells2, info2 = episode(reward_repeat_fall=-0.5)
    assert (turns2, cells2) == (turns, cells) and info2["repeated_falls"] == 2
    diff = [round(b - a, 6) for a, b in zip(plain, penalised)]
    assert diff == [-0.5 if t in falls[1:] else 0.0 for t in range(len(plain))]
    assert info2["reward"] == pytest.approx(sum(penalised)) and info["reward"] == pytest.approx(sum(plain))


def test_repeated_falls_reach_the_training_statistics():
    """charts/repeated_falls: the vector env's episode statistics carry the count (serial envs)."""
    from ppo_tbptt.envs import make_vector_env
    cfg = C.load("mystery_path_grid_cpu", ["curriculum.stages=null", "env.num_envs=2", "env.vector=serial", "ppo.minibatches=1",
                                           "env.reset_params={max_steps: 12}"])
    venv = make_vector_env(cfg.env, run_seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    episodes = []
    while len(episodes) < 6:
        episodes += venv.step(rng.integers(0, 4, size=2)).episodes
    venv.close()
    assert all(0 <= e.extra["repeated_falls"] <= max(e.extra["num_fails"] - 1, 0) for e in episodes)
    assert any(e.extra["repeated_falls"] > 0 for e in episodes)
    from ppo_tbptt.update import episode_scalars
    charts = episode_scalars(episodes)
    assert charts["charts/repeated_falls"] == pytest.approx(np.mean([e.extra["repeated_falls"] for e in episodes]))


def test_reward_repeat_fall_is_a_reset_parameter_of_mystery_path_only():
    cfg = C.load("mystery_path_grid_cpu", ["curriculum.stages=[{reward_repeat_fall: -0.05}, {}]"])
    assert cfg.curriculum.stages[0] == {"reward_repeat_fall": -0.05}
    with pytest.raises(C.ConfigError, match=r"curriculum.stages\[0\].reward_repeat_fall: not a reset "
                                            r"parameter of MortarMayhem-Grid-v0"):
        C.load("mortar_mayhem_grid_cpu", ["curriculum.stages=[{reward_repeat_fall: -0.05}, {}]"])
