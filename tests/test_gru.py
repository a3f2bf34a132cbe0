"""The CPU training kernel of the GRU (ppo_tbptt/gru.py) against nn.GRU itself: outputs, final
states and every gradient (inputs, start state, weights, biases), in float64, for packed
sequences of mixed lengths, for full-length ones, and for stacked layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ppo_tbptt import config as C
from ppo_tbptt.gru import gru_sequence, supported
from ppo_tbptt.model import RecurrentActorCritic


def reference(core: nn.GRU, x: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor | None):
    if lengths is None:
        return core(x, h0)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, h = core(packed, h0)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], h


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("lengths", [[3, 9, 1, 5, 9, 2], [9, 9, 9, 9, 9, 9], None],
                         ids=["mixed", "all-full", "no-lengths"])
def test_kernel_equals_nn_gru_values_and_gradients(layers, lengths):
    torch.manual_seed(0)
    core = nn.GRU(5, 7, layers, batch_first=True).double()
    for p in core.parameters():  # biases that are not small, so a misplaced one shows
        nn.init.normal_(p, std=0.6)
    B, L = 6, 9
    x = torch.randn(B, L, 5, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(layers, B, 7, dtype=torch.double, requires_grad=True)
    lens = None if lengths is None else torch.tensor(lengths)
    out, hn = gru_sequence(core, x, h0, lens)
    ref_out, ref_h = reference(core, x, h0, lens)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(hn, ref_h, rtol=0, atol=1e-12)
    if lens is not None:
        assert torch.all(out[torch.arange(L)[None] >= lens[:, None]] == 0)
    # random weights on every output and on the final state: the final state's gradient must
    # join each sequence at its own last step
    w, wh = torch.randn_like(out), torch.randn_like(hn)
    inputs = [x, h0, *core.parameters()]
    got = torch.autograd.grad((out * w).sum() + (hn * wh).sum(), inputs)
    want = torch.autograd.grad((ref_out * w).sum() + (ref_h * wh).sum(), inputs)
    names = ["x", "h0"] + [n for n, _ in core.named_parameters()]
    for name, g, r in zip(names, got, want):
        assert r.abs().max() > 1e-3, name  # every gradient is exercised
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=lambda s: f"d / d {name}: {s}")


def test_kernel_passes_gradcheck():
    """Second opinion on the hand-written backward: finite differences."""
    torch.manual_seed(1)
    core = nn.GRU(3, 4, 1, batch_first=True).double()
    x = torch.randn(3, 5, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, 3, 4, dtype=torch.double, requires_grad=True)
    lengths = torch.tensor([2, 5, 4])
    assert torch.autograd.gradcheck(lambda x, h0: gru_sequence(core, x, h0, lengths), (x, h0))


def test_the_model_trains_a_cpu_gru_with_the_kernel_unless_told_not_to(monkeypatch):
    """Only with gradients on a CPU and ``model.core_kernel: auto``; an LSTM never."""
    from ppo_tbptt import gru
    calls = []
    real = gru.gru_sequence
    monkeypatch.setattr(gru, "gru_sequence", lambda *a, **k: calls.append(1) or real(*a, **k))
    import gymnasium as gym
    obs = gym.spaces.Box(0, 1, (4,))
    act = gym.spaces.Discrete(3)
    x = torch.rand(2, 5, 4)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    for core, kernel, grad, expect in (("gru", "auto", True, 1), ("gru", "auto", False, 0),
                                       ("gru", "torch", True, 0), ("lstm", "auto", True, 0)):
        calls.clear()
        model = RecurrentActorCritic(obs, act, C.ModelConfig(core=core, hidden_size=8, hidden_layer=8,
                                                             core_kernel=kernel))
        assert supported(model.core) == (core == "gru")
        with torch.set_grad_enabled(grad):
            model(x, model.initial_state(2), valid)
        assert len(calls) == expect, (core, kernel, grad)


def test_core_kernel_is_validated():
    with pytest.raises(C.ConfigError, match="model.core_kernel"):
        C.from_dict({"model": {"core_kernel": "fused"}})
