"""Data-parallel training (ppo_tbptt.distributed) on CPU with gloo: two ranks as processes.

- the same update as one process over the same data (gradient weighting by real steps, global
  advantage normalisation, clipping of the averaged gradient);
- identical parameters on every rank; interrupted + resumed == uninterrupted; world-size errors;
- a fork on two ranks (of a two-rank or a single-process checkpoint), and of a two-rank checkpoint
  in one process;
- a signal to one rank (in-process) or to torchrun's group stops all ranks after the same update,
  with one checkpoint, every rank exiting 128 + signal;
- a killed rank ends the others (torchrun and bare gloo), nothing left behind; so does an env that
  keeps failing on one rank, and the last periodic checkpoint stays intact;
- env slices draw the levels of their global env indices;
- a curriculum's promotion is decided once, from every rank's episodes, for all ranks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_helpers import ROOT, free_port, rank_environ, replay_update, run_ranks, slice_rollout
from eval_helpers import TINY, metric_rows, tiny_config, train_tiny
from ppo_tbptt import checkpoint as ckpt
from ppo_tbptt import train as train_cli
from ppo_tbptt.distributed import Distributed, config_problems, derived_seed, env_share
from ppo_tbptt.envs import make_vector_env
from ppo_tbptt.trainer import Trainer
from ppo_tbptt.truncation import make_strategy
from test_checkpoint import alive, descendants

POSIX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")


# ---- pure parts -------------------------------------------------------------------------------------
def test_env_share_and_config_problems():
    assert [env_share(8, r, 4) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match=r"env.num_envs: 6 is the number of envs over all 4 ranks .* try 4 or 8"):
        env_share(6, 0, 4)
    cfg = tiny_config()  # 4 envs x 16 steps, chunks of 8, 2 minibatches
    assert config_problems(cfg, 1) == [] and config_problems(cfg, 2) == []
    assert config_problems(cfg, 3)[0].startswith("env.num_envs: 4 is the number of envs over all 3 ranks")
    (p,) = config_problems(tiny_config("ppo.minibatches=8"), 4)  # 1 env x 2 chunks per rank
    assert p.startswith("with 4 ranks of env.num_envs / 4 = 1 envs each: ppo.minibatches: 8 minibatches")
    assert derived_seed(5, 0) == 5 and len({derived_seed(5, r) for r in range(4)}) == 4
    assert Distributed.from_environment({}).world_size == 1  # not under torchrun: one process
    assert Distributed.from_environment({"WORLD_SIZE": "1", "RANK": "0"}).enabled is False


class TwoRanksInOneProcess(Distributed):
    """Rank 0 of two whose collectives see ``other`` (rank 1's strategy and rollout) in-process."""

    def __init__(self, other_strategy, other_rollout):
        super().__init__(0, 2)
        self.other_strategy, self.other_rollout = other_strategy, other_rollout

    def all_reduce(self, tensor, what, op="sum"):  # the truncation metrics: rank 1's ratios added
        ratios = self.other_strategy.ratios()
        keys = sorted(ratios)
        return tensor.add_(torch.tensor([ratios[k][i] for i in (0, 1) for k in keys], dtype=tensor.dtype))

    def gather_objects(self, obj, what):
        return [obj, self.other_rollout.episode_start]

    def broadcast_object(self, obj, what=""):
        return obj


@pytest.mark.parametrize("strategy", ["overlap", "random", "adaptive"])
def test_truncation_figures_and_the_adaptive_K_are_the_whole_runs(strategy):
    """Two ranks' halves of a rollout: the strategy's ratio figures (padding and prefix
    fractions, mean piece, delta_hat) and adaptive's K are those of one process over the whole
    rollout, not rank 0's."""
    from trunc_helpers import collect, tiny_config as trunc_config
    over = {"overlap": ["tbptt.strategy=overlap", "tbptt.sequence_length=6", "tbptt.stride=2"],
            "random": ["tbptt.strategy=random", "tbptt.sequence_length=0", "tbptt.mean_length=3"],
            "adaptive": ["tbptt.strategy=adaptive", "tbptt.adapt_window=12", "tbptt.adapt_burn_in=2",
                         "tbptt.adapt_tau=4", "tbptt.adapt_samples=16", "tbptt.k_min=2", "tbptt.k_max=12",
                         "tbptt.target_bias=0.02"]}[strategy]
    cfg = trunc_config(*over, "env.kwargs={num_cues: 3, delay: 7}")
    model, rollout = collect(cfg, rollouts=2)
    es = torch.zeros_like(rollout.episode_start)  # rank 0's envs: short episodes; rank 1's: none
    es[::3, :2] = True
    rollout.episode_start.copy_(es)
    halves = [slice_rollout(rollout, 0, 2), slice_rollout(rollout, 2, 4)]
    whole, ranks = make_strategy(cfg), [make_strategy(cfg), make_strategy(cfg)]
    if strategy == "random":  # no cuts, so that the ranks' pieces are the whole's: its fragments
        whole.cut_prob = ranks[0].cut_prob = ranks[1].cut_prob = 0.0
    whole.before_update(model, rollout)
    for st, half in zip(ranks, halves):
        st.before_update(model, half)
    if strategy == "adaptive":
        ranks[0].estimate = whole.estimate = dataclasses.replace(ranks[0].estimate)
        whole.choose(rollout.episode_start)
        dist = TwoRanksInOneProcess(ranks[1], halves[1])
        dist.sync_truncation(ranks[0], halves[0].episode_start)
        assert ranks[0].K == whole.K
        alone = make_strategy(cfg)
        alone.estimate = whole.estimate
        alone.choose(halves[0].episode_start)
        ranks[1].K, ranks[1].estimate = ranks[0].K, ranks[0].estimate
    whole.build(rollout)
    for st, half in zip(ranks, halves):
        st.build(half)
    want = whole.metrics()
    got = TwoRanksInOneProcess(ranks[1], halves[1]).truncation_metrics(ranks[0])
    rank0 = ranks[0].metrics()
    tags = {"overlap": ["tbptt/padding_fraction", "tbptt/prefix_fraction"], "random": ["tbptt/mean_piece"],
            "adaptive": ["tbptt/padding_fraction", "tbptt/prefix_fraction", "tbptt/delta_hat"]}[strategy]
    for tag in tags:
        assert got[tag] == pytest.approx(want[tag], rel=1e-12), tag
    assert any(rank0[t] != pytest.approx(want[t], rel=1e-6) for t in tags)  # rank 0's alone differ
    if strategy == "adaptive":
        assert alone.K != whole.K  # rank 0's rollout alone would choose another K


def test_list_and_print_config_under_torchrun_print_once_and_join_no_group(monkeypatch, capsys):
    """--list-configs and --print-config train nothing: rank 0 prints, the other ranks print
    nothing, and no process group is joined (WORLD_SIZE 2 without MASTER_ADDR would fail to)."""
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert train_cli.main(["--list-configs"]) == 0
        assert train_cli.main(["--config", "cue_recall", "--print-config"]) == 0
        out, err = capsys.readouterr()
        assert ("cue_recall.yaml" in out and "num_envs:" in out) == printed and (out == "") != printed, out
        assert err == ""


@pytest.mark.parametrize("vector", ["serial", "pool"])
def test_an_env_slice_draws_the_levels_of_its_global_indices(vector):
    """Rank 1 of 2 stepping envs 2 and 3 plays the levels a single process plays in its envs 2 and 3;
    with a pool also after one of its workers was killed and replaced (the replacement rebuilds the
    envs of the same global indices)."""
    cfg = tiny_config(f"env.vector={vector}", "env.envs_per_worker=1")
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 3, 4) for _ in range(12)]
    with make_vector_env(cfg.env, 7) as whole, make_vector_env(cfg.env, 7, num_envs=2, first_env=2) as part:
        whole.reset()
        part.reset()
        seen_whole, seen_part = [], []
        for t, a in enumerate(actions):
            if vector == "pool" and t == 6:
                part.on_warning = lambda message: None
                os.kill(part.pids[1], signal.SIGKILL)
            seen_whole += [(e.env_index, e.seed) for e in whole.step(a).episodes if e.env_index >= 2]
            seen_part += [(e.env_index + 2, e.seed) for e in part.step(a[2:]).episodes]
        assert vector != "pool" or part.restarts == 1
    assert seen_part == seen_whole and len(seen_whole) >= 4


