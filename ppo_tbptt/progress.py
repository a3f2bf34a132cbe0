"""Feedback within an update: env steps collected, minibatches done, the expected time per update.

One update of a MemoryGym config collects tens of thousands of steps and then learns for tens of
seconds, so the line the trainer prints after each update is not enough. :class:`UpdateProgress`
shows the update's phases as they run: on a terminal a tqdm bar (redrawn every second by a helper
thread, also while a single minibatch runs long); elsewhere (a log file, a pipe, a job scheduler's
output) a plain line every ``interval`` seconds. Lines written through :meth:`write` appear above
the bar. Once an update has finished, both show the expected time per update.

A signal handler must not print (a print interrupted by another print raises), so it hands its
message to :meth:`notice`, which the helper thread prints within a fraction of a second. Python
runs a signal handler only between bytecodes of the main thread, which may sit for seconds in one
long torch call (a big minibatch's backward pass); :meth:`watch_fd` lets the helper thread read
``signal.set_wakeup_fd``'s pipe, to which the C-level handler writes at once, so the answer to
Ctrl-C comes immediately even then.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time

from .utils import format_duration

#: Seconds between plain progress lines when the output is not a terminal (env var overrides).
DEFAULT_INTERVAL = 5.0
INTERVAL_ENV = "PPO_TBPTT_PROGRESS_SECONDS"

PHASES = {"collect": ("collecting", "env steps"), "learn": ("learning", "minibatches"),
          "evaluate": ("evaluating", "episodes")}


def _interval_from_env() -> float:
    try:
        return max(0.05, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _is_terminal(stream) -> bool:
    """A terminal with a width (a pseudo-terminal without a size, e.g. under ``script``, would get
    a bar of zero columns: plain lines there)."""
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class UpdateProgress:
    """Progress of the update in flight, as a bar on a terminal or plain lines elsewhere.

    ``bar``: None decides by ``stream.isatty()``. ``interval``: seconds between plain lines (default
    :data:`DEFAULT_INTERVAL`, or the ``PPO_TBPTT_PROGRESS_SECONDS`` environment variable).
    ``echo``: called with every line written through :meth:`write` (e.g. a log file's writer).
    """

    def __init__(self, total_updates: int, stream=None, bar: bool | None = None,
                 interval: float | None = None, echo=None):
        self.stream = sys.stdout if stream is None else stream
        if bar is None:
            bar = _is_terminal(self.stream)
        self.bar_mode = bar
        self.interval = _interval_from_env() if interval is None else float(interval)
        self.total_updates = int(total_updates)
        self.echo = echo
        self.update: int | None = None  # the update in flight (1-based), None between updates
        self.task: str | None = None  # outside updates: what takes time now (e.g. starting envs)
        self.phase: str | None = None
        self.done = 0
        self.total = 0
        self.update_seconds: float | None = None  # expected time per update, once one has finished
        self._update_start = 0.0
        self._last_output = time.monotonic()
        self._notices: list[str] = []
        self._bar = None
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._wake_fd: int | None = None  # see watch_fd
        self._on_wake = None
        self._thread = threading.Thread(target=self._heartbeat, name="ppo_tbptt-progress", daemon=True)
        self._thread.start()

    # ---- the update's phases --------------------------------------------------------------------
    def start_task(self, text: str) -> None:
        """Something outside an update that may take a while (starting envs, building the model):
        printed now, and again with the seconds spent every ``interval`` until :meth:`end_task`
        (on a terminal: one line whose clock runs)."""
        with self._lock:
            self._close_bar(keep=True)
            if self.bar_mode:
                from tqdm import tqdm
                self._bar = tqdm(total=None, desc=text, bar_format="{desc} ({elapsed})", leave=True,
                                 file=self.stream, dynamic_ncols=True)
            else:
                self.write(text)
            self.task = text
            self._update_start = time.monotonic()

    def end_task(self) -> None:
        with self._lock:
            self._close_bar(keep=True)
            self.task = None

    def start_update(self, update: int) -> None:
        with self._lock:
            if self.task is not None:
                self._close_bar(keep=True)
            self.task = None
            self.update = int(update)
            self._update_start = time.monotonic()
            self.phase = None

    def start_phase(self, phase: str, total: int) -> None:
        """``phase``: ``collect`` (total env steps), ``learn`` (minibatches) or ``evaluate`` (episodes)."""
        with self._lock:
            self.phase, self.done, self.total = phase, 0, int(total)
            if self.update is None:
                self._update_start = time.monotonic()
            if self.bar_mode:
                self._show_bar()

    def advance(self, done: int) -> None:
        with self._lock:
            self.done = int(done)
            if self._bar is not None:
                self._bar.n = self.done
                self._bar.refresh()

    def end_update(self) -> float:
        """The update is over (its line may follow): returns its wall time and keeps it as the
        expected time per update (a running mean, weighted towards recent updates)."""
        with self._lock:
            seconds = time.monotonic() - self._update_start
            prev = self.update_seconds
            self.update_seconds = seconds if prev is None else 0.7 * prev + 0.3 * seconds
            self.update, self.phase = None, None
            self._close_bar()
            return seconds

    def abandon_update(self) -> None:
        with self._lock:
            self.update, self.phase = None, None
            self._close_bar()

    # ---- lines ----------------------------------------------------------------------------------
    def write(self, line: str, err: bool = False) -> None:
        """Print ``line`` (on stderr with ``err``) above the bar, and hand it to ``echo``."""
        with self._lock:
            stream = sys.stderr if err else self.stream
            if self._bar is not None:  # tqdm clears the bar, prints the line, redraws the bar below
                self._bar.write(line, file=stream)
                stream.flush()
            else:
                print(line, file=stream, flush=True)
            self._last_output = time.monotonic()
        if self.echo is not None:
            self.echo(line)

    def notice(self, line: str) -> None:
        """A line from a signal handler: printed by the helper thread (never from the handler)."""
        self._notices.append(line)  # list.append is atomic; no lock (the handler may interrupt a holder)

    def flush_notices(self) -> None:
        while True:
            try:
                line = self._notices.pop(0)
            except IndexError:  # (the helper thread and the main thread both flush)
                return
            self.write(line)

    def status(self) -> str:
        """The plain progress line of the update (or the task) in flight."""
        with self._lock:
            if self.update is None and self.phase is None:
                return f"{self.task} ({format_duration(time.monotonic() - self._update_start)})"
            head = self._head()
            what = ""
            if self.phase is not None:
                verb, unit = PHASES[self.phase]
                what = f": {verb} {self.done:,}/{self.total:,} {unit}"
            spent = time.monotonic() - self._update_start
            tail = f" | {format_duration(spent)} into the update"
            if self.update_seconds is not None:
                tail += f" (about {format_duration(self.update_seconds)} per update)"
            return head + what + tail

    def watch_fd(self, fd: int | None, callback=None) -> None:
        """Call ``callback(signum)`` in the helper thread for each byte arriving on ``fd`` (the
        read end of the pipe given to ``signal.set_wakeup_fd``); None stops watching."""
        with self._lock:
            self._wake_fd, self._on_wake = fd, callback

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self.flush_notices()
        with self._lock:
            self._close_bar()

    # ---- internals ------------------------------------------------------------------------------
    def _show_bar(self) -> None:
        from tqdm import tqdm
        verb, unit = PHASES[self.phase]
        desc = f"{self._head()} {verb}"
        if self._bar is not None and self._bar.total is None:  # a task's line: it stays
            self._close_bar(keep=True)
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc=desc, unit=" " + unit.split()[-1], leave=False,
                             file=self.stream, dynamic_ncols=True, mininterval=0.5)
        else:
            self._bar.reset(total=self.total)
            self._bar.set_description(desc, refresh=False)
            self._bar.unit = " " + unit.split()[-1]
        if self.update_seconds is not None:
            self._bar.set_postfix_str(f"about {format_duration(self.update_seconds)} per update", refresh=False)
        self._bar.refresh()

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, or less when a signal arrives on the watched fd."""
        fd, callback = self._wake_fd, self._on_wake
        if fd is None:
            self._closed.wait(seconds)
            return
        try:
            ready, _, _ = select.select([fd], [], [], seconds)
            data = os.read(fd, 64) if ready else b""
        except (OSError, ValueError):  # closed under us: watching ended
            self._closed.wait(seconds)
            return
        for signum in data:
            callback(signum)

    def _head(self) -> str:
        if self.update is None:  # (a phase outside train(): e.g. train_update() called directly)
            return "update"
        return f"update {self.update:,}/{self.total_updates:,}"

    def _close_bar(self, keep: bool = False) -> None:
        """Close the bar; ``keep`` only closes a task's line (it stays on the screen)."""
        if self._bar is not None and (not keep or self._bar.total is None):
            self._bar.close()
            self._bar = None

    def _heartbeat(self) -> None:
        """Print notices at once; keep the bar's clock moving; a plain line every ``interval``."""
        last_refresh = 0.0
        while not self._closed.is_set():
            try:
                self._wait(0.2)
                self.flush_notices()
                with self._lock:
                    now = time.monotonic()
                    if self.update is None and self.task is None and self.phase is None:
                        continue
                    if self._bar is not None:
                        if now - last_refresh >= 1.0:
                            self._bar.refresh()
                            last_refresh = now
                        continue
                    if self.bar_mode or now - self._last_output < self.interval:
                        continue
                    line = self.status()
                self.write(line)
            except Exception:  # feedback must never take training down (e.g. a closed stream)
                pass
