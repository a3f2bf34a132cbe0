"""A GRU and an LSTM over padded sequences with hand-written backward passes, for training on a CPU.

``nn.GRU`` and ``nn.LSTM`` on a CPU run their time steps as separate ATen ops and autograd records
every one of them: their backward computes and accumulates the weight gradients step by step (a
small matmul and an addition of the full ``[3H, H]`` or ``[4H, H]`` gradient per step), the largest
item in a profile of the update. :func:`rnn_sequence` computes the same function (PyTorch's gate
equations) with the input projection of all steps in one matmul, a forward loop over time steps,
and a backward loop that carries only the state's gradient (``dh``; ``dh`` and ``dc`` for an
LSTM); the weight gradients are then one matmul over all steps. Sequences run like a packed
sequence: sorted by length, step t computes only the sequences still running.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


class _GRULayer(torch.autograd.Function):
    """One GRU layer over a packed sequence: ``gi [N, 3H]`` (the input projection, bias included)
    in ``PackedSequence`` order (step 0 of every sequence, then step 1 of those still running,
    ...; sequences sorted by length, ``batch_sizes[t]`` of them at step t), from ``h0 [B, H]``.
    Returns ``out [N, H]`` in the same order and each sequence's state after its last step
    ``[B, H]``."""

    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh, batch_sizes, last):
        N, G = gi.shape
        H = G // 3
        out = gi.new_empty(N, H)
        rz = gi.new_empty(N, 2 * H)  # reset and update gates
        n = gi.new_empty(N, H)       # candidate state
        gh = gi.new_empty(N, G)      # h W_hh^T + b_hh
        wt = w_hh.t()
        # every step's rows as views, made in one call per buffer (cheaper than slicing per step)
        steps = zip(*(x.split(batch_sizes) for x in (*gi.split([2 * H, H], 1), gh, *gh.split([2 * H, H], 1),
                                                    rz, *rz.split([H, H], 1), n, out)))
        hp = h0
        for b, (gi_rz, gi_n, ght, gh_rz, gh_n, r_z, r, z, nt, ht) in zip(batch_sizes, steps):
            if b < hp.shape[0]:
                hp = hp[:b]
            torch.addmm(b_hh, hp, wt, out=ght)
            torch.add(gi_rz, gh_rz, out=r_z).sigmoid_()
            torch.addcmul(gi_n, r, gh_n, out=nt).tanh_()
            hp = torch.addcmul(nt, z, hp - nt, out=ht)  # (1 - z) n + z h
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(h0, w_hh, out, rz, n, gh)
        return out, torch.cat([out[last], h0[len(last):]])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_last):
        h0, w_hh, out, rz, n, gh = ctx.saved_tensors
        bs = ctx.batch_sizes
        N, H = out.shape
        B = h0.shape[0]
        # the state fed into each step: h0 for step 0, else the previous step's output of that row
        prev = _previous_rows(bs, N, out.device)
        hprev = torch.cat([h0[:bs[0]], out[prev]])  # [N, H]
        r, z = rz[:, :H], rz[:, H:]
        # d loss / d h' times these factors gives the gradients of the gates' pre-activations
        a = (1 - z) * (1 - n * n)                        # candidate (n's input)
        cr = a * gh[:, 2 * H:] * (r - r * r)             # reset gate
        cz = (hprev - n) * (z - z * z)                   # update gate
        cgh = torch.cat([cr, cz, a * r], 1)              # [N, 3H]: of h W_hh^T + b_hh
        # d loss / d h carried back; a row's final-state gradient joins at its last step (before
        # it, the row does not run and dh keeps it)
        dh = out.new_zeros(B, H) if dh_last is None else dh_last.clone()
        if dout is None:
            dout = out.new_zeros(N, H)
        d_all = out.new_empty(N, H)  # d loss / d h' at every step
        dgh = out.new_empty(N, 3 * H)
        rows = [x.split(bs) for x in (dout, d_all, dgh, cgh, z)]
        for b, dout_t, d_t, g, cgh_t, z_t in zip(reversed(bs), *(reversed(x) for x in rows)):
            dh_t = dh if b == B else dh[:b]
            d = torch.add(dh_t, dout_t, out=d_t)
            torch.mul(d.unsqueeze(1), cgh_t.view(b, 3, H), out=g.view(b, 3, H))
            torch.addmm(d * z_t, g, w_hh, out=dh_t)
        dgi = torch.cat([dgh[:, :2 * H], d_all * a], 1)  # [N, 3H]
        return dgi, dh, dgh.t() @ hprev, dgh.sum(0), None, None


class _LSTMLayer(torch.autograd.Function):
    """One LSTM layer over a packed sequence (see :class:`_GRULayer`): ``gi [N, 4H]`` is the input
    projection with both biases, and ``w_hh [4H, H]``, their gates in the order o, i, f, g (PyTorch's
    i, f, g, o with o moved first, so that the sigmoid gates are one block and the gates whose
    gradient comes through the cell state another); from ``h0, c0 [B, H]``. Returns ``out [N, H]``
    and each sequence's final ``h`` and ``c`` ``[B, H]``."""

    @staticmethod
    def forward(ctx, gi, h0, c0, w_hh, batch_sizes, last):
        N, G = gi.shape
        H = G // 4
        out = gi.new_empty(N, H)
        gates = gi.new_empty(N, G)  # activated: sigmoid(o, i, f), tanh(g)
        cs = gi.new_empty(N, H)     # the cell state after each step
        tc = gi.new_empty(N, H)     # tanh of it
        wt = w_hh.t()
        steps = zip(*(x.split(batch_sizes) for x in (gi, gates, *gates.split([3 * H, H], 1),
                                                    *gates.split([H, H, H, H], 1), cs, tc, out)))
        hp, cp = h0, c0
        for b, (gi_t, g_t, sig, tg, o, i, f, g, c, t, h) in zip(batch_sizes, steps):
            if b < hp.shape[0]:
                hp, cp = hp[:b], cp[:b]
            torch.addmm(gi_t, hp, wt, out=g_t)
            sig.sigmoid_()
            tg.tanh_()
            torch.mul(f, cp, out=c)
            cp = c.addcmul_(i, g)  # f c + i g
            torch.tanh(c, out=t)
            hp = torch.mul(o, t, out=h)
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(h0, c0, w_hh, out, gates, cs, tc)
        return out, torch.cat([out[last], h0[len(last):]]), torch.cat([cs[last], c0[len(last):]])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_last, dc_last):
        h0, c0, w_hh, out, gates, cs, tc = ctx.saved_tensors
        bs = ctx.batch_sizes
        N, H = out.shape
        B = h0.shape[0]
        prev = _previous_rows(bs, N, out.device)
        hprev = torch.cat([h0[:bs[0]], out[prev]])  # [N, H]: the state fed into each step
        cprev = torch.cat([c0[:bs[0]], cs[prev]])
        o, i, f, g = gates.split(H, 1)
        # with e = d loss / d c' (the cell's gradient at a step, all paths summed) and d = d loss / d h':
        # the pre-activations of i, f, g take e times these, that of o takes d times tc o (1 - o)
        ce = torch.cat([g * (i - i * i), cprev * (f - f * f), i * (1 - g * g)], 1)  # [N, 3H]
        co = tc * (o - o * o)
        dc_of_dh = o * (1 - tc * tc)  # d c' / d h' path: e = dc + d * o (1 - tanh(c')^2)
        dh = out.new_zeros(B, H) if dh_last is None else dh_last.clone()
        dc = out.new_zeros(B, H) if dc_last is None else dc_last.clone()
        if dout is None:
            dout = out.new_zeros(N, H)
        dgates = out.new_empty(N, 4 * H)  # of the pre-activations, in gi's order o, i, f, g
        d_t_all = out.new_empty(N, H)
        rows = [x.split(bs) for x in (dout, d_t_all, dgates, ce, co, dc_of_dh, f)]
        for b, dout_t, d_t, dg, ce_t, co_t, a_t, f_t in zip(reversed(bs), *(reversed(x) for x in rows)):
            dh_t = dh if b == B else dh[:b]
            dc_t = dc if b == B else dc[:b]
            d = torch.add(dh_t, dout_t, out=d_t)
            e = dc_t.addcmul_(d, a_t)  # in place: dc's rows become e
            torch.mul(d, co_t, out=dg[:, :H])
            torch.mul(e.unsqueeze(1), ce_t.view(b, 3, H), out=dg[:, H:].view(b, 3, H))
            dc_t.mul_(f_t)  # e f: the gradient of the cell state before the step
            torch.mm(dg, w_hh, out=dh_t)
        return dgates, dh, dc, dgates.t() @ hprev, None, None


