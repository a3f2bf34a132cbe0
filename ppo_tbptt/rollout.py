"""Rollout buffer (preallocated, time-major, on the training device) and the collector."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from .envs.wrappers import EnvStateError
from .model import RecurrentActorCritic, RecurrentState


@dataclasses.dataclass
class Rollout:
    """One rollout, time-major. T steps, N envs, K layers, H hidden size, D action dims.

    ``state_h``/``state_c [T, K, N, H]`` hold the state fed INTO step t (after any reset).
    ``episode_start [T, N]`` is true where step t is an episode's first step (or, at t = 0, where
    the carried-over state was just reset). ``truncation_values [T, N]`` is V(final obs) for steps
    that ended by truncation (else 0), so GAE can bootstrap them.
    """

    obs: torch.Tensor                 # [T, N, ...] uint8 (env dtype)
    actions: torch.Tensor             # [T, N, D] int64
    logprobs: torch.Tensor            # [T, N]
    values: torch.Tensor              # [T, N]
    rewards: torch.Tensor             # [T, N]
    terminated: torch.Tensor          # [T, N] bool
    truncated: torch.Tensor           # [T, N] bool
    episode_start: torch.Tensor       # [T, N] bool
    state_h: torch.Tensor             # [T, K, N, H]
    state_c: torch.Tensor | None      # [T, K, N, H] (LSTM) or None
    truncation_values: torch.Tensor   # [T, N]
    bootstrap_value: torch.Tensor     # [N]  V(obs after the last step, from the carried state)
    advantages: torch.Tensor          # [T, N] (filled by GAE)
    returns: torch.Tensor             # [T, N] (filled by GAE)

    @property
    def num_steps(self) -> int:
        return self.obs.shape[0]

    @property
    def num_envs(self) -> int:
        return self.obs.shape[1]

    def state_at(self, t: torch.Tensor, n: torch.Tensor) -> RecurrentState:
        """Stored input states at (t[s], n[s]) -> h/c ``[K, S, H]``."""
        h = self.state_h[t, :, n].transpose(0, 1)  # [S, K, H] -> [K, S, H]
        c = None if self.state_c is None else self.state_c[t, :, n].transpose(0, 1)
        return RecurrentState(h.contiguous(), None if c is None else c.contiguous())

    @staticmethod
    def allocate(T: int, N: int, obs_shape, obs_dtype, D: int, K: int, H: int, lstm: bool,
                 device: torch.device) -> "Rollout":
        f = dict(device=device, dtype=torch.float32)
        obs_dtype = torch.from_numpy(np.zeros(0, obs_dtype)).dtype
        return Rollout(
            obs=torch.zeros((T, N, *obs_shape), dtype=obs_dtype, device=device),
            actions=torch.zeros((T, N, D), dtype=torch.int64, device=device),
            logprobs=torch.zeros((T, N), **f), values=torch.zeros((T, N), **f),
            rewards=torch.zeros((T, N), **f),
            terminated=torch.zeros((T, N), dtype=torch.bool, device=device),
            truncated=torch.zeros((T, N), dtype=torch.bool, device=device),
            episode_start=torch.zeros((T, N), dtype=torch.bool, device=device),
            state_h=torch.zeros((T, K, N, H), **f),
            state_c=torch.zeros((T, K, N, H), **f) if lstm else None,
            truncation_values=torch.zeros((T, N), **f),
            bootstrap_value=torch.zeros(N, **f),
            advantages=torch.zeros((T, N), **f), returns=torch.zeros((T, N), **f),
        )


class Collector:
    """Steps the envs with the current policy and fills a preallocated :class:`Rollout`.

    The recurrent state and the last observation carry over from one rollout to the next. Per step:
    store the state fed INTO the step, act, step the envs, then zero the state of every env whose
    episode ended (if ``reset_hidden_state``).
    """

    def __init__(self, envs, model: RecurrentActorCritic, rollout_steps: int, device: torch.device,
                 gamma: float, reset_hidden_state: bool = True):
        self.envs = envs
        self.model = model
        self.device = device
        self.gamma = gamma
        self.reset_hidden_state = reset_hidden_state
        self.N = envs.num_envs
        self.T = rollout_steps
        space = envs.single_observation_space
        self.buffer = Rollout.allocate(self.T, self.N, space.shape, space.dtype, len(model.nvec),
                                       model.num_layers, model.hidden_size, model.core_type == "lstm",
                                       device)
        self._pin = device.type == "cuda"
        self.obs = self._to_device(envs.reset())
        self.state = model.initial_state(self.N, device)
        self.episode_start = torch.ones(self.N, dtype=torch.bool, device=device)
        self.env_seconds = 0.0
        self.policy_seconds = 0.0

    def get_state(self) -> dict:
        """What carries over between rollouts: env states, last obs, recurrent state, episode starts."""
        return {
            "envs": self.envs.get_state(),
            "obs": self.obs.cpu(),
            "state_h": self.state.h.cpu(),
            "state_c": None if self.state.c is None else self.state.c.cpu(),
            "episode_start": self.episode_start.cpu(),
        }

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state`'s data; the envs are rebuilt by replay and must show the same obs."""
        obs = self.envs.set_state(state["envs"])
        saved = state["obs"]
        if not torch.equal(torch.from_numpy(obs), saved.to(torch.from_numpy(obs).dtype)):
            raise EnvStateError("restored envs show different observations than when the checkpoint "
                               "was written; the env is not replayable from seed and actions")
        self.obs = self._to_device(obs)
        h = state["state_h"].to(self.device)
        c = state["state_c"]
        self.state = RecurrentState(h, None if c is None else c.to(self.device))
        self.episode_start = state["episode_start"].to(self.device)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _env_actions(self, actions: torch.Tensor) -> np.ndarray:
        a = actions.cpu().numpy()  # [N, D]
        return a[:, 0] if a.shape[1] == 1 else a

    @torch.no_grad()
    def collect(self) -> tuple[Rollout, list]:
        """Fill the buffer with T steps; return it and the finished episodes' statistics."""
        buf, model = self.buffer, self.model
        episodes: list = []
        buf.truncation_values.zero_()
        for t in range(self.T):
            t0 = time.perf_counter()
            buf.obs[t] = self.obs
            buf.episode_start[t] = self.episode_start
            buf.state_h[t] = self.state.h
            if buf.state_c is not None:
                buf.state_c[t] = self.state.c
            actions, logprobs, values, next_state = model.act(self.obs, self.state)
            env_actions = self._env_actions(actions)
            t1 = time.perf_counter()
            res = self.envs.step(env_actions)
            t2 = time.perf_counter()
            buf.actions[t] = actions
            buf.logprobs[t] = logprobs
            buf.values[t] = values
            buf.rewards[t] = torch.from_numpy(res.reward).to(self.device)
            term = torch.from_numpy(res.terminated).to(self.device)
            trunc = torch.from_numpy(res.truncated).to(self.device)
            buf.terminated[t] = term
            buf.truncated[t] = trunc & ~term
            if res.final_obs:
                idx = sorted(res.final_obs)
                fobs = self._to_device(np.stack([res.final_obs[i] for i in idx]))
                ii = torch.as_tensor(idx, device=self.device)
                buf.truncation_values[t, ii] = model.value(fobs, next_state.index(ii))
            done = term | trunc
            if self.reset_hidden_state:
                next_state = next_state.masked(~done)
            self.state = next_state
            self.episode_start = done
            self.obs = self._to_device(res.obs)
            episodes.extend(res.episodes)
            self.policy_seconds += (t1 - t0) + (time.perf_counter() - t2)
            self.env_seconds += t2 - t1
        buf.bootstrap_value.copy_(model.value(self.obs, self.state))
        return buf, episodes
