"""Observation and action spaces beyond one Box: how they are stored, sent and taken apart.

Observations. A Box of at least one dimension is used as it is (MemoryGym's uint8 [84, 84, 3]
frames pass untouched, stored as uint8 and scaled in the model). Discrete, MultiDiscrete, a
0-dimensional Box, and Tuple / Dict of these (nested too) are flattened by
:class:`FlattenObservation` into one vector whose observation space is a :class:`FlatBox`: a Box
for the rollout buffer, the worker pool's shared memory and the checkpoints, carrying the parts
(:class:`ObsPart`) the model needs to encode each one. Every part is stored as its values (a
Discrete part as its index, not one-hot: the model does the encoding) in one dtype that holds them
all exactly: the parts' common numpy type, where a Discrete part counts as the smallest integer
type of its values (so a uint8 image with a few Discrete parts stays uint8, anything with a
float32 Box becomes float32).

Actions. Discrete and MultiDiscrete: ``D`` int64 entries per env (D = 1 for Discrete). Box (float
dtype): its ``D`` elements flattened, float32 in the rollout buffer, the space's dtype in the
pool's shared memory; :func:`ppo_tbptt.envs.vector.env_actions` reshapes them to the space's
shape and clips them to its bounds, so the env only ever receives actions inside the space.

Action masks. A Dict observation's top-level key ``action_mask`` (a MultiBinary(A) or a 1-D Box
of 0 / 1 values, A = the action space's ``n``, or the sum of its ``nvec``: the per-dimension masks
concatenated; 1 = allowed) is a part of kind ``mask``: stored in the flat vector like the others
(so it travels with its observation through the buffer, the pool and autoreset), never encoded,
and applied by the model to the policy's logits (:meth:`ppo_tbptt.model.RecurrentActorCritic.forward`).
Each observation's mask must allow at least one action per dimension.

Anything else raises :class:`UnsupportedSpaceError` (an :class:`EnvConfigError`) naming the space.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import gymnasium as gym
import numpy as np

from .vector import EnvConfigError

OBS_SUPPORTED = "Box, Discrete, MultiDiscrete, and Tuple / Dict of these"
ACTION_MASK_KEY = "action_mask"
_MASK_NAME = f"obs[{ACTION_MASK_KEY!r}]"
ACTION_SUPPORTED = "Discrete, MultiDiscrete and Box (float)"


class UnsupportedSpaceError(EnvConfigError):
    """The env's observation or action space is not one this package can train on."""


@dataclasses.dataclass(frozen=True)
class ObsPart:
    """One leaf of an observation space, as laid out in the flat vector.

    ``kind`` is ``box`` (``shape`` its shape, values multiplied by ``scale`` in the model),
    ``discrete`` (Discrete: ``shape (1,)``; MultiDiscrete: ``shape (D,)``; dimension i takes the
    ``nvec[i]`` values ``start[i] ..``, one-hot encoded in the model) or ``mask`` (the action
    mask, ``shape (A,)``; ``nvec`` the action dimensions' sizes, if known). ``name`` says where the
    leaf sits in the original space (``obs``, ``obs['pos']``, ``obs[1]``)."""

    name: str
    kind: str
    offset: int
    shape: tuple
    scale: float = 1.0
    nvec: tuple = ()
    start: tuple = ()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_image(self) -> bool:
        """A Box of rank 3, read as [H, W, C] (the CNN takes those of at least 36x36)."""
        return self.kind == "box" and len(self.shape) == 3


class FlatBox(gym.spaces.Box):
    """The Box over a flattened observation: ``shape (n,)``, one dtype; ``parts`` lists the
    :class:`ObsPart` leaves in order and ``source`` is the space they came from."""

    def __init__(self, source: gym.Space, parts: list[ObsPart], low: np.ndarray, high: np.ndarray,
                 dtype: np.dtype):
        super().__init__(low, high, low.shape, dtype)
        self.source = source
        self.parts = list(parts)

    def __repr__(self) -> str:
        return f"FlatBox({self.source} -> {self.shape}, {self.dtype})"


def box_scale(space: gym.spaces.Box) -> float:
    """What the model multiplies a Box's values by: 1 / max(high) for an integer Box whose values
    go above 1 (uint8 images to [0, 1]), else 1 (as the model scales a plain Box observation)."""
    if not np.issubdtype(space.dtype, np.integer):
        return 1.0
    high = float(np.max(space.high))
    return 1.0 / high if high > 1 else 1.0


