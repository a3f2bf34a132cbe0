"""Observation and action spaces beyond one Box: layouts, encodings, the Gaussian policy, and the
recurrent-state invariants (stepping = sequence forward, first-minibatch ratio 1, pool = serial,
bit-exact resume) on every new space, with the test envs of ``tests/space_envs.py``."""
from __future__ import annotations

import json
import pickle
import signal

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import space_envs  # noqa: F401  (registers Spaces-v0 in this process)
from eval_helpers import DEVICES, exact_cuda, metric_rows
from ppo_tbptt import config as C
from ppo_tbptt import train as train_cli
from ppo_tbptt.envs import EnvConfigError, LevelSeedWrapper, make_env, make_vector_env, seed_stream
from ppo_tbptt.envs.spaces import FlatBox, UnsupportedSpaceError, flat_observation_space, flatten_observation
from ppo_tbptt.envs.vector import env_actions
from ppo_tbptt.evaluation import evaluate_policy
from ppo_tbptt.gae import compute_gae
from ppo_tbptt.model import GaussianDist, MLPEncoder, ModelConfigError, MultiPartEncoder, NatureCNN, build_model
from ppo_tbptt.ppo import LossCoefs, ppo_loss
from ppo_tbptt.rollout import Collector
from ppo_tbptt.sequences import build_sequences
from ppo_tbptt.trainer import Trainer

S = gym.spaces
TOL = 1e-5  # as in test_equivalence.py


def space_config(obs: str, act: str, *extra: str) -> C.Config:
    raw = {
        "env": {"id": "space_envs:Spaces-v0", "num_envs": 3, "kwargs": {"obs": obs, "act": act}},
        "model": {"core": "gru", "hidden_size": 8, "hidden_layer": 8},
        "tbptt": {"sequence_length": 4},
        "ppo": {"rollout_steps": 13, "epochs": 2, "minibatches": 2, "lr": 1e-3},
        "run": {"total_steps": 3 * 13 * 4, "device": "cpu", "checkpoint_every": 0, "torch_threads": 1},
    }
    raw, problems = C.apply_overrides(raw, list(extra))
    assert not problems
    return C.from_dict(raw)


# ---- observation layouts ------------------------------------------------------------------------
def test_a_plain_box_is_used_as_it_is():
    image = S.Box(0, 255, (84, 84, 3), np.uint8)
    assert flat_observation_space(image) is image  # MemoryGym's frames: no wrapper, no copy
    cfg = space_config("box", "box")
    assert type(make_env(cfg.env).observation_space) is S.Box


@pytest.mark.parametrize("space,dtype", [
    (S.Dict({"img": S.Box(0, 255, (4, 4, 3), np.uint8), "c": S.Discrete(5)}), np.uint8),
    (S.Tuple((S.Box(0, 255, (2,), np.uint8), S.Discrete(3, start=-1))), np.int16),
    (S.Tuple((S.Box(0, 255, (2,), np.uint8), S.Box(-1, 1, (2,), np.float32))), np.float32),
    (S.MultiDiscrete([300, 2]), np.uint16),
    (S.Dict({"a": S.Box(-1, 1, (1,), np.float64), "b": S.Discrete(2)}), np.float64),
])
def test_flat_dtype_holds_every_part_exactly(space, dtype):
    flat = flat_observation_space(space)
    assert isinstance(flat, FlatBox) and flat.dtype == np.dtype(dtype)
    space.seed(0)
    for _ in range(20):
        obs = space.sample()
        vec = flatten_observation(flat, obs)
        assert vec.dtype == flat.dtype and flat.contains(vec)
        got = [vec[p.offset:p.offset + p.size] for p in flat.parts]
        leaves = list(obs.values()) if isinstance(obs, dict) else list(obs) if isinstance(obs, tuple) else [obs]
        for g, leaf in zip(got, leaves):
            assert np.array_equal(g.astype(np.float64), np.asarray(leaf, np.float64).reshape(-1))
    assert pickle.loads(pickle.dumps(flat)).parts == flat.parts  # travels to pool workers


def test_unsupported_spaces_are_named():
    with pytest.raises(EnvConfigError, match=r"unsupported observation space Text.*supported: Box"):
        make_env(space_config("text", "box").env)
    with pytest.raises(UnsupportedSpaceError, match=r"obs\['x'\]\[1\]"):
        flat_observation_space(S.Dict({"x": S.Tuple((S.Discrete(2), S.MultiBinary(3)))}))
    with pytest.raises(EnvConfigError, match="unsupported action space MultiBinary"):
        make_env(space_config("box", "multibinary").env)
    with pytest.raises(UnsupportedSpaceError, match="unsupported action space Box"):  # integer Box
        build_model(S.Box(0, 1, (2,)), S.Box(0, 3, (2,), np.int64), C.ModelConfig(hidden_size=4, hidden_layer=4))


