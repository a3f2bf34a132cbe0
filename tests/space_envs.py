"""A small memory task on every supported space, reachable as ``env.id: space_envs:Spaces-v0``
with ``env.kwargs: {obs: dict, act: box}``.

At the first step the observation shows a cue (one of 3); the episode lasts 3 to 7 steps (drawn
at reset); at its last step the action is rewarded for naming the cue. The actions move a position
that later observations show, so an episode depends on every action taken (a replay that fed the
env other actions would diverge). Every action is checked against the action space: an env
receiving an unclipped Box action, or one of another dtype than its space's, raises.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces as S

IMAGE = S.Box(0, 255, (36, 36, 2), np.uint8)  # the smallest frame the Nature CNN takes

OBS = {
    "box": S.Box(-1.0, 1.0, (3,), np.float32),
    "discrete": S.Discrete(7, start=-1),
    "multidiscrete": S.MultiDiscrete([4, 8, 3]),
    "dict": S.Dict({"image": IMAGE, "pos": S.Box(-1.0, 1.0, (2,), np.float32),
                    "cue": S.Discrete(4), "clock": S.MultiDiscrete([2, 8])}),
    "tuple": S.Tuple((S.Discrete(4, start=1), S.Box(0, 10, (3,), np.int64),
                      S.MultiDiscrete([3, 2], start=[-1, 0]))),
    "nested": S.Dict({"a": S.Tuple((S.Discrete(4), S.Box(-1.0, 1.0, (), np.float32))),
                      "b": S.Box(0, 255, (4, 4, 3), np.uint8)}),
    "text": S.Text(5),  # unsupported
}

ACT = {
    "discrete": S.Discrete(3),
    "multidiscrete": S.MultiDiscrete([3, 2]),
    "box": S.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32)),  # per-dim bounds
    "box1": S.Box(-2.0, 2.0, (1,), np.float32),
    "box2d": S.Box(-1.0, 1.0, (2, 2), np.float64),
    "box0": S.Box(-1.0, 1.0, (), np.float32),  # a scalar torque
    "multibinary": S.MultiBinary(2),  # unsupported
}


class Spaces(gym.Env):
    def __init__(self, obs: str = "dict", act: str = "box", render_mode=None):
        self.kind, self.act_kind = obs, act
        self.observation_space = OBS[obs]
        self.action_space = ACT[act]
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue = int(self.np_random.integers(3))
        self.length = int(self.np_random.integers(3, 8))
        self.t = 0
        self.pos = np.zeros(2, np.float32)
        self.last = 0
        return self._obs(), {}

    def _first(self, action) -> float:
        """The action's first entry as a number in the cue's range [0, 2]."""
        a = np.asarray(action, np.float64).reshape(-1)
        return float(a[0]) + 1.0 if self.act_kind.startswith("box") else float(a[0])

    def step(self, action):
        if not self.action_space.contains(np.asarray(action, self.action_space.dtype)):
            raise ValueError(f"action {action!r} outside {self.action_space}")
        if self.act_kind.startswith("box") and np.asarray(action).dtype != self.action_space.dtype:
            raise TypeError(f"action {action!r} is not of the space's dtype {self.action_space.dtype}")
        self.t += 1
        x = self._first(action)
        self.pos = np.clip(self.pos + np.float32(0.25) * np.float32(x - 1.0), -1, 1).astype(np.float32)
        self.last = int(np.clip(round(x), 0, 2))
        done = self.t >= self.length
        reward = 1.0 - min(abs(x - self.cue), 1.0) if done else 0.0
        info = {"success": float(abs(x - self.cue) < 0.5)} if done else {}
        return self._obs(), reward, done, False, info

    def _obs(self):
        cue = self.cue + 1 if self.t == 0 else 0  # 0: nothing shown
        query = int(self.t == self.length - 1)
        k = self.kind
        if k == "box":
            return np.array([cue / 3.0, query, self.pos[0]], np.float32)
        if k == "discrete":
            return cue - 1 if self.t == 0 else 3 + self.last  # -1..2 the cue, 3..5 the last action
        if k == "multidiscrete":
            return np.array([cue, self.t, self.last], np.int64)
        if k == "dict":
            image = np.zeros(IMAGE.shape, np.uint8)
            image[: 12 * (self.last + 1), :, 0] = 255
            image[:, : 12 * cue, 1] = 200
            return {"image": image, "pos": self.pos.copy(), "cue": cue,
                    "clock": np.array([query, self.t], np.int64)}
        if k == "tuple":
            return (cue + 1, np.array([self.t, self.last, 10 * query], np.int64),
                    np.array([self.last - 1, query], np.int64))
        if k == "nested":
            b = np.zeros((4, 4, 3), np.uint8)
            b[self.last, :, 0] = 255
            return {"a": (cue, np.array(self.pos[0], np.float32)), "b": b}
        return "x"


if "Spaces-v0" not in gym.registry:
    gym.register("Spaces-v0", entry_point="space_envs:Spaces")
