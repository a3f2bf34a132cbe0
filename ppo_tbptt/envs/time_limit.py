"""Episodes that end at a MemoryGym time limit, passed on as truncations (``env.time_limit_as_truncation``).

memory-gym 1.0.2 ends Mystery Path and Searing Spotlights episodes (and the Endless variants',
where ``max_steps`` > 0) at ``t == max_steps`` and reports that as ``terminated``, never as
``truncated``. Mortar Mayhem has no time limit: its episodes end when the commands are done or
failed. :class:`TimeLimitAsTruncation` counts the steps since the last reset and, at a step that
ends the episode exactly at the env's limit without success, reports ``truncated`` instead of
``terminated``; the vector env then keeps the final observation and GAE bootstraps from it.
"""
from __future__ import annotations

import gymnasium as gym

#: Ids whose episodes end at ``t == max_episode_steps`` (the ``max_steps`` reset parameter).
TIME_LIMIT_IDS = (
    "MysteryPath-v0", "MysteryPath-Grid-v0", "SearingSpotlights-v0",
    "Endless-MortarMayhem-v0", "Endless-MysteryPath-v0", "Endless-SearingSpotlights-v0",
)


def has_time_limit(env_id: str) -> bool:
    """Whether episodes of ``env_id`` can end at a time limit reported as ``terminated``."""
    return env_id in TIME_LIMIT_IDS


class TimeLimitAsTruncation(gym.Wrapper):
    """Report an episode end at the env's time limit as ``truncated``.

    The limit is read after every reset from ``env.unwrapped.max_episode_steps`` (MemoryGym sets it
    from the ``max_steps`` reset parameter; <= 0 means none). A step that sets ``terminated`` when
    the episode has run exactly that many steps and ``info["success"]`` is not 1 becomes
    ``terminated=False, truncated=True``: the episode was stopped, not finished by the task. An
    episode that succeeds on its last allowed step stays terminated. (Searing Spotlights can also
    end by the agent's death on that very step; that rare case is counted as a truncation.)
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._steps = 0
        self._limit = 0

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self._steps = 0
        self._limit = int(getattr(self.env.unwrapped, "max_episode_steps", 0) or 0)
        return out

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        if terminated and 0 < self._limit == self._steps and not info.get("success"):
            terminated, truncated = False, True
        return obs, reward, terminated, truncated, info