@pytest.mark.parametrize("vector", ["serial", "pool"])
@pytest.mark.parametrize("obs,act", [("text", "box"), ("dict", "multibinary")])
def test_train_cli_rejects_unsupported_spaces_in_one_line(tmp_path, capsys, vector, obs, act):
    argv = ["--config", "cue_recall", "--set", "env.id=space_envs:Spaces-v0", "--set", "env.kwargs={}",
            "--set", f"env.kwargs.obs={obs}", "--set", f"env.kwargs.act={act}", "--set", f"env.vector={vector}",
            "--set", "env.num_envs=2", "--set", f"run.out_dir={tmp_path}"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "unsupported" in err
    assert ("Text" if obs == "text" else "MultiBinary") in err
    assert not list(tmp_path.iterdir())  # no run folder left behind


# ---- encoders -----------------------------------------------------------------------------------
def test_one_hot_and_box_scaling_of_the_vector_parts():
    space = S.Tuple((S.Discrete(4, start=1), S.Box(0, 10, (3,), np.int64),
                     S.MultiDiscrete([3, 2], start=[-1, 0]), S.Box(-1, 1, (2,), np.float32)))
    flat = flat_observation_space(space)
    enc = MultiPartEncoder(flat.parts, 8)
    space.seed(3)
    samples = [space.sample() for _ in range(32)]
    x = torch.from_numpy(np.stack([flatten_observation(flat, o) for o in samples])).float()
    got = enc.vector_input(x)
    one_hot = torch.nn.functional.one_hot
    expected = torch.cat([
        torch.tensor(np.stack([o[1] for o in samples]), dtype=torch.float32) / 10,
        torch.tensor(np.stack([o[3] for o in samples]), dtype=torch.float32),
        one_hot(torch.tensor([o[0] - 1 for o in samples]), 4).float(),
        one_hot(torch.tensor([o[2][0] + 1 for o in samples]), 3).float(),
        one_hot(torch.tensor([o[2][1] for o in samples]), 2).float(),
    ], dim=1)
    torch.testing.assert_close(got[:, :5], expected[:, :5], rtol=1e-6, atol=0)  # Box values, scaled
    assert torch.equal(got[:, 5:], expected[:, 5:])  # the one-hot encodings
    assert torch.equal(got[:, 5:].sum(1), torch.full((32,), 3.0))  # one 1 per discrete dimension


def test_images_in_a_dict_get_the_cnn_and_the_rest_an_mlp():
    cfg = C.ModelConfig(hidden_size=8, hidden_layer=8)
    act = S.Discrete(3)
    big = make_env(space_config("dict", "box").env).observation_space
    m = build_model(big, act, cfg)
    assert isinstance(m.encoder, MultiPartEncoder) and len(m.encoder.cnns) == 1
    assert isinstance(m.encoder.cnns[0], NatureCNN) and m.encoder.mlp is not None and m.encoder.fuse is not None
    # the MLP sees the 2 position values and the one-hot cue (4) and clock (2 + 8), not the image
    assert m.encoder.mlp.net[0].in_features == 2 + 4 + 2 + 8
    small = make_env(space_config("nested", "box").env).observation_space  # a 4x4 image: the MLP
    m = build_model(small, act, cfg)
    assert not m.encoder.cnns and m.encoder.fuse is None and m.encoder.mlp.net[0].in_features == 4 + 1 + 48
    m = build_model(big, act, C.ModelConfig(hidden_size=8, hidden_layer=8, encoder="mlp"))
    assert not m.encoder.cnns and isinstance(m.encoder.mlp, MLPEncoder)
    with pytest.raises(ModelConfigError, match="needs an image part"):
        build_model(small, act, C.ModelConfig(hidden_size=8, hidden_layer=8, encoder="cnn"))


def test_image_part_is_scaled_and_laid_out_as_a_plain_image():
    """The CNN of a Dict's image part computes what a plain image model's CNN computes."""
    image = S.Box(0, 255, (36, 36, 2), np.uint8)
    flat = flat_observation_space(S.Dict({"image": image}))
    torch.manual_seed(0)
    enc = MultiPartEncoder(flat.parts, 16)
    obs = torch.randint(0, 256, (5, 36, 36, 2), dtype=torch.uint8)
    ref = NatureCNN(image.shape, 16)
    ref.load_state_dict(enc.cnns[0].state_dict())
    # (the plain image model multiplies by obs_scale = 1 / 255)
    torch.testing.assert_close(enc(obs.reshape(5, -1).float()), ref(obs.float() * (1.0 / 255)), rtol=0, atol=0)


# ---- the Gaussian policy ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (3, 6)])
@pytest.mark.parametrize("D", [1, 3])
def test_gaussian_matches_torch_normal(shape, D):
    gen = torch.Generator().manual_seed(10 * D + len(shape))
    mean = torch.randn(*shape, D, generator=gen) * 2
    log_std = torch.randn(D, generator=gen) * 0.5
    ours = GaussianDist(mean, log_std)
    ref = Normal(mean, log_std.exp().expand_as(mean))
    torch.manual_seed(5)
    expected = ref.sample()
    torch.manual_seed(5)
    actions = ours.sample()
    assert actions.shape == (*shape, D) and torch.equal(actions, expected)  # the same draws
    torch.testing.assert_close(ours.log_prob(actions), ref.log_prob(actions).sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.entropy(), ref.entropy().sum(-1), rtol=1e-6, atol=1e-6)
    assert ours.entropy().shape == shape and torch.equal(ours.mode(), mean)
    other_mean, other_log_std = torch.randn(*shape, D, generator=gen), torch.randn(D, generator=gen)
    other = Normal(other_mean, other_log_std.exp().expand_as(other_mean))
    kl = ours.kl(GaussianDist(other_mean, other_log_std))
    torch.testing.assert_close(kl, kl_divergence(ref, other).sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.all(kl >= 0) and torch.all(ours.kl(ours) == 0)
    # a tiny mean difference under the shared log std: 0.5 (dmu / std)^2, not rounded to 0
    near = GaussianDist(mean + 1e-4, log_std)
    torch.testing.assert_close(ours.kl(near), (0.5 * (1e-4 / log_std.exp()) ** 2).sum().expand(shape),
                               rtol=1e-2, atol=0)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(ours.sample(g), torch.normal(mean, ref.scale, generator=torch.Generator().manual_seed(1)))


def test_gaussian_gradients_match_torch_normal():
    base_mean = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    actions = torch.randn(4, 2, generator=torch.Generator().manual_seed(1)) * 2
    grads = []
    for use_ref in (True, False):
        mean = base_mean.clone().requires_grad_(True)
        log_std = torch.tensor([0.3, -0.7], requires_grad=True)
        if use_ref:
            d = Normal(mean, log_std.exp().expand_as(mean))
            out = d.log_prob(actions).sum() + 0.1 * d.entropy().sum()
        else:
            d = GaussianDist(mean, log_std)
            out = d.log_prob(actions).sum() + 0.1 * d.entropy().sum()
        out.backward()
        grads.append((mean.grad, log_std.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_box_model_has_a_state_independent_log_std():
    cfg = C.ModelConfig(hidden_size=8, hidden_layer=8)
    m = build_model(S.Box(-1, 1, (3,)), S.Box(-1, 1, (2, 2), np.float64), cfg)
    assert m.continuous and m.nvec is None and m.action_dims == 4 and m.action_dtype == torch.float32
    assert m.log_std.shape == (4,) and torch.equal(m.log_std.detach(), torch.zeros(4))  # std 1
    assert "log_std" in m.state_dict()
    obs = torch.randn(5, 3)
    a, logp, v, _ = m.act(obs, m.initial_state(5))
    assert a.shape == (5, 4) and a.dtype == torch.float32 and logp.shape == v.shape == (5,)
    d = m.dist(torch.randn(5, 4))
    assert torch.equal(d.std, torch.ones(5, 4))


def test_env_actions_clip_box_actions_per_dimension():
    box = S.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32))
    a = np.array([[-3.0, 5.0], [0.5, -0.25], [2.0, 1.0]], np.float32)
    before = a.copy()
    out = env_actions(a, box)
    assert out.dtype == np.float32 and np.array_equal(out, [[-1, 2], [0.5, 0], [1, 1]])
    assert np.array_equal(a, before)  # the sample itself is untouched
    b2 = env_actions(np.zeros((2, 4), np.float32) + 7, S.Box(-1, 1, (2, 2), np.float64))
    assert b2.shape == (2, 2, 2) and b2.dtype == np.float64 and (b2 == 1).all()
    assert env_actions(np.array([[2], [1]]), S.Discrete(3)).tolist() == [2, 1]
    md = env_actions(np.array([[2], [1]]), S.MultiDiscrete([3]))  # not squeezed to scalars
    assert md.shape == (2, 1)


def test_buffer_keeps_the_unclipped_sample_and_the_env_gets_the_clipped_one():
    """The test env raises on an action outside its space, so collecting at all shows the clip."""
    cfg = space_config("box", "box", "ppo.rollout_steps=40")
    model, rollout, envs_state = collect_twice(cfg, keep_state=True)
    a = rollout.actions  # [T, N, 2], the Gaussian's samples (std 1 around means near 0)
    assert a.dtype == torch.float32
    assert (a[..., 0].abs() > 1).any() and (a[..., 1] < 0).any(), "some samples leave the bounds"
    recorded = np.array([x for e in envs_state["envs"] for x in e["actions"]])
    assert len(recorded) and (recorded[:, 0] >= -1).all() and (recorded[:, 0] <= 1).all()
    assert (recorded[:, 1] >= 0).all() and (recorded[:, 1] <= 2).all()


# ---- invariants on every new space --------------------------------------------------------------
def collect_twice(cfg: C.Config, seed: int = 0, keep_state: bool = False, device: str = "cpu"):
    """Two rollouts (the second starts mid-episode), heads sharpened as in test_equivalence.py."""
    device = torch.device(device)
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env, seed, device=device.type)
    try:
        model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
        for head in (model.policy_head, model.value_head):
            torch.nn.init.orthogonal_(head.weight, 3.0)
        model = model.to(device)
        col = Collector(envs, model, cfg.ppo.rollout_steps, device, cfg.model.reset_hidden_state)
        col.collect()
        rollout, _ = col.collect()
        state = envs.get_state() if keep_state else None
    finally:
        envs.close()
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                           rollout.bootstrap_value, 0.99, 0.95, rollout.truncation_values)
    rollout.advantages.copy_(adv)
    rollout.returns.copy_(ret)
    return (model, rollout, state) if keep_state else (model, rollout)


