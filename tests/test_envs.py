import gymnasium as gym
import numpy as np
import pytest

from ppo_tbptt import config as C
from ppo_tbptt.envs import CueRecall, LevelSeedWrapper, make_base_env, make_vector_env, seed_stream


class RecordingEnv(gym.Env):
    """Remembers what every reset received; episodes last 2 steps."""

    observation_space = gym.spaces.Box(0, 255, (2,), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.resets = []
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.resets.append((seed, options))
        self.t = 0
        return np.zeros(2, np.uint8), {}

    def step(self, action):
        self.t += 1
        done = self.t >= 2
        return np.zeros(2, np.uint8), 1.0, done, False, ({"success": 1} if done else {})


def test_seed_and_reset_params_reapplied_on_every_autoreset():
    from ppo_tbptt.envs import SerialVectorEnv
    rec = RecordingEnv()
    seeds = iter([11, 12, 13, 14])
    venv = SerialVectorEnv([lambda: LevelSeedWrapper(rec, lambda: next(seeds), {"arena_size": 6})])
    venv.reset()
    for _ in range(6):
        res = venv.step(np.zeros(1, np.int64))
    assert rec.resets == [(11, {"arena_size": 6}), (12, {"arena_size": 6}), (13, {"arena_size": 6}),
                          (14, {"arena_size": 6})]
    assert res.episodes and res.episodes[0].seed == 13 and res.episodes[0].ret == 2.0


def test_memorygym_reset_params_take_effect_after_autoreset():
    """MemoryGym forgets options on a plain reset; the wrapper must keep them."""
    env = LevelSeedWrapper(make_base_env("MortarMayhem-Grid-v0"), seed_stream((0, 10), 0, 0),
                           {"command_count": [2], "explosion_delay": [1], "command_show_delay": [1]})
    lengths = []
    env.reset()
    for _ in range(3):
        done, n = False, 0
        while not done:
            _, _, te, tr, info = env.step(0)
            n += 1
            done = te or tr
        lengths.append(info["length"])
        env.reset()
    base = LevelSeedWrapper(make_base_env("MortarMayhem-Grid-v0"), seed_stream((0, 10), 0, 0))
    base.reset()
    done, n = False, 0
    while not done:
        _, _, te, tr, info = base.step(0)
        done = te or tr
    env.close()
    assert all(l < info["length"] for l in lengths), (lengths, info["length"])


def test_seed_streams_are_per_env_and_in_range():
    a, b = seed_stream((100, 200), 7, 0), seed_stream((100, 200), 7, 1)
    sa, sb = [a() for _ in range(50)], [b() for _ in range(50)]
    assert sa != sb and all(100 <= s < 200 for s in sa + sb)
    again = seed_stream((100, 200), 7, 0)
    assert [again() for _ in range(50)] == sa  # reproducible from (run seed, env index)


def test_cue_recall_rules():
    env = CueRecall(num_cues=3, delay=2)
    obs, _ = env.reset(seed=5)
    cue = int(np.argmax(obs[:3]))
    assert obs[:3].sum() == 1 and obs[3] == 0
    for _ in range(2):
        obs, r, te, tr, _ = env.step((cue + 1) % 3)  # actions during the delay do nothing
        assert r == 0 and not te and obs.sum() == 0
    obs, r, te, tr, info = env.step(cue)
    assert r == 0 and not te and obs[3] == 1  # the query step's observation
    _, r, te, tr, info = env.step(cue)
    assert (r, te, tr) == (1.0, True, False) and info == {"reward": 1.0, "length": 4, "success": 1}
    env.reset(seed=5)
    for _ in range(3):
        env.step(0)
    _, r, te, _, info = env.step((cue + 1) % 3)
    assert r == 0 and te and info["success"] == 0


def test_memorygym_obs_and_episode_stats():
    cfg = C.from_dict({"env": {"id": "MysteryPath-Grid-v0", "num_envs": 2}})
    venv = make_vector_env(cfg.env, 0)
    obs = venv.reset()
    assert obs.shape == (2, 84, 84, 3) and obs.dtype == np.uint8
    eps = []
    rng = np.random.default_rng(0)
    for _ in range(140):
        eps += venv.step(rng.integers(0, 4, 2)).episodes
    venv.close()
    assert eps and all(e.success is not None and "num_fails" in e.extra for e in eps)
    assert all(e.length <= 128 for e in eps)


def test_unknown_env_id_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown env id"):
        make_base_env("NoSuchEnv-v0")


class NoRenderMode(gym.Env):
    """A third-party style env whose constructor takes no ``render_mode``: the cue of step 0 named
    at step ``delay + 1`` earns 1."""

    observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, delay: int = 2):
        self.delay = delay

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(3)), 0
        return np.eye(3, dtype=np.float32)[self.cue], {}

    def step(self, action):
        self.t += 1
        done = self.t > self.delay
        win = done and int(action) == self.cue
        return np.zeros(3, np.float32), float(win), done, False, ({"success": float(win)} if done else {})


@pytest.fixture
def no_render_mode_id():
    env_id = "NoRenderMode-v0"
    gym.register(env_id, entry_point=NoRenderMode)
    yield env_id
    gym.registry.pop(env_id)


def test_an_env_whose_constructor_takes_no_render_mode_trains_and_is_evaluated(tmp_path, no_render_mode_id):
    import torch

    from ppo_tbptt.evaluation import evaluate_policy
    from ppo_tbptt.trainer import Trainer
    assert make_base_env(no_render_mode_id, {"delay": 1}).unwrapped.delay == 1
    cfg = C.from_dict({
        "env": {"id": no_render_mode_id, "num_envs": 2, "kwargs": {"delay": 2}, "vector": "serial"},
        "model": {"hidden_size": 8, "hidden_layer": 8},
        "tbptt": {"sequence_length": 4},
        "ppo": {"rollout_steps": 8, "epochs": 1, "minibatches": 1},
        "run": {"total_steps": 16, "device": "cpu", "checkpoint_every": 0, "eval_every": 16, "eval_episodes": 4},
    })
    tr = Trainer(cfg, tmp_path, torch.device("cpu"), quiet=True)
    scalars = tr.train(handle_signals=False)  # one update, then the periodic evaluation
    assert tr.global_step == 16 and scalars["eval/episodes"] == 4 and 0 <= scalars["eval/success"] <= 1
    result = evaluate_policy(tr.model, cfg.env, range(100, 103))
    assert len(result.episodes) == 3 and all(e.length == 3 for e in result.episodes)
