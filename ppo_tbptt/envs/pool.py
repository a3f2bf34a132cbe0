"""A pool of worker processes, each stepping several envs, with observations in shared memory.

Per step and worker there is one message each way: the learner writes the actions of a group of
envs into shared memory and sends each of the group's workers one byte; a worker steps its envs,
writes observations, rewards and done flags straight into shared memory and answers one byte (or,
when an episode ended, a short pickled list of episode statistics). The envs form ``groups``
exactly as in :class:`SerialVectorEnv`, each served by its own workers, so a collector can run the
policy for one group while the workers of another step (see :class:`ppo_tbptt.rollout.Collector`).

Env ``i`` draws its level seeds from the same private generator as in :class:`SerialVectorEnv`, so a
pool and a serial vector env with the same groups produce the same rollouts.

Failure handling: an exception in an env is sent back with the env index, level seed and
traceback and raised here as :class:`EnvWorkerError`; a worker that dies (killed, crashed) is
noticed as a closed pipe and raised the same way with its exit code, never as a hang. Workers are
daemon processes that ignore SIGINT and SIGTERM (the learner handles them and closes the pool) and
exit when the learner's end of their pipe closes, also when the learner is killed.
:meth:`WorkerPoolVectorEnv.close` asks them to stop and kills those still running after 5 s; a
finalizer does the same if the pool is garbage collected.
"""
from __future__ import annotations

import copy
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from multiprocessing import shared_memory

import gymnasium as gym
import numpy as np

from .spaces import ActionLayout, action_layout
from .vector import EnvConfigError, EnvRunner, PendingSteps, StepResult, VectorEnv, deliver_obs, env_states, split_evenly

# One-byte message tags. Learner -> worker: STEP, or CMD + pickled (name, *args).
STEP, CMD = b"s", b"c"
# Worker -> learner: OK, DATA + pickled payload, or ERR + pickled message.
OK, DATA, ERR = b"k", b"d", b"e"


class EnvWorkerError(RuntimeError):
    """A worker's env raised, or a worker process died; the message names the envs and level seeds."""


class WorkerFailed(EnvWorkerError):
    """One worker died or its env raised (raised by the messaging layer; the pool replaces the
    worker where it can, see :meth:`WorkerPoolVectorEnv._recover`)."""


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_layout(num_envs: int, envs_per_worker: int = 0, groups: int = 1,
                  workers: int | None = None) -> tuple[list[slice], list[slice], list[list[int]]]:
    """``(groups, workers, members)``: env groups exactly as :class:`SerialVectorEnv` forms them
    (so rollouts do not depend on the machine), each group's envs split over worker processes
    (``envs_per_worker`` each, or, with 0, the ``workers`` processes (default: the usable CPU
    cores) shared out in proportion to the groups' sizes), and the worker indices of each group."""
    group_slices = split_evenly(num_envs, groups)
    total = workers or usable_cpus()
    layout: list[slice] = []
    members: list[list[int]] = []
    for g in group_slices:
        n = g.stop - g.start
        if envs_per_worker > 0:
            parts = [slice(a, min(a + envs_per_worker, n)) for a in range(0, n, envs_per_worker)]
        else:
            parts = split_evenly(n, max(1, round(total * n / num_envs)))
        members.append(list(range(len(layout), len(layout) + len(parts))))
        layout.extend(slice(g.start + p.start, g.start + p.stop) for p in parts)
    return group_slices, layout, members


def _layout(num_envs: int, obs_space: gym.Space, actions: ActionLayout) -> tuple[dict, int]:
    """Byte offsets of the shared arrays -> ({name: (offset, shape, dtype)}, total bytes)."""
    fields = [("obs", (num_envs, *obs_space.shape), np.dtype(obs_space.dtype)),
              ("actions", (num_envs, actions.dims), actions.dtype),
              ("reward", (num_envs,), np.dtype(np.float32)),
              ("terminated", (num_envs,), np.dtype(bool)),
              ("truncated", (num_envs,), np.dtype(bool)),
              ("seeds", (num_envs,), np.dtype(np.int64))]
    out, offset = {}, 0
    for name, shape, dtype in fields:
        offset = -(-offset // 64) * 64  # 64-byte aligned
        out[name] = (offset, shape, dtype.str)
        offset += int(np.prod(shape)) * dtype.itemsize
    return out, max(offset, 1)


def _views(buf, layout: dict) -> dict:
    return {name: np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=off)
            for name, (off, shape, dtype) in layout.items()}


