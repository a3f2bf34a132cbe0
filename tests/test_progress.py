"""Feedback within an update: plain lines off a terminal, a bar on one, signal notices."""
import io
import time

from ppo_tbptt.progress import UpdateProgress


def wait_for(stream: io.StringIO, text: str, within: float = 5.0) -> str:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if text in stream.getvalue():
            return stream.getvalue()
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not written within {within} s; got:\n{stream.getvalue()}")


def test_plain_lines_show_steps_minibatches_and_the_time_per_update():
    out = io.StringIO()
    p = UpdateProgress(5, stream=out, bar=False, interval=0.1)
    try:
        p.start_task("starting 4 envs")
        wait_for(out, "starting 4 envs (0m00s)")  # repeated while the task lasts
        p.start_update(1)
        p.start_phase("collect", 1024)
        p.advance(384)
        wait_for(out, "update 1/5: collecting 384/1,024 env steps | 0m00s into the update\n")
        p.end_update()
        assert p.update_seconds is not None
        p.start_update(2)
        p.start_phase("learn", 24)
        p.advance(7)
        text = wait_for(out, "update 2/5: learning 7/24 minibatches | 0m00s into the update (about 0m00s per update)")
        p.write("update 2/5 | step 2,048")
        p.end_update()
        n = out.getvalue().count("\n")
        time.sleep(0.4)  # between updates: no status lines
        assert out.getvalue().count("\n") == n
    finally:
        p.close()
    assert "Traceback" not in text


def test_notice_from_a_signal_handler_is_printed_by_the_helper_thread():
    out = io.StringIO()
    p = UpdateProgress(5, stream=out, bar=False, interval=60)
    try:
        p.start_update(1)
        p.notice("SIGINT received: stopping now")
        wait_for(out, "SIGINT received: stopping now\n", within=2.0)
    finally:
        p.close()


def test_bar_on_a_terminal():
    out = io.StringIO()
    p = UpdateProgress(3, stream=out, bar=True)
    try:
        p.start_task("starting 4 envs")  # a line whose clock runs, kept when the next one starts
        wait_for(out, "starting 4 envs (00:0")
        p.start_update(1)
        p.start_phase("collect", 100)
        p.advance(40)
        wait_for(out, "update 1/3 collecting")
        wait_for(out, "40/100")
        p.start_phase("learn", 8)
        p.advance(2)
        wait_for(out, "update 1/3 learning")
        p.end_update()
        p.start_update(2)
        p.start_phase("collect", 100)
        wait_for(out, "per update")  # the expected time per update, once known
        p.write("a line above the bar")
        assert "a line above the bar\n" in out.getvalue()
    finally:
        p.close()


def test_a_phase_outside_an_update_does_not_break_the_feedback():
    """train_update() or evaluate() called directly (no update number): lines and bar still work."""
    for bar in (False, True):
        out = io.StringIO()
        p = UpdateProgress(5, stream=out, bar=bar, interval=0.1)
        try:
            p.start_phase("evaluate", 8)
            p.advance(3)
            wait_for(out, "evaluating 3/8 episodes" if not bar else "3/8")
        finally:
            p.close()


def test_wakeup_fd_signals_reach_the_helper_thread():
    """The C-level handler writes each signal's number to set_wakeup_fd's pipe at once; the helper
    thread reads it there, so a signal is answered even while the main thread sits in one long
    torch call (where Python handlers wait for the call to return)."""
    import os
    import signal
    import threading
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old_handler = signal.signal(signal.SIGUSR1, lambda *a: None)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    seen = []
    p = UpdateProgress(5, stream=io.StringIO(), bar=False, interval=60)
    p.watch_fd(r, lambda signum: seen.append((signum, threading.current_thread().name)))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        end = time.monotonic() + 5
        while not seen and time.monotonic() < end:
            time.sleep(0.02)
        assert seen == [(signal.SIGUSR1, "ppo_tbptt-progress")]
    finally:
        p.close()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old_handler)
        os.close(r)
        os.close(w)
