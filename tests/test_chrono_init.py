"""``model.chrono_init``: the recurrent core's keep gates start with retention times spread up to T
steps, so that a gradient reaches tens of steps back from the first update (with zero biases it
halves, or worse, at every step)."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from ppo_tbptt import config as C
from ppo_tbptt.model import build_model

OBS = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)


def _model(core: str, chrono: int, layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    cfg = C.ModelConfig(core=core, hidden_size=64, hidden_layer=32, num_layers=layers, chrono_init=chrono)
    return build_model(OBS, gym.spaces.Discrete(3), cfg)


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_chrono_init_sets_the_keep_gate_of_every_layer_and_nothing_else(core):
    h, horizon = 64, 50
    model = _model(core, horizon, layers=2)
    for k in range(2):
        b_ih = getattr(model.core, f"bias_ih_l{k}").detach()
        assert torch.count_nonzero(getattr(model.core, f"bias_hh_l{k}")) == 0
        gates = b_ih.view(-1, h)  # GRU: r, z, n; LSTM: i, f, g, o
        keep = gates[1]
        # sigmoid(log u) = u / (1 + u): a unit keeps its state for 1 + u steps, u in [1, T - 1]
        steps = 1.0 / (1.0 - torch.sigmoid(keep))
        assert steps.min() >= 2.0 - 1e-4 and steps.max() <= horizon + 1e-3
        assert steps.max() > horizon / 2 and steps.min() < 10  # spread over the range, not one value
        others = [0, 2] if core == "gru" else [2, 3]
        assert torch.count_nonzero(gates[others]) == 0
        if core == "lstm":
            torch.testing.assert_close(gates[0], -keep)  # writes little where it keeps long
    assert not torch.equal(model.core.bias_ih_l0, model.core.bias_ih_l1)  # drawn per layer


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_chrono_init_0_leaves_every_bias_at_zero_and_the_draws_unchanged(core):
    model = _model(core, 0)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.core.named_parameters() if "bias" in n)
    # off, nothing is drawn: the weights are those of a config without the key
    torch.manual_seed(0)
    plain = build_model(OBS, gym.spaces.Discrete(3), C.ModelConfig(core=core, hidden_size=64, hidden_layer=32))
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def _reach(model, gap: int, length: int = 100) -> float:
    """|d out[last] / d x[last - gap]| relative to |d out[last] / d x[last - 1]| at initialisation,
    through ``run_core`` (on a CPU with gradients on: the training kernels)."""
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(8, length, 32, generator=g)).requires_grad_()
    out, _ = model.run_core(x, model.initial_state(8))
    grad, = torch.autograd.grad(out[:, -1].sum(), x)
    norms = grad.norm(dim=(0, 2))
    return float(norms[length - 1 - gap] / norms[length - 2])


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_chrono_init_carries_the_gradient_60_steps_back_where_zero_biases_lose_it(core):
    # Mortar Mayhem's tenth command is acted on about 80 steps after it is shown; with zero biases
    # every unit keeps half its state a step, and 60 steps back nothing of the gradient is left
    zero, chrono = _reach(_model(core, 0), 60), _reach(_model(core, 128), 60)
    assert zero < 1e-6
    assert chrono > 1e-2


@pytest.mark.parametrize("value", [1, -2])
def test_a_chrono_horizon_below_2_is_a_config_error(value):
    with pytest.raises(C.ConfigError, match="model.chrono_init"):
        C.from_dict({"model": {"chrono_init": value}})