# ---- the update equals a single process's over the same data -----------------------------------------
def _plans(sizes: list[int]) -> list[list[list[torch.Tensor]]]:
    """Per rank, per epoch: deliberately lopsided minibatches (one sequence on rank 0 against all
    but one on rank 1), so the ranks' real-step counts differ a lot in every minibatch step."""
    g = torch.Generator().manual_seed(3)
    out = []
    for r, s in enumerate(sizes):
        perm = torch.randperm(s, generator=g)
        cut = s // 3 if r == 0 else 2 * s // 3
        first = [torch.arange(1), torch.arange(1, s)] if r == 0 else [torch.arange(s - 1), torch.tensor([s - 1])]
        out.append([first, [perm[:cut], perm[cut:]]])
    return out


EXTRA = ["tbptt.strategy=random", "tbptt.mean_length=3", "run.total_steps=320", "run.checkpoint_every=64",
         "run.eval_every=128", "run.eval_episodes=4"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One start of two ranks for the tests below: the equivalence update over prepared data, then
    the training, interruption and resume of ``EXTRA``. Returns the folder and the single
    process's reference update."""
    out = tmp_path_factory.mktemp("two_ranks")
    overrides = ["ppo.max_grad_norm=0.05", "env.kwargs.delay=3"]
    cfg = tiny_config(*overrides)
    ref = Trainer(cfg, out / "ref", torch.device("cpu"), log=False, quiet=True)
    try:
        ref.collector.collect()  # a rollout with episodes under way and ended
        rollout, _ = ref.collector.collect()
        rollout = slice_rollout(rollout, 0, cfg.env.num_envs)
        init = {k: v.clone() for k, v in ref.model.state_dict().items()}
        sizes = [make_strategy(cfg).build(slice_rollout(rollout, lo, lo + 2)).num_sequences for lo in (0, 2)]
        plans = _plans(sizes)
        # the single process's minibatch j is the union of the ranks' minibatches j (its sequences
        # are env by env: rank 0's, then rank 1's)
        union = [[torch.cat([plans[0][e][j], sizes[0] + plans[1][e][j]]) for j in range(2)] for e in range(2)]
        torch.save({"overrides": overrides, "init": init, "rollout": rollout, "plans": plans}, out / "data.pt")
        expected = replay_update(ref, slice_rollout(rollout, 0, 4), union)
    finally:
        ref.close()
    train_tiny(out / "single", "run.total_steps=64")
    run_ranks("session", 2, out, extra=EXTRA)
    return out, expected, plans


def test_two_ranks_take_the_update_of_one_process_over_the_same_data(two_ranks):
    """2 ranks x 2 envs against 1 process x 4 envs, over one collected rollout, with the union of
    the ranks' minibatches as the single process's minibatches: the gradients at every optimizer
    step, the parameters after the update and the logged losses agree to float precision. The
    minibatches hold very different numbers of real steps per rank (episodes of 5 steps cut chunks
    of 8; one sequence against all but one), advantages are normalised and the gradient is clipped."""
    out, expected, plans = two_ranks
    counts = [[int(m.numel()) for m in plans[r][0]] for r in range(2)]
    assert counts[0][0] == 1 and counts[1][0] >= 6  # lopsided
    assert expected["scalars"]["losses/grad_norm"] > 0.05  # clipping acts
    results = [torch.load(out / f"result_{r}.pt", weights_only=False) for r in range(2)]
    for res in results:
        assert len(res["grads"]) == len(expected["grads"]) == 4
        for step, (got, want) in enumerate(zip(res["grads"], expected["grads"])):
            scale = max(float(w.abs().max()) for w in want)
            err = max(float((g - w).abs().max()) for g, w in zip(got, want))
            assert err <= 1e-5 * scale, f"minibatch step {step}: gradient off by {err:.3g} (scale {scale:.3g})"
        for k, want in expected["params"].items():
            assert torch.allclose(res["params"][k], want, rtol=0, atol=1e-6), k
        for k in ("losses/policy", "losses/value", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                  "losses/grad_norm", "losses/explained_variance", "tbptt/sequences_per_batch",
                  "tbptt/padding_fraction"):
            assert res["scalars"][k] == pytest.approx(expected["scalars"][k], rel=1e-4, abs=1e-7), k
    for k in results[0]["params"]:  # and the ranks agree bit for bit
        assert torch.equal(results[0]["params"][k], results[1]["params"][k]), k


# ---- identical parameters, resume, world size ---------------------------------------------------------
def test_ranks_stay_identical_and_an_interrupted_run_resumes_bit_exact(two_ranks):
    """Two ranks (random truncation: per-rank cut samplers; periodic evaluation on rank 0): after 5
    updates their parameters are bit-identical; a run that one rank's signal stops after update 2
    (both ranks stop there, one checkpoint), resumed, logs exactly what the uninterrupted run logs
    and ends with the same parameters (rank 0 alone reads the checkpoint); a resume that changes
    env.num_envs is refused by field on both ranks; a single-process checkpoint refuses to resume
    on 2 ranks."""
    tmp_path = two_ranks[0]
    full = [torch.load(tmp_path / f"params_full_{r}.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / f"params_resumed_{r}.pt") for r in range(2)]
    for k in full[0]:
        assert torch.equal(full[0][k], full[1][k]) and torch.equal(resumed[0][k], resumed[1][k]), k
        assert torch.equal(resumed[0][k], full[0][k]), k
    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert rep["interrupted"] == signal.SIGTERM and rep["stopped_at"] == 128 == rep["resumed_at"]
        assert "written by a run of 1 process (ranks), this one has 2" in rep["single"]
        assert rep["frozen"].startswith("env.num_envs: the run has 4, the resume asks for 8; a resume cannot change it")
    rows = metric_rows(tmp_path / "full")
    assert [r["global_step"] for r in rows] == [64, 128, 192, 256, 320]  # one row per update, rank 0's
    assert metric_rows(tmp_path / "part") == rows
    assert any("eval/success" in r for r in rows) and (tmp_path / "full" / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir() if p.name.startswith("step_")) \
        == [f"step_{s:012d}.pt" for s in (192, 256, 320)]  # keep_checkpoints 3; none from rank 1
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "full"))
    parts = state["distributed"]["ranks"]
    assert state["distributed"]["world_size"] == 2 and len(parts) == 2
    assert all(len(p["collector"]["envs"]["envs"]) == 2 for p in parts)  # each rank's own 2 envs
    assert not torch.equal(parts[0]["rng"]["torch"], parts[1]["rng"]["torch"])  # per-rank streams
    assert parts[0]["truncation"]["generator"].tolist() != parts[1]["truncation"]["generator"].tolist()


def test_a_fork_on_two_ranks_branches_from_rank_0s_checkpoint_and_a_single_process_forks_theirs(two_ranks):
    """``--fork`` under two ranks (dist_helpers._fork, in the same start of the ranks): from the
    two-rank run's last checkpoint at a new learning rate, both ranks begin at its step, train with
    the new rate and stay bit-identical; a single-process checkpoint, which a resume refuses to
    continue on two ranks, forks onto them. And back: the two-rank checkpoint forks in one process."""
    out = two_ranks[0]
    reps = [json.loads((out / f"fork_{r}.json").read_text()) for r in range(2)]
    assert reps[0] == reps[1]
    assert reps[0]["fork"] == {"checkpoint": f"step_{320:012d}.pt", "began": 320, "ended": 384, "lr": 1e-4}
    assert {k: v for k, v in reps[0]["fork_single"].items() if k != "lr"} == {
        "checkpoint": f"step_{64:012d}.pt", "began": 64, "ended": 128}
    full = torch.load(out / "params_full_0.pt")
    for name, origin in (("fork", full), ("fork_single", ckpt.load_checkpoint(out / "single" / "checkpoints"
                                                                            / f"step_{64:012d}.pt")["model"])):
        params = [torch.load(out / f"params_{name}_{r}.pt") for r in range(2)]
        for k in params[0]:
            assert torch.equal(params[0][k], params[1][k]), (name, k)
        assert any(not torch.equal(params[0][k], origin[k]) for k in params[0]), f"{name} did not train"
    rows = metric_rows(out / "fork")
    assert [r["global_step"] for r in rows] == [384] and rows[0]["charts/learning_rate"] == pytest.approx(1e-4)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "fork"))
    assert state["global_step"] == 384 and state["distributed"]["world_size"] == 2

    path, saved, _, cfg, _ = train_cli.plan_fork(out / "full", ["run.total_steps=384"])
    assert saved["distributed"]["world_size"] == 2
    one = Trainer(cfg, out / "fork_one", torch.device("cpu"), quiet=True, fork=saved, fork_path=path)
    assert one.global_step == 320 and all(torch.equal(v, full[k]) for k, v in one.model.state_dict().items())
    one.train(handle_signals=False)
    assert one.global_step == 384 and "distributed" not in ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "fork_one"))