PAIRS = [("box", "box"), ("dict", "box"), ("tuple", "multidiscrete"), ("discrete", "box1"),
         ("multidiscrete", "discrete"), ("nested", "box2d"), ("dict", "discrete"), ("box", "box0")]


@pytest.fixture
def exact():
    with exact_cuda():
        yield


CUDA = [pytest.param(obs, act, "cuda", marks=DEVICES[1].marks) for obs, act in (("dict", "box"), ("tuple", "box2d"))]


@pytest.mark.parametrize("obs,act,device", [(obs, act, "cpu") for obs, act in PAIRS] + CUDA)
@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_stepping_equals_sequence_forward_and_first_ratio_is_one(obs, act, device, core, exact):
    """On CUDA too (gpu marker): observations through the pinned staging buffer, actions sampled
    on the device and clipped on the host."""
    model, rollout = collect_twice(space_config(obs, act, f"model.core={core}"), device=device)
    assert not rollout.episode_start[0].all() and rollout.episode_start[1:].any()
    b = build_sequences(rollout, 4)
    model.train()
    logits, values, _ = model(b.obs, b.init_state, b.valid)  # as in the update
    logp = model.dist(logits.detach()).log_prob(b.actions)
    assert logp.std() > 0.02
    m = b.mask.bool()
    torch.testing.assert_close(logp[m], b.logprobs[m], atol=TOL, rtol=0)
    torch.testing.assert_close(values.detach()[m], b.values[m], atol=TOL, rtol=0)
    mb = b.select(torch.arange(0, b.num_sequences, 2, device=b.mask.device))
    out = ppo_loss(model, mb, LossCoefs(0.2, 0.01, 0.5))
    assert abs(out.metrics["losses/ratio"].item() - 1.0) < 1e-6
    assert abs(out.metrics["losses/approx_kl"].item()) < 1e-7
    assert out.metrics["losses/clipfrac"].item() == 0.0
    out.loss.backward()
    if model.continuous:
        assert model.log_std.grad is not None and model.log_std.grad.abs().sum() > 0


