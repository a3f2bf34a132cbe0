"""``random``: randomized truncation (after Tallec & Ollivier 2017), unbiased for BPTT over whole
chunks at a fraction of its sequential depth.

Each chunk of ``tbptt.sequence_length`` steps (<= 0: each episode fragment) is divided into
segments of ``tbptt.segment_length`` = s steps from its start. At every boundary between two
segments the backward chain is cut with probability q = s / ``tbptt.mean_length`` (so the pieces
between cuts are ``mean_length`` steps long on average) and otherwise kept, its gradient scaled by
1 / (1 - q). A gradient path from a loss back to an earlier state crosses some number b of
boundaries: it survives with probability (1 - q)^b and is scaled by (1 - q)^-b, so its expectation
is the full-chunk BPTT gradient, path by path. Edges inside a segment are never cut nor scaled,
which is what lets a segment run as one recurrent call; s = 1 is the per-edge scheme.

The pieces between cuts are the training sequences, each starting from the stored state at its
first step (detached), like any chunk. Their forward values equal the chunk's own unroll only
while the weights are those that collected the rollout: in the first minibatch of the first epoch.
After the first optimizer step every piece (like every chunk of any strategy) restarts from a
stale stored state (``tbptt.refresh_states`` recomputes them before each later epoch).

What is unbiased, exactly: for a loss that is a sum over steps of per-step terms with weights
that do not depend on the cuts, the expectation over the cuts of the gradient equals the
gradient of BPTT over the whole chunks (``tests/test_truncation.py`` enumerates every cut
pattern of small cases and finds them equal to 1e-16). The trainer's loss meets that over one
minibatch holding the whole batch (``ppo.minibatches: 1``): its masked-mean denominator and the
advantage normalisation run over every step, whichever pieces there are. With several
minibatches the sequences are shuffled into them, so a step's weight (1 / the steps in its
minibatch) and its normalised advantage depend on the pieces that share its minibatch, and each
minibatch's gradient is biased (9% of its norm in the test's 16-step case split in two); the
weights are kept as they are, the masked mean every strategy trains, rather than weights fixed
in advance that would make the random strategy's loss differ from the others'. Gradient clipping after the
average breaks it as well (E[clip g] != clip E[g]: clipping acts on each draw's noisier gradient),
and so do the later minibatches' stale start states and moved ratio clipping, as for any
strategy.

Pieces are independent, so the recurrent depth of a minibatch is its longest piece (about
``mean_length`` x ln(pieces)) instead of the chunk length, run as ceil(depth / s) calls over the
pieces still running. The gradient is a random variable around the chunk's: its variance grows
with the number of kept boundaries a path crosses (the weights (1 - q)^-b), so it buys reach
(unbiased for the whole chunk) at the depth of short pieces, and pays with noise.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import Config
from ..model import RecurrentActorCritic, RecurrentState
from ..rollout import Rollout
from ..sequences import SequenceBatch, chunk_starts, gather_sequences
from ..utils import stream_seed
from .base import TruncationStrategy

# A recurrent call over a segment: (x [B, s, F], state tensors [K, B, H]) -> (out [B, s, H], state tensors)
RunFn = Callable[[torch.Tensor, list], tuple]


def scale_gradient(x: torch.Tensor, scale) -> torch.Tensor:
    """Identity forward (bit for bit); the backward pass multiplies the gradient by ``scale``.

    ``x [K, B, H]``; ``scale`` a number or ``[B]`` (one factor per batch entry).
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.to(x.dtype)[None, :, None]  # [B] -> [1, B, 1]
    return x + (scale - 1.0) * (x - x.detach())


def core_run(core: torch.nn.Module) -> RunFn:
    """Wrap an ``nn.LSTM``/``nn.GRU`` (batch_first) as a :data:`RunFn` over state tensor lists."""

    def run(x: torch.Tensor, state: list) -> tuple:
        s = (state[0], state[1]) if len(state) == 2 else state[0]
        out, s = core(x, s)
        return out, RecurrentState.from_torch(s).tensors()

    return run


