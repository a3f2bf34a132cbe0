"""The PPO loss against a plain reference, on data where it matters.

At ratio 1 (the equivalence tests) a flipped clip bound, a wrong sign or an unmasked mean give the
same numbers as the right loss, so these tests move the policy and the values away from the ones
that collected the data (ratios well outside the clip range on both sides, values beyond the value
clip), put garbage where the mask is 0 (padding after a sequence's end and a prefix before its loss
positions), and compare the loss, its gradients and its metrics with a reference written from the
PPO paper's definitions: boolean selection of the loss positions, ``torch.distributions.Categorical``,
plain means.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch.distributions import Categorical

from ppo_tbptt.model import ActionDist, RecurrentState
from ppo_tbptt.ppo import LossCoefs, ppo_loss_from_outputs
from ppo_tbptt.sequences import SequenceBatch

S, L = 5, 7
CLIP, ENT, VF = 0.2, 0.05, 0.7


def make_case(nvec: list[int], seed: int = 0):
    """Model outputs (leaves) and a batch with padding, prefixes and garbage where mask = 0."""
    g = torch.Generator().manual_seed(seed)
    A, D = sum(nvec), len(nvec)
    dt = torch.float64
    logits = (2.0 * torch.randn(S, L, A, generator=g, dtype=dt)).requires_grad_(True)
    values = torch.randn(S, L, generator=g, dtype=dt).requires_grad_(True)
    actions = torch.stack([torch.randint(0, n, (S, L), generator=g) for n in nvec], dim=-1)  # [S, L, D]
    lengths = torch.tensor([7, 4, 6, 2, 7])          # padding after the sequence's end
    loss_from = torch.tensor([0, 0, 3, 0, 2])        # a prefix that only feeds the state
    ar = torch.arange(L)
    valid = ar[None] < lengths[:, None]
    mask = (valid & (ar[None] >= loss_from[:, None])).to(dt)
    with torch.no_grad():
        newlogp = ActionDist(logits, nvec).log_prob(actions)
        # old log-probs 0.6 nats away on average: ratios from ~0.3 to ~3, clipped on both sides
        logprobs = newlogp + 0.6 * torch.randn(S, L, generator=g, dtype=dt)
        old_values = values + 0.5 * torch.randn(S, L, generator=g, dtype=dt)  # beyond the 0.2 value clip
    advantages = 1.0 + torch.randn(S, L, generator=g, dtype=dt)  # mean far from 0: normalisation shows
    returns = torch.randn(S, L, generator=g, dtype=dt)
    off = mask == 0  # garbage where nothing may look
    for x, v in ((logprobs, 3.0), (old_values, -40.0), (advantages, 60.0), (returns, 25.0)):
        x[off] = v
    batch = SequenceBatch(
        obs=torch.zeros(S, L, 1), actions=actions, logprobs=logprobs, values=old_values,
        advantages=advantages, returns=returns, mask=mask, valid=valid,
        index=torch.zeros(S, L, dtype=torch.long), init_state=RecurrentState(torch.zeros(1, S, 2)),
    )
    return logits, values, batch


def reference(logits, values, b: SequenceBatch, nvec, coefs: LossCoefs) -> dict:
    """PPO (Schulman et al. 2017) over the positions where mask = 1, written out plainly."""
    m = b.mask.bool()
    lg, a = logits[m], b.actions[m]                       # [M, A], [M, D]
    dists = [Categorical(logits=part) for part in torch.split(lg, nvec, dim=-1)]
    newlogp = sum(d.log_prob(a[:, i]) for i, d in enumerate(dists))
    entropy = sum(d.entropy() for d in dists)
    logratio = newlogp - b.logprobs[m]
    ratio = logratio.exp()
    adv = b.advantages[m]
    if coefs.norm_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - coefs.clip, 1 + coefs.clip) * adv)
    policy = -surrogate.mean()                            # the pessimistic bound, maximised
    v, ret, old_v = values[m], b.returns[m], b.values[m]
    if coefs.clip_value_loss:
        v_clipped = old_v + (v - old_v).clamp(-coefs.clip, coefs.clip)
        value = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2).mean()
    else:
        value = 0.5 * ((v - ret) ** 2).mean()
    loss = policy - coefs.ent_coef * entropy.mean() + coefs.vf_coef * value
    return {"loss": loss, "losses/policy": policy, "losses/value": value,
            "losses/entropy": entropy.mean(), "losses/approx_kl": ((ratio - 1) - logratio).mean(),
            "losses/clipfrac": ((ratio - 1).abs() > coefs.clip).double().mean(),
            "losses/ratio": ratio.mean()}


@pytest.mark.parametrize("nvec", [[4], [3, 2]], ids=["discrete", "multidiscrete"])
@pytest.mark.parametrize("norm_advantages,clip_value_loss", [(True, True), (False, False), (True, False)])
def test_loss_gradients_and_metrics_match_the_reference(nvec, norm_advantages, clip_value_loss):
    coefs = LossCoefs(CLIP, ENT, VF, norm_advantages=norm_advantages, clip_value_loss=clip_value_loss)
    logits, values, batch = make_case(nvec)
    stub = types.SimpleNamespace(dist=lambda lg: ActionDist(lg, nvec))  # the loss only needs dist()
    out = ppo_loss_from_outputs(stub, batch, logits, values, coefs)
    got = torch.autograd.grad(out.loss, [logits, values])
    ref = reference(logits, values, batch, nvec, coefs)
    want = torch.autograd.grad(ref["loss"], [logits, values])

    # the data really is off-policy: ratios clipped above and below, values clipped
    m = batch.mask.bool()
    ratio = (ActionDist(logits, nvec).log_prob(batch.actions) - batch.logprobs).exp()[m]
    assert (ratio > 1 + CLIP).sum() >= 3 and (ratio < 1 - CLIP).sum() >= 3
    assert ((values - batch.values).abs()[m] > CLIP).sum() >= 5

    torch.testing.assert_close(out.loss, ref["loss"], rtol=1e-10, atol=1e-12)
    for name, g, w in zip(("logits", "values"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda s: f"d loss / d {name}: {s}")
        assert torch.all(g[batch.mask == 0] == 0), f"positions outside the mask got gradient on {name}"
    for key, value in ref.items():
        if key != "loss":
            torch.testing.assert_close(out.metrics[key].double(), value.detach(), rtol=1e-6, atol=1e-9,
                                       msg=lambda s: f"{key}: {s}")


def test_each_term_moves_the_loss_the_right_way():
    """Signs spelled out: raising the probability of a positive-advantage action inside the clip
    range lowers the loss, more entropy lowers it, a value nearer its return lowers it."""
    nvec = [2]
    batch = SequenceBatch(
        obs=torch.zeros(1, 1, 1), actions=torch.zeros(1, 1, 1, dtype=torch.long),
        logprobs=torch.log(torch.tensor([[0.5]])), values=torch.zeros(1, 1),
        advantages=torch.ones(1, 1), returns=torch.ones(1, 1), mask=torch.ones(1, 1),
        valid=torch.ones(1, 1, dtype=torch.bool), index=torch.zeros(1, 1, dtype=torch.long),
        init_state=RecurrentState(torch.zeros(1, 1, 2)))
    stub = types.SimpleNamespace(dist=lambda lg: ActionDist(lg, nvec))
    coefs = LossCoefs(0.2, 0.1, 0.5, norm_advantages=False, clip_value_loss=False)
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    values = torch.zeros(1, 1, requires_grad=True)
    out = ppo_loss_from_outputs(stub, batch, logits, values, coefs)
    d_logits, d_values = torch.autograd.grad(out.loss, [logits, values])
    # policy term: -A * d ratio / d logit_0 = -0.5; entropy term at the uniform policy: 0
    assert d_logits[0, 0, 0] == pytest.approx(-0.5) and d_logits[0, 0, 1] == pytest.approx(0.5)
    assert d_values[0, 0] == pytest.approx(0.5 * (0.0 - 1.0))  # vf_coef * (V - R)
    no_bonus = ppo_loss_from_outputs(stub, batch, logits.detach(), values.detach(),
                                     LossCoefs(0.2, 0.0, 0.5, norm_advantages=False, clip_value_loss=False))
    # the entropy bonus is subtracted: ln 2 nats at the uniform policy, times ent_coef 0.1
    assert float(out.loss.detach() - no_bonus.loss) == pytest.approx(-0.1 * float(torch.log(torch.tensor(2.0))))