def test_two_ranks_take_one_curriculum_decision_from_all_their_episodes(two_ranks):
    """A curriculum on two ranks (dist_helpers.CURRICULUM, in the same start of the ranks): rank 0's
    promotion window holds every rank's episodes of the stage, and both ranks (their promotion
    state and every env) move to the next stage after the same update."""
    out = two_ranks[0]
    reps = [json.loads((out / f"curriculum_{r}.json").read_text()) for r in range(2)]
    assert reps[0]["stages"] == reps[1]["stages"] and reps[0]["env_stages"] == reps[1]["env_stages"]
    assert reps[0]["stages"][0] == 0 and reps[0]["stages"][-1] == 2  # promoted twice, in step
    for rep in reps:
        assert all(set(s) == {t} for s, t in zip(rep["env_stages"], rep["stages"]))
    # the first update (stage 0, 16 two-step episodes per rank): rank 0's window holds both ranks'
    assert reps[0]["window"][0] == reps[0]["local"][0] + reps[1]["local"][0] > reps[0]["local"][0]
    assert set(reps[1]["window"]) == {0}  # rank 1 holds no window: it follows rank 0's decision


def test_a_two_rank_checkpoint_refuses_a_single_process_resume(tmp_path, capsys):
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=64")
    path = ckpt.latest_checkpoint(run)
    state = ckpt.load_checkpoint(path)
    part = {k: state[k] for k in ("rng", "shuffle_generator", "collector", "truncation")}
    state["distributed"] = {"world_size": 2, "ranks": [part, part]}
    ckpt.atomic_save(state, path)
    assert train_cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "\n" not in err
    assert "written by a run of 2 processes (ranks), this one has 1" in err and "torchrun with 2 processes" in err


