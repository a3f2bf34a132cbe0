"""Rollout -> training sequences (TBPTT). The only place where time-major becomes batch-first.

A sequence never crosses an episode start. Its initial recurrent state is the state stored at its
first step, detached: the value carries over, the gradient does not cross the cut. Sequences are
padded to the sequence length L only (whole-episode mode pads to the longest fragment in the
rollout, which is at most T), with a mask that is 1 on real steps.
"""
from __future__ import annotations

import dataclasses

import torch

from .model import RecurrentState
from .rollout import Rollout


@dataclasses.dataclass
class SequenceBatch:
    """Batch-first sequences. S sequences of padded length L.

    ``mask [S, L]`` is 1 where a transition enters the loss. ``valid [S, L]`` is true on real steps
    (a prefix that only feeds the recurrent state included), false on the padding after a
    sequence's end. ``index [S, L]`` is each position's flat time-major index ``t * N + n`` into
    the rollout (padding repeats the last real index). ``init_state`` holds the detached start
    states ``[K, S, H]``.
    """

    obs: torch.Tensor           # [S, L, ...]
    actions: torch.Tensor       # [S, L, D]
    logprobs: torch.Tensor      # [S, L]
    values: torch.Tensor        # [S, L]
    advantages: torch.Tensor    # [S, L]
    returns: torch.Tensor       # [S, L]
    mask: torch.Tensor          # [S, L] float
    valid: torch.Tensor         # [S, L] bool
    index: torch.Tensor         # [S, L] int64
    init_state: RecurrentState  # [K, S, H]

    @property
    def num_sequences(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def select(self, idx: torch.Tensor) -> "SequenceBatch":
        """Sub-batch of sequences ``idx [s]``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: (v.index(idx) if isinstance(v, RecurrentState) else v[idx]) for k, v in fields.items()}
        return SequenceBatch(**out)


def chunk_starts(episode_start: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where sequences start in a ``[T, N]`` rollout and how long they are.

    A new sequence starts at t = 0, at every episode start, and every ``seq_len`` steps inside an
    episode fragment (``seq_len <= 0``: only at fragment starts). Returns ``(t0 [S], n [S],
    length [S])``, ordered env by env, then by time.
    """
    T, N = episode_start.shape
    dev = episode_start.device
    es = episode_start.t().clone()  # [N, T] env-major
    es[:, 0] = True
    steps = torch.arange(T, device=dev).expand(N, T)  # [N, T]
    frag_start = torch.cummax(torch.where(es, steps, torch.zeros_like(steps)), dim=1).values
    pos = steps - frag_start  # position inside the episode fragment
    starts = es | (pos % seq_len == 0) if seq_len > 0 else es
    flat = torch.nonzero(starts.reshape(-1)).squeeze(1)  # env-major flat index n * T + t
    ends = torch.cat([flat[1:], flat.new_tensor([N * T])])
    n = flat // T
    t0 = flat % T
    # A chunk never runs past its env's row: the next env's t = 0 is always a start.
    return t0, n, ends - flat


def gather_sequences(rollout: Rollout, t0: torch.Tensor, n: torch.Tensor, length: torch.Tensor,
                     pad_to: int, loss_from: torch.Tensor | None = None) -> SequenceBatch:
    """Cut ``[t0, t0 + length)`` of env ``n`` out of the rollout, padded to ``pad_to`` steps.

    ``loss_from [S]`` (optional) is the first position of each sequence that enters the loss; the
    positions before it are a prefix that only feeds the recurrent state (mask 0).
    """
    T, N = rollout.num_steps, rollout.num_envs
    ar = torch.arange(pad_to, device=t0.device)
    valid = ar[None, :] < length[:, None]  # [S, L]
    mask = valid if loss_from is None else valid & (ar[None, :] >= loss_from[:, None])  # [S, L]
    t = t0[:, None] + torch.minimum(ar[None, :], (length - 1)[:, None])  # [S, L] clamped to last real step
    index = t * N + n[:, None]  # [S, L] flat time-major

    def g(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(T * N, *x.shape[2:])[index]  # [T, N, ...] -> [T*N, ...] -> [S, L, ...]

    return SequenceBatch(
        obs=g(rollout.obs), actions=g(rollout.actions), logprobs=g(rollout.logprobs),
        values=g(rollout.values), advantages=g(rollout.advantages), returns=g(rollout.returns),
        mask=mask.float(), valid=valid, index=index, init_state=rollout.state_at(t0, n).detach(),
    )


def build_sequences(rollout: Rollout, seq_len: int) -> SequenceBatch:
    """Fixed-length TBPTT(L, L): chunks of ``seq_len`` steps (``<= 0``: whole episode fragments)."""
    t0, n, length = chunk_starts(rollout.episode_start, seq_len)
    pad_to = seq_len if seq_len > 0 else int(length.max())
    return gather_sequences(rollout, t0, n, length, pad_to)


def overlap_windows(episode_start: torch.Tensor, k1: int, k2: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TBPTT(k1, k2) windows in a ``[T, N]`` rollout.

    Loss blocks start at every fragment start and every ``k1`` steps inside a fragment (exactly the
    fixed chunks of length ``k1``); each block is preceded by a prefix of up to ``p = k2 - k1``
    steps that never reaches back past the fragment start. Returns ``(t0 [S], n [S], length [S],
    loss_from [S])``: the window is ``[t0, t0 + length)`` of env ``n`` and its positions
    ``>= loss_from`` enter the loss, so every transition enters the loss exactly once.
    """
    if not 1 <= k1 <= k2:
        raise ValueError(f"overlap windows need 1 <= k1 <= k2, got k1={k1}, k2={k2}")
    T, N = episode_start.shape
    s, n, block = chunk_starts(episode_start, k1)  # loss blocks [s, s + block)
    es = episode_start.t().clone()  # [N, T] env-major
    es[:, 0] = True
    steps = torch.arange(T, device=episode_start.device).expand(N, T)  # [N, T]
    frag_start = torch.cummax(torch.where(es, steps, torch.zeros_like(steps)), dim=1).values  # [N, T]
    t0 = torch.maximum(frag_start[n, s], s - (k2 - k1))  # [S]
    loss_from = s - t0
    return t0, n, loss_from + block, loss_from


def minibatch_indices(num_sequences: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffle whole sequences into ``minibatches`` groups of near-equal count."""
    perm = torch.randperm(num_sequences, generator=generator)
    return [chunk for chunk in torch.tensor_split(perm, minibatches) if chunk.numel() > 0]