def _int_type(lo: int, hi: int) -> np.dtype:
    """The smallest integer dtype that holds every value in ``[lo, hi]``."""
    return np.result_type(np.min_scalar_type(int(lo)), np.min_scalar_type(int(hi)))


def _leaves(space: gym.Space, name: str) -> Iterator[tuple[str, gym.Space]]:
    if isinstance(space, gym.spaces.Dict):
        if not space.spaces:
            raise UnsupportedSpaceError(f"observation space {space} (at {name}) has no parts")
        for key, sub in space.spaces.items():
            yield from _leaves(sub, f"{name}[{key!r}]")
    elif isinstance(space, gym.spaces.Tuple):
        if not space.spaces:
            raise UnsupportedSpaceError(f"observation space {space} (at {name}) has no parts")
        for i, sub in enumerate(space.spaces):
            yield from _leaves(sub, f"{name}[{i}]")
    elif isinstance(space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete)) or name == _MASK_NAME:
        yield name, space
    else:
        where = "" if name == "obs" else f" (at {name})"
        raise UnsupportedSpaceError(f"unsupported observation space {space}{where}; supported: "
                                    f"{OBS_SUPPORTED}")


def _mask_part(leaf: gym.Space, offset: int, action_space: gym.Space | None) -> ObsPart:
    """The ``mask`` part of an ``action_mask`` leaf, checked against ``action_space`` if given."""
    n = int(np.prod(leaf.shape, dtype=np.int64)) if leaf.shape else 0
    binary = isinstance(leaf, gym.spaces.MultiBinary) or (
        isinstance(leaf, gym.spaces.Box) and bool(np.all(leaf.low >= 0)) and bool(np.all(leaf.high <= 1)))
    if not binary or len(leaf.shape) != 1 or n == 0:
        raise UnsupportedSpaceError(f"unsupported action mask {leaf} (at {_MASK_NAME}): it needs a "
                                    "MultiBinary(A) or a Box of shape (A,) with values in [0, 1]")
    nvec: tuple = (n,)
    if action_space is not None:
        if isinstance(action_space, gym.spaces.Discrete):
            nvec = (int(action_space.n),)
        elif isinstance(action_space, gym.spaces.MultiDiscrete) and np.asarray(action_space.nvec).ndim == 1:
            nvec = tuple(int(k) for k in action_space.nvec)
        else:
            raise UnsupportedSpaceError(f"an action mask ({_MASK_NAME}) needs Discrete or MultiDiscrete "
                                        f"actions, the action space is {action_space}")
        if sum(nvec) != n:
            raise UnsupportedSpaceError(f"the action mask {leaf} (at {_MASK_NAME}) has {n} entries, the "
                                        f"action space {action_space} needs {sum(nvec)} "
                                        f"({'+'.join(map(str, nvec))}: one per action of each dimension)")
    return ObsPart(_MASK_NAME, "mask", offset, (n,), 1.0, nvec)


def flat_observation_space(space: gym.Space, action_space: gym.Space | None = None) -> gym.spaces.Box:
    """``space`` itself if it is a Box of rank >= 1, else the :class:`FlatBox` of its flattening
    (raises :class:`UnsupportedSpaceError` naming the first unsupported part). An ``action_mask``
    key is checked against ``action_space`` if given (see the module docstring)."""
    if isinstance(space, gym.spaces.Box) and len(space.shape) >= 1:
        return space
    parts, lows, highs, dtypes = [], [], [], []
    offset = 0
    for name, leaf in _leaves(space, "obs"):
        if name == _MASK_NAME:
            part = _mask_part(leaf, offset, action_space)
            lows.append(np.zeros(part.size, np.uint8))
            highs.append(np.ones(part.size, np.uint8))
            dtypes.append(np.dtype(np.uint8))
        elif isinstance(leaf, gym.spaces.Box):
            shape = tuple(leaf.shape) if leaf.shape else (1,)
            part = ObsPart(name, "box", offset, shape, box_scale(leaf))
            lows.append(np.broadcast_to(leaf.low, leaf.shape).reshape(-1))
            highs.append(np.broadcast_to(leaf.high, leaf.shape).reshape(-1))
            dtypes.append(leaf.dtype)
        else:
            if isinstance(leaf, gym.spaces.Discrete):
                nvec, start = np.array([leaf.n]), np.array([leaf.start])
            else:
                if np.asarray(leaf.nvec).ndim != 1:
                    raise UnsupportedSpaceError(f"unsupported observation space {leaf} (at {name}): "
                                                "a MultiDiscrete needs a 1-D nvec")
                nvec = np.asarray(leaf.nvec, np.int64)
                start = np.asarray(getattr(leaf, "start", np.zeros_like(nvec)), np.int64)
            last = start + nvec - 1
            part = ObsPart(name, "discrete", offset, (len(nvec),), 1.0,
                           tuple(int(n) for n in nvec), tuple(int(s) for s in start))
            lows.append(start)
            highs.append(last)
            dtypes.append(_int_type(start.min(), last.max()))
        parts.append(part)
        offset += part.size
    if all(p.kind == "mask" for p in parts):
        raise UnsupportedSpaceError(f"observation space {space} has nothing to observe besides the action mask")
    dtype = np.result_type(*dtypes)
    low = np.concatenate(lows).astype(dtype)
    high = np.concatenate(highs).astype(dtype)
    return FlatBox(space, parts, low, high, dtype)