def segment_boundaries(episode_start: torch.Tensor, seq_len: int, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks of a ``[T, N]`` rollout (:func:`~ppo_tbptt.sequences.chunk_starts`, ``seq_len``
    steps, <= 0: whole fragments) and the places they may be cut: ``(starts [N, T], boundary [N,
    T])``, env-major, true at each chunk's first step and at every ``segment``-th step after it."""
    T, N = episode_start.shape
    dev = episode_start.device
    t0, n, _ = chunk_starts(episode_start, seq_len)
    starts = torch.zeros(N, T, dtype=torch.bool, device=dev)  # env-major
    starts[n, t0] = True
    steps = torch.arange(T, device=dev).expand(N, T)  # [N, T]
    pos = steps - torch.cummax(torch.where(starts, steps, torch.zeros_like(steps)), dim=1).values
    return starts, (pos > 0) & (pos % segment == 0)  # [N, T] position inside the chunk


def pieces_from_starts(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``starts [N, T]`` (env-major, true where a piece begins; ``[:, 0]`` true) -> the pieces
    ``(t0 [P], n [P], length [P])``, env by env, then by time."""
    N, T = starts.shape
    flat = torch.nonzero(starts.reshape(-1)).squeeze(1)  # env-major flat index n * T + t
    ends = torch.cat([flat[1:], flat.new_tensor([N * T])])
    return flat % T, flat // T, ends - flat


def random_pieces(episode_start: torch.Tensor, seq_len: int, segment: int, cut_prob: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the chunks of a ``[T, N]`` rollout at random segment boundaries.

    Chunks and boundaries are those of :func:`segment_boundaries`; each boundary is cut with
    probability ``cut_prob`` (uniforms drawn on the CPU from ``generator``, so the stream is the
    same on every device). Returns the pieces ``(t0 [P], n [P], length [P])``, env by env, then
    by time, like ``chunk_starts``.
    """
    T, N = episode_start.shape
    starts, boundary = segment_boundaries(episode_start, seq_len, segment)
    u = torch.rand(N, T, generator=generator).to(episode_start.device)
    return pieces_from_starts(starts | (boundary & (u < cut_prob)))


def segment_unroll(run: RunFn, x: torch.Tensor, state: list, length: torch.Tensor, segment: int,
                   scale: float) -> torch.Tensor:
    """Run pieces ``x [B, L, F]`` of real lengths ``length [B]`` from ``state`` (tensors ``[K, B,
    H]``) in calls of ``segment`` steps, scaling the gradient by ``scale`` at every boundary
    between two segments (forward values unchanged). Each call covers only the pieces still
    running (they are sorted by length); outputs past a piece's end are zero. -> ``[B, L, H]``."""
    B, L = x.shape[:2]
    order = torch.argsort(length, descending=True, stable=True)
    lengths = length[order].tolist()  # one host sync
    xs = x[order]
    st = [s[:, order] for s in state]
    outs = []
    for k0 in range(0, int(lengths[0]), segment):
        alive = sum(1 for ln in lengths if ln > k0)  # a prefix: longest first
        seg = [s[:, :alive].contiguous() for s in st]  # (cuDNN wants contiguous states)
        if k0 > 0:
            seg = [scale_gradient(s, scale) for s in seg]
        out, st = run(xs[:alive, k0:k0 + segment], seg)  # out [alive, s, H]
        outs.append(torch.nn.functional.pad(out, (0, 0, 0, 0, 0, B - alive)))  # [B, s, H]
    out = torch.cat(outs, dim=1)  # [B, >= max length, H]
    if out.shape[1] < L:
        out = torch.nn.functional.pad(out, (0, 0, 0, L - out.shape[1]))
    return out[:, :L][torch.argsort(order)]  # back to the batch's order


class RandomStrategy(TruncationStrategy):
    """Randomized truncation: pieces of mean length ``tbptt.mean_length`` cut at random
    ``tbptt.segment_length`` boundaries of chunks of ``tbptt.sequence_length`` (<= 0: whole
    episode fragments); the gradient is unbiased for BPTT over the whole chunk under the
    conditions the module docstring states, with the estimator and its cost."""

    name = "random"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.segment = int(self.tb.segment_length)
        self.cut_prob = self.segment / self.tb.mean_length
        self.generator = torch.Generator().manual_seed(stream_seed(cfg.run.seed, "random truncation"))
        self._reach = float(self.tb.mean_length)

    def build(self, rollout: Rollout) -> SequenceBatch:
        t0, n, length = random_pieces(rollout.episode_start, self.tb.sequence_length, self.segment,
                                      self.cut_prob, self.generator)
        self._reach = float(self.tb.mean_length)
        self.add_ratio("tbptt/mean_piece", float(length.sum()), len(length), replace=True)
        return gather_sequences(rollout, t0, n, length, int(length.max()))

    def core_out(self, model: RecurrentActorCritic, batch: SequenceBatch) -> torch.Tensor:
        x = model.encode(batch.obs, batch.valid)  # [S, L, F]
        length = batch.valid.sum(dim=1)  # [S]
        out = segment_unroll(core_run(model.core), x, batch.init_state.tensors(), length, self.segment,
                             1.0 / (1.0 - self.cut_prob))  # [S, L, H]
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