def collect_rollouts(cfg: C.Config, seed: int = 0):
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env, seed)
    try:
        model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
        col = Collector(envs, model, cfg.ppo.rollout_steps, torch.device("cpu"))
        out = []
        for _ in range(2):
            r, eps = col.collect()
            out.append(({k: v.clone() for k, v in vars(r).items() if torch.is_tensor(v)},
                        [(e.env_index, e.seed, e.ret, e.length) for e in eps]))
        return out
    finally:
        envs.close()


@pytest.mark.parametrize("obs,act", [("dict", "box"), ("tuple", "box2d"), ("discrete", "multidiscrete"),
                                     ("nested", "box0")])
def test_pool_rollouts_equal_serial_rollouts(obs, act):
    """Flattened observations and float actions through the pool's shared memory."""
    extra = ["env.num_envs=4", "env.groups=2"]
    serial = collect_rollouts(space_config(obs, act, *extra, "env.vector=serial"))
    pool = collect_rollouts(space_config(obs, act, *extra, "env.vector=pool", "env.envs_per_worker=1"))
    for (rs, es), (rp, ep) in zip(serial, pool):
        assert es == ep and es
        for k, v in rs.items():
            assert v.dtype == rp[k].dtype and torch.equal(v, rp[k]), k


def test_gym_async_rollouts_equal_serial_rollouts():
    """gymnasium's AsyncVectorEnv (the benchmark's baseline) takes the flattened space too."""
    serial = collect_rollouts(space_config("dict", "box", "env.vector=serial"))
    gym_async = collect_rollouts(space_config("dict", "box", "env.vector=gym_async"))
    for (rs, es), (ra, ea) in zip(serial, gym_async):
        assert [(i, r, n) for i, _, r, n in es] == [(i, r, n) for i, _, r, n in ea] and es
        assert all(torch.equal(v, ra[k]) for k, v in rs.items())


