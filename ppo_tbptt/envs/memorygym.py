"""MemoryGym specifics: which ids exist, and the Mortar Mayhem success flag that has to be recomputed.

memory-gym 1.0.2's Mortar Mayhem (all four variants: ``MortarMayhem-v0``, ``MortarMayhem-Grid-v0``,
``MortarMayhemB-v0``, ``MortarMayhemB-Grid-v0``) reports a failed episode as a success when the agent
fails the *last* command: the verification step sets ``done`` for the failure and then also runs
the "all commands completed" branch, so ``info["success"]`` is 1 and ``commands_completed`` 1.0.
:class:`MortarMayhemTrueSuccess` recomputes both from what happened (was the agent on the target
tile when the last command was verified) and keeps the env's own values as ``raw_success`` and
``raw_commands_completed``, so figures stay comparable with published ones that read the flag.

Mystery Path's flag needs no fix: ``success`` is 1 exactly when the agent stands on the goal
(checked in ``tests/test_memorygym.py``).
"""
from __future__ import annotations

import gymnasium as gym

MORTAR_MAYHEM_IDS = ("MortarMayhem-v0", "MortarMayhem-Grid-v0", "MortarMayhemB-v0", "MortarMayhemB-Grid-v0")
MEMORY_GYM_IDS = MORTAR_MAYHEM_IDS + (
    "MysteryPath-v0", "MysteryPath-Grid-v0", "SearingSpotlights-v0",
    "Endless-MortarMayhem-v0", "Endless-MysteryPath-v0", "Endless-SearingSpotlights-v0",
)


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
