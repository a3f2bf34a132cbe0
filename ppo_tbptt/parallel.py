"""The seam between training and data parallelism.

The trainer and the entry point talk to the other ranks of a run through one small interface,
chosen once, when the process starts: :class:`SingleProcess` (:data:`SINGLE`) for a plain run,
whose every method is the identity or a no-op, or :class:`ppo_tbptt.distributed.Distributed` for
one rank of a ``torchrun`` group, which implements the same methods with collectives. So a
single-process run never passes through rank logic, and nothing here imports
``torch.distributed``.

The interface, in the order a run uses it:

- set-up: :meth:`~SingleProcess.place` (the config checks and this rank's device),
  :meth:`~SingleProcess.env_kwargs` (this rank's slice of the envs), :meth:`~SingleProcess.start`
  (rank 0's weights and per-rank random streams), :meth:`~SingleProcess.stopping` (how a signal
  stops the run);
- one update: :meth:`~SingleProcess.gather_episodes`, :meth:`~SingleProcess.sync_truncation`,
  :meth:`~SingleProcess.normalise_advantages`, :meth:`~SingleProcess.average_gradients`,
  :meth:`~SingleProcess.weigh`, :meth:`~SingleProcess.reduce_update`,
  :meth:`~SingleProcess.rollout_scalars`, :meth:`~SingleProcess.truncation_metrics`;
- the loop around it: :meth:`~SingleProcess.broadcast_object`, :meth:`~SingleProcess.from_main`,
  :meth:`~SingleProcess.agree`;
- checkpoints: :meth:`~SingleProcess.gather_state`, :meth:`~SingleProcess.rank_state`,
  :meth:`~SingleProcess.load_latest`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch


class RankLost(RuntimeError):
    """Another rank died or stopped answering: a collective failed or timed out."""


class SingleProcess:
    """A plain run of one process: the whole run's envs, no other ranks to talk to.

    Every method is the identity or a no-op, so a plain run's numbers are exactly those of a trainer
    that knows nothing of data parallelism. :class:`ppo_tbptt.distributed.Distributed` overrides
    each of them for one rank of a data-parallel run."""

    rank = 0
    world_size = 1
    local_rank = 0
    local_world_size = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether other ranks take part (False: one process)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files, logs and evaluates (rank 0)."""
        return self.rank == 0

    @property
    def rank_prefix(self) -> str:
        """What a message of this process starts with, to say which rank wrote it: nothing."""
        return ""

    def __repr__(self) -> str:
        return "SingleProcess()"

    def close(self) -> None:
        """Leave the process group (nothing to do with one process)."""

    # ---- set-up ----------------------------------------------------------------------------------
    def place(self, cfg, device: torch.device) -> torch.device:
        """The device this process trains on, once the config is known to fit the run's ranks
        (ConfigError or ValueError with the message to print otherwise). ``device`` itself here."""
        return device

    def env_kwargs(self, env_cfg) -> dict:
        """``make_vector_env`` arguments for this process's slice of the envs: all of them (``{}``)."""
        return {}

    def start(self, model: torch.nn.Module, seed: int, generators: Iterable[torch.Generator]) -> None:
        """Once the model and the random streams exist: every rank from rank 0's weights, with its
        own streams (``generators``: the minibatch shuffle, a strategy's sampler). Nothing here."""

    def stopping(self, console):
        """How a signal stops this process (:class:`ppo_tbptt.stopping.StopAtOnce`: at once, the
        update in flight discarded). ``console``: the :class:`ppo_tbptt.console.Console` that answers."""
        from .stopping import StopAtOnce
        return StopAtOnce(console)

    # ---- one update ------------------------------------------------------------------------------
    def gather_episodes(self, episodes: list, first_env: int) -> list:
        """Every rank's finished episodes on rank 0: ``episodes`` as they are."""
        return episodes

    def sync_truncation(self, strategy, episode_start: torch.Tensor | None = None) -> None:
        """Make a strategy's estimate (adaptive's K) the whole run's: it is already."""

    def normalise_advantages(self, mb, coefs):
        """``(mb, coefs)`` for the loss: unchanged (the loss normalises a process's minibatch itself)."""
        return mb, coefs

    def average_gradients(self, params: Iterable[torch.nn.Parameter], mask: torch.Tensor):
        """The gradient over all ranks' minibatches (here: this one's, as it is); returns this
        process's share of the minibatch's loss steps, 1.0."""
        return 1.0

    def weigh(self, metrics: dict, share) -> dict:
        """A minibatch's metrics weighted by ``share``: unchanged."""
        return metrics

    def reduce_update(self, sums: dict, first_kl, finite: torch.Tensor):
        """The update's metric sums, first-minibatch KL and finiteness over all ranks: as they are."""
        return sums, first_kl, finite

    def rollout_scalars(self, rollout, batch) -> dict:
        """Statistics of the whole run's rollout that differ from this process's own: none."""
        return {}

    def truncation_metrics(self, strategy) -> dict:
        """The strategy's scalars over the whole run's rollout: its own."""
        return strategy.metrics()

    # ---- the loop --------------------------------------------------------------------------------
    def broadcast_object(self, obj, what: str = "a broadcast from rank 0"):
        """Rank 0's ``obj`` on every rank: ``obj``."""
        return obj

    def from_main(self, fn: Callable, errors: tuple = (Exception,)):
        """``fn()`` run on rank 0, its result (or one of ``errors``) on every rank: ``fn()``."""
        return fn()

    def agree(self, signal_seen: int | None, over_time: bool) -> tuple[int | None, bool]:
        """Whether to stop after this update, decided by every rank together: this process's own view."""
        return signal_seen, over_time

    # ---- checkpoints -----------------------------------------------------------------------------
    def gather_state(self, state: dict, model: torch.nn.Module) -> dict | None:
        """The whole run's checkpoint on rank 0 (None elsewhere): ``state``."""
        return state

    def check_world_size(self, state: dict, path) -> None:
        """Raise CheckpointError if ``state`` (a checkpoint) was written by a run of another world size."""
        from .checkpoint import CheckpointError
        saved = state.get("distributed")
        saved_world = 1 if saved is None else int(saved["world_size"])
        if saved_world != self.world_size:
            how = ("python -m ppo_tbptt.train --resume" if saved_world == 1 else
                   f"torchrun with {saved_world} processes in all (--nnodes x --nproc_per_node) and -m "
                   "ppo_tbptt.train --resume")
            raise CheckpointError(
                f"checkpoint {path}: written by a run of {saved_world} process{'es' if saved_world != 1 else ''} "
                f"(ranks), this one has {self.world_size}: each rank's envs, recurrent state and random "
                f"streams are in the checkpoint, so resume with the same number: {how} ...")

    def rank_state(self, state: dict, path) -> dict:
        """``state`` (a checkpoint) as this process restores it. Raises CheckpointError if the
        checkpoint was written by a run of another world size."""
        self.check_world_size(state, path)
        return state

    def load_latest(self, run_dir) -> tuple[Path, dict]:
        """The newest checkpoint of ``run_dir`` and its contents (with ranks: read on rank 0 and
        sent to the others, whose machines need no copy of the run folder). Raises CheckpointError
        on every rank."""
        from . import checkpoint as ckpt

        def read():
            path = ckpt.latest_checkpoint(run_dir)
            return str(path), ckpt.load_checkpoint(path)

        path, state = self.from_main(read, (ckpt.CheckpointError,))
        return Path(path), state


#: The context of a plain single-process run.
SINGLE = SingleProcess()


def from_environment(environ=None, timeout: float | None = None) -> SingleProcess:
    """This process's place in the run: :data:`SINGLE` unless a launcher such as ``torchrun`` set
    ``WORLD_SIZE`` above 1; then it joins the process group
    (:meth:`ppo_tbptt.distributed.Distributed.from_environment`)."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    from .distributed import Distributed
    return Distributed.from_environment(environ, timeout)