def test_pool_stepping_equals_sequence_forward():
    model, rollout = collect_twice(space_config("dict", "box", "env.vector=pool", "env.envs_per_worker=2"))
    b = build_sequences(rollout, 0)
    with torch.no_grad():
        logits, values, _ = model(b.obs, b.init_state)
    m = b.mask.bool()
    torch.testing.assert_close(model.dist(logits).log_prob(b.actions)[m], b.logprobs[m], atol=TOL, rtol=0)
    torch.testing.assert_close(values[m], b.values[m], atol=TOL, rtol=0)


@pytest.mark.parametrize("act", ["box", "box1", "box2d", "box0"])
def test_box_action_env_state_replays_to_the_same_future(act):
    """LevelSeedWrapper records float actions as plain data; replaying them rebuilds the episode."""
    env_cfg = space_config("dict", act).env
    a = LevelSeedWrapper(make_env(env_cfg), seed_stream((0, 1000), 1, 0))
    b = LevelSeedWrapper(make_env(env_cfg), seed_stream((0, 1000), 1, 7))
    a.reset()
    b.reset()
    space = a.action_space
    rng = np.random.default_rng(0)

    def action():
        return np.clip(rng.normal(size=space.shape), space.low, space.high).astype(space.dtype)

    for _ in range(2):
        a.step(action())
    state = json.loads(json.dumps(a.get_state()))  # plain data
    obs_b = b.set_state(state)
    assert np.array_equal(obs_b, flatten_observation(a.observation_space, a.unwrapped._obs()))
    for _ in range(30):
        act_ = action()
        ra, rb = a.step(act_), b.step(act_)
        assert np.array_equal(ra[0], rb[0]) and ra[1:4] == rb[1:4]
        if ra[2]:
            assert np.array_equal(a.reset()[0], b.reset()[0])


def train_space(run_dir, cfg: C.Config) -> Trainer:
    tr = Trainer(cfg, run_dir, torch.device("cpu"), quiet=True)
    tr.train(handle_signals=False)
    return tr


@pytest.mark.parametrize("obs,act,vector", [("dict", "box", "serial"), ("tuple", "box1", "pool"),
                                             ("nested", "box2d", "serial"), ("multidiscrete", "discrete", "serial"),
                                             ("box", "box0", "pool")])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, obs, act, vector):
    """Mid-episode float actions, flattened observations and the Gaussian's log std travel in the
    checkpoint: the resumed run logs exactly what the uninterrupted one logs (on a CPU)."""
    extra = [f"env.vector={vector}", "env.envs_per_worker=2", "run.total_steps=195"]  # 5 updates
    cfg = space_config(obs, act, *extra)
    train_space(tmp_path / "full", cfg)
    part = Trainer(cfg, tmp_path / "part", torch.device("cpu"), quiet=True)
    original = part.train_update

    def update_then_interrupt():
        out = original()
        if part.update == 2:
            part.request_stop(signal.SIGINT)
        return out

    part.train_update = update_then_interrupt
    part.train(handle_signals=False)
    assert part.global_step == 78
    from ppo_tbptt import checkpoint as ckpt
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "part"))
    envs = state["collector"]["envs"]["envs"]
    assert any(e["actions"] for e in envs)  # interrupted mid-episode
    if act.startswith("box"):
        assert isinstance(np.asarray(envs[0]["actions"] or envs[1]["actions"]).flat[0].item(), float)
    Trainer.from_run(tmp_path / "part", quiet=True).train(handle_signals=False)
    full, again = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "part")
    assert len(full) == 5 and again == full


