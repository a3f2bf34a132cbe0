"""Running tiny data-parallel jobs in the tests: ranks as spawned processes joined over gloo on
localhost (what torchrun sets up, without its agent), and the tasks they run."""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import signal
import socket
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environ(rank: int, world: int, port: int) -> dict:
    """The variables torchrun gives rank ``rank`` of a one-machine group."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def run_ranks(task: str, world: int, out: Path, timeout: float = 180, **kwargs) -> None:
    """Run ``TASKS[task](dist, out, **kwargs)`` in ``world`` spawned processes, one rank each;
    raises if one fails (the others are ended) or if they are not done within ``timeout``."""
    import torch.multiprocessing as tmp
    ctx = tmp.start_processes(_rank_main, args=(world, free_port(), task, str(out), kwargs), nprocs=world,
                              join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks of {task!r} still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


#: The threads of a process group (gloo's event loop and work threads, rank 0's TCPStore server),
#: as /proc names them; a rank that exits while they run may abort in C++ (std::terminate).
GROUP_THREADS = ("gloo", "pt_gloo", "pt_tcpstore")


def group_threads() -> list[str]:
    """The names of this process's process-group threads still running (Linux; [] elsewhere)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for t in tasks.iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if n.startswith(GROUP_THREADS))


def _rank_main(rank: int, world: int, port: int, task: str, out: str, kwargs: dict) -> None:
    # a rank that dies of a fatal signal (an abort in C++ included) prints every thread's Python
    # stack first: where it was, which the parent's "terminated with signal" does not say
    faulthandler.enable(all_threads=True)
    os.environ.update(rank_environ(rank, world, port))
    torch.set_num_threads(1)
    import ppo_tbptt
    assert Path(ppo_tbptt.__file__).resolve().is_relative_to(ROOT), ppo_tbptt.__file__  # this checkout's
    from ppo_tbptt.distributed import Distributed
    dist = Distributed.from_environment(timeout=60)
    try:
        TASKS[task](dist, Path(out), **kwargs)
    finally:
        dist.close()
    left = group_threads()  # (after a clean task: an exception is reported as it is)
    assert not left, f"rank {rank}: process-group threads still running after close(): {left}"


# ---- data for the equivalence test -----------------------------------------------------------------
def slice_rollout(rollout, lo: int, hi: int):
    """The envs ``[lo, hi)`` of a rollout (a copy), as the rank stepping them would have collected."""
    fields = {}
    for f in dataclasses.fields(rollout):
        v = getattr(rollout, f.name)
        if v is None:
            fields[f.name] = None
        elif f.name in ("state_h", "state_c"):  # [T, K, N, H]
            fields[f.name] = v[:, :, lo:hi].clone()
        elif f.name == "bootstrap_value":  # [N]
            fields[f.name] = v[lo:hi].clone()
        else:  # [T, N, ...]
            fields[f.name] = v[:, lo:hi].clone()
    return type(rollout)(**fields)


def replay_update(trainer, rollout, plans: list[list[torch.Tensor]]) -> dict:
    """``trainer.train_update()`` on ``rollout`` instead of a fresh collection, with the minibatches
    of each epoch taken from ``plans`` instead of the shuffle; records the gradient that reaches
    every optimizer step. Returns the scalars, the gradients and the parameters after the update."""
    import ppo_tbptt.update as update_mod
    trainer.collector.collect = lambda: (rollout, [])
    epochs = iter(plans)

    def planned(num_sequences, minibatches, generator):
        plan = next(epochs)
        assert sorted(torch.cat(plan).tolist()) == list(range(num_sequences)), "plan must cover every sequence"
        return plan

    grads, step = [], trainer.optimizer.step

    def recording_step(*a, **k):
        grads.append([p.grad.detach().clone() for p in trainer.model.parameters()])
        return step(*a, **k)

    real = update_mod.minibatch_indices
    update_mod.minibatch_indices = planned
    trainer.optimizer.step = recording_step
    try:
        scalars = trainer.train_update()
    finally:
        update_mod.minibatch_indices = real
        trainer.optimizer.step = step
    return {"scalars": scalars, "grads": grads,
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}


def _equivalence(dist, out: Path) -> None:
    from eval_helpers import tiny_config
    from ppo_tbptt.distributed import env_share
    from ppo_tbptt.trainer import Trainer
    data = torch.load(out / "data.pt", weights_only=False)
    cfg = tiny_config(*data["overrides"])
    trainer = Trainer(cfg, out / f"rank{dist.rank}", torch.device("cpu"), log=False, quiet=True, dist=dist)
    try:
        trainer.model.load_state_dict(data["init"])
        first, count = env_share(cfg.env.num_envs, dist.rank, dist.world_size)
        result = replay_update(trainer, slice_rollout(data["rollout"], first, first + count), data["plans"][dist.rank])
    finally:
        trainer.close()
    torch.save(result, out / f"result_{dist.rank}.pt")


