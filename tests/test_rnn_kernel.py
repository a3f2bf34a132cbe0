"""The CPU training kernels (ppo_tbptt/rnn_kernel.py) against nn.GRU and nn.LSTM themselves:
outputs, final states and every gradient (inputs, start states, weights, biases), in float64, for
packed sequences of mixed lengths, for full-length ones, and for stacked layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ppo_tbptt import config as C
from ppo_tbptt.model import RecurrentActorCritic
from ppo_tbptt.rnn_kernel import rnn_sequence, supported


def reference(core: nn.Module, x: torch.Tensor, state, lengths: torch.Tensor | None):
    """``core``'s own output and final state (``h``, or ``(h, c)``)."""
    if lengths is None:
        return core(x, state)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, s = core(packed, state)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], s


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("lengths", [[3, 9, 1, 5, 9, 2], [9, 9, 9, 9, 9, 9], None, [0, 4, 9, 0, 2, 9],
                                     [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]],
                         ids=["mixed", "all-full", "no-lengths", "some-empty", "one-step", "one-step-or-empty"])
def test_kernel_equals_torch_values_and_gradients(kind, layers, lengths):
    """(One-step sequences are BPTT(1, 1)'s: ``tbptt.sequence_length: 1``.)"""
    torch.manual_seed(0)
    lstm = kind == "lstm"
    core = (nn.LSTM if lstm else nn.GRU)(5, 7, layers, batch_first=True).double()
    for p in core.parameters():  # biases that are not small, so a misplaced one shows
        nn.init.normal_(p, std=0.6)
    B, L = 6, (1 if lengths is not None and max(lengths) == 1 else 9)
    x = torch.randn(B, L, 5, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(layers, B, 7, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(layers, B, 7, dtype=torch.double, requires_grad=True) if lstm else None
    lens = None if lengths is None else torch.tensor(lengths)
    out, hn, cn = rnn_sequence(core, x, h0, c0, lens)
    if lens is not None and bool((lens == 0).any()):  # packing refuses empty sequences: run the others
        ran = lens > 0
        sub_state = (h0[:, ran], c0[:, ran]) if lstm else h0[:, ran]
        sub_out, sub_s = reference(core, x[ran], sub_state, lens[ran])
        ref_out = torch.zeros_like(out).index_put((ran.nonzero()[:, 0],), sub_out)
        ref_h = h0.clone()  # an empty sequence's final state is its start state
        ref_h[:, ran] = sub_s[0] if lstm else sub_s
        ref_c = None
        if lstm:
            ref_c = c0.clone()
            ref_c[:, ran] = sub_s[1]
    else:
        ref_out, ref_s = reference(core, x, (h0, c0) if lstm else h0, lens)
        ref_h, ref_c = ref_s if lstm else (ref_s, None)
    assert (cn is None) == (not lstm)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(hn, ref_h, rtol=0, atol=1e-12)
    if lstm:
        torch.testing.assert_close(cn, ref_c, rtol=0, atol=1e-12)
    if lens is not None:
        assert torch.all(out[torch.arange(L)[None] >= lens[:, None]] == 0)
    # random weights on every output and on the final states: a final state's gradient must join
    # each sequence at its own last step
    w, wh = torch.randn_like(out), torch.randn_like(hn)
    wc = torch.randn_like(hn) if lstm else None
    inputs = [x, h0, *([c0] if lstm else []), *core.parameters()]

    def loss(o, h, c):
        return (o * w).sum() + (h * wh).sum() + ((c * wc).sum() if lstm else 0)

    got = torch.autograd.grad(loss(out, hn, cn), inputs)
    want = torch.autograd.grad(loss(ref_out, ref_h, ref_c), inputs)
    names = ["x", "h0", *(["c0"] if lstm else [])] + [n for n, _ in core.named_parameters()]
    for name, g, r in zip(names, got, want):
        assert r.abs().max() > 1e-3, name  # every gradient is exercised
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=lambda s: f"d / d {name}: {s}")


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_kernel_passes_gradcheck(kind):
    """Second opinion on the hand-written backward: finite differences."""
    torch.manual_seed(1)
    lstm = kind == "lstm"
    core = (nn.LSTM if lstm else nn.GRU)(3, 4, 1, batch_first=True).double()
    x = torch.randn(3, 5, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, 3, 4, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(1, 3, 4, dtype=torch.double, requires_grad=True)
    lengths = torch.tensor([2, 5, 4])
    if lstm:
        assert torch.autograd.gradcheck(lambda x, h0, c0: rnn_sequence(core, x, h0, c0, lengths), (x, h0, c0))
    else:
        assert torch.autograd.gradcheck(lambda x, h0: rnn_sequence(core, x, h0, None, lengths)[:2], (x, h0))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_no_sequence_running_keeps_the_start_state(kind):
    lstm = kind == "lstm"
    core = (nn.LSTM if lstm else nn.GRU)(3, 4, 2, batch_first=True)
    h0 = torch.randn(2, 3, 4, requires_grad=True)
    c0 = torch.randn(2, 3, 4, requires_grad=True) if lstm else None
    out, h, c = rnn_sequence(core, torch.randn(3, 5, 3), h0, c0, torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 5, 4) and not out.any()
    assert torch.equal(h, h0) and (not lstm or torch.equal(c, c0))
    (h.sum() + (c.sum() if lstm else 0)).backward()
    assert torch.equal(h0.grad, torch.ones_like(h0)) and (not lstm or torch.equal(c0.grad, torch.ones_like(c0)))


def test_an_lstm_needs_its_cell_state():
    core = nn.LSTM(3, 4, batch_first=True)
    with pytest.raises(ValueError, match="c0"):
        rnn_sequence(core, torch.zeros(1, 2, 3), torch.zeros(1, 1, 4))


def test_unsupported_cores_keep_torch():
    for core in (nn.LSTM(3, 4, batch_first=True, proj_size=2), nn.GRU(3, 4, batch_first=False),
                 nn.GRU(3, 4, batch_first=True, bias=False), nn.LSTM(3, 4, batch_first=True, bidirectional=True),
                 nn.LSTM(3, 4, 2, batch_first=True, dropout=0.1), nn.RNN(3, 4, batch_first=True)):
        assert not supported(core), core
    assert supported(nn.GRU(3, 4, 2, batch_first=True)) and supported(nn.LSTM(3, 4, 2, batch_first=True))


def test_the_model_trains_on_a_cpu_with_the_kernel_unless_told_not_to(monkeypatch):
    """Only with gradients on a CPU and ``model.core_kernel: auto``, for a GRU and an LSTM."""
    from ppo_tbptt import rnn_kernel
    calls = []
    real = rnn_kernel.rnn_sequence
    monkeypatch.setattr(rnn_kernel, "rnn_sequence", lambda *a, **k: calls.append(1) or real(*a, **k))
    import gymnasium as gym
    obs = gym.spaces.Box(0, 1, (4,))
    act = gym.spaces.Discrete(3)
    x = torch.rand(2, 5, 4)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    for core in ("gru", "lstm"):
        for kernel, grad, expect in (("auto", True, 1), ("auto", False, 0), ("torch", True, 0)):
            calls.clear()
            model = RecurrentActorCritic(obs, act, C.ModelConfig(core=core, hidden_size=8, hidden_layer=8,
                                                                 core_kernel=kernel))
            with torch.set_grad_enabled(grad):
                _, _, state = model(x, model.initial_state(2), valid)
            assert len(calls) == expect, (core, kernel, grad)
            assert (state.c is not None) == (core == "lstm")


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_the_models_final_state_is_the_same_on_both_paths(core):
    """``run_core``'s outputs and final state (``h`` and ``c``) with the kernel equal those of the
    torch path, for sequences of mixed lengths from a random start state."""
    import gymnasium as gym
    torch.manual_seed(3)
    obs, act = gym.spaces.Box(0, 1, (4,)), gym.spaces.Discrete(3)
    x = torch.randn(3, 6, 8)
    valid = torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]
    models = [RecurrentActorCritic(obs, act, C.ModelConfig(core=core, hidden_size=8, hidden_layer=8,
                                                           core_kernel=k)) for k in ("auto", "torch")]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].initial_state(3)
    for t in start.tensors():
        t.normal_()
    (out_a, s_a), (out_b, s_b) = (m.run_core(x, start, valid) for m in models)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)
    for a, b in zip(s_a.tensors(), s_b.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(s_a.tensors()) == (2 if core == "lstm" else 1)
    assert (s_a.h - start.h).abs().min() > 0 and (core == "gru" or (s_a.c - start.c).abs().min() > 0)


def test_core_kernel_is_validated():
    with pytest.raises(C.ConfigError, match="model.core_kernel"):
        C.from_dict({"model": {"core_kernel": "fused"}})