def _values(space: gym.Space, obs: Any) -> Iterator[Any]:
    """The leaves of ``obs`` in the order of :func:`_leaves`."""
    if isinstance(space, gym.spaces.Dict):
        for key, sub in space.spaces.items():
            yield from _values(sub, obs[key])
    elif isinstance(space, gym.spaces.Tuple):
        for sub, o in zip(space.spaces, obs):
            yield from _values(sub, o)
    else:
        yield obs


def flatten_observation(space: FlatBox, obs: Any) -> np.ndarray:
    """One observation of ``space.source`` -> its flat vector ``[n]`` of ``space.dtype``."""
    out = np.empty(space.shape, space.dtype)
    for part, value in zip(space.parts, _values(space.source, obs)):
        out[part.offset:part.offset + part.size] = np.asarray(value).reshape(-1)
        if part.kind == "mask":
            check_action_mask(part, np.asarray(value).reshape(-1))
    return out


def check_action_mask(part: ObsPart, mask: np.ndarray) -> None:
    """Raise ValueError unless ``mask [A]`` holds only 0 / 1 and allows an action in every dimension."""
    if mask.shape != part.shape or not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{part.name} must hold {part.size} values of 0 or 1, got {mask.tolist()}")
    heads = np.add.reduceat(mask != 0, np.cumsum((0,) + part.nvec[:-1]))  # allowed actions per dimension
    if not np.all(heads > 0):
        which = "" if len(part.nvec) == 1 else f" (dimension {int(np.argmin(heads))} of {len(part.nvec)})"
        raise ValueError(f"{part.name} allows no action{which}: {mask.astype(int).tolist()}")


class FlattenObservation(gym.ObservationWrapper):
    """Turns the observations of a Tuple / Dict / Discrete / MultiDiscrete space into the flat
    vectors of its :class:`FlatBox` (see the module docstring)."""

    def __init__(self, env: gym.Env, space: FlatBox | None = None):
        super().__init__(env)
        self.observation_space = (space if space is not None
                                  else flat_observation_space(env.observation_space, env.action_space))

    def observation(self, observation):
        return flatten_observation(self.observation_space, observation)


def flatten_observations(env: gym.Env) -> gym.Env:
    """``env`` unchanged if its observations are a Box of rank >= 1, else wrapped in
    :class:`FlattenObservation` (raises :class:`UnsupportedSpaceError`)."""
    space = flat_observation_space(env.observation_space, env.action_space)
    return env if space is env.observation_space else FlattenObservation(env, space)


# ---- actions -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ActionLayout:
    """How one env's action is stored: ``dims`` entries of ``dtype`` (int64, or a Box's float
    dtype), handed to the env as an array of ``shape`` (``()`` for Discrete)."""

    dims: int
    dtype: np.dtype
    shape: tuple
    box: bool


def action_layout(space: gym.Space) -> ActionLayout:
    """The :class:`ActionLayout` of a supported action space; raises :class:`UnsupportedSpaceError`."""
    if isinstance(space, gym.spaces.Discrete):
        return ActionLayout(1, np.dtype(np.int64), (), False)
    if isinstance(space, gym.spaces.MultiDiscrete) and np.asarray(space.nvec).ndim == 1:
        return ActionLayout(len(space.nvec), np.dtype(np.int64), tuple(space.shape), False)
    if isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.floating):
        return ActionLayout(max(1, int(np.prod(space.shape, dtype=np.int64))), np.dtype(space.dtype),
                            tuple(space.shape), True)
    raise UnsupportedSpaceError(f"unsupported action space {space}; supported: {ACTION_SUPPORTED}")
