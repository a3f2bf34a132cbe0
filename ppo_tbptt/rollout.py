"""Rollout buffer (preallocated, time-major, on the training device) and the collector."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from .envs.vector import env_actions
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
    actions: torch.Tensor             # [T, N, D] int64 (Box actions: float32, unclipped)
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
                 device: torch.device, action_dtype: torch.dtype = torch.int64) -> "Rollout":
        f = dict(device=device, dtype=torch.float32)
        obs_dtype = torch.from_numpy(np.zeros(0, obs_dtype)).dtype
        return Rollout(
            obs=torch.zeros((T, N, *obs_shape), dtype=obs_dtype, device=device),
            actions=torch.zeros((T, N, D), dtype=action_dtype, device=device),
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

    The recurrent state and the last observation carry over from one rollout to the next. Per step
    and env: store the state fed INTO the step, act, step the env, then zero the state of every env
    whose episode ended (if ``reset_hidden_state``).

    The envs' ``groups`` are served in turn: the policy acts for group g and sends its actions, then
    collects group g+1's step results and acts for it, ... so with a worker pool the policy's work
    for one group overlaps the stepping of the others. With one group this is the plain loop.
    Observations reach the device with one host copy (the envs write them into ``self.obs`` on a
    CPU, into pinned memory on CUDA, then an asynchronous transfer).
    """

    def __init__(self, envs, model: RecurrentActorCritic, rollout_steps: int, device: torch.device,
                 reset_hidden_state: bool = True):
        self.envs = envs
        self.model = model
        self.device = device
        self.reset_hidden_state = reset_hidden_state
        self.N = envs.num_envs
        self.T = rollout_steps
        self.groups = list(getattr(envs, "groups", [slice(0, self.N)]))
        space = envs.single_observation_space
        self.buffer = Rollout.allocate(self.T, self.N, space.shape, space.dtype, model.action_dims,
                                       model.num_layers, model.hidden_size, model.core_type == "lstm",
                                       device, model.action_dtype)
        self.obs = torch.zeros_like(self.buffer.obs[0])  # [N, ...] the observation each env shows now
        # The envs deliver observations into host memory: straight into self.obs on a CPU, into a
        # pinned staging copy on CUDA (then an asynchronous transfer; see _host_obs / _upload).
        self._host = self.obs if device.type != "cuda" else torch.zeros(
            self.obs.shape, dtype=self.obs.dtype, pin_memory=True)
        self._host_np = self._host.numpy()
        self._uploads: dict[int, torch.cuda.Event] = {}  # group -> its last transfer from _host
        np.copyto(self._host_np, envs.reset())
        self._upload(slice(0, self.N))
        self.state = model.initial_state(self.N, device)
        self.episode_start = torch.ones(self.N, dtype=torch.bool, device=device)
        self._next_state: dict[int, RecurrentState] = {}
        self.wait_seconds = 0.0  # time spent waiting for env steps (not hidden behind the policy)
        # Optional: called after each of a rollout's T steps with the env steps sent so far
        # ((t + 1) x N), for progress feedback; it may raise to abandon the rollout.
        self.progress = None

    def get_state(self) -> dict:
        """What carries over between rollouts: env states, last obs, recurrent state, episode starts."""
        def own(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to("cpu", copy=True)
        return {
            "envs": self.envs.get_state(),
            "obs": own(self.obs),
            "state_h": own(self.state.h),
            "state_c": None if self.state.c is None else own(self.state.c),
            "episode_start": own(self.episode_start),
        }

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state`'s data; the envs are rebuilt by replay and must show the same obs."""
        obs = self.envs.set_state(state["envs"])
        saved = state["obs"]
        if not torch.equal(torch.from_numpy(obs), saved.to(torch.from_numpy(obs).dtype)):
            raise EnvStateError("restored envs show different observations than when the checkpoint "
                               "was written; the env is not replayable from seed and actions")
        self._uploads.clear()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        np.copyto(self._host_np, obs)
        self._upload(slice(0, self.N))
        h = state["state_h"].to(self.device)
        c = state["state_c"]
        self.state = RecurrentState(h.clone(), None if c is None else c.to(self.device).clone())
        self.episode_start = state["episode_start"].to(self.device).clone()

    def _host_obs(self, g: int, sl: slice) -> np.ndarray:
        """Where group g's next observations go; waits until its last transfer from there is done."""
        event = self._uploads.pop(g, None)
        if event is not None:
            event.synchronize()
        return self._host_np[sl]

    def _upload(self, sl: slice, g: int | None = None) -> None:
        """Move observations from the host buffer to ``self.obs[sl]`` (nothing to do on a CPU)."""
        if self._host is self.obs:
            return
        self.obs[sl].copy_(self._host[sl], non_blocking=True)
        if g is None:  # reset / restore: rare, so wait here rather than track it
            torch.cuda.current_stream(self.device).synchronize()
        else:
            self._uploads[g] = torch.cuda.Event()
            self._uploads[g].record(torch.cuda.current_stream(self.device))  # (cuda:N, not the current device)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)

    def _act(self, t: int, g: int, sl: slice) -> None:
        """Store step t's inputs for group g, run the policy on them and send the actions."""
        buf = self.buffer
        # [K, n, H] slices are not contiguous for K > 1, which cuDNN's RNN refuses for hx
        state = RecurrentState(self.state.h[:, sl].contiguous(),
                               None if self.state.c is None else self.state.c[:, sl].contiguous())
        buf.obs[t, sl] = self.obs[sl]
        buf.episode_start[t, sl] = self.episode_start[sl]
        buf.state_h[t, :, sl] = state.h
        if buf.state_c is not None:
            buf.state_c[t, :, sl] = state.c
        actions, logprobs, values, next_state = self.model.act(self.obs[sl], state)
        buf.actions[t, sl] = actions
        buf.logprobs[t, sl] = logprobs
        buf.values[t, sl] = values
        self._next_state[g] = next_state
        self.envs.step_async(env_actions(actions.cpu().numpy(), self.envs.single_action_space), g)

    def _receive(self, t: int, g: int, sl: slice, episodes: list) -> None:
        """Take group g's results of step t: rewards, dones, next obs; reset ended envs' states."""
        buf = self.buffer
        t0 = time.perf_counter()
        res = self.envs.step_wait(g, obs_out=self._host_obs(g, sl))
        self.wait_seconds += time.perf_counter() - t0
        flags = torch.from_numpy(np.stack([res.reward, res.terminated, res.truncated]).astype(np.float32))
        flags = flags.to(self.device)  # [3, n]: one transfer instead of three
        term, trunc = flags[1].bool(), flags[2].bool()
        buf.rewards[t, sl] = flags[0]
        buf.terminated[t, sl] = term
        buf.truncated[t, sl] = trunc & ~term
        next_state = self._next_state.pop(g)
        if res.final_obs:
            idx = sorted(res.final_obs)
            fobs = self._to_device(np.stack([res.final_obs[i] for i in idx]))
            local = torch.as_tensor([i - sl.start for i in idx], device=self.device)
            buf.truncation_values[t, torch.as_tensor(idx, device=self.device)] = \
                self.model.value(fobs, next_state.index(local))
        done = term | trunc
        if self.reset_hidden_state:
            next_state = next_state.masked(~done)
        self.state.h[:, sl] = next_state.h
        if self.state.c is not None:
            self.state.c[:, sl] = next_state.c
        self.episode_start[sl] = done
        self._upload(sl, g)
        episodes.extend(res.episodes)

    @torch.no_grad()
    def collect(self) -> tuple[Rollout, list]:
        """Fill the buffer with T steps; return it and the finished episodes' statistics."""
        buf = self.buffer
        episodes: list = []
        buf.truncation_values.zero_()
        for t in range(self.T):
            for g, sl in enumerate(self.groups):
                if t > 0:
                    self._receive(t - 1, g, sl, episodes)
                self._act(t, g, sl)
            if self.progress is not None:
                self.progress((t + 1) * self.N)
        for g, sl in enumerate(self.groups):
            self._receive(self.T - 1, g, sl, episodes)
        buf.bootstrap_value.copy_(self.model.value(self.obs, self.state))
        return buf, episodes