def _previous_rows(bs: list[int], n: int, device) -> torch.Tensor:
    """For each packed row from step 1 on, the row of the same sequence one step earlier
    (``[n - bs[0]]``)."""
    return torch.arange(bs[0], n, device=device) - torch.repeat_interleave(
        torch.tensor(bs[:-1], dtype=torch.long, device=device), torch.tensor(bs[1:], dtype=torch.long, device=device))


def rnn_sequence(core: nn.GRU | nn.LSTM, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``core`` (a batch-first ``nn.GRU`` or ``nn.LSTM`` that :func:`supported` accepts) over
    ``x [B, L, F]`` from ``h0 [K, B, H]`` (and, for an LSTM, ``c0 [K, B, H]``) -> ``out [B, L, H]``,
    final ``h [K, B, H]`` and final ``c`` (None for a GRU), as ``core(x, h0)`` / ``core(x, (h0, c0))``
    computes them. ``lengths [B]`` (optional): sequence b has only its first ``lengths[b]`` steps;
    its outputs after them are zero and its final state is the one after its last step, as with a
    packed sequence."""
    lstm = isinstance(core, nn.LSTM)
    if lstm and c0 is None:
        raise ValueError("an LSTM needs its start cell state c0")
    B, L = x.shape[:2]
    if lengths is None:
        lengths = torch.full((B,), L, dtype=torch.long, device=x.device)
    lengths, order = torch.sort(lengths, descending=True, stable=True)
    steps = int(lengths[0])  # (one host sync)
    if steps == 0:  # nothing runs: no outputs, the start states are the final ones
        h = core.hidden_size
        return x.new_zeros(B, L, h), h0 + 0, (c0 + 0) if lstm else None
    running = torch.arange(steps, device=x.device)[:, None] < lengths[None, :]  # [steps, B] sorted
    batch_sizes = running.sum(1).tolist()
    t, j = running.nonzero(as_tuple=True)  # packed order: by step, then by sorted row
    idx = order[j] * L + t  # [N] flat batch-first positions
    # row j's last step in the packed order (rows of length 0 keep h0)
    offsets = torch.tensor([0] + batch_sizes, device=x.device).cumsum(0)
    ran = lengths[lengths > 0]
    last = offsets[ran - 1] + torch.arange(len(ran), device=x.device)
    xs = x.reshape(B * L, -1)[idx]  # [N, F]
    hs = h0[:, order]
    cs = c0[:, order] if lstm else None
    finals, cells = [], []
    for k in range(core.num_layers):
        w_ih, w_hh = getattr(core, f"weight_ih_l{k}"), getattr(core, f"weight_hh_l{k}")
        b_ih, b_hh = getattr(core, f"bias_ih_l{k}"), getattr(core, f"bias_hh_l{k}")
        if lstm:
            perm = _lstm_gate_order(core.hidden_size, x.device)
            gi = F.linear(xs, w_ih[perm], (b_ih + b_hh)[perm])  # [N, 4H]
            xs, hk, ck = _LSTMLayer.apply(gi, hs[k], cs[k], w_hh[perm], batch_sizes, last)
            cells.append(ck)
        else:
            gi = F.linear(xs, w_ih, b_ih)  # [N, 3H]
            xs, hk = _GRULayer.apply(gi, hs[k], w_hh, b_hh, batch_sizes, last)
        finals.append(hk)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(B, device=x.device)
    out = xs.new_zeros(B * L, xs.shape[1]).index_copy(0, idx, xs).reshape(B, L, -1)  # [B, L, H]
    return out, torch.stack(finals)[:, inv], torch.stack(cells)[:, inv] if lstm else None


def _lstm_gate_order(hidden: int, device) -> torch.Tensor:
    """Rows of PyTorch's LSTM weights (gates i, f, g, o) in :class:`_LSTMLayer`'s order o, i, f, g."""
    return torch.arange(4 * hidden, device=device).view(4, hidden)[[3, 0, 1, 2]].reshape(-1)


def supported(core: nn.Module) -> bool:
    """Whether :func:`rnn_sequence` computes what ``core`` does (batch-first GRU or LSTM, biases,
    one direction, no dropout, no LSTM projections)."""
    return (isinstance(core, (nn.GRU, nn.LSTM)) and core.batch_first and core.bias and not core.bidirectional
            and core.dropout == 0 and getattr(core, "proj_size", 0) == 0)
