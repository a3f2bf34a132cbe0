"""Recurrent actor-critic: encoder (Nature CNN | MLP) -> LSTM | GRU -> policy and value heads."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rnn_kernel
from .envs.spaces import FlatBox, ObsPart, action_layout


@dataclasses.dataclass
class RecurrentState:
    """Recurrent state: ``h [K, B, H]`` and, for LSTM, ``c [K, B, H]`` (GRU: ``c is None``)."""

    h: torch.Tensor
    c: torch.Tensor | None = None

    def detach(self) -> "RecurrentState":
        return RecurrentState(self.h.detach(), None if self.c is None else self.c.detach())

    def clone(self) -> "RecurrentState":
        return RecurrentState(self.h.clone(), None if self.c is None else self.c.clone())

    def index(self, idx) -> "RecurrentState":
        """Select batch entries: ``idx`` indexes the B dimension."""
        return RecurrentState(self.h[:, idx], None if self.c is None else self.c[:, idx])

    def masked(self, keep: torch.Tensor) -> "RecurrentState":
        """Multiply by ``keep [B]`` (0 zeroes an env's state)."""
        k = keep.to(self.h.dtype)[None, :, None]  # [1, B, 1]
        return RecurrentState(self.h * k, None if self.c is None else self.c * k)

    def as_torch(self):
        return self.h if self.c is None else (self.h, self.c)

    @staticmethod
    def from_torch(s) -> "RecurrentState":
        return RecurrentState(s[0], s[1]) if isinstance(s, tuple) else RecurrentState(s)

    def tensors(self) -> list[torch.Tensor]:
        return [self.h] if self.c is None else [self.h, self.c]


class ModelConfigError(ValueError):
    """The model cannot be built for these spaces with this config (a user error, not a bug)."""


def _ortho(layer: nn.Module, gain: float) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def chrono_init_(core: nn.GRU | nn.LSTM, horizon: int) -> None:
    """Chrono initialisation (Tallec & Ollivier, "Can recurrent neural networks warp time?", ICLR
    2018) of ``core``'s keep gates, in place, in every layer: bias log(u), u ~ U(1, horizon - 1), in
    ``bias_ih`` (``bias_hh`` untouched). A unit whose keep gate is sigmoid(log u) = u / (1 + u) keeps
    its state for about 1 + u steps, so the state starts with retention times spread over
    2..horizon steps instead of every unit halving itself each step (zero biases). PyTorch's gate
    order: GRU r, z, n (h' = (1 - z) n + z h: z keeps); LSTM i, f, g, o (the input gate i is set to
    -log u, so a unit that keeps long also writes little)."""
    h = core.hidden_size
    for k in range(core.num_layers):
        b = getattr(core, f"bias_ih_l{k}")
        with torch.no_grad():
            keep = torch.log(torch.empty(h, device=b.device).uniform_(1.0, float(horizon - 1)))
            b[h:2 * h] = keep  # the second gate: GRU z, LSTM f
            if isinstance(core, nn.LSTM):
                b[:h] = -keep


class NatureCNN(nn.Module):
    """The DQN encoder: [B, 84, 84, C] uint8 -> [B, out]."""

    def __init__(self, in_shape: Sequence[int], out: int):
        super().__init__()
        h, w, c = in_shape
        g = math.sqrt(2)
        self.conv = nn.Sequential(
            _ortho(nn.Conv2d(c, 32, 8, 4), g), nn.ReLU(),
            _ortho(nn.Conv2d(32, 64, 4, 2), g), nn.ReLU(),
            _ortho(nn.Conv2d(64, 64, 3, 1), g), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.conv(torch.zeros(1, c, h, w)).shape[1]
        self.fc = nn.Sequential(_ortho(nn.Linear(n, out), g), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x.permute(0, 3, 1, 2)))  # [B, H, W, C] -> [B, C, H, W]


class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, out: int):
        super().__init__()
        g = math.sqrt(2)
        self.net = nn.Sequential(_ortho(nn.Linear(in_dim, out), g), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class MultiPartEncoder(nn.Module):
    """A flattened Tuple / Dict / Discrete observation (a :class:`~ppo_tbptt.envs.spaces.FlatBox`'s
    vector, as float) -> ``[B, out]``.

    Each image part of at least 36x36 pixels goes through its own Nature CNN (unless ``encoder`` is
    ``mlp``); every other part, Box values scaled as a plain Box observation is and Discrete /
    MultiDiscrete values one-hot encoded, joins one vector for one MLP (an action mask part is not
    encoded: it masks the policy's logits). With more than one of
    these encoders, their features are concatenated and mapped to ``out`` by a linear layer."""

    def __init__(self, parts: Sequence[ObsPart], out: int, encoder: str = "auto"):
        super().__init__()
        images = [p for p in parts if p.is_image and min(p.shape[:2]) >= 36 and encoder != "mlp"]
        if encoder == "cnn" and not images:
            raise ModelConfigError(f"model.encoder 'cnn' needs an image part of at least 36x36 "
                                   f"[H, W, C], got parts {', '.join(f'{p.name} {p.shape}' for p in parts)}")
        self._images = [(p.offset, p.size, p.shape, p.scale) for p in images]
        self.cnns = nn.ModuleList(NatureCNN(p.shape, out) for p in images)
        rest = [p for p in parts if p not in images]
        box = [p for p in rest if p.kind == "box"]
        disc = [p for p in rest if p.kind == "discrete"]
        box_cols = [torch.arange(p.offset, p.offset + p.size) for p in box]
        box_scale = [torch.full((p.size,), p.scale) for p in box]
        # one-hot: column c of the flat vector, repeated once per value it can take, compared
        # with those values
        disc_cols = [torch.full((n,), p.offset + i) for p in disc for i, n in enumerate(p.nvec)]
        disc_vals = [torch.arange(s, s + n, dtype=torch.float32) for p in disc for s, n in zip(p.start, p.nvec)]

        def cat(xs, dtype):
            return torch.cat(xs).to(dtype) if xs else torch.zeros(0, dtype=dtype)

        self.register_buffer("box_cols", cat(box_cols, torch.int64), persistent=False)
        self.register_buffer("box_scale", cat(box_scale, torch.float32), persistent=False)
        self.register_buffer("disc_cols", cat(disc_cols, torch.int64), persistent=False)
        self.register_buffer("disc_vals", cat(disc_vals, torch.float32), persistent=False)
        width = len(self.box_cols) + len(self.disc_cols)
        self.mlp = MLPEncoder(width, out) if width else None
        n = len(self.cnns) + (self.mlp is not None)
        self.fuse = nn.Sequential(_ortho(nn.Linear(n * out, out), math.sqrt(2)), nn.ReLU()) if n > 1 else None

    def vector_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, n]`` -> the MLP's input ``[B, box elements + sum of nvec]``: scaled Box values,
        then the one-hot encodings."""
        onehot = (x[:, self.disc_cols] == self.disc_vals).to(x.dtype)  # [B, sum(nvec)]
        return torch.cat([x[:, self.box_cols] * self.box_scale, onehot], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [cnn(x[:, off:off + size].reshape(-1, *shape) * scale)  # [B, H, W, C] each
                 for cnn, (off, size, shape, scale) in zip(self.cnns, self._images)]
        if self.mlp is not None:
            feats.append(self.mlp(self.vector_input(x)))
        z = torch.cat(feats, dim=1) if len(feats) > 1 else feats[0]  # [B, n * out] or [B, out]
        return z if self.fuse is None else self.fuse(z)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits [..., A]`` with every entry where ``allowed [..., A]`` is false set to the dtype's
    lowest finite value: such actions get probability 0 (never sampled, never the mode) while
    log-probs, entropy and KL stay finite, and no gradient reaches the masked logits."""
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


