"""Checkpoint safety (atomic writes under a crash) and clean stops on SIGINT/SIGTERM."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval_helpers import TINY, metric_rows, tiny_config, train_tiny
from ppo_tbptt import checkpoint as ckpt
from ppo_tbptt import train as train_cli
from ppo_tbptt.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _crashing_save(real_save):
    """A torch.save that writes half of the real bytes to the file, then dies."""
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError("disk full (simulated crash in the middle of a save)")
    return save


def test_crash_during_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = train_tiny(run, "run.total_steps=64", "run.eval_every=64", "run.eval_episodes=2")
    ckpt_dir = run / "checkpoints"
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step_000000000064.pt" and (ckpt_dir / "best.pt").is_file()
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}

    monkeypatch.setattr(torch, "save", _crashing_save(torch.save))
    trainer.global_step = 128  # the next checkpoint would be step 128
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save_checkpoint()
    with pytest.raises(OSError, match="simulated crash"):  # overwriting in place: best.pt
        ckpt.atomic_save(trainer.state_dict(), ckpt_dir / "best.pt")
    monkeypatch.undo()

    after = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    assert after == before  # no partial step_128, no temp file left behind, old files untouched
    assert ckpt.latest_checkpoint(run) == latest
    assert ckpt.load_checkpoint(latest)["global_step"] == 64
    assert ckpt.load_checkpoint(ckpt_dir / "best.pt")["global_step"] == 64
    # a temp file left by a process killed outright (SIGKILL) is never taken for a checkpoint
    (ckpt_dir / ".step_000000000192.pt.x1y2.tmp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(run) == latest
    assert train_cli.main(["--resume", str(run), "--set", "run.total_steps=128"]) == 0
    assert [r["global_step"] for r in metric_rows(run)] == [64, 128]


def test_second_signal_stops_at_once(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path / "run", torch.device("cpu"), quiet=True)
    try:
        trainer._on_signal(signal.SIGTERM, None)
        assert trainer.interrupted == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            trainer._on_signal(signal.SIGINT, None)
    finally:
        trainer.close()


def test_signal_seen_early_by_the_helper_thread_is_answered_once(tmp_path, capsys):
    """The helper thread (wakeup fd) answers first and asks the update to stop; the main thread's
    handler, running later, does not answer again, and a second signal still stops at once."""
    trainer = Trainer(tiny_config(), tmp_path / "run", torch.device("cpu"))
    try:
        capsys.readouterr()
        trainer._on_wakeup(signal.SIGINT)
        assert trainer._stop_now and trainer.interrupted is None  # (the handler has not run yet)
        trainer._on_wakeup(signal.SIGINT)  # the same signal's byte again, or a second press: no new line
        trainer._on_signal(signal.SIGINT, None)
        trainer.progress.flush_notices()
        assert capsys.readouterr().out.count("SIGINT received: stopping now") == 1
        assert trainer.interrupted == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            trainer._on_signal(signal.SIGINT, None)
    finally:
        trainer.close()


def descendants(pid: int) -> set[int]:
    """All processes below ``pid`` (from /proc: children, grandchildren, ...)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")
@pytest.mark.parametrize("sig,vector", [(signal.SIGINT, "serial"), (signal.SIGTERM, "serial"),
                                        (signal.SIGINT, "pool"), (signal.SIGTERM, "pool")],
                         ids=["SIGINT", "SIGTERM", "SIGINT-pool-group", "SIGTERM-pool-group"])