# ---- training, interruption and resume -------------------------------------------------------------
def _train_and_resume(dist, out: Path, extra: list[str]) -> None:
    from eval_helpers import tiny_config
    from ppo_tbptt.checkpoint import CheckpointError
    from ppo_tbptt.trainer import Trainer
    cpu = torch.device("cpu")
    report: dict = {}
    full = Trainer(tiny_config(*extra), out / "full", cpu, quiet=True, dist=dist)
    full.train(handle_signals=False)
    torch.save(full.model.state_dict(), out / f"params_full_{dist.rank}.pt")

    part = Trainer(tiny_config(*extra), out / "part", cpu, quiet=True, dist=dist)
    if dist.rank == 1:  # a signal seen by one rank only: all ranks must stop after the same update
        original = part.train_update

        def update_then_interrupt():
            result = original()
            if part.update == 2:
                part.request_stop(signal.SIGTERM)
            return result

        part.train_update = update_then_interrupt
    part.train(handle_signals=False)
    report["interrupted"], report["stopped_at"] = part.interrupted, part.global_step

    from ppo_tbptt import checkpoint as ckpt
    from ppo_tbptt.config import ConfigError
    try:  # a resume's config-field checks (resume.plan_resume) hold on every rank
        Trainer.from_run(out / "part", overrides=["env.num_envs=8"], quiet=True, dist=dist)
        report["frozen"] = "resumed"
    except ConfigError as exc:
        report["frozen"] = "; ".join(exc.problems)
    real_load = ckpt.load_checkpoint
    if dist.rank != 0:  # rank 0 reads the checkpoint and sends it: the others never open it
        def no_load(*a, **k):
            raise AssertionError(f"rank {dist.rank} read a checkpoint file")
        ckpt.load_checkpoint = no_load
    try:
        resumed = Trainer.from_run(out / "part", quiet=True, dist=dist)
    finally:
        ckpt.load_checkpoint = real_load
    report["resumed_at"] = resumed.global_step
    resumed.train(handle_signals=False)
    torch.save(resumed.model.state_dict(), out / f"params_resumed_{dist.rank}.pt")
    try:  # a checkpoint of a single-process run cannot continue on two ranks
        Trainer.from_run(out / "single", quiet=True, dist=dist)
        report["single"] = "resumed"
    except CheckpointError as exc:
        report["single"] = str(exc)
    (out / f"report_{dist.rank}.json").write_text(json.dumps(report))


def _fork(dist, out: Path) -> None:
    """``--fork`` on two ranks (what train.fork does, without the folder naming): a fork of the
    two-rank run ``full`` at a new learning rate, and a fork of the single-process run ``single``
    (which a resume refuses to continue on two ranks). Records where each began and ended, its
    learning rate and its parameters."""
    from ppo_tbptt.train import plan_fork
    from ppo_tbptt.trainer import Trainer
    report: dict = {}
    for name, source, overrides in (("fork", "full", ["ppo.lr=1e-4", "run.total_steps=384"]),
                                    ("fork_single", "single", ["run.total_steps=128"])):
        path, state, _, cfg, _ = plan_fork(out / source, overrides, dist)
        tr = Trainer(cfg, out / name, torch.device("cpu"), quiet=True, dist=dist, fork=state, fork_path=path)
        began = tr.global_step
        tr.train(handle_signals=False)  # (closes the envs)
        report[name] = {"checkpoint": path.name, "began": began, "ended": tr.global_step,
                        "lr": tr.optimizer.param_groups[0]["lr"]}
        torch.save(tr.model.state_dict(), out / f"params_{name}_{dist.rank}.pt")
    (out / f"fork_{dist.rank}.json").write_text(json.dumps(report))


def _learn(dist, out: Path) -> None:
    import numpy as np
    from ppo_tbptt import config as C
    from ppo_tbptt.trainer import Trainer
    cfg = C.load("cue_recall.yaml", ["run.torch_threads=1"])
    tr = Trainer(cfg, out / "learn", torch.device("cpu"), log=False, quiet=True, dist=dist)
    history = []
    try:
        while tr.global_step < cfg.run.total_steps:
            history.append(tr.train_update().get("charts/success", np.nan))
    finally:
        tr.close()
    if dist.is_main:
        (out / "success.json").write_text(json.dumps(history))


#: A curriculum for the session's ranks: CueRecall with delays 0, 1, 3 (tests/test_curriculum.py),
#: promoted at a success of 0.2 over 40 episodes (more than both ranks finish in their first update).
CURRICULUM = ["curriculum.stages=[{delay: 0}, {delay: 1}, {}]", "curriculum.window=40",
              "curriculum.threshold=0.2", "curriculum.share=0.5"]


def _curriculum(dist, out: Path, extra: list[str]) -> None:
    """Train a curriculum update by update; record per update the stage after it, every env's
    stage, the promotion window's size (rank 0's decides) and the rank's own episodes of the stage."""
    from eval_helpers import tiny_config
    from ppo_tbptt.trainer import Trainer
    tr = Trainer(tiny_config(*extra), out / f"cur{dist.rank}", torch.device("cpu"), log=False, quiet=True,
                 dist=dist)
    rep: dict = {"stages": [], "env_stages": [], "window": [], "local": []}
    collect = tr.collector.collect

    def counting():
        rollout, episodes = collect()
        rep["local"].append(sum(e.stage == tr.promotion.stage for e in episodes))
        return rollout, episodes

    tr.collector.collect = counting
    try:
        while tr.global_step < tr.cfg.run.total_steps:
            scalars = tr.train_update()
            rep["window"].append(scalars["curriculum/window_episodes"])
            rep["stages"].append(tr.promotion.stage)
            rep["env_stages"].append([e.stages.stage for e in tr.envs.envs])
    finally:
        tr.close()
    (out / f"curriculum_{dist.rank}.json").write_text(json.dumps(rep))


def _session(dist, out: Path, extra: list[str]) -> None:
    """The equivalence update, then training, resume and forks, in one start of the ranks (each start
    costs seconds of imports)."""
    _equivalence(dist, out)
    _train_and_resume(dist, out, extra)
    _fork(dist, out)
    _curriculum(dist, out, CURRICULUM)


TASKS = {"equivalence": _equivalence, "train_and_resume": _train_and_resume, "session": _session,
         "learn": _learn, "curriculum": _curriculum}