class ActionDist:
    """A product of categoricals (Discrete: one, MultiDiscrete: one per dimension).

    Masked logits (:func:`mask_logits`) give masked actions probability 0: log-probs and entropy
    are those of the distribution renormalised over the allowed actions.

    The arithmetic is ``torch.distributions.Categorical``'s, step for step (same normalisation,
    same ``multinomial`` draw, so the same samples for the same RNG state), without its per-call
    object and argument-checking cost, which the collector pays at every step. (Non-finite logits
    are caught where they would do harm: the trainer checks every update's losses.)"""

    def __init__(self, logits: torch.Tensor, nvec: Sequence[int]):
        self.nvec = list(nvec)
        if logits.shape[-1] != sum(self.nvec):
            raise ValueError(f"logits have {logits.shape[-1]} entries in the last dimension, the action "
                             f"space needs {sum(self.nvec)} ({'+'.join(map(str, self.nvec))})")
        parts = torch.split(logits, self.nvec, dim=-1) if len(self.nvec) > 1 else (logits,)
        self.log_probs = [lg - lg.logsumexp(-1, keepdim=True) for lg in parts]  # normalised logits
        self._probs: list[torch.Tensor] | None = None

    @property
    def probs(self) -> list[torch.Tensor]:
        if self._probs is None:
            self._probs = [torch.softmax(lp, -1) for lp in self.log_probs]
        return self._probs

    def sample(self) -> torch.Tensor:
        out = []
        for p in self.probs:
            flat = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, True)  # [B, 1]
            out.append(flat.reshape(p.shape[:-1]))
        return torch.stack(out, dim=-1)  # [..., D]

    def mode(self) -> torch.Tensor:
        return torch.stack([lp.argmax(-1) for lp in self.log_probs], dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """``actions [..., D]`` -> ``[...]`` summed over dimensions."""
        return sum(lp.gather(-1, actions[..., i:i + 1]).squeeze(-1) for i, lp in enumerate(self.log_probs))

    def entropy(self) -> torch.Tensor:
        return sum(-(lp.clamp(min=torch.finfo(lp.dtype).min) * p).sum(-1)
                   for lp, p in zip(self.log_probs, self.probs))

    def kl(self, other: "ActionDist") -> torch.Tensor:
        """KL(self || other), summed over dimensions, from the log-probabilities: finite where
        ``other``'s probability underflows to 0 in float32 (torch's categorical KL gives inf)."""
        total = 0
        for lp, p, lq in zip(self.log_probs, self.probs, other.log_probs):
            total = total + torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
        return total


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class GaussianDist:
    """A diagonal Gaussian for Box actions: ``mean [..., D]`` from the policy head and a
    state-independent ``log_std [D]`` parameter (CleanRL's ``ppo_continuous_action.py``).
    Log-probs and entropies are summed over D; samples are ``torch.distributions.Normal``'s draws
    (the same ``torch.normal`` call, so the same samples for the same RNG state)."""

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor):
        if mean.shape[-1] != log_std.shape[-1]:
            raise ValueError(f"mean has {mean.shape[-1]} entries in the last dimension, log_std "
                             f"{log_std.shape[-1]}")
        self.mean = mean
        self.log_std = log_std.expand_as(mean)
        self.std = self.log_std.exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return torch.normal(self.mean, self.std, generator=generator)  # [..., D]

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """``actions [..., D]`` (unclipped samples) -> ``[...]`` summed over dimensions."""
        return (-((actions - self.mean) ** 2) / (2 * self.std ** 2) - self.log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (0.5 + _HALF_LOG_2PI + self.log_std).sum(-1)

    def kl(self, other: "GaussianDist") -> torch.Tensor:
        """KL(self || other), summed over dimensions: the closed form
        ``0.5 * (r + ((mu_p - mu_q) / std_q)^2 - 1 - log r)`` with the variance ratio
        ``r = exp(d)``, ``d = 2 (log_std_p - log_std_q)``, written as ``expm1(d) - d`` so that
        small mean differences survive (torch's ``r + t - 1`` rounds a ``t`` below 6e-8 away:
        with the shared log std, the staleness of refreshed states would read exactly 0)."""
        d = 2 * (self.log_std - other.log_std)
        t1 = ((self.mean - other.mean) / other.std) ** 2
        return (0.5 * (t1 + torch.expm1(d) - d)).sum(-1)


def action_nvec(space: gym.Space) -> list[int]:
    if isinstance(space, gym.spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return [int(n) for n in np.asarray(space.nvec).ravel()]
    raise ModelConfigError(f"unsupported action space {space} (Discrete, MultiDiscrete and Box are)")


class RecurrentActorCritic(nn.Module):
    """Actions are stored as ``[..., D]``: int64 for Discrete (D = 1) and MultiDiscrete, float32
    for Box (D elements, the Gaussian's unclipped sample; ``nvec`` is None then)."""

    def __init__(self, obs_space: gym.spaces.Box, action_space: gym.Space, model_cfg):
        super().__init__()
        self.obs_shape = tuple(obs_space.shape)
        self.action_dims = action_layout(action_space).dims  # raises for an unsupported space
        self.continuous = isinstance(action_space, gym.spaces.Box)
        self.nvec = None if self.continuous else action_nvec(action_space)
        mask = [p for p in getattr(obs_space, "parts", ()) if p.kind == "mask"]
        self.action_mask_cols = None  # the flat observation's action mask columns, if it has one
        if mask:
            if self.continuous or mask[0].size != sum(self.nvec):
                raise ModelConfigError(f"the action mask {mask[0].name} has {mask[0].size} entries: it needs "
                                       f"Discrete or MultiDiscrete actions with as many in all, got "
                                       f"{action_space}")
            self.action_mask_cols = (mask[0].offset, mask[0].size)
        self.action_dtype = torch.float32 if self.continuous else torch.int64
        self.core_type = model_cfg.core
        self.num_layers = model_cfg.num_layers
        self.hidden_size = model_cfg.hidden_size
        enc = model_cfg.encoder
        if enc == "auto":  # the Nature CNN's kernels need at least 36x36 pixels
            enc = "cnn" if len(self.obs_shape) == 3 and min(self.obs_shape[:2]) >= 36 else "mlp"
        high = float(np.max(obs_space.high)) if np.issubdtype(obs_space.dtype, np.integer) else 1.0
        self.obs_scale = 1.0 / high if high > 1 else 1.0
        width = model_cfg.hidden_layer
        if isinstance(obs_space, FlatBox):  # Tuple / Dict / Discrete observations: parts scaled inside
            self.encoder = MultiPartEncoder(obs_space.parts, width, model_cfg.encoder)
            self.obs_scale = 1.0
        elif enc == "cnn":
            if len(self.obs_shape) != 3:
                raise ModelConfigError(f"model.encoder 'cnn' needs image observations [H, W, C], got "
                                       f"{self.obs_shape}")
            if min(self.obs_shape[:2]) < 36:
                raise ModelConfigError(f"model.encoder 'cnn' (the Nature CNN) needs images of at least 36x36, got "
                                 f"{self.obs_shape[0]}x{self.obs_shape[1]} (use encoder 'mlp' for small images)")
            self.encoder = NatureCNN(self.obs_shape, width)
        else:
            self.encoder = MLPEncoder(int(np.prod(self.obs_shape)), width)
        self.encoder_bf16 = getattr(model_cfg, "encoder_dtype", "float32") == "bfloat16"
        self.memoryless = bool(getattr(model_cfg, "memoryless", False))
        self.core_kernel = getattr(model_cfg, "core_kernel", "auto")
        rnn = nn.LSTM if self.core_type == "lstm" else nn.GRU
        self.core = rnn(width, self.hidden_size, self.num_layers, batch_first=True)
        for name, p in self.core.named_parameters():
            if "weight" in name:
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)
        g = math.sqrt(2)
        self.body = nn.Sequential(_ortho(nn.Linear(self.hidden_size, width), g), nn.ReLU())
        self.policy_head = _ortho(nn.Linear(width, self.action_dims if self.continuous else sum(self.nvec)), 0.01)
        self.value_head = _ortho(nn.Linear(width, 1), 1.0)
        if self.continuous:  # state-independent log std of the Gaussian policy, starting at std 1
            self.log_std = nn.Parameter(torch.zeros(self.action_dims))
        chrono = int(getattr(model_cfg, "chrono_init", 0))
        if chrono >= 3:  # drawn after the rest, so the other weights are those of the same seed without it
            chrono_init_(self.core, chrono)
        self.recall_lags = int(getattr(model_cfg, "recall_lags", 0))
        self.recall_head = None
        if self.recall_lags > 0:  # built last, for the same reason
            if isinstance(obs_space, FlatBox):
                raise ModelConfigError(f"model.recall_lags: the recall head predicts Box observations; this env's "
                                       f"are {obs_space.source}, flattened into parts (set model.recall_lags: 0)")
            # the output layer starts at zero: no gradient reaches the core before the head has
            # learned something (a head added to a trained run by a fork does not disturb it)
            self.recall_head = nn.Sequential(
                _ortho(nn.Linear(self.hidden_size + self.recall_lags, width), g), nn.ReLU(),
                _ortho(nn.Linear(width, int(np.prod(self.obs_shape))), 0.0))

    # ---- state -------------------------------------------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str | None = None) -> RecurrentState:
        dev = device if device is not None else next(self.parameters()).device
        z = torch.zeros(self.num_layers, batch, self.hidden_size, device=dev)
        return RecurrentState(z, z.clone() if self.core_type == "lstm" else None)

    # ---- forward -----------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``obs [B, L, *obs_shape]`` (any dtype) -> features ``[B, L, width]``.

        ``valid [B, L]`` (bool, optional): encode only these positions and give the others zero
        features. Padding sits after a sequence's real steps, so the recurrent outputs at real
        steps do not depend on it, and the encoder (most of the compute) skips it."""
        if tuple(obs.shape[2:]) != self.obs_shape:
            raise ValueError(f"observation shape {tuple(obs.shape[2:])} != model's {self.obs_shape}")
        b, l = obs.shape[:2]
        if valid is None:
            x = obs.reshape(b * l, *self.obs_shape).float() * self.obs_scale  # [B*L, ...]
            return self._encode_flat(x).reshape(b, l, -1)  # [B, L, width]
        idx = valid.reshape(b * l).nonzero().squeeze(1)  # [V] flat real positions (one host sync)
        x = obs.reshape(b * l, *self.obs_shape)[idx].float() * self.obs_scale  # [V, ...]
        feats = self._encode_flat(x)  # [V, width]
        out = feats.new_zeros(b * l, feats.shape[-1]).index_copy(0, idx, feats)  # [B*L, width]
        return out.reshape(b, l, -1)  # [B, L, width]

    def _encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, ...]`` float -> float32 features ``[n, width]`` (in bfloat16 inside if configured)."""
        if not self.encoder_bf16:
            return self.encoder(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return self.encoder(x).float()

    def heads(self, core_out: torch.Tensor, obs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``core_out [..., H]`` -> ``logits [..., sum(nvec)]`` (Box: the Gaussian's mean ``[..., D]``),
        ``values [...]``. Given the observations ``obs [..., *obs_shape]`` of those steps, the
        logits are masked by their action mask (:meth:`apply_action_mask`)."""
        z = self.body(core_out)
        logits = self.policy_head(z)
        if obs is not None:
            logits = self.apply_action_mask(logits, obs)
        return logits, self.value_head(z).squeeze(-1)

    def forward(self, obs: torch.Tensor, state: RecurrentState, valid: torch.Tensor | None = None):
        """Run over sequences in one recurrent call.

        ``obs [B, L, ...]``, ``state`` h/c ``[K, B, H]`` -> ``logits [B, L, A]``, ``values [B, L]``,
        final state. Sequences never cross an episode start, so no resets happen inside.
        ``valid [B, L]``: see :meth:`encode` (outputs past a sequence's end are then meaningless).
        With an action mask in the observations the logits come masked (:meth:`apply_action_mask`).
        """
        x = self.encode(obs, valid)
        out, s = self.run_core(x, state, valid)  # out [B, L, H]
        logits, values = self.heads(out, obs)
        return logits, values, s

    def recall_loss(self, core_out: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The recall head's loss over a batch of sequences (``model.recall_lags`` = K > 0).

        ``core_out [S, L, H]``: the core's outputs over the sequences; ``obs [S, L, *obs_shape]``
        their observations; ``mask [S, L]`` the steps that enter the loss. At each such step p > 0
        a lag k is drawn uniformly from 1..min(K, p) (from ``generator``) and the head predicts,
        from ``core_out[:, p]`` and k (one-hot), how observation p - k of the same sequence differs
        from observation p: what the state must supply, as what is still in view cancels. The
        result is the squared error summed over the observation, averaged over those steps (0 if
        none)."""
        if self.recall_head is None:
            raise ValueError("recall_loss needs model.recall_lags > 0")
        s, l = mask.shape
        dev = core_out.device
        pos = torch.arange(l, device=dev)  # [L]
        span = pos.clamp(max=self.recall_lags)  # [L] the lags available at each position
        u = torch.rand(s, l, generator=generator,
                       device=generator.device if generator is not None else dev).to(dev)  # [S, L]
        lag = 1 + torch.minimum((u * span).long(), (span - 1).clamp(min=0))  # [S, L] in 1..max(span, 1)
        seq, at = torch.nonzero((mask > 0) & (span > 0)).unbind(1)  # [V] each
        if seq.numel() == 0:
            return core_out.sum() * 0.0
        k = lag[seq, at]  # [V]
        flat = obs.reshape(s, l, -1)
        target = (flat[seq, at - k].float() - flat[seq, at].float()) * self.obs_scale  # [V, D]
        x = torch.cat([core_out[seq, at], F.one_hot(k - 1, self.recall_lags).to(core_out.dtype)], dim=1)
        return ((self.recall_head(x) - target) ** 2).sum(dim=1).mean()

    def apply_action_mask(self, logits: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """``logits [..., A]`` masked by the action mask in ``obs [..., *obs_shape]`` (unchanged
        if the observations carry none)."""
        if self.action_mask_cols is None:
            return logits
        off, size = self.action_mask_cols
        return mask_logits(logits, obs[..., off:off + size] != 0)  # [..., A]

    def run_core(self, x: torch.Tensor, state: RecurrentState, valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, RecurrentState]:
        """The recurrent core over ``x [B, L, F]`` from ``state`` -> ``out [B, L, H]``, final state.

        ``valid [B, L]`` (real steps first, then padding): when some sequences are shorter than
        L, they run as a packed sequence, so the core computes real steps only (whole-episode
        sequences are a third padding or more); outputs at padded positions are then zero and the
        final state is each sequence's state after its last real step.
        With ``model.memoryless`` (an ablation) every step starts from the zero state: the core
        runs on ``[B * L, 1, F]`` and the "final state" is that of the last step alone."""
        if not self.memoryless:
            if self.core_kernel == "auto" and x.device.type == "cpu" and torch.is_grad_enabled() \
                    and rnn_kernel.supported(self.core):  # training on a CPU: see ppo_tbptt/rnn_kernel.py
                lengths = valid.sum(1) if valid is not None and x.shape[1] > 1 else None
                out, h, c = rnn_kernel.rnn_sequence(self.core, x, state.h, state.c, lengths)
                return out, RecurrentState(h, c)
            if valid is not None and x.shape[1] > 1:
                lengths = valid.sum(1)
                if bool((lengths < x.shape[1]).any()):  # one host sync; the padding is worth skipping
                    return self._run_packed(x, state, lengths)
            out, s = self.core(x, state.as_torch())
            return out, RecurrentState.from_torch(s)
        b, l = x.shape[:2]
        zero = self.initial_state(b * l, x.device)
        out, s = self.core(x.reshape(b * l, 1, x.shape[-1]), zero.as_torch())  # [B*L, 1, H]
        last = RecurrentState.from_torch(s)
        keep = torch.arange(b, device=x.device) * l + (l - 1)  # each sequence's last step
        return out.reshape(b, l, -1), last.index(keep)

    def _run_packed(self, x: torch.Tensor, state: RecurrentState, lengths: torch.Tensor
                    ) -> tuple[torch.Tensor, RecurrentState]:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, s = self.core(packed, state.as_torch())  # the final state comes back in input order
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # [B, L, H]
        return out, RecurrentState.from_torch(s)

    def dist(self, logits: torch.Tensor) -> ActionDist | GaussianDist:
        if self.continuous:
            return GaussianDist(logits, self.log_std)
        return ActionDist(logits, self.nvec)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, state: RecurrentState, deterministic: bool = False):
        """One step for ``obs [B, ...]`` -> actions ``[B, D]``, log-probs ``[B]``, values ``[B]``, new state."""
        logits, values, new_state = self.forward(obs.unsqueeze(1), state)  # [B, 1, ...]
        d = self.dist(logits[:, 0])
        actions = d.mode() if deterministic else d.sample()
        return actions, d.log_prob(actions), values[:, 0], new_state

    @torch.no_grad()
    def value(self, obs: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """``obs [B, ...]`` -> ``values [B]``."""
        return self.forward(obs.unsqueeze(1), state)[1][:, 0]


def build_model(obs_space, action_space, model_cfg) -> RecurrentActorCritic:
    return RecurrentActorCritic(obs_space, action_space, model_cfg)