def _worker_main(index: int, lo: int, hi: int, env_cfg, run_seed: int, seed_range, conn,
                 first_env: int = 0, curriculum=None) -> None:
    """A worker process: build envs lo..hi-1, attach the shared arrays, serve commands until closed.
    Env ``i`` draws the level seeds (and curriculum stages) of global env ``first_env + i``."""
    # Ctrl-C and a service manager's stop signal the whole process group: the learner handles
    # them (finish the update, save, close the pool); a worker outlives them until it is closed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..curriculum import stage_sampler
    from . import env_fn, seed_stream

    envs: list = []
    runner = shm = arrays = None
    try:
        for i in range(lo, hi):
            envs.append(env_fn(env_cfg, seed_stream(seed_range, run_seed, first_env + i),
                               stages=stage_sampler(curriculum, env_cfg, run_seed, first_env + i))())
        conn.send_bytes(DATA + pickle.dumps((envs[0].observation_space, envs[0].action_space)))
        msg = conn.recv_bytes()
        if msg[:1] != CMD:
            raise ValueError(f"expected the attach command, got {msg[:20]!r}")
        cmd, *args = pickle.loads(msg[1:])
        if cmd != "attach":  # closed while starting
            return
        name, layout = args
        shm = shared_memory.SharedMemory(name=name)
        arrays = _views(shm.buf, layout)
        runner = EnvRunner(envs, lo, arrays["obs"][lo:hi], arrays["reward"][lo:hi],
                           arrays["terminated"][lo:hi], arrays["truncated"][lo:hi], arrays["seeds"][lo:hi])
        # [n, D] in shared memory, viewed as what the envs take: [n] (Discrete), [n, *shape]
        actions = arrays["actions"][lo:hi].reshape(hi - lo, *action_layout(envs[0].action_space).shape)
        conn.send_bytes(OK)
        while True:
            msg = conn.recv_bytes()
            if msg == STEP:
                final_obs, episodes = runner.step(actions)
                conn.send_bytes(DATA + pickle.dumps((final_obs, episodes)) if final_obs or episodes else OK)
                continue
            cmd, *args = pickle.loads(msg[1:])
            if cmd == "close":
                break
            if cmd == "reset":
                runner.reset()
                conn.send_bytes(OK)
            elif cmd == "get_state":
                conn.send_bytes(DATA + pickle.dumps(runner.get_state()))
            elif cmd == "set_state":
                runner.set_state(args[0])
                conn.send_bytes(OK)
            elif cmd == "set_stage":
                runner.set_stage(args[0])
                conn.send_bytes(OK)
            elif cmd == "replay":  # steps the learner has seen already: results stay here
                for a in args[0]:  # [n, D] as the learner wrote them, viewed as the envs take them
                    runner.step(np.asarray(a).reshape(actions.shape))
                conn.send_bytes(OK)
            else:
                raise ValueError(f"unknown pool command {cmd!r}")
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the learner is gone
    except BaseException as exc:  # report, then exit
        report = {"type": type(exc).__name__, "message": str(exc),
                  "traceback": "".join(traceback.format_exception(exc))}
        try:
            conn.send_bytes(ERR + pickle.dumps(report))
        except OSError:
            pass
    finally:
        del arrays, runner  # views must go before the shared memory closes
        for env in envs:
            try:
                env.close()
            except Exception:
                pass
        if shm is not None:
            shm.close()
        conn.close()


