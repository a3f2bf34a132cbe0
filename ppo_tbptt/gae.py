"""Pure maths for the update: GAE over a whole rollout and masked statistics."""
from __future__ import annotations

import torch


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor,
                truncated: torch.Tensor, bootstrap_value: torch.Tensor, gamma: float, lam: float,
                truncation_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[T, N]`` time-major tensors.

    Runs once over the whole rollout (truncated BPTT cuts gradients, not return targets).
    At a step with ``terminated`` the next value is 0 (no bootstrap). At a step with ``truncated``
    the episode also ends, but it bootstraps from ``truncation_values[t]`` = V(final obs). Otherwise
    the next value is ``values[t + 1]``, or ``bootstrap_value`` after the last step. The lambda
    chain never crosses an episode end. Returns ``(advantages, returns)``, both ``[T, N]``.
    """
    T = rewards.shape[0]
    term = terminated.to(values.dtype)
    trunc = truncated.to(values.dtype) * (1.0 - term)
    tv = torch.zeros_like(values) if truncation_values is None else truncation_values
    next_values = torch.cat([values[1:], bootstrap_value[None]], dim=0)  # [T, N]
    next_values = next_values * (1.0 - trunc) + tv * trunc
    deltas = rewards + gamma * next_values * (1.0 - term) - values  # [T, N]
    carry = 1.0 - torch.maximum(term, trunc)  # lambda chain continues only inside an episode
    adv = torch.zeros_like(values)
    last = torch.zeros_like(bootstrap_value)
    for t in range(T - 1, -1, -1):
        last = deltas[t] + gamma * lam * carry[t] * last
        adv[t] = last
    return adv, adv + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (same shape)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standard deviation (unbiased) of ``x`` over masked-in entries."""
    m = mask.to(x.dtype)
    n = m.sum()
    mu = (x * m).sum() / n.clamp_min(1.0)
    var = (((x - mu) * m) ** 2).sum() / (n - 1.0).clamp_min(1.0)
    return var.sqrt()
