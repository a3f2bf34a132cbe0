"""The recurrent-state invariants: collection and training see the same computation."""
import gymnasium as gym
import pytest
import torch

from ppo_tbptt import config as C
from ppo_tbptt.envs import CueRecall, SerialVectorEnv, make_vector_env
from ppo_tbptt.gae import compute_gae
from ppo_tbptt.model import MLPEncoder, build_model
from ppo_tbptt.ppo import LossCoefs, ppo_loss
from ppo_tbptt.rollout import Collector
from ppo_tbptt.sequences import build_sequences
from tests.conftest import tiny_cue_config
from tests.eval_helpers import DEVICES, exact_cuda

#: Agreement of step-by-step collection and whole-sequence training forwards (a wrong or
#: misaligned state is off by orders of magnitude more). On CUDA the tests run with TF32 off
#: (``exact_cuda``); its step and sequence kernels may still round differently.
TOL = 1e-5


@pytest.fixture(autouse=True)
def _exact():
    with exact_cuda():
        yield


def collect_twice(cfg: C.Config, seed: int = 0, device: str = "cpu", sharp_heads: bool = False):
    """Two consecutive rollouts, so the second starts mid-episode from a carried state.

    ``sharp_heads``: policy and value heads initialised with gain 1 instead of 0.01 / 1, so the
    log-probs and values move with every change upstream (a near-uniform untrained policy would
    hide differences in the features below the test bounds)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env, seed, device=device.type)
    model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
    if sharp_heads:
        for head in (model.policy_head, model.value_head):
            torch.nn.init.orthogonal_(head.weight, 3.0)
    model = model.to(device)
    col = Collector(envs, model, cfg.ppo.rollout_steps, device, cfg.model.reset_hidden_state)
    col.collect()
    rollout, _ = col.collect()
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                           rollout.bootstrap_value, 0.99, 0.95, rollout.truncation_values)
    rollout.advantages.copy_(adv)
    rollout.returns.copy_(ret)
    envs.close()
    return model, rollout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", ["lstm", "gru"])
@pytest.mark.parametrize("seq_len", [1, 3, 0])
@pytest.mark.parametrize("training", [False, True], ids=["no-grad", "training"])
def test_stepping_equals_sequence_forward(core, seq_len, device, training):
    """``training``: the update's forward (gradients on, train mode, the real steps marked), which
    on a CPU runs a GRU or LSTM through ppo_tbptt/rnn_kernel.py."""
    model, rollout = collect_twice(tiny_cue_config(core), device=device)
    assert not rollout.episode_start[0].all(), "second rollout should start mid-episode"
    assert rollout.episode_start[1:].any(), "episodes should end inside the rollout"
    b = build_sequences(rollout, seq_len)
    model.train(training)
    with torch.set_grad_enabled(training):
        logits, values, _ = model(b.obs, b.init_state, b.valid if training else None)
        assert values.requires_grad == training
        logits, values = logits.detach(), values.detach()
        logp = model.dist(logits).log_prob(b.actions)
    m = b.mask.bool()
    torch.testing.assert_close(logp[m], b.logprobs[m], atol=TOL, rtol=0)
    torch.testing.assert_close(values[m], b.values[m], atol=TOL, rtol=0)
    # sequences that begin an episode start from a zero state; the others from a stored, non-zero one
    starts = rollout.episode_start.flatten()[b.index[:, 0]]  # [S]
    assert starts.any() and (~starts).any()
    for h in b.init_state.tensors():  # [K, S, H]
        assert torch.all(h[:, starts] == 0) and torch.all(h[:, ~starts].abs().sum(dim=(0, 2)) > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoder_dtype", ["float32", "bfloat16"])
def test_stepping_equals_sequence_forward_memorygym_cnn(device, encoder_dtype):
    """Also with the CNN in bfloat16: collection (no_grad, eval mode) and the update (gradients on,
    train mode, real steps only) run the same encoder numerics, so the stored log-probs and values
    are reproduced as tightly as in float32."""
    cfg = C.from_dict({"env": {"id": "MortarMayhem-Grid-v0", "num_envs": 2},
                       "model": {"core": "gru", "hidden_size": 16, "hidden_layer": 16,
                                 "encoder_dtype": encoder_dtype},
                       "tbptt": {"sequence_length": 5},
                       "ppo": {"rollout_steps": 12, "minibatches": 1}})
    model, rollout = collect_twice(cfg, device=device, sharp_heads=True)
    assert rollout.obs.dtype == torch.uint8
    b = build_sequences(rollout, 5)
    model.train()
    logits, values, _ = model(b.obs, b.init_state, b.valid)  # as in the update
    assert values.requires_grad
    logits, values = logits.detach(), values.detach()
    logp = model.dist(logits).log_prob(b.actions)
    assert logp.std() > 0.02, "the sharp heads must make the policy far from uniform"
    m = b.mask.bool()
    torch.testing.assert_close(logp[m], b.logprobs[m], atol=TOL, rtol=0)
    torch.testing.assert_close(values[m], b.values[m], atol=TOL, rtol=0)


def grid_fast_config(memoryless: bool = False, core: str = "gru", core_kernel: str = "auto") -> C.Config:
    """The grid envs' CPU path: 4x-pooled 21x21x3 frames into the MLP encoder."""
    return C.from_dict({"env": {"id": "MortarMayhem-Grid-v0", "num_envs": 3, "downsample": 4,
                                "reset_params": {"command_count": [2], "explosion_delay": [3]}},
                        "model": {"core": core, "hidden_size": 16, "hidden_layer": 16, "encoder": "auto",
                                  "memoryless": memoryless, "core_kernel": core_kernel},
                        "tbptt": {"sequence_length": 0},
                        "ppo": {"rollout_steps": 24, "minibatches": 1}})