def _shutdown(procs: list, conns: list, shm) -> None:
    """Stop the workers (politely, then terminate, then kill) and free the shared memory."""
    for conn in conns:
        try:
            conn.send_bytes(CMD + pickle.dumps(("close",)))
        except OSError:
            pass
    end = time.monotonic() + 5
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():  # stuck in an env step: workers ignore SIGTERM, so kill
            p.kill()
            p.join(timeout=5)
    for conn in conns:
        conn.close()
    if shm is not None:  # no view of it escapes the pool (step_wait copies), so unmap it now
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class WorkerPoolVectorEnv(VectorEnv):
    """``num_envs`` envs stepped by worker processes (see the module docstring).

    ``groups`` splits the envs as :class:`SerialVectorEnv` does; ``envs_per_worker`` 0 spreads each
    group over its share of the usable CPU cores (see :func:`worker_layout`). ``start_method``:
    ``forkserver`` (default on Linux: children start from a clean process, not a copy of a learner
    that holds CUDA and thread pools) or ``spawn``. ``first_env``: the global index of env 0 (its
    level seeds; see :func:`ppo_tbptt.envs.make_vector_env`); ``workers``: the process count for
    ``envs_per_worker`` 0 (default: the usable CPU cores); ``curriculum``: a config's curriculum
    section (each env's stage sampler is built in its worker).
    """

    def __init__(self, env_cfg, run_seed: int, num_envs: int, seed_range, envs_per_worker: int = 0,
                 groups: int = 1, start_method: str | None = None, first_env: int = 0,
                 workers: int | None = None, curriculum=None):
        self.env_id = env_cfg.id
        self.num_envs = int(num_envs)
        self.groups, self.workers, self._group_workers = worker_layout(self.num_envs, envs_per_worker, groups,
                                                                       workers)
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(["ppo_tbptt.envs.pool"])
        self._procs, self._conns, self._shm, self._arrays = [], [], None, None
        self._pending = PendingSteps()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, None)
        self._worker_args = (ctx, env_cfg, run_seed, tuple(seed_range), int(first_env), curriculum)
        self._init_recovery()
        try:
            for w in range(len(self.workers)):
                p, parent = self._spawn(w)
                self._procs.append(p)
                self._conns.append(parent)
            spaces = [self._recv(w) for w in range(len(self.workers))]
            self.single_observation_space, self.single_action_space = spaces[0]
            layout, size = _layout(self.num_envs, self.single_observation_space,
                                   action_layout(self.single_action_space))
            self._shm = shared_memory.SharedMemory(create=True, size=size)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, self._shm)
            self._arrays = _views(self._shm.buf, layout)
            self._layout = layout
            for w in range(len(self.workers)):
                self._command(w, "attach", self._shm.name, layout)
            for w in range(len(self.workers)):
                self._recv(w)
        except BaseException:
            self.close()
            raise

    # ---- messaging -----------------------------------------------------------------------------
    def _describe(self, w: int) -> str:
        sl = self.workers[w]
        seeds = self._arrays["seeds"][sl].tolist() if self._arrays is not None else []
        known = [s for s in seeds if s >= 0]
        seed_text = f", level seeds {known}" if known else ""
        return f"{self.env_id} worker {w} (envs {sl.start}..{sl.stop - 1}{seed_text})"

    def _recv(self, w: int):
        try:
            msg = self._conns[w].recv_bytes()
        except (EOFError, ConnectionResetError, OSError):
            p = self._procs[w]
            p.join(timeout=2)
            code = p.exitcode
            how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 and
                   -code in signal.valid_signals() else f"exited with code {code}")
            raise WorkerFailed(f"{self._describe(w)} died: the process {how}") from None
        tag = msg[:1]
        if tag == OK:
            return None
        if tag == DATA:
            return pickle.loads(msg[1:])
        report = pickle.loads(msg[1:])
        if report["type"] == "EnvStateError":  # a bad checkpoint, not a broken worker
            from .wrappers import EnvStateError
            raise EnvStateError(report["message"])
        if report["type"] == "EnvConfigError":  # the config names an env that cannot be built
            raise EnvConfigError(report["message"])
        raise WorkerFailed(f"{self._describe(w)} failed: {report['type']}: {report['message']}\n"
                           f"worker traceback:\n{report['traceback']}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.env_id} worker pool is closed")

    def _command(self, w: int, name: str, *args) -> None:
        try:
            self._conns[w].send_bytes(CMD + pickle.dumps((name, *args)))
        except OSError:
            self._recv(w)  # raises with the worker's fate
            raise

    # ---- the VectorEnv interface ---------------------------------------------------------------
    def reset(self) -> np.ndarray:
        self._check_open()
        for w in range(len(self.workers)):
            self._command(w, "reset")
        for w in range(len(self.workers)):
            self._recv(w)
        for w in range(len(self.workers)):
            self._new_base(w, self._ask(w, "get_state"))
        return self._arrays["obs"].copy()

    def step_async(self, actions: np.ndarray, group: int = 0) -> None:
        """Write the group's actions (as the envs take them: ``[n_g]``, ``[n_g, D]`` or a Box's
        ``[n_g, *shape]``) to shared memory and wake its workers."""
        self._check_open()
        self._pending.start(group)
        sl = self.groups[group]
        self._arrays["actions"][sl] = np.asarray(actions).reshape(sl.stop - sl.start, -1)
        for w in self._group_workers[group]:
            self._log[w].append(self._arrays["actions"][self.workers[w]].copy())
            self._inflight.add(w)
            try:
                self._conns[w].send_bytes(STEP)
            except OSError:
                try:
                    self._recv(w)  # raises with the worker's fate
                except WorkerFailed as exc:
                    self._recover(w, str(exc))  # (re-sends the step)

    def step_wait(self, group: int = 0, obs_out: np.ndarray | None = None) -> StepResult:
        """Wait for the group's workers; ``obs_out`` receives the observations (else a new array).
        A worker that died or whose env raised is replaced first (see :meth:`_recover`)."""
        self._check_open()
        self._pending.finish(group)
        final_obs: dict = {}
        episodes: list = []
        for w in self._group_workers[group]:
            while True:
                try:
                    data = self._recv(w)
                    break
                except WorkerFailed as exc:
                    self._recover(w, str(exc))
            self._inflight.discard(w)
            self._failures[w] = 0
            if data is not None:
                final_obs.update(data[0])
                episodes.extend(data[1])
        for w in self._group_workers[group]:
            if len(self._log[w]) >= self.refresh_every:  # bound the replay a replacement needs
                self._new_base(w, self._ask(w, "get_state"))
        sl = self.groups[group]
        a = self._arrays
        return StepResult(deliver_obs(a["obs"][sl], obs_out), a["reward"][sl].copy(), a["terminated"][sl].copy(),
                          a["truncated"][sl].copy(), final_obs, episodes)

    def get_state(self) -> dict:
        self._check_open()
        parts = [self._ask(w, "get_state") for w in range(len(self.workers))]
        for w, part in enumerate(parts):
            self._new_base(w, part)
        return {"envs": [e for p in parts for e in p["envs"]], "ret": [x for p in parts for x in p["ret"]],
                "len": [x for p in parts for x in p["len"]]}

    def set_state(self, state: dict) -> np.ndarray:
        self._check_open()
        envs = env_states(state, self.num_envs)
        parts = [{"envs": envs[sl], "ret": state["ret"][sl], "len": state["len"][sl]} for sl in self.workers]
        for w, part in enumerate(parts):
            self._command(w, "set_state", part)
        for w in range(len(self.workers)):
            self._recv(w)
        for w, part in enumerate(parts):
            self._new_base(w, part)
        return self._arrays["obs"].copy()

    def set_stage(self, stage: int) -> None:
        """Move every env to curriculum stage ``stage`` (between steps). Each worker's base is
        renewed after it (a replacement worker restores the stage with the envs' states)."""
        self._check_open()
        for w in range(len(self.workers)):
            self._ask(w, "set_stage", stage)
            self._new_base(w, self._ask(w, "get_state"))

    # ---- replacing a dead worker ---------------------------------------------------------------
    # The pool keeps, per worker, its envs' replayable states as of some moment (a "base": after
    # reset or set_state, at every get_state, and at the latest every ``refresh_every`` steps) and
    # the actions it was sent since. A replacement worker rebuilds the envs, restores the base
    # (each episode replayed from level seed and actions, as a resume does), then steps through the
    # logged actions without reporting, so its envs stand exactly where the dead worker's stood
    # after its last step the learner received; a step in flight is then sent again.

    #: Failures of one worker in a row (without a step received in between) that end the pool.
    max_failures = 3
    #: Logged steps after which a worker's base is refreshed (bounds replay time and memory).
    refresh_every = 1024

    def _init_recovery(self) -> None:
        n = len(self.workers)
        self._base: list[dict | None] = [None] * n
        self._log: list[list[np.ndarray]] = [[] for _ in range(n)]
        self._inflight: set[int] = set()
        self._failures = [0] * n
        self.restarts = 0  # workers replaced so far
        self.on_warning = None  # callable(message); default: a "warning: ..." line on stderr

    def _spawn(self, w: int):
        """Start worker ``w``'s process -> (process, the learner's end of its pipe)."""
        ctx, env_cfg, run_seed, seed_range, first_env, curriculum = self._worker_args
        sl = self.workers[w]
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, name=f"ppo_tbptt-env-{w}", daemon=True,
                        args=(w, sl.start, sl.stop, env_cfg, run_seed, seed_range, child, first_env,
                              curriculum))
        p.start()
        child.close()  # only the worker holds its end now, so its death closes the pipe
        return p, parent

    def _new_base(self, w: int, part: dict) -> None:
        self._base[w] = copy.deepcopy(part)
        self._log[w] = []

    def _ask(self, w: int, name: str, *args):
        """Send a command to an idle worker and return its answer, replacing the worker if needed."""
        while True:
            try:
                self._command(w, name, *args)
                return self._recv(w)
            except WorkerFailed as exc:
                self._recover(w, str(exc))

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _recover(self, w: int, cause: str) -> None:
        """Replace worker ``w`` (dead, or its env raised: ``cause``) and bring its envs back to where
        the learner expects them; raises EnvWorkerError when it failed ``max_failures`` times in a
        row or never had a base (it failed before its envs were reset)."""
        while True:
            first, _, details = cause.partition("\n")
            self._failures[w] += 1
            if self._failures[w] >= self.max_failures or self._base[w] is None:
                times = (f"the same worker failed {self._failures[w]} times in a row"
                         if self._base[w] is not None else "its envs had not been reset yet")
                raise EnvWorkerError(f"{first}; {times}, giving up" + (f"\n{details}" if details else "")) from None
            self._warn(f"{first}; replacing it: its envs are rebuilt and their episodes restored from "
                       "level seed and actions, training goes on")
            old, conn = self._procs[w], self._conns[w]
            conn.close()
            old.join(timeout=1)
            if old.is_alive():  # an env raised: the worker is on its way out, or stuck
                old.kill()
                old.join(timeout=5)
            self._procs[w], self._conns[w] = self._spawn(w)
            try:
                self._recv(w)  # its spaces
                self._command(w, "attach", self._shm.name, self._layout)
                self._recv(w)
                self._command(w, "set_state", self._base[w])
                self._recv(w)
                pending = w in self._inflight
                replay = self._log[w][:-1] if pending else self._log[w]
                if replay:
                    self._command(w, "replay", replay)
                    self._recv(w)
                if pending:
                    self._conns[w].send_bytes(STEP)
            except WorkerFailed as exc:
                cause = str(exc)
                continue
            except OSError as exc:
                cause = f"{self._describe(w)}: its replacement could not be reached ({exc})"
                continue
            self.restarts += 1
            return

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._arrays = None
        self._finalizer()


__all__ = ["EnvWorkerError", "WorkerPoolVectorEnv", "usable_cpus", "worker_layout"]
