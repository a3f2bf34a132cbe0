"""How a run stops before its end: a signal (SIGINT / SIGTERM), or an env that keeps failing.

One process stops at once (:class:`StopAtOnce`): the update in flight is discarded and the state of
the last update boundary, which the trainer copies at the start of every update, is saved as its
checkpoint. The ranks of a data-parallel run cannot (:class:`StopTogether`): a rank that left its
update would leave the others waiting in a collective, and the boundary would need every rank's
part. So there a signal finishes the update, the ranks agree after it (an all-reduce of the
signals seen) and all of them save one checkpoint together; an env that keeps failing ends its
rank without saving, and the last periodic checkpoint is what a resume continues from.

The seam (:meth:`ppo_tbptt.parallel.SingleProcess.stopping`) picks the policy once, when the trainer
is built; the trainer's loop only calls it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

from . import checkpoint as ckpt
from .envs import EnvError
from .envs.pool import EnvWorkerError


class EnvFailure(RuntimeError):
    """An env kept failing (a pool gives up on a worker after repeated failures; a serial env's
    first exception): training stopped after saving the state of the last update boundary (in a
    data-parallel run: without saving, the last periodic checkpoint stays as it is).
    ``details`` holds what does not fit one line (e.g. the worker's traceback)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class StopNow(BaseException):
    """Raised inside an update when a signal asks to stop: the update in flight is abandoned.
    (A BaseException, so that no ``except Exception`` on the way swallows it.)"""


#: What an env that failed for good raises, where the trainer steps or asks its envs.
ENV_ERRORS = (EnvWorkerError, EnvError)


class StopAtOnce:
    """One process: a signal stops at once, at the update's next env step, minibatch or episode.

    ``console``: the :class:`ppo_tbptt.console.Console` whose progress answers a signal (a signal
    handler must not print, see :meth:`ppo_tbptt.progress.UpdateProgress.notice`)."""

    def __init__(self, console):
        self.console = console
        self.signal: int | None = None  # the signal that stopped training (Trainer.interrupted)
        self.now = False  # a signal asked to stop inside the update in flight
        self.answered = False  # the signal's message is out

    @property
    def received(self) -> bool:
        """Whether a signal (or :meth:`request`) has asked to stop."""
        return self.signal is not None

    def request(self, signum: int) -> None:
        """Stop at the next update boundary (:meth:`ppo_tbptt.trainer.Trainer.request_stop`)."""
        self.signal = int(signum)

    def on_signal(self, signum, frame) -> None:
        """The SIGINT / SIGTERM handler: the first asks to stop, a second raises KeyboardInterrupt."""
        if self.received:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping now")
        self.request(signum)
        self.abandon_update()
        progress = self.console.progress
        if progress is not None and not self.answered:  # (printing here could interrupt a print:
            self.answered = True                         # the progress thread does it)
            progress.notice(self.notice(signum))

    def abandon_update(self) -> None:
        """Ask the update in flight to stop at its next env step or minibatch (:meth:`check`)."""
        self.now = True

    def on_wakeup(self, signum: int) -> None:
        """The progress thread's early view of a signal (from the wakeup fd), while the main thread
        may still be inside a long torch call: answer at once and ask the update to stop; the
        handler still runs in the main thread when it can, and counts the signals."""
        if signum not in (signal.SIGINT, signal.SIGTERM) or self.answered:
            return
        self.answered = True
        self.now = True
        progress = self.console.progress
        if progress is not None:
            progress.write(self.notice(signum))

    def notice(self, signum: int) -> str:
        """The line that answers a signal."""
        progress = self.console.progress
        learning = progress is not None and progress.phase == "learn"
        when = "once the minibatch in progress is done" if learning else "now"
        return (f"{signal.Signals(signum).name} received: stopping {when}; the update in flight is "
                "discarded and the last update boundary saved (send it again to stop without saving)")

    def check(self) -> None:
        """Raise :class:`StopNow` if a signal asked the update in flight to stop."""
        if self.now:
            raise StopNow()

    def after_update(self, over_time: bool) -> bool:
        """Whether the time budget stops training after this update (signals: :attr:`signal`)."""
        return over_time

    @contextlib.contextmanager
    def handlers(self, install: bool):
        """While training: SIGINT / SIGTERM call :meth:`on_signal` (when ``install`` and in the main
        thread), and the progress thread watches the wakeup fd (:meth:`on_wakeup`)."""
        old = {}
        wakeup = None  # (read end, write end, the wakeup fd before)
        try:
            if install and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    old[sig] = signal.signal(sig, self.on_signal)
                wakeup = self._watch_wakeup()
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if wakeup is not None:
                signal.set_wakeup_fd(wakeup[2])
                os.close(wakeup[0])
                os.close(wakeup[1])

    def _watch_wakeup(self):
        progress = self.console.progress
        if progress is None:
            return None
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
        progress.watch_fd(r, self.on_wakeup)
        return wakeup

    # ---- what a stop saves -----------------------------------------------------------------------
    def boundary(self, trainer, previous: dict | None) -> dict | None:
        """What a stop inside the next update saves: ``trainer.boundary_state()``; if the envs fail
        to report their states, :meth:`env_failure` with the ``previous`` boundary."""
        try:
            return trainer.boundary_state()
        except ENV_ERRORS as exc:
            self.env_failure(trainer, exc, previous)

    def env_failure(self, trainer, exc: Exception, boundary: dict | None):
        """An env failed for good: save ``boundary`` (if any) and raise EnvFailure (one line; the
        rest of the message, e.g. a worker's traceback, goes to ``details``)."""
        if self.console.progress is not None:
            self.console.progress.abandon_update()
        first, _, details = str(exc).partition("\n")
        if boundary is None:
            raise EnvFailure(f"{first}; training stopped before its first update", details) from None
        path = trainer.stop_at_boundary(boundary)
        raise EnvFailure(f"{first}; training stopped: checkpoint {path} holds the last update boundary "
                         f"(step {trainer.global_step:,}); resume with: python -m ppo_tbptt.train --resume "
                         f"{trainer.run_dir}", details) from None


class StopTogether(StopAtOnce):
    """The ranks of a data-parallel run: a signal finishes the update in flight on every rank, and
    the ranks agree after each update whether to stop (any rank's signal, any rank's time limit).
    No update-boundary copy is kept (it would cost every update a gather of every rank's state)."""

    def __init__(self, console, ranks):
        super().__init__(console)
        self.ranks = ranks
        self.seen: int | None = None  # this rank's signal, until the ranks agree

    @property
    def received(self) -> bool:
        """Whether a signal has asked this rank to stop, or the ranks have agreed to."""
        return self.signal is not None or self.seen is not None

    def request(self, signum: int) -> None:
        """Stop once the ranks agree, at the end of the update in flight."""
        self.seen = int(signum)

    def abandon_update(self) -> None:
        """(The update in flight goes on: the other ranks wait for this one in its collectives.)"""

    def on_wakeup(self, signum: int) -> None:
        """(Not watched: the handler's answer, at the end of a torch call, is soon enough.)"""

    def notice(self, signum: int) -> str:
        """The line that answers a signal: the update in flight finishes first."""
        return (f"{signal.Signals(signum).name} received: every rank finishes this update, then one "
                "checkpoint is saved (send it again to stop at once, without saving)")

    def after_update(self, over_time: bool) -> bool:
        """Every rank stops after the same update (signals and clocks differ): sets :attr:`signal`."""
        self.signal, over = self.ranks.agree(self.seen, over_time)
        return over

    def _watch_wakeup(self):
        return None

    def boundary(self, trainer, previous: dict | None) -> None:
        """None: a stop saves after the update, together (see the class)."""
        return None

    def env_failure(self, trainer, exc: Exception, boundary: dict | None):
        """An env failed for good on this rank: raise EnvFailure without saving (a checkpoint would
        need every rank); the other ranks' next collective fails (RankLost)."""
        if self.console.progress is not None:
            self.console.progress.abandon_update()
        first, _, details = str(exc).partition("\n")
        files = ckpt.checkpoint_files(trainer.run_dir / "checkpoints")  # (if on this machine)
        kept = (f"the last periodic checkpoint {files[-1]} is intact" if files else
                f"the run's periodic checkpoints (rank 0 writes them, in {trainer.run_dir}) are intact")
        raise EnvFailure(f"{self.console.rank_prefix}{first}; training stopped on every rank without saving: "
                         f"{kept}; resume with the same ranks and --resume {trainer.run_dir}",
                         details) from None
