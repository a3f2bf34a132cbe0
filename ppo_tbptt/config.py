"""Typed configuration: frozen dataclasses, one docstring per field.

YAML is only the input format. :func:`load` reads a file (or a bare name found in the package's
``configs/``), applies ``--set`` overrides, coerces and validates everything at once, and raises
:class:`ConfigError` listing *every* problem with its arithmetic.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package (package data)


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class Schedule:
    """A scalar that moves from ``initial`` to ``final`` over ``steps`` environment steps.

    ``kind`` is ``constant`` (``final`` ignored), ``linear`` or ``polynomial`` (with ``power``).
    ``steps`` <= 0 means "over ``run.total_steps``". Past ``steps`` the value stays at ``final``.
    """

    initial: float
    """Value at step 0."""
    final: float | None = None
    """Value at ``steps`` and after (ignored by ``constant``)."""
    kind: str = "constant"
    """``constant``, ``linear`` or ``polynomial``."""
    power: float = 1.0
    """``polynomial`` only: the exponent of the remaining fraction, (1 - step / steps) ** power."""
    steps: int = 0
    """Environment steps over which the value moves; <= 0: over ``run.total_steps`` (a resume that
    raises the total pins it at the old total)."""

    def value(self, step: int, total_steps: int) -> float:
        if self.kind == "constant" or self.final is None:
            return float(self.initial)
        horizon = self.steps if self.steps > 0 else total_steps
        frac = min(max(step / max(horizon, 1), 0.0), 1.0)
        if self.kind == "linear":
            return float(self.initial + frac * (self.final - self.initial))
        return float((self.initial - self.final) * (1.0 - frac) ** self.power + self.final)


@dataclass(frozen=True)
class EnvConfig:
    id: str = "MortarMayhem-Grid-v0"
    """Environment id: a MemoryGym id (e.g. ``MortarMayhem-Grid-v0``), ``CueRecall-v0``,
    ``PendulumNoVelocity-v0``, any registered gymnasium id, or ``module:EnvId`` (imports
    ``module``, which registers the id); see the docs' Bring your own environment page for the
    supported spaces."""
    num_envs: int = 16
    """Number of parallel environments N."""
    reset_params: dict = field(default_factory=dict)
    """MemoryGym reset parameters, re-applied on every reset (MemoryGym's are not sticky)."""
    kwargs: dict = field(default_factory=dict)
    """Constructor keyword arguments (e.g. ``num_cues``/``delay`` for CueRecall)."""
    time_limit_as_truncation: bool = False
    """MemoryGym reports an episode that reaches its time limit (Mystery Path's and Searing
    Spotlights' ``max_steps``) as ``terminated``, so by default GAE treats it like any other end:
    no value after it. True passes such an end (at exactly the limit, without success) on as
    ``truncated``, so GAE bootstraps it from V(final observation), as for a time limit the agent
    cannot see. Only for ids with a time limit (Mortar Mayhem has none)."""
    train_seeds: tuple = (0, 100_000)
    """Half-open range ``[start, end)`` from which each training episode's level seed is drawn."""
    eval_seeds: tuple = (1_000_000, 1_001_000)
    """Held-out half-open range of level seeds for evaluation; must not overlap ``train_seeds``."""
    backend: str = "memorygym"
    """``memorygym`` (memory-gym's own envs, drawn with pygame) or ``fast``: an exact port of
    ``MortarMayhem-Grid-v0`` and ``MysteryPath-Grid-v0`` whose frames are composed in numpy from
    pieces pygame drew once (the same observations, rewards, ends and infos for the same level
    seeds and actions, several times faster; ``ppo_tbptt/envs/fast_grid.py``). Only those two ids."""
    downsample: int = 1
    """Average-pool image observations by this factor in both directions where the env runs
    (1 = off). 4 turns MemoryGym's 84x84x3 grid frames into 21x21x3 and keeps every tile apart
    (the grid envs' fast path on a CPU); the factor must divide the image size."""
    vector: str = "serial"
    """How envs are stepped: ``serial`` (in this process), ``pool`` (worker processes writing
    observations into shared memory; the fast path) or ``gym_async`` (gymnasium's AsyncVectorEnv,
    one process per env: a baseline for benchmarks, cannot resume)."""
    envs_per_worker: int = 0
    """For ``vector: pool``: envs per worker process (0 = spread over the usable CPU cores)."""
    groups: int = 0
    """Env groups the collector alternates between: while the workers step one group, the policy
    acts for another, so inference hides behind env stepping. 0 = automatic: 2 for ``pool`` with
    a CUDA device, else 1. A pool's groups hold whole workers (at most one group per worker).
    Rollouts depend on it (the policy samples group by group), not on ``vector``: serial and pool
    with equal groups produce the same rollouts."""


@dataclass(frozen=True)
class ModelConfig:
    core: str = "gru"
    """Recurrent core: ``lstm`` or ``gru``."""
    hidden_size: int = 512
    """Recurrent state size H."""
    num_layers: int = 1
    """Number of stacked recurrent layers K."""
    hidden_layer: int = 512
    """Width of the fully connected layers before and after the core."""
    encoder: str = "auto"
    """``auto`` (the Nature CNN for images of at least 36x36 pixels, else an MLP over the flattened
    observation), ``cnn`` or ``mlp``."""
    encoder_dtype: str = "float32"
    """``float32``, or ``bfloat16``: the encoder runs under autocast in bfloat16, in collection and
    in the update alike, and hands float32 features on; the recurrent core, the heads and the loss
    stay float32 (so the carried state keeps its precision). Faster where bfloat16 matmuls and
    convolutions are (CPUs with AVX512-BF16 or AMX, recent GPUs)."""
    core_kernel: str = "auto"
    """``auto``: a GRU or LSTM trained on a CPU runs ppo_tbptt's sequence kernels
    (``ppo_tbptt/rnn_kernel.py``: the same function with a hand-written backward pass; see the docs'
    Throughput page); ``torch``: ``nn.GRU`` / ``nn.LSTM`` everywhere (packed sequences). Collection,
    evaluation and GPUs always use ``nn.GRU`` / ``nn.LSTM``."""
    reset_hidden_state: bool = True
    """Zero the recurrent state of an env when its episode ends."""
    chrono_init: int = 0
    """0: the recurrent core's biases start at zero, so every unit of the state starts with a keep
    gate of sigmoid(0) = 0.5 and forgets half of itself each step. T >= 3: chrono initialisation
    (Tallec & Ollivier, ICLR 2018) for memories up to about T steps: each unit's keep-gate bias (the
    GRU's update gate z, the LSTM's forget gate, with its input gate at the negative) is drawn as
    log(u), u ~ U(1, T - 1), so the units start with retention times spread over 2..T steps. Drawn
    after every other weight: the rest of the network is the same as with 0. A resume cannot
    change it."""
    recall_lags: int = 0
    """0: off. K >= 1: an auxiliary recall head. At every training step t after the first of its
    sequence it is given the core's output and a lag k drawn uniformly from 1..min(K, steps since
    the sequence began), and predicts how the observation of step t - k differed from that of step
    t (as the encoder receives them, scaled to [0, 1] for integer frames; Box observations only):
    what the state must supply, as what is still in view cancels. Its squared error, summed over
    the observation and weighed by ``ppo.recall_coef``, joins the PPO loss (being a sum, the loss
    grows with the observation's size: the default coefficient suits the grid envs' 21x21x3
    frames). The gradient reaches the core through the sequence, so the state is trained to keep
    what the episode showed, not only what the return has rewarded so far. The head is built after
    every other weight (the rest of the network is the same as with 0), its output layer starts at
    zero (no gradient reaches the core before the head has learned something), and it is used in
    training only. A resume cannot change it; ``train --fork`` can add it to a run without one."""
    memoryless: bool = False
    """Ablation: zero the recurrent state before every step, in collection and in training, so the
    policy sees only the current observation (the same network, no memory). A task that needs
    memory should fail with it; the gap to the recurrent agent shows how much memory is used."""


@dataclass(frozen=True)
class TBPTTConfig:
    sequence_length: int = 32
    """Training sequence length L: the chunk length of ``fixed`` (k1 = k2 = L) and ``random``, the
    window length k2 of ``overlap``, the starting K of ``adaptive``; <= 0 means whole episode
    fragments (not for ``overlap``)."""
    strategy: str = "fixed"
    """Truncation strategy: ``fixed`` (chunks of ``sequence_length``), ``overlap`` (TBPTT(k1, k2)
    with k1 = ``stride``, k2 = ``sequence_length``), ``random`` (randomized truncation with mean
    length ``mean_length`` inside chunks of ``sequence_length``) or ``adaptive`` (every loss term
    keeps K steps of history, K re-estimated every ``adapt_every`` updates)."""
    stride: int = 0
    """``overlap``: k1, the steps between window starts (1 <= stride <= sequence_length); each
    window's last ``stride`` steps enter the loss, the ``sequence_length - stride`` before them are
    its prefix. 0 means ``sequence_length`` (no overlap). ``adaptive``: the loss steps per window
    (each window holds K - 1 more steps before them); 0 means K."""
    burn_in: bool = False
    """``overlap`` only: run each window's prefix without gradient (R2D2-style burn-in) instead of
    backpropagating through it."""
    mean_length: float = 8.0
    """``random`` only: mean length of the pieces between random cuts; each boundary between two
    segments (``segment_length``) is cut with probability c = segment_length / mean_length and a
    kept one scales the gradient by 1/(1 - c). Must be > ``segment_length``."""
    segment_length: int = 1
    """``random`` only: cuts fall on boundaries every this many steps of a chunk; a segment runs
    as one recurrent call (1: every edge may be cut, and the pieces run step by step)."""
    refresh_states: bool = False
    """Before every epoch after the first, recompute each sequence's start state with the current
    weights (no gradient) by re-running the core over the rollout; logs ``tbptt/staleness_kl``."""
    adapt_every: int = 10
    """``adaptive`` only: re-estimate K every this many updates (the first update always estimates)."""
    target_bias: float = 0.1
    """``adaptive`` only: K is the smallest history whose bound on the relative bias of the trained
    gradient (``tbptt/delta_hat``) is below this, in (0, 1)."""
    k_min: int = 2
    """``adaptive`` only: smallest K allowed."""
    k_max: int = 64
    """``adaptive`` only: largest K allowed (also used when no K meets ``target_bias``)."""
    adapt_window: int = 32
    """``adaptive`` only: W, the number of lags k = 0..W-1 at which phi_k is measured."""
    adapt_burn_in: int = 8
    """``adaptive`` only: no-gradient steps run before each estimation window."""
    adapt_tau: int = 16
    """``adaptive`` only: the geometric decay rate beta is fitted on lags k >= tau (tau < W)."""
    adapt_samples: int = 64
    """``adaptive`` only: number of windows B sampled from the rollout per estimate."""


@dataclass(frozen=True)
class PPOConfig:
    rollout_steps: int = 256
    """Steps T collected per env per update (batch = T x N transitions)."""
    epochs: int = 3
    """Passes over each rollout."""
    minibatches: int = 8
    """Minibatches per epoch; whole sequences are shuffled into them."""
    gamma: float = 0.995
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    lr: Schedule = Schedule(2.5e-4)
    """Adam learning rate (a number or a schedule); with ``kl_target`` the base that its scale multiplies."""
    kl_target: float = 0.0
    """> 0: the learning rate adapts to the policy's step. The rate of each update is ``ppo.lr``'s
    value times a scale (starting at 1, kept in checkpoints, ``charts/lr_scale``): after an update
    whose mean approximate KL (``losses/approx_kl``, over all minibatches and ranks) exceeds twice
    this target the scale is divided by ``kl_lr_factor``, after one below half of it multiplied by
    it, within [``kl_lr_min_scale``, ``kl_lr_max_scale``]. 0: the schedule alone."""
    kl_lr_factor: float = 1.5
    """``kl_target`` only: the factor by which the scale moves after one update (> 1)."""
    kl_lr_min_scale: float = 0.01
    """``kl_target`` only: the smallest scale (0 < min <= 1)."""
    kl_lr_max_scale: float = 10.0
    """``kl_target`` only: the largest scale (>= 1)."""
    clip: Schedule = Schedule(0.1)
    """PPO ratio clip range, also used for the value clip (a number or a schedule)."""
    ent_coef: Schedule = Schedule(1e-4)
    """Entropy bonus coefficient (a number or a schedule)."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.25
    """Global gradient norm clip."""
    recall_coef: float = 0.05
    """The weight of the recall loss (``model.recall_lags`` > 0 only)."""
    norm_advantages: bool = True
    """Normalise advantages per minibatch (masked mean and std)."""
    clip_value_loss: bool = True
    """Use the clipped value loss."""
    adam_eps: float = 1e-5
    """Adam epsilon."""


@dataclass(frozen=True)
class RunConfig:
    total_steps: int = 10_000_000
    """Environment steps to train for."""
    seed: int = 1
    """Seed for python, numpy, torch and the env seed generators."""
    device: str = "auto"
    """``auto`` (cuda if present), ``cpu`` or ``cuda``/``cuda:N``."""
    checkpoint_every: int = 1_000_000
    """Save a checkpoint every this many env steps (and always at the end); <= 0: only at the end."""
    keep_checkpoints: int = 3
    """How many periodic ``step_*.pt`` checkpoints to keep (<= 0 keeps all)."""
    out_dir: str = "runs"
    """Folder that holds the run folders."""
    name: str = ""
    """Run name prefix (default: the config's file name)."""
    track: str = ""
    """Experiment tracking besides TensorBoard: ``wandb`` (Weights & Biases; the ``track`` extra)
    logs the same scalars, the resolved config and ``evaluate``'s results and GIFs to a wandb run
    named after the run folder; ``--resume`` continues it (see :mod:`ppo_tbptt.tracking`). Empty: off."""
    torch_threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    collect_threads: int = 0
    """torch CPU threads while collecting a rollout (then back to ``torch_threads`` for learning).
    0 = auto: 1 when the envs step in worker processes (``pool``, ``gym_async``) on a CPU device,
    where the policy's per-step batches are small and extra threads only take cores from the
    workers; otherwise as for learning."""
    eval_every: int = 0
    """Evaluate on held-out ``env.eval_seeds`` every this many env steps (<= 0: never)."""
    eval_episodes: int = 32
    """Episodes per periodic evaluation (one level seed each, the first seeds of ``env.eval_seeds``)."""
    cpu_config: str = ""
    """A config to train instead when ``run.device`` is ``auto`` and no CUDA device is present
    (the same ``--set`` overrides apply to it): the published GPU configs of the grid envs name a
    reduced task that learns in minutes on a CPU. ``train --exact`` trains this config as it is;
    an explicit ``--device cpu`` does too. Empty: no substitute."""
    max_seconds: float = 0.0
    """Wall-clock budget of one training process, counted from its first update (env start-up
    and a resume's replay come before): after the update that reaches it (and that update's
    evaluation and checkpoint, if due), save a checkpoint and stop; ``--resume`` continues, with
    the budget again. <= 0: no limit."""


class StageList(tuple):
    """A curriculum's stages: a tuple of mappings (overrides of ``env.reset_params``)."""


@dataclass(frozen=True)
class CurriculumConfig:
    stages: StageList | None = None
    """Ordered stages, each a mapping of overrides of ``env.reset_params`` (a stage plays
    ``env.reset_params`` updated by its own mapping, not by the stages before it); the last stage
    is the target task, the one evaluation reports. Absent or null: no curriculum. Every env
    switches at the same update boundary (see :mod:`ppo_tbptt.curriculum`)."""
    window: int = 500
    """Promotion window: the last this many finished training episodes of the current stage
    (over all envs and ranks; episodes of earlier stages drawn by ``share`` do not count). A stage
    is left only once it has played this many episodes of its own."""
    threshold: float = 0.9
    """Promote when the mean true ``success`` over the window reaches this, in (0, 1]."""
    min_updates: int = 0
    """Updates a stage is trained for at least before it can be left."""
    share: float = 0.0
    """Probability, per episode reset, that an env plays an earlier stage (drawn uniformly among
    them) instead of the current one, so earlier stages are not forgotten; in [0, 1). Each env
    draws from its own generator (seeded by ``run.seed`` and the env index, checkpointed)."""


@dataclass(frozen=True)
class Config:
    env: EnvConfig = EnvConfig()
    model: ModelConfig = ModelConfig()
    tbptt: TBPTTConfig = TBPTTConfig()
    ppo: PPOConfig = PPOConfig()
    run: RunConfig = RunConfig()
    curriculum: CurriculumConfig = CurriculumConfig()

    def to_dict(self) -> dict:
        return _to_plain(self)

    def replace(self, section: str, **kw) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **kw)})


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Coercion: raw YAML values -> typed values, collecting problems instead of raising.