@pytest.mark.parametrize("memoryless,core,core_kernel", [
    (False, "gru", "auto"), (False, "gru", "torch"), (False, "lstm", "auto"), (False, "lstm", "torch"),
    (True, "gru", "auto"), (True, "lstm", "auto")])
def test_stepping_equals_sequence_forward_grid_fast_path(core, memoryless, core_kernel):
    """Downsampled frames (stored as 21x21x3 uint8) and, as an ablation, a memoryless core: the
    update's forward reproduces the collected log-probs and values, and first-minibatch ratio is 1
    (with ``core_kernel`` ``auto`` a GRU or LSTM trains through ppo_tbptt/rnn_kernel.py, with
    ``torch`` through nn.GRU's / nn.LSTM's packed sequences)."""
    model, rollout = collect_twice(grid_fast_config(memoryless, core, core_kernel), sharp_heads=True)
    assert rollout.obs.shape[2:] == (21, 21, 3) and rollout.obs.dtype == torch.uint8
    assert isinstance(model.encoder, MLPEncoder)
    assert rollout.episode_start[1:].any() and not rollout.episode_start[0].all()
    b = build_sequences(rollout, 0)
    model.train()
    logits, values, _ = model(b.obs, b.init_state, b.valid)
    logp = model.dist(logits.detach()).log_prob(b.actions)
    assert logp.std() > 0.02
    m = b.mask.bool()
    torch.testing.assert_close(logp[m], b.logprobs[m], atol=TOL, rtol=0)
    torch.testing.assert_close(values.detach()[m], b.values[m], atol=TOL, rtol=0)
    out = ppo_loss(model, b, LossCoefs(0.2, 0.01, 0.5))
    assert abs(out.metrics["losses/ratio"].item() - 1.0) < 1e-6
    assert abs(out.metrics["losses/approx_kl"].item()) < 1e-7
    # memoryless: the outputs do not depend on the start state; with memory they do
    noisy = b.init_state.clone()
    for t in noisy.tensors():
        t.add_(torch.randn_like(t))
    with torch.no_grad():
        other, _, _ = model(b.obs, noisy, b.valid)
    if memoryless:
        torch.testing.assert_close(other[m], logits.detach()[m], atol=1e-6, rtol=0)
    else:
        assert (other[m] - logits.detach()[m]).abs().max() > 1e-3


