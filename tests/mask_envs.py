"""A corridor with a memory task whose observations carry an action mask, reachable as
``env.id: mask_envs:MaskedCorridor-v0`` with ``env.kwargs: {act: discrete, mask: multibinary}``.

At the first step the observation shows a cue (one of 4); the corridor is 4 to 8 steps long (drawn
at reset). Every step the mask allows a random part of the actions (at least one per dimension);
an action the mask forbids is fatal: reward -10 and the episode ends at once (``FATAL``). At the
last step (the observation's query flag is up) the mask allows the cue's action among others, and
naming the cue earns 1 (success). With ``act: multidiscrete`` the actions are MultiDiscrete([3, 4]):
the first dimension only has to be allowed, the second names the cue; the mask is the two
dimensions' masks concatenated (3 + 4 entries).

``empty_mask_at: t`` breaks the env: its mask at step t allows nothing.
``allow``: the chance that the mask allows an action (0: exactly one per dimension, forced).
``mask``: ``multibinary`` (gymnasium's MultiBinary), ``box`` (PettingZoo's Box(0, 1, (A,), int8)),
or ``unused``: the same mask under the key ``allowed``, which is only an observation (the control:
nothing is masked, and an untrained policy walks into fatal actions). ``image: true`` shows the
cue, query flag and step as a MultiDiscrete beside a 36x36 uint8 view (the flat observation is
then uint8, and the view goes through the CNN).
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces as S

FATAL = -10.0
CUES = 4
ACT = {"discrete": S.Discrete(CUES), "multidiscrete": S.MultiDiscrete([3, CUES])}


class MaskedCorridor(gym.Env):
    def __init__(self, act: str = "discrete", mask: str = "multibinary", image: bool = False,
                 mask_size: int | None = None, allow: float = 0.5, empty_mask_at: int = -1,
                 render_mode=None):
        self.action_space = ACT[act]
        self.nvec = [CUES] if act == "discrete" else [int(n) for n in self.action_space.nvec]
        size = sum(self.nvec) if mask_size is None else mask_size  # (another size: a config error)
        key = "allowed" if mask == "unused" else "action_mask"
        mask_space = S.MultiBinary(size) if mask == "multibinary" else S.Box(0, 1, (size,), np.int8)
        parts = {key: mask_space}
        if image:
            parts.update(obs=S.MultiDiscrete([CUES + 1, 2, 9]), view=S.Box(0, 255, (36, 36, 1), np.uint8))
        else:
            parts["obs"] = S.Box(0.0, 1.0, (CUES + 2,), np.float32)
        self.observation_space = S.Dict(parts)
        self.key, self.image, self.allow, self.empty_mask_at = key, image, allow, empty_mask_at
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue = int(self.np_random.integers(CUES))
        self.length = int(self.np_random.integers(4, 9))
        self.t = 0
        self._draw_mask()
        return self._obs(), {}

    def _draw_mask(self) -> None:
        heads = []
        for i, n in enumerate(self.nvec):
            m = self.np_random.random(n) < self.allow
            if i == len(self.nvec) - 1 and self.t == self.length - 1:
                m[self.cue] = True  # the answer is always allowed
            if not m.any():
                m[self.np_random.integers(n)] = True
            heads.append(m)
        self.mask = np.concatenate(heads).astype(np.int8)
        if self.t == self.empty_mask_at:  # a broken env: nothing allowed
            self.mask[:] = 0

    def allowed(self, action) -> bool:
        a = np.asarray(action, np.int64).reshape(-1)
        starts = np.cumsum([0] + self.nvec[:-1])
        return all(self.mask[s + int(x)] for s, x in zip(starts, a))

    def step(self, action):
        if not self.action_space.contains(np.asarray(action, self.action_space.dtype)):
            raise ValueError(f"action {action!r} outside {self.action_space}")
        if not self.allowed(action):
            return self._obs(), FATAL, True, False, {"success": 0.0}
        last = self.t == self.length - 1
        self.t += 1
        if last:
            named = int(np.asarray(action).reshape(-1)[-1])
            return self._obs(), float(named == self.cue), True, False, {"success": float(named == self.cue)}
        self._draw_mask()
        return self._obs(), 0.0, False, False, {}

    def _obs(self):
        v = np.zeros(CUES + 2, np.float32)
        if self.t == 0:
            v[self.cue] = 1.0
        v[CUES] = float(self.t == self.length - 1)
        v[CUES + 1] = self.t / 8.0
        out = {"obs": v, self.key: self.mask.copy()}
        if self.image:
            view = np.zeros((36, 36, 1), np.uint8)
            view[: 4 * (self.t + 1)] = 255
            shown = self.cue + 1 if self.t == 0 else 0
            out.update(obs=np.array([shown, int(v[CUES]), self.t], np.int64), view=view)
        return out


if "MaskedCorridor-v0" not in gym.registry:
    gym.register("MaskedCorridor-v0", entry_point="mask_envs:MaskedCorridor")
