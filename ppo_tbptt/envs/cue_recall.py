"""CueRecall: a minimal memory task with a known gradient horizon.

At step 0 the observation shows one of ``num_cues`` cues (one-hot). Then come ``delay`` blank steps
during which actions do nothing, then a query step (a query flag is set) where the action equal to
the cue earns reward 1 (else 0) and the episode ends. An episode lasts ``delay + 2`` steps, and only
an agent whose gradients reach back ``delay + 1`` steps from the query can learn it; a memoryless
agent succeeds with probability ``1 / num_cues``.

Observation: uint8 vector of size ``num_cues + 1`` (cue one-hot, then the query flag).

Reset option (``reset(options={"delay": d})``, e.g. a curriculum stage's ``env.reset_params``):
``delay`` sets this episode's delay (default: the constructor's).
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np


class CueRecall(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}
    #: Reset options and their defaults (MemoryGym's convention; None: the constructor's value).
    default_reset_parameters = {"delay": None}

    def __init__(self, num_cues: int = 4, delay: int = 8, render_mode: str | None = None):
        if num_cues < 2:
            raise ValueError(f"CueRecall: num_cues must be >= 2, got {num_cues}")
        if delay < 0:
            raise ValueError(f"CueRecall: delay must be >= 0, got {delay}")
        self.num_cues = int(num_cues)
        self.delay = self._default_delay = int(delay)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 1, (self.num_cues + 1,), np.uint8)
        self.action_space = gym.spaces.Discrete(self.num_cues)
        self._cue = 0
        self._t = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.num_cues + 1, np.uint8)
        if self._t == 0:
            obs[self._cue] = 1
        if self._t == self.delay + 1:
            obs[-1] = 1
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        unknown = set(options or {}) - set(self.default_reset_parameters)
        if unknown:
            raise ValueError(f"CueRecall: unknown reset options {sorted(unknown)} (known: delay)")
        delay = (options or {}).get("delay")
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)) or delay < 0:
                raise ValueError(f"CueRecall: the delay option must be an integer >= 0, got {delay!r}")
        self.delay = self._default_delay if delay is None else int(delay)
        self._cue = int(self.np_random.integers(self.num_cues))
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        if self._t > self.delay + 1:
            raise RuntimeError("CueRecall: step() after the episode ended; call reset()")
        if self._t == self.delay + 1:
            success = int(int(action) == self._cue)
            self._t += 1
            reward = float(success)
            info = {"reward": reward, "length": self.delay + 2, "success": success}
            return np.zeros(self.num_cues + 1, np.uint8), reward, True, False, info
        self._t += 1
        return self._obs(), 0.0, False, False, {}

    def render(self):
        """A small RGB picture: the cue (if shown) as a coloured bar, the query as a white frame."""
        img = np.zeros((32, 32 * self.num_cues, 3), np.uint8)
        if self._t == 0:
            img[8:24, 32 * self._cue + 4: 32 * self._cue + 28] = (255, 200, 0)
        if self._t == self.delay + 1:
            img[[0, -1], :] = 255
            img[:, [0, -1]] = 255
        return img
