import torch

from ppo_tbptt.gae import compute_gae, masked_mean, masked_std


def reference_gae(rewards, values, terminated, truncated, bootstrap, trunc_values, gamma, lam):
    """A plain per-env loop written from the definition."""
    T, N = rewards.shape
    adv = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            if terminated[t, n]:
                next_v, cont = 0.0, 0.0
            elif truncated[t, n]:
                next_v, cont = float(trunc_values[t, n]), 0.0
            else:
                next_v = float(values[t + 1, n]) if t + 1 < T else float(bootstrap[n])
                cont = 1.0
            delta = float(rewards[t, n]) + gamma * next_v - float(values[t, n])
            running = delta + gamma * lam * cont * running
            adv[t, n] = running
    return adv


def test_gae_matches_reference_with_terminated_and_truncated():
    g = torch.Generator().manual_seed(0)
    T, N = 17, 5
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    terminated = torch.rand(T, N, generator=g) < 0.15
    truncated = (torch.rand(T, N, generator=g) < 0.15) & ~terminated
    assert terminated.any() and truncated.any()
    bootstrap = torch.randn(N, generator=g, dtype=torch.float64)
    tv = torch.randn(T, N, generator=g, dtype=torch.float64) * truncated
    adv, ret = compute_gae(rewards, values, terminated, truncated, bootstrap, 0.97, 0.9, tv)
    ref = reference_gae(rewards, values, terminated, truncated, bootstrap, tv, 0.97, 0.9)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, ref + values)


def test_truncation_bootstraps_but_termination_does_not():
    rewards = torch.zeros(1, 2)
    values = torch.zeros(1, 2)
    term = torch.tensor([[True, False]])
    trunc = torch.tensor([[False, True]])
    adv, _ = compute_gae(rewards, values, term, trunc, torch.tensor([5.0, 5.0]), 0.5, 1.0,
                         torch.tensor([[0.0, 2.0]]))
    assert adv.tolist() == [[0.0, 1.0]]  # truncated: gamma * V(final obs); terminated: nothing


def test_masked_stats_ignore_padding():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == 2.0
    assert masked_std(x, m).item() == torch.tensor([1.0, 3.0]).std().item()