def test_signal_saves_checkpoint_and_exits_cleanly(tmp_path, sig, vector):
    """With a pool the signal goes to the whole process group, as Ctrl-C in a terminal or a service
    manager's stop does: the workers must outlive it long enough to be closed, then be gone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy",
               PYGAME_HIDE_SUPPORT_PROMPT="1", PYTHONUNBUFFERED="1")
    over = [a for o in TINY if not o.startswith("run.total_steps") for a in ("--set", o)]
    cmd = [sys.executable, "-m", "ppo_tbptt.train", "--config", "cue_recall", *over,
           "--set", "run.total_steps=10000000", "--set", f"run.out_dir={tmp_path}", "--run-name", "r",
           "--set", f"env.vector={vector}", "--set", "env.envs_per_worker=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if re.match(r"update \d+/\d+ \| step", line):  # an update's line (not its progress)
                break
            assert time.time() < deadline, "no update line within 60 s"
        else:
            pytest.fail(f"training ended before its first update: {proc.stderr.read()}")
        children = descendants(proc.pid)
        if vector == "pool":
            assert len(children) >= 3, children  # the forkserver and two workers
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    end = time.time() + 10
    while any(alive(p) for p in children) and time.time() < end:
        time.sleep(0.05)
    assert not any(alive(p) for p in children), "processes outlived the training process"
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert f"{signal.Signals(sig).name} received" in out and "resume with:" in out
    run = tmp_path / "r"
    latest = ckpt.latest_checkpoint(run)
    state = ckpt.load_checkpoint(latest)
    step = state["global_step"]
    assert step > 0 and step % 64 == 0 and latest.name == f"step_{step:012d}.pt"
    assert [r["global_step"] for r in metric_rows(run)][-1] == step
    # resumable in another process (the same config; a time budget ends it after one more update),
    # and the pieces log exactly what one uninterrupted process logs
    assert train_cli.main(["--resume", str(run), "--set", "run.max_seconds=1e-9"]) == 0
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["global_step"] == step + 64
    full = Trainer(tiny_config("run.total_steps=10000000", f"env.vector={vector}", "env.envs_per_worker=2"),
                   tmp_path / "full", torch.device("cpu"), quiet=True)
    original = full.train_update

    def update_then_stop():
        out = original()
        if full.global_step == step + 64:
            full.request_stop()
        return out

    full.train_update = update_then_stop
    full.train(handle_signals=False)
    assert metric_rows(run) == metric_rows(tmp_path / "full")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_signal_in_the_middle_of_a_long_collection_stops_at_once(tmp_path):
    """An update whose collection alone takes seconds (4 envs x 500 steps of an env that sleeps
    1 ms a step, in this process only): SIGINT while it collects stops training within a second,
    not at the end of the update; the checkpoint holds the last update boundary, and resuming from
    it logs exactly what an uninterrupted run logs (the partial rollout left no trace)."""
    tests = str(ROOT / "tests")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tests}", SDL_VIDEODRIVER="dummy",
               SDL_AUDIODRIVER="dummy", PYGAME_HIDE_SUPPORT_PROMPT="1", PYTHONUNBUFFERED="1",
               PPO_TBPTT_PROGRESS_SECONDS="0.2", SLOW_ENV_DELAY="0.001")
    long = ["env.id=pool_envs:Slow-v0", "env.kwargs={}", "ppo.rollout_steps=500",
            "ppo.minibatches=2", "ppo.epochs=1", "tbptt.sequence_length=8"]
    over = [a for o in TINY + long if not o.startswith("run.total_steps") for a in ("--set", o)]
    cmd = [sys.executable, "-m", "ppo_tbptt.train", "--config", "cue_recall", *over,
           "--set", "run.total_steps=4000", "--set", f"run.out_dir={tmp_path}", "--run-name", "r"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        for line in proc.stdout:  # a progress line of the second update's collection
            if re.match(r"update 2/2: collecting [\d,]+/2,000 env steps", line):
                break
            assert time.time() < deadline, "no progress line of update 2's collection within 120 s"
        else:
            pytest.fail(f"training ended before update 2 collected: {proc.stderr.read()}")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, took = "", None
        for line in proc.stdout:  # (each line as it comes: the stop is timed by its message)
            out += line
            if took is None and line.startswith("stopped during update 2"):
                took = time.monotonic() - sent
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # the rest of the collection alone would sleep for 2 s and more
    assert took is not None and took < 1.0, f"the stop took {took} s"
    assert "SIGINT received: stopping now" in out
    assert re.search(r"stopped during update 2 \(collecting: [\d,]+ of 2,000 env steps\)", out), out
    run = tmp_path / "r"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert state["global_step"] == 2000 and state["update"] == 1
    assert [r["global_step"] for r in metric_rows(run)] == [2000]
    assert train_cli.main(["--resume", str(run)]) == 0
    full = tiny_config(*long, "run.total_steps=4000")
    Trainer(full, tmp_path / "full", torch.device("cpu"), quiet=True).train(handle_signals=False)
    assert metric_rows(run) == metric_rows(tmp_path / "full")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_stops_training_without_saving(tmp_path, monkeypatch, capsys, poison):
    """A NaN loss, or a finite loss with NaN gradients (injected in the last minibatch of the second
    update) ends training with a one-line error and exit code 1 before the poisoned weights reach a
    checkpoint or the next rollout."""
    import ppo_tbptt.update as update_mod
    real = update_mod.ppo_loss_from_outputs
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # 2 epochs x 2 minibatches per update in the tiny config
            if poison == "loss":
                out.loss = out.loss * float("nan")
            else:  # sqrt(w - w) is 0, its gradient 0/0
                w = model.value_head.bias
                out.loss = out.loss + torch.sqrt(w - w).sum()
                assert torch.isfinite(out.loss)
        return out

    monkeypatch.setattr(update_mod, "ppo_loss_from_outputs", poisoned)
    over = [a for o in TINY + ["run.checkpoint_every=64", f"run.out_dir={tmp_path}"] for a in ("--set", o)]
    assert train_cli.main(["--config", "cue_recall", *over, "--run-name", "r"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss or gradient in update 2 (env steps 64..128)") and "\n" not in err
    assert ckpt.latest_checkpoint(tmp_path / "r").name == f"step_{64:012d}.pt"
    assert [r["global_step"] for r in metric_rows(tmp_path / "r")] == [64]


def test_trainer_that_cannot_restore_closes_its_envs(tmp_path, monkeypatch):
    """A checkpoint whose weights do not fit the model: a one-line error naming the checkpoint, and
    the worker pool that was already started is closed, not left running."""
    import ppo_tbptt.trainer as trainer_mod
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=64")
    created = []
    real = trainer_mod.make_vector_env

    def recording(*args, **kwargs):
        created.append(real(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(trainer_mod, "make_vector_env", recording)
    latest = ckpt.latest_checkpoint(run)
    state = torch.load(latest, weights_only=True)  # a config that no longer fits its weights
    state["config"] = tiny_config("model.hidden_size=24", "env.vector=pool", "env.envs_per_worker=2").to_dict()
    ckpt.atomic_save(state, latest)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint .*step_000000000064\.pt: .*do not fit"):
        Trainer.from_run(run, quiet=True)
    assert len(created) == 1 and created[0]._closed


def test_checkpoints_get_the_same_file_mode_as_the_other_run_files(tmp_path):
    """mkstemp creates 0600 files; a checkpoint must be as readable as config.yaml or metrics.jsonl
    (0644 under the usual umask 022), e.g. for an evaluation run by another user."""
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train_tiny(run, "run.total_steps=64", "run.eval_every=64", "run.eval_episodes=2")
        (run / "config.yaml").write_text("x")  # as train.py writes it
        files = [ckpt.latest_checkpoint(run), run / "checkpoints" / "best.pt", run / "metrics.jsonl",
                 run / "config.yaml", run / "train.log"]
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
        os.umask(0o027)
        ckpt.atomic_save({"x": 1}, run / "other.pt")
        assert (run / "other.pt").stat().st_mode & 0o777 == 0o640  # the umask decides, as for open()
    finally:
        os.umask(old)