# ---- whole processes: signals and a killed rank --------------------------------------------------------
def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy",
                PYGAME_HIDE_SUPPORT_PROMPT="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _train_args(tmp_path: Path, vector: str) -> list[str]:
    over = [a for o in TINY if not o.startswith("run.total_steps") for a in ("--set", o)]
    return ["-m", "ppo_tbptt.train", "--config", "cue_recall", *over, "--set", "run.total_steps=10000000",
            "--set", f"run.out_dir={tmp_path}", "--run-name", "r", "--set", f"env.vector={vector}",
            "--set", "env.envs_per_worker=1"]


def _wait_for_update(proc, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    for line in proc.stdout:
        if line.startswith("update "):
            return
        assert time.time() < deadline, "no update line in time"
    pytest.fail(f"training ended before its first update: {proc.stderr.read()}")


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@POSIX
def test_a_signal_to_the_torchrun_group_stops_every_rank_after_the_same_update(tmp_path, capsys):
    """Ctrl-C's SIGINT to torchrun's process group (the ranks run in sessions of their own; the
    agent forwards the signal): both ranks finish the update, rank 0 writes one checkpoint and the
    metrics, both exit 128 + SIGINT. The run then refuses a plain single-process resume."""
    port = free_port()
    train_args = _train_args(tmp_path, "serial")[2:]  # (after "-m ppo_tbptt.train")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", str(ROOT / "tests" / "rank_entry.py"), str(tmp_path), *train_args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _wait_for_update(proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    codes = [int((tmp_path / f"rank{r}.rc").read_text()) for r in range(2)]
    assert codes == [128 + signal.SIGINT] * 2, err[-3000:]
    assert "SIGINT received" in out and "interrupted at" in out and out.count("interrupted at") == 1
    run = tmp_path / "r"
    files = [p.name for p in (run / "checkpoints").iterdir()]
    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["global_step"]
    assert files == [f"step_{step:012d}.pt"] and step % 64 == 0
    assert [r["global_step"] for r in metric_rows(run)] == list(range(64, step + 1, 64))  # one row per update
    assert train_cli.main(["--resume", str(run)]) == 2
    assert "written by a run of 2 processes" in capsys.readouterr().err


def _rank_pids(pids: set[int]) -> dict[int, int]:
    """rank -> pid of the training processes among ``pids`` (not torchrun, not env workers)."""
    out = {}
    for pid in pids:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"ppo_tbptt.train" in cmd and b"torch.distributed.run" not in cmd:
            out.update({int(v[5:]): pid for v in env if v.startswith(b"RANK=")})
    return out


@POSIX
@pytest.mark.parametrize("launcher", ["torchrun", "gloo"])
def test_a_killed_rank_stops_the_others_and_leaves_nothing_behind(tmp_path, launcher):
    """kill -9 of rank 1 in the middle of training. Under torchrun (envs in worker pools) the agent
    ends the group and reports the dead rank; with bare gloo (no agent, as for a rank on another
    machine) rank 0's next collective fails at once and it exits 1 with a one-line error. Either
    way within seconds, and no process or shared memory of either rank is left."""
    shm_before = _shm()
    port = free_port()
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", *_train_args(tmp_path, "pool")]
        top = [subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)]
    else:
        top = [subprocess.Popen([sys.executable, *_train_args(tmp_path, "serial")], cwd=tmp_path,
                                env=_env(**rank_environ(r, 2, port)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True) for r in range(2)]
    try:
        _wait_for_update(top[0])
        everything = set().union(*(descendants(p.pid) | {p.pid} for p in top))
        ranks = _rank_pids(everything)
        assert sorted(ranks) == [0, 1]
        if launcher == "torchrun":
            assert len(everything) >= 3 + 2 * 3, everything  # torchrun, 2 ranks, each: forkserver + 2 workers
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        out, err = top[0].communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        for p in top:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert top[0].returncode not in (0, None) and took < 30, (took, err[-3000:])
    if launcher == "torchrun":
        assert "exitcode  : -9" in err or "Signal 9" in err, err[-3000:]
    else:
        assert top[0].returncode == 1, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert lines and "rank 0 of 2" in lines[-1] and "another rank died or stopped answering" in lines[-1], err
    end = time.time() + 15
    while any(alive(p) for p in everything) and time.time() < end:
        time.sleep(0.1)
    assert not [p for p in everything if alive(p)], "processes outlived the run"
    end = time.time() + 10
    while _shm() - shm_before and time.time() < end:
        time.sleep(0.1)
    assert not (_shm() - shm_before), _shm() - shm_before


@POSIX
def test_an_env_that_keeps_failing_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    """From some update on, every episode's second step raises in rank 1's env workers only. Rank
    1's pool replaces the worker twice (warnings), then gives up: rank 1 exits 1 with one
    ``error: rank 1 of 2: ...`` line and saves nothing (a checkpoint needs every rank, and no
    update-boundary copy is kept under torchrun); rank 0's next collective fails and it exits 1
    with the one-line lost-rank error, within seconds, never a hang. The periodic checkpoint of the
    last whole update stays intact and matches the last metrics row; no process or shared memory
    is left behind."""
    shm_before = _shm()
    port = free_port()
    poison = tmp_path / "poison"
    args = _train_args(tmp_path, "pool") + ["--set", "env.id=pool_envs:Exploding-v0",
             "--set", f"env.kwargs={{explode_at: 2, poison: '{poison}', rank: 1}}", "--set", "run.checkpoint_every=64"]
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    top = [subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=dict(_env(**rank_environ(r, 2, port)),
                                                                             PYTHONPATH=pythonpath),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
           for r in range(2)]
    try:
        _wait_for_update(top[0])
        everything = set().union(*(descendants(p.pid) | {p.pid} for p in top))
        t0 = time.monotonic()
        poison.touch()
        errs = [p.communicate(timeout=90)[1] for p in top]
        took = time.monotonic() - t0
    finally:
        for p in top:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in top] == [1, 1] and took < 60, (took, errs[0][-2000:], errs[1][-2000:])
    lines1 = [line for line in errs[1].splitlines() if not line.startswith("warning:")]
    assert len(lines1) == 1 and lines1[0].startswith("error: rank 1 of 2: ") and "Traceback" not in errs[1], errs[1]
    # the env's own error, whether the last failure came from a step ("...: step raised ValueError:
    # boom") or from the replay that restores a replaced worker's episodes ("failed: ValueError: boom")
    assert "ValueError: boom" in lines1[0] and "the same worker failed 3 times in a row" in lines1[0]
    assert "without saving" in lines1[0] and "is intact" in lines1[0]
    assert errs[1].count("warning: rank 1 of 2: ") == 2 and "replacing it" in errs[1]
    lines0 = [line for line in errs[0].splitlines() if line.startswith("error:")]
    assert len(lines0) == 1 and "rank 0 of 2" in lines0[0] and "another rank died or stopped answering" in lines0[0], \
        errs[0]
    run = tmp_path / "r"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))  # intact, and the last whole update's
    assert state["distributed"]["world_size"] == 2
    assert state["global_step"] == metric_rows(run)[-1]["global_step"] >= 64
    assert not list((run / "checkpoints").glob("*.tmp"))
    end = time.time() + 15
    while any(alive(p) for p in everything) and time.time() < end:
        time.sleep(0.1)
    assert not [p for p in everything if alive(p)], "processes outlived the run"
    end = time.time() + 10
    while _shm() - shm_before and time.time() < end:
        time.sleep(0.1)
    assert not (_shm() - shm_before), _shm() - shm_before


@pytest.mark.slow
def test_cue_recall_learns_with_two_ranks(tmp_path):
    """cue_recall.yaml's 16 envs as 2 ranks x 8: it learns as one process does (test_learning)."""
    run_ranks("learn", 2, tmp_path, timeout=600)
    history = json.loads((tmp_path / "success.json").read_text())
    final = float(np.nanmean(history[-10:]))
    print(f"CueRecall on 2 ranks: success over the last 10 updates {final:.3f}")
    assert final >= 0.9