def test_memoryless_model_sees_only_the_current_observation():
    """Every step of a memoryless forward equals a one-step forward from the zero state."""
    cfg = tiny_cue_config("lstm").replace("model", memoryless=True)
    env = CueRecall(num_cues=3, delay=3)
    model = build_model(env.observation_space, env.action_space, cfg.model)
    obs = torch.randint(0, 2, (4, 6, 4), dtype=torch.uint8)
    state = model.initial_state(4)
    for t in state.tensors():
        t.normal_()
    with torch.no_grad():
        logits, values, _ = model(obs, state)
        plain = build_model(env.observation_space, env.action_space, cfg.model.__class__(
            **{**cfg.model.__dict__, "memoryless": False}))
        plain.load_state_dict(model.state_dict())
        step_logits, step_values, _ = plain(obs.reshape(24, 1, 4), plain.initial_state(24))
    torch.testing.assert_close(logits.reshape(24, -1), step_logits[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(values.reshape(24), step_values[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core,encoder_dtype,core_kernel", [
    ("lstm", "float32", "auto"), ("lstm", "float32", "torch"), ("gru", "float32", "auto"), ("gru", "float32", "torch"),
    ("gru", "bfloat16", "auto")])
def test_first_minibatch_ratio_is_one(core, encoder_dtype, core_kernel, device):
    model, rollout = collect_twice(tiny_cue_config(core).replace("model", encoder_dtype=encoder_dtype,
                                                                 core_kernel=core_kernel),
                                   device=device, sharp_heads=True)
    b = build_sequences(rollout, 4)
    mb = b.select(torch.arange(0, b.num_sequences, 2, device=b.mask.device))
    model.train()
    out = ppo_loss(model, mb, LossCoefs(0.2, 0.01, 0.5))
    _, values, _ = model(mb.obs, mb.init_state, mb.valid)
    m = mb.mask.bool()
    torch.testing.assert_close(values.detach()[m], mb.values[m], atol=TOL, rtol=0)
    assert abs(out.metrics["losses/ratio"].item() - 1.0) < 1e-6
    assert abs(out.metrics["losses/approx_kl"].item()) < 1e-7
    assert out.metrics["losses/clipfrac"].item() == 0.0


@pytest.mark.parametrize("core_kernel", ["auto", "torch"])
def test_trainer_reports_zero_kl_on_first_minibatch(tmp_path, core_kernel):
    from ppo_tbptt.trainer import Trainer
    cfg = tiny_cue_config("gru").replace("model", core_kernel=core_kernel)
    tr = Trainer(cfg, tmp_path, torch.device("cpu"), log=False, quiet=True)
    try:
        s = tr.train_update()
    finally:
        tr.close()
    assert abs(s["losses/first_minibatch_kl"]) < 1e-7
    assert s["losses/approx_kl"] != s["losses/first_minibatch_kl"]  # later minibatches moved


def test_store_then_reset_rule():
    model, rollout = collect_twice(tiny_cue_config("lstm"))
    starts = rollout.episode_start  # [T, N]
    h = rollout.state_h.permute(0, 2, 1, 3)  # [T, K, N, H] -> [T, N, K, H]
    c = rollout.state_c.permute(0, 2, 1, 3)
    assert (h[starts] == 0).all() and (c[starts] == 0).all()
    assert (h[~starts].abs().sum(dim=(-1, -2)) > 0).all()


def test_no_reset_keeps_state_across_episodes():
    cfg = tiny_cue_config("gru").replace("model", reset_hidden_state=False)
    model, rollout = collect_twice(cfg)
    starts = rollout.episode_start
    h = rollout.state_h.permute(0, 2, 1, 3)  # [T, N, K, H]
    assert (h[starts].abs().sum(dim=(-1, -2)) > 0).all()


def test_detached_start_state_stops_gradient_at_the_cut():
    """A loss on one sequence reaches no earlier time step; its start state has no history."""
    model, rollout = collect_twice(tiny_cue_config("lstm"), seed=3)
    rollout.obs = rollout.obs.float().requires_grad_(True)  # leaf so gradients can be traced back
    rollout.state_h.requires_grad_(True)
    rollout.state_c.requires_grad_(True)
    b = build_sequences(rollout, 2)
    # a sequence that starts mid-episode, i.e. with a non-zero carried-over state
    N = rollout.num_envs
    s = next(i for i in range(b.num_sequences)
             if b.init_state.h[:, i].abs().sum() > 0 and b.mask[i].sum() == 2)
    assert b.init_state.h.grad_fn is None and not b.init_state.h.requires_grad
    one = b.select(torch.tensor([s]))
    logits, values, _ = model(one.obs, one.init_state)
    (values.sum() + logits.sum()).backward()
    t0, n0 = int(one.index[0, 0]) // N, int(one.index[0, 0]) % N
    g = rollout.obs.grad.abs().sum(dim=-1)  # [T, N]
    assert g[t0:t0 + 2, n0].sum() > 0, "the sequence's own steps must receive gradient"
    assert g[:t0, n0].eq(0).all(), "gradient leaked across the truncation cut"
    g_other = g.clone()
    g_other[:, n0] = 0
    assert g_other.eq(0).all()
    assert rollout.state_h.grad is None and rollout.state_c.grad is None


def test_truncated_steps_bootstrap_from_final_observation():
    def env():
        from ppo_tbptt.envs.wrappers import LevelSeedWrapper
        counter = iter(range(10**6))
        return LevelSeedWrapper(gym.wrappers.TimeLimit(CueRecall(3, 6), max_episode_steps=4),
                                lambda: next(counter))
    envs = SerialVectorEnv([env, env])
    cfg = tiny_cue_config("gru")
    torch.manual_seed(0)
    model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
    col = Collector(envs, model, 6, torch.device("cpu"))
    r, episodes = col.collect()
    assert r.truncated[3].all() and not r.terminated.any()
    assert (r.truncation_values[3] != 0).all() and (r.truncation_values[[0, 1, 2, 4, 5]] == 0).all()
    assert r.episode_start[4].all()
    assert [e.length for e in episodes] == [4, 4]
    # V(final obs) must come from the state *before* the reset: recompute it by hand
    with torch.no_grad():
        st = model.initial_state(2)
        for t in range(4):
            _, v, st = model(r.obs[t].unsqueeze(1), st)
        final_obs = torch.zeros(2, 4, dtype=torch.uint8)  # CueRecall's obs at t = 4 is blank
        expected = model.value(final_obs, st)
    torch.testing.assert_close(r.truncation_values[3], expected)