_MISSING = object()


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is StageList:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list of mappings (reset-parameter overrides), got {value!r}")
            return _MISSING
        bad = [i for i, v in enumerate(value) if not isinstance(v, Mapping)]
        for i in bad:
            problems.append(f"{where}[{i}]: expected a mapping of reset parameters, got {value[i]!r}")
        return _MISSING if bad else StageList(dict(v) for v in value)
    if tp is Schedule:
        return _coerce_schedule(value, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return _MISSING
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return _MISSING
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        problems.append(f"{where}: expected an integer, got {value!r}")
        return _MISSING
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r}")
            return _MISSING
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 3e-4 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        problems.append(f"{where}: expected a finite number, got {value!r}")
        return _MISSING
    if tp is str:
        if isinstance(value, str):
            return value
        problems.append(f"{where}: expected a string, got {value!r}")
        return _MISSING
    if tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        problems.append(f"{where}: expected a mapping, got {value!r}")
        return _MISSING
    if tp is tuple:  # a [start, end) range: "A:B" or [A, B]
        parts: Any = value
        if isinstance(value, str) and ":" in value:
            parts = value.split(":")
        if isinstance(parts, (list, tuple)) and len(parts) == 2:
            a = _coerce(parts[0], int, where, [])
            b = _coerce(parts[1], int, where, [])
            if a is not _MISSING and b is not _MISSING:
                return (a, b)
        problems.append(f"{where}: expected a range [start, end] or 'start:end', got {value!r}")
        return _MISSING
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _coerce_schedule(value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        v = _coerce(value, float, where, problems)
        return _MISSING if v is _MISSING else Schedule(v)
    known = {f.name for f in dataclasses.fields(Schedule)}
    out: dict[str, Any] = {}
    for k in value:
        if k not in known:
            problems.append(f"{where}.{k}: unknown key (known: {', '.join(sorted(known))})")
    for f in dataclasses.fields(Schedule):
        if f.name in value and value[f.name] is not None:  # None: the default (to_dict round trip)
            tp = int if f.name == "steps" else (str if f.name == "kind" else float)
            v = _coerce(value[f.name], tp, f"{where}.{f.name}", problems)
            if v is not _MISSING:
                out[f.name] = v
    if "initial" not in value:
        problems.append(f"{where}.initial: required for a schedule")
        return _MISSING
    if value.get("final") is not None and "kind" not in out:
        out["kind"] = "linear"
    try:
        return Schedule(**out)
    except TypeError:
        return _MISSING


def _section_from_raw(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(names)})")
            continue
        tp = hints[key]
        v = _coerce(value, tp, f"{where}.{key}", problems)
        if v is not _MISSING:
            kwargs[key] = v
    return cls(**kwargs)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def from_dict(raw: Mapping) -> Config:
    """Build and validate a Config from plain data; raises ConfigError listing every problem."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"])
    hints = typing.get_type_hints(Config)
    sections = {}
    for key in raw:
        if key not in hints:
            problems.append(f"{key}: unknown section (known: {', '.join(hints)})")
    for name, cls in hints.items():
        sections[name] = _section_from_raw(cls, raw.get(name), name, problems)
    cfg = Config(**sections)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Return every semantic problem of a well-typed config (empty list if it is valid)."""
    p: list[str] = []
    e, m, t, o, r = cfg.env, cfg.model, cfg.tbptt, cfg.ppo, cfg.run
    if e.num_envs < 1:
        p.append(f"env.num_envs: must be >= 1, got {e.num_envs}")
    if e.vector not in ("serial", "pool", "gym_async"):
        p.append(f"env.vector: must be 'serial', 'pool' or 'gym_async', got {e.vector!r}")
    if e.backend not in ("memorygym", "fast"):
        p.append(f"env.backend: must be 'memorygym' or 'fast', got {e.backend!r}")
    elif e.backend == "fast":
        from .envs.fast_grid import FAST_IDS
        if e.id not in FAST_IDS:
            p.append(f"env.backend: 'fast' implements only {', '.join(FAST_IDS)}, not {e.id!r} "
                     f"(use 'memorygym')")
    if e.downsample < 1:
        p.append(f"env.downsample: must be >= 1 (1 = off), got {e.downsample}")
    if e.envs_per_worker < 0:
        p.append(f"env.envs_per_worker: must be >= 0, got {e.envs_per_worker}")
    if e.time_limit_as_truncation:
        from .envs.time_limit import TIME_LIMIT_IDS
        if e.id not in TIME_LIMIT_IDS:
            p.append(f"env.time_limit_as_truncation: {e.id} has no time limit that ends episodes "
                     f"(those that do: {', '.join(TIME_LIMIT_IDS)})")
    if e.groups < 0:
        p.append(f"env.groups: must be >= 0 (0 = automatic), got {e.groups}")
    elif e.groups > e.num_envs >= 1:
        p.append(f"env.groups: {e.groups} groups but only env.num_envs = {e.num_envs} envs")
    for name, rng in (("train_seeds", e.train_seeds), ("eval_seeds", e.eval_seeds)):
        if rng[0] < 0 or rng[1] <= rng[0]:
            p.append(f"env.{name}: need 0 <= start < end, got [{rng[0]}, {rng[1]})")
    if max(e.train_seeds[0], e.eval_seeds[0]) < min(e.train_seeds[1], e.eval_seeds[1]):
        p.append(f"env.eval_seeds: [{e.eval_seeds[0]}, {e.eval_seeds[1]}) overlaps env.train_seeds "
                 f"[{e.train_seeds[0]}, {e.train_seeds[1]}); evaluation levels must be held out")
    if m.core not in ("lstm", "gru"):
        p.append(f"model.core: must be 'lstm' or 'gru', got {m.core!r}")
    if m.encoder not in ("auto", "cnn", "mlp"):
        p.append(f"model.encoder: must be 'auto', 'cnn' or 'mlp', got {m.encoder!r}")
    if m.memoryless and (t.strategy != "fixed" or t.refresh_states):
        p.append(f"model.memoryless: an ablation for tbptt.strategy 'fixed' without "
                 f"tbptt.refresh_states (got strategy {t.strategy!r}, refresh_states {t.refresh_states})")
    if m.core_kernel not in ("auto", "torch"):
        p.append(f"model.core_kernel: must be 'auto' or 'torch', got {m.core_kernel!r}")
    if m.encoder_dtype not in ("float32", "bfloat16"):
        p.append(f"model.encoder_dtype: must be 'float32' or 'bfloat16', got {m.encoder_dtype!r}")
    if m.chrono_init < 0 or m.chrono_init in (1, 2):
        p.append(f"model.chrono_init: 0 (off) or a horizon T >= 3 in steps, got {m.chrono_init}")
    if m.recall_lags < 0:
        p.append(f"model.recall_lags: 0 (off) or the longest lag K >= 1 in steps, got {m.recall_lags}")
    if m.recall_lags > 0 and m.memoryless:
        p.append("model.recall_lags: the memoryless ablation keeps nothing to recall (set one of them)")
    if m.recall_lags > 0 and t.strategy in ("fixed", "random") and t.sequence_length == 1:
        p.append("model.recall_lags: sequences of one step hold no earlier observation to recall "
                 "(tbptt.sequence_length >= 2, or <= 0 for whole episode fragments)")
    for name in ("hidden_size", "num_layers", "hidden_layer"):
        if getattr(m, name) < 1:
            p.append(f"model.{name}: must be >= 1, got {getattr(m, name)}")
    if t.strategy not in STRATEGIES:
        p.append(f"tbptt.strategy: must be one of {', '.join(STRATEGIES)}, got {t.strategy!r}")
    p.extend(_validate_tbptt(t, o))
    if o.rollout_steps < 1:
        p.append(f"ppo.rollout_steps: must be >= 1, got {o.rollout_steps}")
    if o.epochs < 1:
        p.append(f"ppo.epochs: must be >= 1, got {o.epochs}")
    if o.minibatches < 1:
        p.append(f"ppo.minibatches: must be >= 1, got {o.minibatches}")
    elif o.rollout_steps >= 1 and e.num_envs >= 1:
        # The fewest sequences a rollout can yield: no episode ends inside it.
        chunk, what = _chunk_length(t)
        per_env = 1 if chunk <= 0 else math.ceil(o.rollout_steps / chunk)
        fewest = e.num_envs * per_env
        if o.minibatches > fewest:
            how = (f"{e.num_envs} envs x 1 whole-fragment sequence" if chunk <= 0 else
                   f"{e.num_envs} envs x ceil({o.rollout_steps} steps / {what} {chunk}) = "
                   f"{e.num_envs} x {per_env}")
            p.append(f"ppo.minibatches: {o.minibatches} minibatches but a rollout may hold only "
                     f"{how} = {fewest} sequences")
    if not 0.0 < o.gamma <= 1.0:
        p.append(f"ppo.gamma: must be in (0, 1], got {o.gamma}")
    if not 0.0 <= o.gae_lambda <= 1.0:
        p.append(f"ppo.gae_lambda: must be in [0, 1], got {o.gae_lambda}")
    for name, lo_ok in (("lr", lambda v: v > 0), ("clip", lambda v: v > 0), ("ent_coef", lambda v: v >= 0)):
        s: Schedule = getattr(o, name)
        if s.kind not in ("constant", "linear", "polynomial"):
            p.append(f"ppo.{name}.kind: must be constant, linear or polynomial, got {s.kind!r}")
        for label, v in (("initial", s.initial), ("final", s.final)):
            if v is not None and not lo_ok(v):
                p.append(f"ppo.{name}.{label}: out of range, got {v}")
    if not o.kl_target >= 0:  # (NaN too)
        p.append(f"ppo.kl_target: must be >= 0 (0: off), got {o.kl_target}")
    if not o.kl_lr_factor > 1:
        p.append(f"ppo.kl_lr_factor: must be > 1, got {o.kl_lr_factor}")
    if not 0 < o.kl_lr_min_scale <= 1:
        p.append(f"ppo.kl_lr_min_scale: must be in (0, 1], got {o.kl_lr_min_scale}")
    if not 1 <= o.kl_lr_max_scale < math.inf:
        p.append(f"ppo.kl_lr_max_scale: must be >= 1 and finite, got {o.kl_lr_max_scale}")
    if o.vf_coef < 0:
        p.append(f"ppo.vf_coef: must be >= 0, got {o.vf_coef}")
    if not 0 <= o.recall_coef < math.inf:  # (NaN too)
        p.append(f"ppo.recall_coef: must be >= 0 and finite, got {o.recall_coef}")
    if o.max_grad_norm <= 0:
        p.append(f"ppo.max_grad_norm: must be > 0, got {o.max_grad_norm}")
    if r.total_steps < 1:
        p.append(f"run.total_steps: must be >= 1, got {r.total_steps}")
    if not (r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:")):
        p.append(f"run.device: must be auto, cpu, cuda or cuda:N, got {r.device!r}")
    if r.track not in ("", "wandb"):
        p.append(f"run.track: must be wandb or empty (off), got {r.track!r}")
    if r.cpu_config:
        try:
            resolve_path(r.cpu_config)
        except ConfigError as exc:
            p.append(f"run.cpu_config: {exc.problems[0]}")
    if r.torch_threads < 0:
        p.append(f"run.torch_threads: must be >= 0, got {r.torch_threads}")
    if r.collect_threads < 0:
        p.append(f"run.collect_threads: must be >= 0, got {r.collect_threads}")
    if r.name and (r.name in (".", "..") or any(c in r.name for c in "/\\\0") or r.name != r.name.strip()):
        p.append(f"run.name: a prefix of the run folder's name must not leave run.out_dir or nest "
                 f"folders (no '/' or '\\', not '.' or '..'), got {r.name!r}")
    if r.eval_every > 0:
        n_eval = e.eval_seeds[1] - e.eval_seeds[0]
        if r.eval_episodes < 1:
            p.append(f"run.eval_episodes: must be >= 1 when run.eval_every > 0, got {r.eval_episodes}")
        elif n_eval > 0 and r.eval_episodes > n_eval:
            p.append(f"run.eval_episodes: {r.eval_episodes} episodes but env.eval_seeds "
                     f"[{e.eval_seeds[0]}, {e.eval_seeds[1]}) holds only {n_eval} level seeds")
    p.extend(_validate_curriculum(cfg.curriculum, e))
    return p


def _validate_curriculum(c: CurriculumConfig, e: EnvConfig) -> list[str]:
    """Problems of the curriculum section (none without stages)."""
    if c.stages is None:
        return []
    p: list[str] = []
    if len(c.stages) == 0:
        p.append("curriculum.stages: empty; give at least one stage (the last is the target task), "
                 "or leave the curriculum out (curriculum.stages: null)")
    if c.window < 1:
        p.append(f"curriculum.window: must be >= 1 episode, got {c.window}")
    if not 0.0 < c.threshold <= 1.0:
        p.append(f"curriculum.threshold: a success rate in (0, 1], got {c.threshold}")
    if not 0.0 <= c.share < 1.0:
        p.append(f"curriculum.share: a probability in [0, 1), got {c.share}")
    if c.min_updates < 0:
        p.append(f"curriculum.min_updates: must be >= 0, got {c.min_updates}")
    from .envs import reset_param_defaults
    defaults = reset_param_defaults(e.id)
    if defaults is None:
        p.append(f"curriculum: stages override reset parameters, and {e.id} declares none "
                 "(MemoryGym ids and CueRecall-v0 do: an env class's default_reset_parameters)")
        return p
    named = [("env.reset_params", e.reset_params)] + [(f"curriculum.stages[{i}]", s) for i, s in enumerate(c.stages)]
    for where, params in named:
        for key, value in params.items():
            if key not in defaults:
                p.append(f"{where}.{key}: not a reset parameter of {e.id} (known: {', '.join(defaults)})")
            elif isinstance(defaults[key], list) and not (isinstance(value, list) and value):
                p.append(f"{where}.{key}: {e.id} samples it per episode from a list; give a non-empty "
                         f"list such as [{value!r}], got {value!r}")
    return p


STRATEGIES = ("fixed", "overlap", "random", "adaptive")


def _chunk_length(t: TBPTTConfig) -> tuple[int, str]:
    """Steps between sequence starts in the sparsest case (<= 0: whole fragments), and its name."""
    if t.strategy == "overlap":
        return (t.stride if t.stride > 0 else t.sequence_length), "tbptt.stride"
    if t.strategy == "adaptive":
        return (t.stride, "tbptt.stride") if t.stride > 0 else (t.k_max, "tbptt.k_max")
    return t.sequence_length, "tbptt.sequence_length"


def _validate_tbptt(t: TBPTTConfig, o: PPOConfig) -> list[str]:
    """Problems with the truncation settings of the selected strategy."""
    p: list[str] = []
    if t.stride < 0:
        p.append(f"tbptt.stride: must be >= 0 (0 = sequence_length), got {t.stride}")
    if t.strategy == "overlap":
        if t.sequence_length < 1:
            p.append(f"tbptt.sequence_length: overlap needs a window length k2 >= 1, "
                     f"got {t.sequence_length} (whole-episode windows have nothing to overlap)")
        elif t.stride > t.sequence_length:
            p.append(f"tbptt.stride: k1 = {t.stride} must be <= k2 = tbptt.sequence_length = "
                     f"{t.sequence_length} (a window's loss steps cannot exceed the window)")
    if t.strategy == "random":
        if t.segment_length < 1:
            p.append(f"tbptt.segment_length: must be >= 1, got {t.segment_length}")
        elif not t.mean_length > t.segment_length:
            p.append(f"tbptt.mean_length: must be > {t.segment_length} = tbptt.segment_length (cut "
                     f"probability c = segment_length / mean_length < 1), got {t.mean_length}")
    if t.strategy == "adaptive":
        if t.adapt_every < 1:
            p.append(f"tbptt.adapt_every: must be >= 1, got {t.adapt_every}")
        if not 0.0 < t.target_bias < 1.0:
            p.append(f"tbptt.target_bias: must be in (0, 1), got {t.target_bias}")
        if t.k_min < 1:
            p.append(f"tbptt.k_min: must be >= 1, got {t.k_min}")
        if t.k_max < t.k_min:
            p.append(f"tbptt.k_max: must be >= tbptt.k_min = {t.k_min}, got {t.k_max}")
        if t.adapt_window < 2:
            p.append(f"tbptt.adapt_window: must be >= 2, got {t.adapt_window}")
        if not 0 <= t.adapt_tau < t.adapt_window:
            p.append(f"tbptt.adapt_tau: must be in [0, adapt_window = {t.adapt_window}), "
                     f"got {t.adapt_tau}")
        if t.adapt_burn_in < 0:
            p.append(f"tbptt.adapt_burn_in: must be >= 0, got {t.adapt_burn_in}")
        if t.adapt_samples < 1:
            p.append(f"tbptt.adapt_samples: must be >= 1, got {t.adapt_samples}")
        if t.adapt_window + t.adapt_burn_in > o.rollout_steps >= 1:
            p.append(f"tbptt.adapt_window: window {t.adapt_window} + burn-in {t.adapt_burn_in} = "
                     f"{t.adapt_window + t.adapt_burn_in} steps must fit in ppo.rollout_steps = "
                     f"{o.rollout_steps}")
    return p


# --------------------------------------------------------------------------------------------
# Files and overrides

def resolve_path(name_or_path: str) -> Path:
    """``mortar_mayhem.yaml`` or ``mortar_mayhem`` finds ``ppo_tbptt/configs/mortar_mayhem.yaml``; a path works."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(c.name for c in CONFIG_DIR.glob("*.yaml"))) if CONFIG_DIR.is_dir() else ""
    raise ConfigError([f"config {name_or_path!r}: no such file, and not in {CONFIG_DIR} (known: {known})"])


def apply_overrides(raw: dict, overrides: list[str] | None) -> tuple[dict, list[str]]:
    """Apply ``section.key=value`` strings (YAML-parsed values; dotted paths reach into mappings)."""
    problems: list[str] = []
    raw = _deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected section.key=value")
            continue
        path, text = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if len(keys) < 2:
            problems.append(f"--set {item!r}: expected section.key=value")
            continue
        if re.fullmatch(r"\s*-?\d+\s*:\s*-?\d+\s*", text):
            value = text.strip()  # a range 'A:B' (YAML 1.1 would read it as a base-60 integer)
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {} if node.get(k) is None else node[k]
                if not isinstance(node[k], dict):
                    problems.append(f"--set {item!r}: {k} is not a mapping")
                    break
            node = node[k]
        else:
            node[keys[-1]] = value
    return raw, problems


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (by name or path), apply overrides, validate; raise ConfigError on any problem."""
    raw: Any = {}
    if name_or_path is not None:
        path = resolve_path(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: expected a mapping of sections at the top level"])
    raw, problems = apply_overrides(raw, overrides)
    try:
        cfg = from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
