"""The action distribution: torch.distributions.Categorical's results, bit for bit."""
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from eval_helpers import DEVICES
from ppo_tbptt import config as C
from ppo_tbptt.model import ActionDist, build_model


@pytest.mark.parametrize("nvec", [[4], [3, 3], [5, 2, 3]])
@pytest.mark.parametrize("shape", [(7,), (3, 6)])
def test_action_dist_matches_categorical_exactly(nvec, shape):
    gen = torch.Generator().manual_seed(sum(nvec) * 100 + len(shape))
    logits = torch.randn(*shape, sum(nvec), generator=gen) * 3
    logits[..., 0] = -1e30  # a near-impossible action: entropy and KL must stay finite
    ref = [Categorical(logits=lg) for lg in torch.split(logits, nvec, dim=-1)]
    ours = ActionDist(logits, nvec)

    torch.manual_seed(5)
    expected = torch.stack([d.sample() for d in ref], dim=-1)
    torch.manual_seed(5)
    actions = ours.sample()
    assert actions.shape == (*shape, len(nvec)) and actions.dtype == torch.int64
    assert torch.equal(actions, expected)  # same draws from the same RNG state

    assert torch.equal(ours.log_prob(actions), sum(d.log_prob(actions[..., i]) for i, d in enumerate(ref)))
    assert torch.equal(ours.entropy(), sum(d.entropy() for d in ref))
    assert torch.equal(ours.mode(), torch.stack([d.logits.argmax(-1) for d in ref], dim=-1))
    assert torch.isfinite(ours.entropy()).all()

    other_logits = torch.randn(*shape, sum(nvec), generator=gen)
    other = [Categorical(logits=lg) for lg in torch.split(other_logits, nvec, dim=-1)]
    expected_kl = sum(kl_divergence(p, q) for p, q in zip(ref, other))
    torch.testing.assert_close(ours.kl(ActionDist(other_logits, nvec)), expected_kl, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ours.kl(ActionDist(other_logits, nvec))).all()


def test_action_dist_gradients_match_categorical():
    nvec = [3, 2]
    base = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    actions = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 1]])
    grads = []
    for use_ref in (True, False):
        logits = base.clone().requires_grad_(True)
        if use_ref:
            ds = [Categorical(logits=lg) for lg in torch.split(logits, nvec, dim=-1)]
            out = sum(d.log_prob(actions[:, i]) for i, d in enumerate(ds)).sum() + 0.1 * sum(d.entropy() for d in ds).sum()
        else:
            d = ActionDist(logits, nvec)
            out = d.log_prob(actions).sum() + 0.1 * d.entropy().sum()
        out.backward()
        grads.append(logits.grad)
    assert torch.equal(grads[0], grads[1])


def test_kl_stays_finite_where_the_other_probability_underflows():
    """exp(-200) is 0 in float32: the KL must come from log-probabilities (torch's gives inf)."""
    p, q = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, -200.0, 2.0]])
    ours = ActionDist(p, [3]).kl(ActionDist(q, [3]))
    lp, lq = p.double().log_softmax(-1), q.double().log_softmax(-1)
    exact = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=0)
    assert torch.isinf(kl_divergence(Categorical(logits=p), Categorical(logits=q))).all()


def test_action_dist_rejects_logits_of_the_wrong_width():
    with pytest.raises(ValueError, match="action space needs 5"):
        ActionDist(torch.zeros(2, 4), [3, 2])
    with pytest.raises(ValueError, match="action space needs 4"):
        ActionDist(torch.zeros(2, 5), [4])


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_encoder_computes_in_bfloat16_and_hands_on_float32(device):
    import gymnasium as gym
    import numpy as np
    space = gym.spaces.Box(0, 255, (84, 84, 3), np.uint8)
    models = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        cfg = C.ModelConfig(hidden_size=16, hidden_layer=32, encoder_dtype=dtype)
        models[dtype] = build_model(space, gym.spaces.Discrete(4), cfg).to(device)
    obs = torch.randint(0, 256, (3, 5, 84, 84, 3), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1)).to(device)
    f32, bf16 = models["float32"].encode(obs), models["bfloat16"].encode(obs)
    assert f32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(f32, bf16)  # the bfloat16 path really ran (on this device)
    torch.testing.assert_close(bf16, f32, rtol=0.05, atol=0.05)

    model = models["bfloat16"]
    seen = {}

    def conv_hook(module, inputs, output):
        seen["conv"] = output.dtype

    def float32_hook(name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = (torch.is_autocast_enabled(out.device.type), out.dtype)
        return hook

    model.encoder.conv[0].register_forward_hook(conv_hook)
    for name in ("body", "policy_head", "value_head"):
        getattr(model, name).register_forward_hook(float32_hook(name))
    run_core = model.run_core  # (on a CPU the core trains through ppo_tbptt/rnn_kernel.py, not the module)

    def core_spy(*args, **kw):
        out = run_core(*args, **kw)
        float32_hook("core")(None, None, out)
        return out

    model.run_core = core_spy
    logits, values, state = model(obs, model.initial_state(3, device))
    assert seen.pop("conv") == torch.bfloat16
    assert seen == {n: (False, torch.float32) for n in ("core", "body", "policy_head", "value_head")}
    assert logits.dtype == values.dtype == state.h.dtype == torch.float32
    (logits.sum() + values.sum()).backward()
    conv = model.encoder.conv[0].weight
    assert conv.dtype == torch.float32 and conv.grad is not None and torch.isfinite(conv.grad).all()


def test_encoder_dtype_is_validated():
    with pytest.raises(C.ConfigError, match="model.encoder_dtype"):
        C.from_dict({"model": {"encoder_dtype": "float16"}})
