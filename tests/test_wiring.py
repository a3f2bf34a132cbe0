"""The maths where it is wired in: the trainer's GAE arguments and gradient clipping, the
collector's bootstrap value, the model's initial heads. Each piece has its own unit test; these
check that the code that calls it passes the right things."""
from __future__ import annotations

import math

import pytest

import torch

from ppo_tbptt.envs import make_vector_env
from ppo_tbptt.model import build_model
from ppo_tbptt.rollout import Collector
from ppo_tbptt.trainer import Trainer

from tests.conftest import tiny_cue_config
from tests.test_gae import reference_gae


def test_trainer_runs_gae_with_its_gamma_and_lambda(tmp_path):
    """gamma 0.9 and lambda 0.5 are far apart, so swapping them (or using defaults) shows."""
    cfg = tiny_cue_config("gru").replace("ppo", gamma=0.9, gae_lambda=0.5)
    tr = Trainer(cfg, tmp_path, torch.device("cpu"), log=False, quiet=True)
    try:
        tr.train_update()
        r = tr.collector.buffer  # the rollout the update trained on
        assert r.terminated.any() and not r.terminated.all()
        ref = reference_gae(r.rewards.double(), r.values.double(), r.terminated, r.truncated,
                            r.bootstrap_value.double(), r.truncation_values.double(), 0.9, 0.5)
        torch.testing.assert_close(r.advantages.double(), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.returns.double(), ref + r.values.double(), rtol=0, atol=1e-5)
    finally:
        tr.close()


def test_trainer_clips_the_gradient_before_every_step(tmp_path):
    max_norm = 1e-3
    cfg = tiny_cue_config("lstm").replace("ppo", max_grad_norm=max_norm)
    tr = Trainer(cfg, tmp_path, torch.device("cpu"), log=False, quiet=True)
    seen = []
    step = tr.optimizer.step

    def checked_step(*args, **kw):
        grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kw)

    tr.optimizer.step = checked_step
    try:
        s = tr.train_update()
    finally:
        tr.close()
    assert len(seen) == cfg.ppo.epochs * cfg.ppo.minibatches
    assert s["losses/grad_norm"] > 10 * max_norm  # the raw gradient needed clipping ...
    assert max(seen) <= max_norm * (1 + 1e-4)     # ... and the optimizer only saw clipped ones


def test_bootstrap_value_comes_from_the_carried_state():
    """V(obs after the last step) from the state carried into the next rollout: recomputed here
    from the last stored state, one model step, and the reset of envs whose episode just ended."""
    cfg = tiny_cue_config("lstm")
    torch.manual_seed(0)
    envs = make_vector_env(cfg.env, 0)
    model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model)
    torch.nn.init.orthogonal_(model.value_head.weight, 3.0)  # values that move with the state
    col = Collector(envs, model, cfg.ppo.rollout_steps, torch.device("cpu"), True)
    try:
        r, _ = col.collect()
        last_obs = col.obs.clone()  # what the envs show after step T - 1
    finally:
        envs.close()
    with torch.no_grad():
        state_in = r.state_at(torch.full((r.num_envs,), r.num_steps - 1), torch.arange(r.num_envs))
        _, _, state = model(r.obs[-1].unsqueeze(1), state_in)  # [N, ...] -> [N, 1, ...]
        state = state.masked(~(r.terminated[-1] | r.truncated[-1]))
        expect = model.value(last_obs, state)
        from_zero = model.value(last_obs, model.initial_state(r.num_envs))
    mid = ~(r.terminated[-1] | r.truncated[-1])
    assert mid.any(), "some env must be mid-episode at the end of the rollout"
    assert (expect - from_zero)[mid].abs().max() > 1e-3  # the carried state matters for these envs
    torch.testing.assert_close(r.bootstrap_value, expect, rtol=0, atol=1e-6)


def test_initial_heads_near_uniform_policy_and_unit_scale_values():
    """Orthogonal init with gain 0.01 for the policy head (near-uniform first policy) and 1 for the
    value head; biases 0."""
    cfg = tiny_cue_config("gru")
    env = make_vector_env(cfg.env, 0)
    try:
        model = build_model(env.single_observation_space, env.single_action_space,
                            cfg.model.__class__(**{**cfg.model.__dict__, "hidden_layer": 64}))
    finally:
        env.close()
    for head, gain in ((model.policy_head, 0.01), (model.value_head, 1.0)):
        w = head.weight.detach()  # [out, width], out < width: orthonormal rows times the gain
        torch.testing.assert_close(w @ w.T, gain ** 2 * torch.eye(w.shape[0]), rtol=0, atol=1e-6 * max(gain ** 2, 1e-4))
        assert torch.all(head.bias == 0)
    obs = torch.randint(0, 2, (16, 5, *env.single_observation_space.shape), dtype=torch.uint8)
    with torch.no_grad():
        logits, values, _ = model(obs, model.initial_state(16))
    entropy = model.dist(logits).entropy()
    n = env.single_action_space.n
    assert float((math.log(n) - entropy).max()) < 1e-3  # every first decision is near uniform
    assert values.std() > 30 * logits.std()  # values on their own scale, logits squashed (gain 1 vs 0.01)


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_update_with_the_kernel_equals_the_update_with_torch(tmp_path, core):
    """``model.core_kernel`` changes how a CPU GRU or LSTM is trained, not what: from the same
    seed, one whole update (3 epochs of minibatches, whole-episode sequences of mixed lengths) ends
    with the same weights and metrics as with nn.GRU's / nn.LSTM's packed sequences, up to float
    rounding."""
    results = []
    for kernel in ("auto", "torch"):
        cfg = tiny_cue_config(core, seq_len=0).replace("model", core_kernel=kernel).replace("ppo", epochs=3)
        tr = Trainer(cfg, tmp_path / kernel, torch.device("cpu"), log=False, quiet=True)
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        try:
            s = tr.train_update()
            results.append((s, {k: v.clone() for k, v in tr.model.state_dict().items()}))
            assert all((v - before[k]).abs().max() > 1e-4 for k, v in results[-1][1].items())  # it learned
        finally:
            tr.close()
    (s1, w1), (s2, w2) = results
    assert s1["tbptt/padding_fraction"] > 0.1  # sequences of mixed lengths
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=2e-6, msg=lambda m: f"{k}: {m}")
    for k in ("losses/policy", "losses/value", "losses/entropy", "losses/approx_kl", "losses/grad_norm"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-4, abs=1e-7), k