def test_refresh_staleness_kl_of_the_gaussian(tmp_path):
    """tbptt.refresh_states measures KL between Gaussians: finite, >= 0, and > 0 once weights move."""
    cfg = space_config("box", "box", "tbptt.refresh_states=true", "ppo.epochs=3", "run.total_steps=78")
    tr = Trainer(cfg, tmp_path, torch.device("cpu"), log=False, quiet=True)
    try:
        s = tr.train_update()
    finally:
        tr.close()
    assert np.isfinite(s["tbptt/staleness_kl"]) and s["tbptt/staleness_kl"] > 0
    assert abs(s["losses/first_minibatch_kl"]) < 1e-7 and np.isfinite(s["losses/entropy"])
    # entropy of a D-dim Gaussian at std exp(log_std): the policy's log std moved little in one update
    assert abs(s["losses/entropy"] - 2 * (0.5 + 0.5 * np.log(2 * np.pi))) < 0.1


@pytest.mark.parametrize("deterministic", [False, True])
def test_evaluation_with_box_actions_and_dict_observations(deterministic):
    cfg = space_config("dict", "box")
    env = make_env(cfg.env)
    model = build_model(env.observation_space, env.action_space, cfg.model)
    env.close()
    r1 = evaluate_policy(model, cfg.env, range(100, 106), deterministic=deterministic, sample_seed=3)
    r2 = evaluate_policy(model, cfg.env, range(100, 106), deterministic=deterministic, sample_seed=3)
    assert len(r1.episodes) == 6 and all(3 <= e.length <= 7 for e in r1.episodes)
    assert [e.ret for e in r1.episodes] == [e.ret for e in r2.episodes]  # private sampler: repeatable


# ---- the shipped continuous-action memory task ----------------------------------------------------
def test_pendulum_no_velocity_is_pendulum_seen_through_the_angle():
    """Pendulum-v1's dynamics and rewards, observing (cos, sin) only; replayable from plain data."""
    cfg = C.load("pendulum_no_velocity", ["env.num_envs=2"])
    ours = LevelSeedWrapper(make_env(cfg.env), seed_stream((0, 1000), 1, 0))
    ref = gym.make("Pendulum-v1")
    assert ours.observation_space.shape == (2,) and ours.action_space == ref.action_space
    obs, _ = ours.reset()
    full, _ = ref.reset(seed=ours.current_seed)
    assert np.array_equal(obs, full[:2])
    rng = np.random.default_rng(0)
    actions = [env_actions(rng.normal(0, 2, (1, 1)).astype(np.float32), ours.action_space)[0]
               for _ in range(60)]  # clipped to [-2, 2]
    for t, a in enumerate(actions):
        obs, r, te, tr, _ = ours.step(a)
        f, rr, _, _, _ = ref.step(a)
        assert np.array_equal(obs, f[:2]) and r == rr and not te and not tr
        if t == 29:
            state = json.loads(json.dumps(ours.get_state()))  # after 30 float actions
    again = LevelSeedWrapper(make_env(cfg.env), seed_stream((0, 1000), 1, 5))
    again.set_state(state)
    for a in actions[30:]:
        last = again.step(a)[0]
    assert np.array_equal(last, obs)
    ref.close()


def test_pendulum_no_velocity_config_trains(tmp_path):
    cfg = C.load("pendulum_no_velocity", ["env.num_envs=2", "ppo.rollout_steps=16", "ppo.epochs=1",
                                          "ppo.minibatches=2", "run.total_steps=64", "run.torch_threads=1"])
    tr = train_space(tmp_path, cfg)
    assert tr.global_step == 64 and tr.model.continuous
    rows = metric_rows(tmp_path)
    assert len(rows) == 2 and all(np.isfinite(r["losses/policy"]) for r in rows)
