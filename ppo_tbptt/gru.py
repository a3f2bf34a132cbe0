"""A GRU over padded sequences with a hand-written backward pass, for training on a CPU.

``nn.GRU`` on a CPU runs its time steps as separate ATen ops and autograd records every one of
them: its backward computes and accumulates the weight gradients step by step (a small matmul and
an addition of the full ``[3H, H]`` gradient per step), the largest item in a profile of the
update. :func:`gru_sequence` computes the same function (PyTorch's gate equations, in the same
order) with the input projection of all steps in one matmul, a forward loop over time steps, and a
backward loop that carries only ``dh``; the weight gradients are then one matmul over all steps.
Sequences run like a packed sequence: sorted by length, step t computes only the sequences still
running.
"""
from __future__ import annotations

import torch
from torch import nn
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
    def backward(ctx, dout, dh_last):
        h0, w_hh, out, rz, n, gh = ctx.saved_tensors
        bs = ctx.batch_sizes
        N, H = out.shape
        B = h0.shape[0]
        # the state fed into each step: h0 for step 0, else the previous step's output of that row
        prev = torch.arange(bs[0], N, device=out.device) - torch.repeat_interleave(
            torch.tensor(bs[:-1], device=out.device), torch.tensor(bs[1:], device=out.device))
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


def gru_sequence(core: nn.GRU, x: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``core`` (a batch-first ``nn.GRU`` with biases, no dropout) over ``x [B, L, F]`` from
    ``h0 [K, B, H]`` -> ``out [B, L, H]``, final state ``[K, B, H]``, as ``core(x, h0)`` computes
    them. ``lengths [B]`` (optional): sequence b has only its first ``lengths[b]`` steps; its
    outputs after them are zero and its final state is the one after its last step, as with a
    packed sequence."""
    B, L = x.shape[:2]
    if lengths is None:
        lengths = torch.full((B,), L, dtype=torch.long, device=x.device)
    lengths, order = torch.sort(lengths, descending=True, stable=True)
    steps = int(lengths[0])  # (one host sync)
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
    finals = []
    for k in range(core.num_layers):
        gi = F.linear(xs, getattr(core, f"weight_ih_l{k}"), getattr(core, f"bias_ih_l{k}"))  # [N, 3H]
        xs, hk = _GRULayer.apply(gi, hs[k], getattr(core, f"weight_hh_l{k}"),
                                 getattr(core, f"bias_hh_l{k}"), batch_sizes, last)
        finals.append(hk)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(B, device=x.device)
    out = xs.new_zeros(B * L, xs.shape[1]).index_copy(0, idx, xs).reshape(B, L, -1)  # [B, L, H]
    return out, torch.stack(finals)[:, inv]


def supported(core: nn.Module) -> bool:
    """Whether :func:`gru_sequence` computes what ``core`` does (batch-first GRU, biases, one
    direction, no dropout or projections)."""
    return (isinstance(core, nn.GRU) and core.batch_first and core.bias and not core.bidirectional
            and core.dropout == 0)
