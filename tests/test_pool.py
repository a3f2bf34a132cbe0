"""The worker pool: same rollouts as serial stepping, resumable state, clear errors, no leftovers."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_helpers import DEVICES, exact_cuda, metric_rows, tiny_config, train_tiny
from ppo_tbptt.config import ConfigError, load
from ppo_tbptt.envs import make_vector_env
from ppo_tbptt.envs.pool import EnvWorkerError, WorkerPoolVectorEnv, worker_layout
from ppo_tbptt.envs.vector import split_evenly
from ppo_tbptt.envs.wrappers import EnvStateError
from ppo_tbptt.model import build_model
from ppo_tbptt.rollout import Collector
from ppo_tbptt.trainer import Trainer


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM raises inside the test after ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds}s: the pool hangs")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def gone(pid: int, within: float = 5.0) -> bool:
    """True once no process ``pid`` exists (exited and reaped)."""
    end = time.time() + within
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def cue_cfg(*extra):
    return tiny_config("env.num_envs=6", "env.envs_per_worker=2", *extra)


def test_layouts():
    assert split_evenly(7, 3) == [slice(0, 2), slice(2, 5), slice(5, 7)]
    assert split_evenly(2, 5) == [slice(0, 1), slice(1, 2)]
    # groups are formed first, exactly as SerialVectorEnv forms them, whatever the core count
    for cores in (1, 2, 3, 4, 16):
        groups, workers, members = worker_layout(8, groups=2, workers=cores)
        assert groups == split_evenly(8, 2) == [slice(0, 4), slice(4, 8)]
        assert [workers[w] for w in members[0]][0].start == 0 and workers[-1].stop == 8
        assert all(workers[w].start >= g.start and workers[w].stop <= g.stop
                   for g, ws in zip(groups, members) for w in ws)
    assert worker_layout(8, groups=2, workers=4)[1] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert worker_layout(7, envs_per_worker=3)[1] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert worker_layout(6, envs_per_worker=4, groups=2)[1] == [slice(0, 3), slice(3, 6)]


def shm_segments() -> set:
    return {p.name for p in Path("/dev/shm").glob("psm_*")} if Path("/dev/shm").is_dir() else set()


@pytest.fixture
def exact():
    with exact_cuda():
        yield


def collect_rollouts(cfg, seed=0, rollouts=2, device="cpu"):
    """Rollouts (tensors copied to the CPU) and episode statistics from a fresh model and envs."""
    device = torch.device(device)
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env, seed, device=device.type)
    try:
        model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model).to(device)
        col = Collector(envs, model, cfg.ppo.rollout_steps, device)
        out = []
        for _ in range(rollouts):
            r, eps = col.collect()
            out.append(({k: (v.to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in vars(r).items()},
                        [(e.env_index, e.seed, e.ret, e.length) for e in eps]))
        return out, envs.groups
    finally:
        envs.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups,per_worker", [(1, 2), (3, 2), (2, 4)])
def test_pool_rollouts_equal_serial_rollouts(groups, per_worker, device, exact):
    """(2, 4): 4 envs per worker would not fit the groups of 3: the pool must still form serial's.
    On CUDA the observations travel through the pinned staging buffer and its per-group slices."""
    serial, sg = collect_rollouts(cue_cfg("env.vector=serial", f"env.groups={groups}"), device=device)
    before = shm_segments()
    pool, pg = collect_rollouts(cue_cfg("env.vector=pool", f"env.groups={groups}",
                                        f"env.envs_per_worker={per_worker}"), device=device)
    assert shm_segments() <= before, "shared memory left behind"
    assert sg == pg and len(pg) == groups
    for (rs, es), (rp, ep) in zip(serial, pool):
        assert es == ep and es, "episodes (env, level seed, return, length) must match and exist"
        for k, v in rs.items():
            if torch.is_tensor(v):
                assert torch.equal(v, rp[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_grouped_collection_stepping_equals_sequence_forward(core, device, exact):
    """With 3 groups the collector acts group by group; each env's stored states must still be the
    ones its own steps produced, so running the model over the sequences reproduces the rollout.
    Two layers: a group's state slice is not contiguous, which cuDNN refuses unless copied."""
    from ppo_tbptt.sequences import build_sequences
    cfg = cue_cfg("env.groups=3", f"model.core={core}", "model.num_layers=2")
    device = torch.device(device)
    torch.manual_seed(0)
    with make_vector_env(cfg.env, 0, device=device.type) as envs:
        model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model).to(device)
        col = Collector(envs, model, cfg.ppo.rollout_steps, device)
        col.collect()
        rollout, _ = col.collect()
    assert len(col.groups) == 3 and rollout.episode_start[1:].any() and not rollout.episode_start[0].all()
    b = build_sequences(rollout, 5)
    with torch.no_grad():
        logits, values, _ = model(b.obs, b.init_state)
    m = b.mask.bool()
    tol = 1e-5  # on CUDA too: TF32 is off here (see exact_cuda)
    torch.testing.assert_close(model.dist(logits).log_prob(b.actions)[m], b.logprobs[m], atol=tol, rtol=0)
    torch.testing.assert_close(values[m], b.values[m], atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_memorygym_pool_matches_serial(device, exact):
    """MultiDiscrete actions (sampled per dimension, group by group) and CNN observations (uint8,
    through pinned memory on CUDA)."""
    over = ["env.num_envs=5", "env.envs_per_worker=2", "env.groups=2", "model.hidden_size=8",
            "model.hidden_layer=8", "ppo.rollout_steps=20", "ppo.minibatches=1", "tbptt.sequence_length=4"]
    serial, _ = collect_rollouts(load("mortar_mayhem", over + ["env.vector=serial"]), rollouts=1, device=device)
    pool, _ = collect_rollouts(load("mortar_mayhem", over + ["env.vector=pool"]), rollouts=1, device=device)
    assert serial[0][0]["actions"].shape[-1] == 2
    for k in ("obs", "actions", "rewards", "terminated", "state_h", "values"):
        assert torch.equal(serial[0][0][k], pool[0][0][k]), k


def test_trainer_on_pool_logs_the_same_metrics_as_serial(tmp_path):
    train_tiny(tmp_path / "serial", "env.vector=serial", "env.groups=2", "run.total_steps=192")
    train_tiny(tmp_path / "pool", "env.vector=pool", "env.groups=2", "run.total_steps=192",
               "env.envs_per_worker=3")
    a, b = metric_rows(tmp_path / "serial"), metric_rows(tmp_path / "pool")
    assert len(a) == 3 and a == b


def test_state_roundtrip_between_pool_and_serial():
    cfg = cue_cfg()
    pool_env = dataclasses.replace(cfg.env, vector="pool")
    rng = np.random.default_rng(0)
    with make_vector_env(pool_env, 3) as pool, make_vector_env(cfg.env, 4) as serial:
        pool.reset()
        serial.reset()
        for _ in range(9):
            last = pool.step(rng.integers(0, 3, 6)).obs
        assert np.array_equal(serial.set_state(pool.get_state()), last)

        def same_future(a, b):
            for _ in range(12):
                act = rng.integers(0, 3, 6)
                ra, rb = a.step(act), b.step(act)
                assert np.array_equal(ra.obs, rb.obs) and np.array_equal(ra.reward, rb.reward)
                assert [(e.env_index, e.seed, e.ret) for e in ra.episodes] == \
                    [(e.env_index, e.seed, e.ret) for e in rb.episodes]

        same_future(pool, serial)
        for _ in range(3):
            serial.step(rng.integers(0, 3, 6))  # now the serial envs are ahead: copy them back
        serial_obs = serial.step(rng.integers(0, 3, 6)).obs
        serial_state = serial.get_state()
        assert np.array_equal(pool.set_state(serial_state), serial_obs)
        same_future(pool, serial)
    with make_vector_env(dataclasses.replace(pool_env, num_envs=4), 3) as pool4:
        with pytest.raises(EnvStateError, match="holds 6 env states, but there are 4 envs"):
            pool4.set_state(serial_state)


@pytest.mark.parametrize("vector", ["serial", "pool"])
def test_step_protocol_misuse_is_an_error(vector):
    with make_vector_env(cue_cfg(f"env.vector={vector}", "env.groups=2").env, 0) as venv:
        venv.reset()
        with pytest.raises(RuntimeError, match="without a step_async"):
            venv.step_wait(1)
        venv.step_async(np.zeros(3, np.int64), 0)
        with pytest.raises(RuntimeError, match="still pending"):
            venv.step_async(np.zeros(3, np.int64), 0)
        assert venv.step_wait(0).obs.shape == (3, 5)
    if vector == "pool":
        with pytest.raises(RuntimeError, match="pool is closed"):
            venv.step_async(np.zeros(3, np.int64), 0)


def test_env_that_keeps_raising_names_env_and_seed_and_gives_up():
    """An env that raises at the same step however often its worker is replaced: two replacements
    (each replaying the episode to that step), then an error naming the env and its level seed."""
    cfg = tiny_config("env.id=pool_envs:Exploding-v0", "env.kwargs={explode_at: 2}", "env.vector=pool",
                      "env.num_envs=4", "env.envs_per_worker=2", "env.train_seeds=5:6")
    warnings = []
    with deadline(60), make_vector_env(cfg.env, 0) as pool:
        pool.on_warning = warnings.append
        pool.reset()
        pool.step(np.zeros(4, np.int64))
        with pytest.raises(EnvWorkerError, match=r"worker \d \(envs \d\.\.\d, level seeds \[5, 5\]\) failed: "
                                                 r"EnvError: env \d \(level seed 5\): step raised ValueError: boom; "
                                                 r"the same worker failed 3 times in a row, giving up") as ei:
            pool.step(np.zeros(4, np.int64))
        assert "worker traceback:" in str(ei.value).partition("\n")[2]  # for the log, not the one line
        assert len(warnings) == 2 and all("replacing it" in w and "level seeds [5, 5]" in w for w in warnings)
        pids = pool.pids
    assert all(gone(p) for p in pids)


def _same_steps(a, b, steps, rng, n, before_step=None):
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        act = rng.integers(0, 2, n)
        ra, rb = a.step(act), b.step(act)
        assert np.array_equal(ra.obs, rb.obs) and np.array_equal(ra.reward, rb.reward)
        assert np.array_equal(ra.terminated, rb.terminated)
        assert [(e.env_index, e.seed, e.ret, e.length) for e in ra.episodes] == \
            [(e.env_index, e.seed, e.ret, e.length) for e in rb.episodes]


def test_killed_worker_is_replaced_and_its_episodes_go_on():
    """SIGKILL between steps and while a step is in flight: the replacement restores the episodes
    (level seed, the actions since the pool's last state snapshot) and the envs step exactly as the
    envs of a pool nobody killed, seed draws of later episodes included."""
    cfg = tiny_config("env.id=pool_envs:Slow-v0", "env.kwargs={delay: 0.02}", "env.vector=pool",
                      "env.num_envs=6", "env.envs_per_worker=2")
    rng = np.random.default_rng(0)
    warnings = []
    with deadline(120), make_vector_env(cfg.env, 0) as pool, make_vector_env(cfg.env, 0) as ref:
        pool.on_warning = warnings.append
        pool.refresh_every = 7  # a snapshot mid-way too: replays start from it
        assert np.array_equal(pool.reset(), ref.reset())
        _same_steps(pool, ref, 9, rng, 6)
        old = pool.pids[1]
        os.kill(old, signal.SIGKILL)  # idle: noticed when the next step is sent
        assert gone(old)
        _same_steps(pool, ref, 8, rng, 6)
        assert pool.restarts == 1 and pool.pids[1] != old
        act = rng.integers(0, 2, 6)
        pool.step_async(act, 0)  # in flight: each worker sleeps 2 x 20 ms in this step
        os.kill(pool.pids[2], signal.SIGKILL)
        ra, rb = pool.step_wait(0), ref.step(act)
        assert pool.restarts == 2
        assert np.array_equal(ra.obs, rb.obs) and np.array_equal(ra.reward, rb.reward)
        _same_steps(pool, ref, 8, rng, 6)
        assert len(warnings) == 2 and "worker 1 (envs 2..3, level seeds [" in warnings[0]
        assert all("died: the process was killed by SIGKILL; replacing it" in w for w in warnings)
        pids = pool.pids
    assert all(gone(p) for p in pids)


def test_transient_env_exception_is_replaced(tmp_path):
    """An env that raises once (a flaky simulator): its worker is replaced, the episode replayed,
    the step retried, and nothing differs from a pool where it never raised."""
    marker = tmp_path / "raised"
    flaky = tiny_config("env.id=pool_envs:Flaky-v0", f"env.kwargs={{marker: '{marker}', explode_at: 3}}",
                        "env.vector=pool", "env.num_envs=4", "env.envs_per_worker=2")
    calm = tiny_config("env.id=pool_envs:Flaky-v0", f"env.kwargs={{marker: '{tmp_path / 'never'}'}}",
                       "env.vector=pool", "env.num_envs=4", "env.envs_per_worker=2")
    (tmp_path / "never").touch()
    rng = np.random.default_rng(0)
    warnings = []
    with deadline(60), make_vector_env(flaky.env, 0) as pool, make_vector_env(calm.env, 0) as ref:
        pool.on_warning = warnings.append
        assert np.array_equal(pool.reset(), ref.reset())
        _same_steps(pool, ref, 12, rng, 4)
    assert marker.exists() and pool.restarts == 1
    assert len(warnings) == 1 and "step raised ValueError: transient failure; replacing it" in warnings[0]


def test_killed_worker_gives_up_after_max_failures():
    """Replacement has a limit: with max_failures 1 a death is an error naming the worker's envs
    and level seeds, never a hang."""
    with deadline(60), make_vector_env(cue_cfg("env.vector=pool").env, 0) as pool:
        pool.max_failures = 1
        pool.reset()
        pool.step(np.zeros(6, np.int64))
        os.kill(pool.pids[1], signal.SIGKILL)
        with pytest.raises(EnvWorkerError, match=r"CueRecall-v0 worker 1 \(envs 2\.\.3, level seeds \[\d+, \d+\]\) "
                                                 r"died: the process was killed by SIGKILL; .*giving up"):
            for _ in range(3):
                pool.step(np.zeros(6, np.int64))
        pids = pool.pids
    assert all(gone(p) for p in pids)


def test_trainer_with_a_worker_killed_mid_rollout_logs_what_an_undisturbed_run_logs(tmp_path, capfd):
    """The issue's case: SIGKILL one env worker in the middle of the second update's collection;
    training goes on and finishes, and metrics.jsonl holds exactly the undisturbed run's values."""
    extra = ("env.vector=pool", "env.envs_per_worker=2", "run.total_steps=192")
    train_tiny(tmp_path / "calm", *extra)
    trainer = Trainer(tiny_config(*extra), tmp_path / "killed", torch.device("cpu"), quiet=True)
    real = trainer.collector.progress
    killed = []

    def kill_mid_rollout(steps):
        real(steps)
        if trainer.update == 1 and steps == 5 * trainer.envs.num_envs and not killed:
            killed.append(trainer.envs.pids[1])
            os.kill(killed[0], signal.SIGKILL)

    trainer.collector.progress = kill_mid_rollout
    trainer.train(handle_signals=False)
    assert killed and gone(killed[0]) and trainer.envs.restarts == 1
    assert trainer.global_step == 192
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "calm")
    err = capfd.readouterr().err
    assert "warning: CueRecall-v0 worker 1 (envs 2..3, level seeds [" in err and "killed by SIGKILL" in err
    assert "killed by SIGKILL; replacing it" in (tmp_path / "killed" / "train.log").read_text()


