"""The PPO loss over a minibatch of sequences. Every mean is masked."""
from __future__ import annotations

import dataclasses

import torch

from .gae import masked_mean, masked_std
from .model import RecurrentActorCritic
from .sequences import SequenceBatch


@dataclasses.dataclass(frozen=True)
class LossCoefs:
    clip: float
    ent_coef: float
    vf_coef: float
    norm_advantages: bool = True
    clip_value_loss: bool = True


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict  # name -> float tensor (detached)


def ppo_loss_from_outputs(model: RecurrentActorCritic, batch: SequenceBatch, logits: torch.Tensor,
                          values: torch.Tensor, coefs: LossCoefs) -> LossOutput:
    """Clipped surrogate + (clipped) value loss - entropy bonus, from the model's outputs.

    ``logits [S, L, A]`` and ``values [S, L]`` must be aligned with ``batch`` (mask ``[S, L]``).
    """
    mask = batch.mask
    dist = model.dist(logits)
    newlogp = dist.log_prob(batch.actions)  # [S, L]
    entropy = dist.entropy()  # [S, L]
    logratio = newlogp - batch.logprobs
    ratio = logratio.exp()

    adv = batch.advantages
    if coefs.norm_advantages:
        adv = (adv - masked_mean(adv, mask)) / (masked_std(adv, mask) + 1e-8)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - coefs.clip, 1.0 + coefs.clip))
    pg_loss = masked_mean(pg, mask)

    v_err = (values - batch.returns) ** 2
    if coefs.clip_value_loss:
        v_clipped = batch.values + (values - batch.values).clamp(-coefs.clip, coefs.clip)
        v_err = torch.maximum(v_err, (v_clipped - batch.returns) ** 2)
    v_loss = 0.5 * masked_mean(v_err, mask)
    ent = masked_mean(entropy, mask)
    loss = pg_loss - coefs.ent_coef * ent + coefs.vf_coef * v_loss

    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - logratio, mask)
        clipfrac = masked_mean(((ratio - 1.0).abs() > coefs.clip).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
    metrics = {
        "losses/policy": pg_loss.detach(), "losses/value": v_loss.detach(),
        "losses/entropy": ent.detach(), "losses/approx_kl": approx_kl,
        "losses/clipfrac": clipfrac, "losses/ratio": ratio_mean,
    }
    return LossOutput(loss, metrics)


def ppo_loss(model: RecurrentActorCritic, batch: SequenceBatch, coefs: LossCoefs) -> LossOutput:
    """Run the model over the batch's sequences (one recurrent call) and compute the PPO loss."""
    logits, values, _ = model(batch.obs, batch.init_state, batch.valid)
    return ppo_loss_from_outputs(model, batch, logits, values, coefs)
