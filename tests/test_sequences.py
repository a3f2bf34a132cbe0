import pytest
import torch

from ppo_tbptt.rollout import Rollout
from ppo_tbptt.sequences import build_sequences, chunk_starts, minibatch_indices

T, N, K, H = 12, 4, 2, 3

# Episode starts per env (time steps). Env 0: one episode crossing both rollout boundaries;
# env 1: episodes ending mid-chunk; env 2: an episode start at t = 0; env 3: many 1-step episodes.
STARTS = {0: [], 1: [3, 4, 9], 2: [0, 5], 3: [2, 3, 4, 5, 11]}


def fake_rollout() -> Rollout:
    r = Rollout.allocate(T, N, (2,), "uint8", 1, K, H, lstm=True, device=torch.device("cpu"))
    for n, ts in STARTS.items():
        for t in ts:
            r.episode_start[t, n] = True
    t_idx = torch.arange(T)[:, None].expand(T, N)
    n_idx = torch.arange(N)[None, :].expand(T, N)
    r.values[:] = (t_idx * 100 + n_idx).float()  # a unique tag per transition
    r.state_h[:] = (t_idx * 100 + n_idx).float()[:, None, :, None] + 0.5  # [T, K, N, H]
    r.state_c[:] = -r.state_h
    return r


@pytest.mark.parametrize("seq_len", [1, 3, 5, 12, 100, 0, -1])
def test_every_transition_exactly_once_and_no_episode_crossing(seq_len):
    r = fake_rollout()
    b = build_sequences(r, seq_len)
    L = b.length
    if seq_len > 0:
        assert L == seq_len  # padded to the sequence length only
    tags = b.values[b.mask.bool()]
    assert sorted(tags.tolist()) == sorted(r.values.flatten().tolist())  # each (t, n) once
    assert b.mask.sum().item() == T * N
    for s in range(b.num_sequences):
        real = b.index[s][b.mask[s].bool()]
        t, n = real // N, real % N
        assert (n == n[0]).all()
        assert (t[1:] - t[:-1] == 1).all()  # consecutive steps
        starts_inside = r.episode_start[t[1:], n[1:]]
        assert not starts_inside.any(), f"sequence {s} crosses an episode start"
        # mask is a prefix: real steps first, padding after
        m = b.mask[s]
        assert (m[: int(m.sum())] == 1).all()
        if seq_len > 0:
            assert len(t) <= seq_len


@pytest.mark.parametrize("seq_len", [1, 4, 0])
def test_initial_states_are_stored_states_detached(seq_len):
    r = fake_rollout()
    r.state_h.requires_grad_(True)
    b = build_sequences(r, seq_len)
    assert not b.init_state.h.requires_grad and b.init_state.h.grad_fn is None
    first = b.index[:, 0]
    t0, n0 = first // N, first % N
    expected = (t0 * 100 + n0).float() + 0.5  # [S]
    assert b.init_state.h.shape == (K, b.num_sequences, H)
    torch.testing.assert_close(b.init_state.h, expected[None, :, None].expand(K, -1, H))
    torch.testing.assert_close(b.init_state.c, -expected[None, :, None].expand(K, -1, H))


def test_chunk_counts_by_hand():
    r = fake_rollout()
    t0, n, length = chunk_starts(r.episode_start, 5)
    got = {(int(a), int(b)): int(c) for a, b, c in zip(n, t0, length)}
    assert got == {
        (0, 0): 5, (0, 5): 5, (0, 10): 2,
        (1, 0): 3, (1, 3): 1, (1, 4): 5, (1, 9): 3,
        (2, 0): 5, (2, 5): 5, (2, 10): 2,
        (3, 0): 2, (3, 2): 1, (3, 3): 1, (3, 4): 1, (3, 5): 5, (3, 10): 1, (3, 11): 1,
    }
    t0, n, length = chunk_starts(r.episode_start, 0)  # whole fragments
    assert sorted(zip(n.tolist(), t0.tolist(), length.tolist())) == [
        (0, 0, 12), (1, 0, 3), (1, 3, 1), (1, 4, 5), (1, 9, 3), (2, 0, 5), (2, 5, 7),
        (3, 0, 2), (3, 2, 1), (3, 3, 1), (3, 4, 1), (3, 5, 6), (3, 11, 1)]


def test_minibatches_partition_sequences():
    g = torch.Generator().manual_seed(0)
    parts = minibatch_indices(10, 3, g)
    assert len(parts) == 3
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