@pytest.mark.parametrize("vector", ["pool", "serial"])
def test_env_that_keeps_failing_stops_training_with_one_line_and_a_checkpoint(tmp_path, capsys, monkeypatch, vector):
    """From the second update on every episode's second step raises: a pool replaces the worker
    twice, then training stops (a serial env at once) with a one-line error and exit code 1, after
    saving the last update boundary; the worker's traceback goes to train.log only."""
    import ppo_tbptt.rollout as rollout_mod
    from ppo_tbptt import checkpoint as ckpt
    from ppo_tbptt import train as train_cli
    poison = tmp_path / "poison"
    real = rollout_mod.Collector.collect
    calls = {"n": 0}

    def collect(self):
        calls["n"] += 1
        if calls["n"] == 2:
            poison.touch()
        return real(self)

    monkeypatch.setattr(rollout_mod.Collector, "collect", collect)
    over = ["env.id=pool_envs:Exploding-v0", f"env.kwargs={{explode_at: 2, poison: '{poison}'}}",
            f"env.vector={vector}", "env.envs_per_worker=2", "run.total_steps=448", "env.num_envs=4",
            "model.hidden_size=16", "model.hidden_layer=16", "ppo.rollout_steps=16", "ppo.epochs=2",
            "ppo.minibatches=2", "tbptt.sequence_length=8", "run.torch_threads=1", "run.device=cpu",
            f"run.out_dir={tmp_path}"]
    rc = train_cli.main(["--config", "cue_recall", *[a for o in over for a in ("--set", o)], "--run-name", "r"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "(level seed" in lines[0] and "step raised ValueError: boom" in lines[0]
    assert "holds the last update boundary (step 64)" in lines[0] and "--resume" in lines[0]
    if vector == "pool":
        assert "the same worker failed 3 times in a row" in lines[0]
        assert err.count("warning: ") == 2
        assert "worker traceback:" in (tmp_path / "r" / "train.log").read_text()
    assert ckpt.latest_checkpoint(tmp_path / "r").name == f"step_{64:012d}.pt"
    assert [r["global_step"] for r in metric_rows(tmp_path / "r")] == [64]


def test_close_leaves_no_processes_even_if_the_learner_is_killed(tmp_path):
    code = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
        from eval_helpers import tiny_config
        from ppo_tbptt.envs import make_vector_env
        pool = make_vector_env(tiny_config("env.vector=pool", "env.num_envs=4", "env.envs_per_worker=2").env, 0)
        pool.reset()
        print(" ".join(map(str, pool.pids)), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(p, within=0.2) for p in pids)
        proc.kill()  # SIGKILL: no cleanup code runs in the learner
        proc.wait(timeout=10)
        assert all(gone(p, within=10) for p in pids), "workers outlived their learner"
    finally:
        proc.kill()


def test_pool_config_errors():
    with pytest.raises(ConfigError) as ei:
        load("cue_recall", ["env.vector=threads", "env.groups=-1", "env.envs_per_worker=-2"])
    text = str(ei.value)
    assert "env.vector: must be 'serial', 'pool' or 'gym_async', got 'threads'" in text
    assert "env.groups: must be >= 0" in text and "env.envs_per_worker: must be >= 0" in text
    with pytest.raises(ConfigError, match="env.groups: 5 groups but only env.num_envs = 4 envs"):
        load("cue_recall", ["env.num_envs=4", "env.groups=5"])


def test_gym_async_baseline_steps_and_refuses_to_resume():
    cfg = tiny_config("env.vector=gym_async", "env.num_envs=2")
    with deadline(60), make_vector_env(cfg.env, 0) as venv:
        assert venv.reset().shape == (2, 5)
        eps = []
        for _ in range(12):
            eps += venv.step(np.zeros(2, np.int64)).episodes
        assert len(eps) == 4 and all(e.length == 5 and e.success is not None for e in eps)
        assert len(venv.get_state()["envs"]) == 2
        with pytest.raises(EnvStateError, match="cannot restore"):
            venv.set_state(venv.get_state())
