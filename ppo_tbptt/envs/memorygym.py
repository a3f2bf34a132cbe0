"""MemoryGym specifics: which ids exist, and the Mortar Mayhem success flag that has to be recomputed.

memory-gym 1.0.2's Mortar Mayhem (all four variants: ``MortarMayhem-v0``, ``MortarMayhem-Grid-v0``,
``MortarMayhemB-v0``, ``MortarMayhemB-Grid-v0``) reports a failed episode as a success when the agent
fails the *last* command: the verification step sets ``done`` for the failure and then also runs
the "all commands completed" branch, so ``info["success"]`` is 1 and ``commands_completed`` 1.0.
:class:`MortarMayhemTrueSuccess` recomputes both from what happened (was the agent on the target
tile when the last command was verified) and keeps the env's own values as ``raw_success`` and
``raw_commands_completed``, so figures stay comparable with published ones that read the flag.

Mystery Path's flag needs no fix: ``success`` is 1 exactly when the agent stands on the goal
(checked in ``tests/test_memorygym.py``). :class:`MysteryPathRepeatedFalls` counts the falls into a
cell fallen into before in the same episode (what an agent that remembers where it fell never
does), and can penalise them through a reset parameter this package adds, ``reward_repeat_fall``.
"""
from __future__ import annotations

import gymnasium as gym

MORTAR_MAYHEM_IDS = ("MortarMayhem-v0", "MortarMayhem-Grid-v0", "MortarMayhemB-v0", "MortarMayhemB-Grid-v0")
MEMORY_GYM_IDS = MORTAR_MAYHEM_IDS + (
    "MysteryPath-v0", "MysteryPath-Grid-v0", "SearingSpotlights-v0",
    "Endless-MortarMayhem-v0", "Endless-MysteryPath-v0", "Endless-SearingSpotlights-v0",
)
MYSTERY_PATH_IDS = ("MysteryPath-v0", "MysteryPath-Grid-v0")

# Reset parameters this package adds to an env's own, with their defaults: a curriculum stage or
# env.reset_params may set them like the env's; a wrapper takes them out before the env sees them.
EXTRA_RESET_PARAMS = {env_id: {"reward_repeat_fall": 0.0} for env_id in MYSTERY_PATH_IDS}


class MysteryPathRepeatedFalls(gym.Wrapper):
    """Mystery Path's falls into a cell the agent had already fallen into in the same episode.

    A fall is a step that raises the env's ``num_fails``; its cell is the env's
    ``normalized_agent_position`` at that step (the tile off the path). The episode's last info
    gets ``repeated_falls``, the number of falls into a cell fallen into before, beside the env's
    ``num_fails``. The reset parameter ``reward_repeat_fall`` (default 0.0; removed from the
    options before the env sees them) is added to the reward of each such fall, and to the env's
    episode sum ``reward`` in the last info: a penalty for forgetting where the agent fell, which
    leaves the first fall into a cell, exploration, unpenalised (the env's own ``reward_fall_off``
    pays every fall).
    """

    PARAM = "reward_repeat_fall"

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.repeat_reward = 0.0
        self._fallen: set = set()
        self._fails = 0
        self._repeats = 0

    def reset(self, *, seed=None, options=None):
        if options is not None and self.PARAM in options:
            options = dict(options)
            self.repeat_reward = float(options.pop(self.PARAM))
        else:
            self.repeat_reward = 0.0
        self._fallen, self._fails, self._repeats = set(), 0, 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        u = self.env.unwrapped
        if u.num_fails > self._fails:
            self._fails = u.num_fails
            cell = tuple(int(v) for v in u.normalized_agent_position)
            if cell in self._fallen:
                self._repeats += 1
                reward = reward + self.repeat_reward
            self._fallen.add(cell)
        if "num_fails" in info:
            info = dict(info)
            info["repeated_falls"] = self._repeats
            if "reward" in info and self._repeats and self.repeat_reward:  # the env's own episode sum
                info["reward"] = info["reward"] + self._repeats * self.repeat_reward
        return obs, reward, terminated, truncated, info


class MortarMayhemTrueSuccess(gym.Wrapper):
    """Recompute Mortar Mayhem's end-of-episode ``success`` and ``commands_completed``.

    An episode succeeds when every command was verified with the agent on its target tile: at the
    step that ends the episode, all ``num_commands`` commands have been verified and the agent
    stands on the last target. (A failure at an earlier verification, or leaving the target while
    its tiles explode, ends the episode with fewer commands verified or off the target.)
    ``commands_completed`` keeps the env's definition, commands survived / commands, with the true
    success in place of the flag. The env's values move to ``raw_success`` and
    ``raw_commands_completed``. ``command_count`` is the episode's number of commands (sampled per
    episode from a list), so that ``commands_completed * command_count`` commands were carried out.
    """

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if "success" in info:
            u = self.env.unwrapped
            verified = int(u._current_command)
            on_target = tuple(u.normalized_agent_position) == tuple(u._target_pos)
            success = int(verified >= u.num_commands and on_target)
            info = dict(info)
            info["raw_success"] = info["success"]
            info["success"] = success
            if "commands_completed" in info:
                info["raw_commands_completed"] = info["commands_completed"]
                info["commands_completed"] = (verified - 1 + success) / u.num_commands
                info["command_count"] = int(u.num_commands)
        return obs, reward, terminated, truncated, info
