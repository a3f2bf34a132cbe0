"""``python -m ppo_tbptt.benchmark --config NAME [--seconds S] [--set section.key=value ...]``

Throughput, measured side by side in one run on this machine:

1. the env-only ceiling: one env per process on every usable core, random actions, no IPC;
2. gymnasium's AsyncVectorEnv alone (random actions, the config's number of envs);
3. collection with the policy, no learning (the config's vector env, and AsyncVectorEnv), and the
   policy side's own ceiling: the same collector with envs that return at once;
4. end-to-end training (the config's vector env, and AsyncVectorEnv).

Prints a table of steps/s and each one's ratio to (1); ``--json`` writes the same figures. The
AsyncVectorEnv rows run the same collector and trainer, so the difference is the env side alone.
``--sweep 32x512,64x256,...`` instead measures the policy side, collection and end-to-end training
for each number of envs x rollout length (the env-only ceiling once) and prints one row per layout,
for choosing them on a machine.
Each measurement first runs one warm-up rollout or update (process start, CUDA and cuDNN set-up),
then whole rollouts or updates until ``--seconds`` have passed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .cli import DEVICE_HELP, add_common, device_arg
from .config import Config
from .envs.vector import PendingSteps, StepResult, deliver_obs, split_evenly


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .envs.pool import usable_cpus
    text = f"{usable_cpus()} usable CPU cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


# ---- (1) env-only ceiling ------------------------------------------------------------------------
def _env_only_worker(env_cfg, index: int, seconds: float, start, out) -> None:
    """One env in this process, random actions for ``seconds`` once every process is ready."""
    from .envs import env_fn, seed_stream
    env = env_fn(env_cfg, seed_stream(env_cfg.train_seeds, 12345, index))()
    env.reset()
    env.action_space.seed(index)
    actions = [env.action_space.sample() for _ in range(4096)]
    start.wait()  # a barrier: all processes start their clocks together
    steps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(64):
            _, _, term, trunc, _ = env.step(actions[steps % 4096])
            steps += 1
            if term or trunc:
                env.reset()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    out.put((steps, elapsed))
    env.close()


def env_only_ceiling(env_cfg, seconds: float, processes: int) -> dict:
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    start, out = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_env_only_worker, args=(env_cfg, i, seconds, start, out), daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    start.wait(timeout=300)
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    steps, elapsed = int(sum(s for s, _ in results)), float(max(e for _, e in results))
    return {"steps_per_second": steps / elapsed, "processes": processes, "steps": steps, "seconds": elapsed,
            "per_process": [s / e for s, e in results]}


# ---- (2) AsyncVectorEnv alone --------------------------------------------------------------------
def async_env_only(env_cfg, seconds: float) -> dict:
    from .envs import make_vector_env
    venv = make_vector_env(dataclasses.replace(env_cfg, vector="gym_async"), 12345)
    try:
        venv.reset()
        space = venv.single_action_space
        space.seed(0)
        acts = [np.stack([space.sample() for _ in range(venv.num_envs)]) for _ in range(256)]
        for a in acts[:8]:
            venv.step(a)  # warm-up
        steps, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            venv.step(acts[i % 256])
            steps += venv.num_envs
            i += 1
        elapsed = time.perf_counter() - t0
        return {"steps_per_second": steps / elapsed, "steps": steps, "seconds": elapsed}
    finally:
        venv.close()


# ---- (3) collection, (4) end-to-end -------------------------------------------------------------
class InstantVectorEnv:
    """A vector env whose steps cost nothing: every step returns one real observation of the
    config's env again, reward 0, no episode end. Collecting from it measures the policy side
    alone (inference, buffer writes, transfers, the collector's bookkeeping), in the same groups
    the config's vector env would form; what it leaves out is the value pass the collector makes
    on the final observations of truncated episodes."""

    def __init__(self, env_cfg, device_type: str):
        from .envs import env_fn, env_groups, seed_stream
        env = env_fn(env_cfg, seed_stream(env_cfg.train_seeds, 0, 0))()
        try:
            self.single_observation_space = env.observation_space
            self.single_action_space = env.action_space
            first, _ = env.reset()
        finally:
            env.close()
        self.num_envs = env_cfg.num_envs
        groups = 1 if env_cfg.vector == "gym_async" else env_groups(env_cfg, device_type)  # as make_vector_env
        self.groups = split_evenly(self.num_envs, groups)
        self._obs = np.broadcast_to(np.asarray(first), (self.num_envs, *np.shape(first)))
        self._pending = PendingSteps()

    def reset(self) -> np.ndarray:
        return self._obs.copy()

    def step_async(self, actions, group: int = 0) -> None:
        self._pending.start(group)

    def step_wait(self, group: int = 0, obs_out: np.ndarray | None = None):
        self._pending.finish(group)
        sl = self.groups[group]
        n = sl.stop - sl.start
        return StepResult(deliver_obs(self._obs[sl], obs_out), np.zeros(n, np.float32), np.zeros(n, bool),
                          np.zeros(n, bool), {}, [])

    def close(self) -> None:
        pass


def collection(cfg: Config, device: torch.device, seconds: float, instant: bool = False) -> dict:
    from .envs import make_vector_env
    from .model import build_model
    from .rollout import Collector
    from .trainer import collect_threads
    from .utils import seed_everything
    seed_everything(cfg.run.seed)
    threads = torch.get_num_threads()
    envs = InstantVectorEnv(cfg.env, device.type) if instant else make_vector_env(cfg.env, cfg.run.seed, device=device.type)
    try:
        model = build_model(envs.single_observation_space, envs.single_action_space, cfg.model).to(device)
        model.eval()
        col = Collector(envs, model, cfg.ppo.rollout_steps, device, cfg.model.reset_hidden_state)
        # the threads training collects with (run.collect_threads)
        torch.set_num_threads(collect_threads(cfg, device, torch.get_num_threads()))
        col.collect()  # warm-up
        steps, rollouts, wait0, t0 = 0, 0, col.wait_seconds, time.perf_counter()
        while rollouts == 0 or time.perf_counter() - t0 < seconds:
            col.collect()
            steps += cfg.ppo.rollout_steps * envs.num_envs
            rollouts += 1
        elapsed = time.perf_counter() - t0
        return {"steps_per_second": steps / elapsed, "steps": steps, "seconds": elapsed, "rollouts": rollouts,
                "env_wait_fraction": (col.wait_seconds - wait0) / elapsed}
    finally:
        torch.set_num_threads(threads)
        envs.close()


def end_to_end(cfg: Config, device: torch.device, seconds: float) -> dict:
    from .trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), device, log=False, quiet=True)
        try:
            trainer.train_update()  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            steps0, updates, t0 = trainer.global_step, 0, time.perf_counter()
            collect = update = 0.0
            while updates == 0 or time.perf_counter() - t0 < seconds:
                s = trainer.train_update()
                collect += s["time/collect_seconds"]
                update += s["time/update_seconds"]
                updates += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            steps = trainer.global_step - steps0
            m = trainer.model
            model = (f"{type(m.encoder).__name__} {cfg.model.hidden_layer} -> {cfg.model.core.upper()} "
                     f"{cfg.model.hidden_size}" + (", memoryless" if m.memoryless else ""))
            return {"steps_per_second": steps / elapsed, "steps": steps, "seconds": elapsed, "updates": updates,
                    "collect_seconds_per_update": collect / updates, "update_seconds_per_update": update / updates,
                    "obs_shape": list(trainer.envs.single_observation_space.shape), "model": model}
        finally:
            trainer.close()


def copy_rollout(rollout):
    """A copy of a :class:`~ppo_tbptt.rollout.Rollout` that shares no storage with it."""
    return dataclasses.replace(rollout, **{f.name: getattr(rollout, f.name).clone()
                                           for f in dataclasses.fields(rollout)
                                           if getattr(rollout, f.name) is not None})


def update_only(cfg: Config, device: torch.device, seconds: float) -> dict:
    """(c) The PPO update alone: the trainer collects one rollout after a warm-up update, then
    learns from copies of that recorded rollout again and again (GAE, sequences, epochs x
    minibatches: ``train_update`` itself, with its collection replaced by the copy)."""
    from .trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), device, log=False, quiet=True)
        try:
            trainer.train_update()  # warm-up, and the policy as training has it after one update
            torch.set_num_threads(trainer.collect_threads)
            try:
                recorded, _ = trainer.collector.collect()
            finally:
                torch.set_num_threads(trainer.learn_threads)
            recorded = copy_rollout(recorded)
            trainer.collector.collect = lambda: (copy_rollout(recorded), [])
            trainer.train_update()  # warm-up on the recorded rollout
            updates, learn, t0 = 0, 0.0, time.perf_counter()
            while updates == 0 or time.perf_counter() - t0 < seconds:
                learn += trainer.train_update()["time/update_seconds"]
                updates += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            return {"steps_per_second": updates * trainer.batch_size / learn, "steps": updates * trainer.batch_size,
                    "seconds": learn, "wall_seconds_updates": elapsed, "updates": updates,
                    "update_seconds_per_update": learn / updates, "threads": trainer.learn_threads}
        finally:
            trainer.close()


def describe_vector(cfg: Config, device: torch.device) -> str:
    from .envs import env_groups
    e = cfg.env
    groups = env_groups(e, device.type)
    if e.vector == "pool":
        from .envs.pool import worker_layout
        _, workers, _ = worker_layout(e.num_envs, e.envs_per_worker, groups)
        sizes = sorted({s.stop - s.start for s in workers})
        return f"pool: {len(workers)} workers x {'/'.join(map(str, sizes))} envs, {groups} group(s)"
    if e.vector == "gym_async":
        return "gymnasium AsyncVectorEnv"
    return f"serial, {groups} group(s)"


MEASUREMENTS = ("env_only", "async_env_only", "policy_only", "update_only", "collect", "async_collect", "train",
                "async_train")


def serial_bound(batch: int, env_rate: float, policy_rate: float, update_seconds: float) -> float:
    """The steps/s that the parts allow when they take turns on the cores, as training on a CPU
    does (one env group: the envs step while the policy waits, the policy acts while the envs wait,
    and learning follows collection): an update of B steps takes at least
    B / E + B / P + U seconds, so the rate is at most B / (B / E + B / P + U), with E the envs
    alone on every usable core (a), P the policy side alone (b) and U the update alone (c)."""
    return batch / (batch / env_rate + batch / policy_rate + update_seconds)


def run_benchmark(cfg: Config, device: torch.device, seconds: float, baselines: bool = True,
                  only: set | None = None, log=print) -> dict:
    from .envs.pool import usable_cpus
    n, T = cfg.env.num_envs, cfg.ppo.rollout_steps
    async_cfg = cfg.replace("env", vector="gym_async")
    plan = [("env_only", f"(a) env-only ceiling: {usable_cpus()} processes x 1 env, random actions, no IPC",
             usable_cpus(), lambda: env_only_ceiling(cfg.env, seconds, usable_cpus()))]
    if baselines:
        plan.append(("async_env_only", "gymnasium AsyncVectorEnv alone, random actions", n,
                     lambda: async_env_only(cfg.env, seconds)))
    plan.append(("policy_only", "(b) policy side alone: collection from envs that return at once", n,
                 lambda: collection(cfg, device, seconds, instant=True)))
    plan.append(("update_only", "(c) PPO update alone, on copies of one recorded rollout", n,
                 lambda: update_only(cfg, device, seconds)))
    plan.append(("collect", f"collection with the policy ({describe_vector(cfg, device)})", n,
                 lambda: collection(cfg, device, seconds)))
    if baselines and cfg.env.vector != "gym_async":
        plan.append(("async_collect", "collection with the policy (gymnasium AsyncVectorEnv)", n,
                     lambda: collection(async_cfg, device, seconds)))
    plan.append(("train", f"(d) end-to-end training ({describe_vector(cfg, device)})", n,
                 lambda: end_to_end(cfg, device, seconds)))
    if baselines and cfg.env.vector != "gym_async":
        plan.append(("async_train", "end-to-end training (gymnasium AsyncVectorEnv)", n,
                     lambda: end_to_end(async_cfg, device, seconds)))
    results = {}
    for key, label, envs, fn in plan:
        if only and key not in only:
            continue
        log(f"  measuring {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = fn()
        r.update(label=label, envs=envs, wall_seconds=time.perf_counter() - t0)
        results[key] = r
        log(f"    {r['steps_per_second']:,.0f} steps/s", file=sys.stderr, flush=True)
    report = {"config": {"env": cfg.env.id, "num_envs": n, "rollout_steps": T, "batch": n * T,
                       "vector": describe_vector(cfg, device), "core": cfg.model.core,
                       "hidden_size": cfg.model.hidden_size, "encoder_dtype": cfg.model.encoder_dtype,
                       "sequence_length": cfg.tbptt.sequence_length,
                       "epochs": cfg.ppo.epochs, "minibatches": cfg.ppo.minibatches},
            "device": str(device), "machine": machine_description(device), "seconds": seconds,
            "results": results}
    if all(k in results for k in ("env_only", "policy_only", "update_only")):
        e, p = results["env_only"]["steps_per_second"], results["policy_only"]["steps_per_second"]
        u = results["update_only"]["update_seconds_per_update"]
        bound = {"steps_per_second": serial_bound(n * T, e, p, u), "env_seconds_per_update": n * T / e,
                 "policy_seconds_per_update": n * T / p, "update_seconds_per_update": u}
        if "train" in results:
            bound["train_vs_bound"] = results["train"]["steps_per_second"] / bound["steps_per_second"]
        report["bound"] = bound
    return report


def format_table(report: dict) -> str:
    c = report["config"]
    res = report["results"]
    base = res.get("env_only", {}).get("steps_per_second")
    lines = [f"{c['env']}: {c['num_envs']} envs x {c['rollout_steps']} steps = {c['batch']:,} per update, "
             f"{c['core'].upper()} {c['hidden_size']}, encoder {c['encoder_dtype']}, "
             f"sequence length {c['sequence_length']}, "
             f"{c['epochs']} epochs x {c['minibatches']} minibatches; device {report['device']}",
             f"machine: {report['machine']}", "",
             "| measurement | envs | steps/s | ratio to env-only |", "|---|---:|---:|---:|"]
    for r in res.values():
        ratio = f"{r['steps_per_second'] / base:.2f}" if base else "-"
        extra = ""
        if "collect_seconds_per_update" in r:
            extra = (f" (per update: collect {r['collect_seconds_per_update']:.2f} s, "
                     f"learn {r['update_seconds_per_update']:.2f} s)")
        elif "update_seconds_per_update" in r:
            extra = (f" ({r['update_seconds_per_update']:.2f} s per update, {r['threads']} "
                     f"thread{'s' if r['threads'] != 1 else ''})")
        lines.append(f"| {r['label']}{extra} | {r['envs']} | {r['steps_per_second']:,.0f} | {ratio} |")
    b = report.get("bound")
    if b:
        ratio = f"{b['steps_per_second'] / base:.2f}" if base else "-"
        lines.append(f"| bound of (a)-(c) taking turns: B / (B/E + B/P + U) = {c['batch']:,} / "
                     f"({b['env_seconds_per_update']:.2f} + {b['policy_seconds_per_update']:.2f} + "
                     f"{b['update_seconds_per_update']:.2f} s) | {c['num_envs']} | {b['steps_per_second']:,.0f} | "
                     f"{ratio} |")
        if "train_vs_bound" in b:
            lines += ["", f"end-to-end training (d) reaches {b['train_vs_bound']:.0%} of the bound"]
    return "\n".join(lines)


SWEEP_ROWS = ("policy_only", "collect", "train")


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """``"32x512,64x256"`` -> ``[(32, 512), (64, 256)]`` (ValueError with the bad item)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--sweep: expected ENVSxSTEPS items like 64x256, got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def run_sweep(configs: list[Config], device: torch.device, seconds: float, log=print) -> dict:
    """The env-only ceiling once, then the policy side, collection and training per config."""
    from .envs.pool import usable_cpus
    log(f"  measuring the env-only ceiling ({usable_cpus()} processes) ...", file=sys.stderr, flush=True)
    ceiling = env_only_ceiling(configs[0].env, seconds, usable_cpus())
    log(f"    {ceiling['steps_per_second']:,.0f} steps/s", file=sys.stderr, flush=True)
    layouts = []
    for cfg in configs:
        log(f"  layout {cfg.env.num_envs} envs x {cfg.ppo.rollout_steps} steps:", file=sys.stderr, flush=True)
        layouts.append(run_benchmark(cfg, device, seconds, baselines=False, only=set(SWEEP_ROWS), log=log))
    return {"env_only": ceiling, "device": str(device), "machine": machine_description(device),
            "seconds": seconds, "layouts": layouts}


def format_sweep(sweep: dict) -> str:
    base = sweep["env_only"]["steps_per_second"]
    first = sweep["layouts"][0]["config"]
    lines = [f"{first['env']}, {first['core'].upper()} {first['hidden_size']}, encoder {first['encoder_dtype']}, "
             f"{first['epochs']} epochs x "
             f"{first['minibatches']} minibatches; device {sweep['device']}",
             f"machine: {sweep['machine']}",
             f"env-only ceiling: {base:,.0f} steps/s", "",
             "| envs x steps | batch | vector | policy side | collection | end-to-end | per update: collect / learn (s) "
             "| end-to-end / env-only |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for rep in sweep["layouts"]:
        c, r = rep["config"], rep["results"]
        t = r["train"]
        lines.append(f"| {c['num_envs']} x {c['rollout_steps']} | {c['batch']:,} | {c['vector']} | "
                     f"{r['policy_only']['steps_per_second']:,.0f} | {r['collect']['steps_per_second']:,.0f} | "
                     f"{t['steps_per_second']:,.0f} | {t['collect_seconds_per_update']:.2f} / "
                     f"{t['update_seconds_per_update']:.2f} | {t['steps_per_second'] / base:.2f} |")
    return "\n".join(lines)


COMPARE_ROWS = ("policy_only", "collect", "train")
_SUMMARISED = ("steps_per_second", "collect_seconds_per_update", "update_seconds_per_update")


def run_compare(named: list[tuple[str, Config]], device: torch.device, seconds: float, repeat: int = 1,
                rows: Sequence[str] = COMPARE_ROWS, log=print) -> dict:
    """The policy side, collection and end-to-end training of several configs, one after the
    other in one process (the same machine state), for a side-by-side table.

    With ``repeat`` > 1 the configs are measured in turn ``repeat`` times (A, B, ..., A, B, ...),
    so that the machine's drift hits each of them alike; each figure is then the median over the
    rounds (with its min-max), and a config's end-to-end ratio to the first config is the median of
    the ratios within each round."""
    runs = [{"name": name, "rounds": []} for name, _ in named]
    for k in range(repeat):
        for (name, cfg), run in zip(named, runs):
            log(f"  config {name}" + (f" (round {k + 1} of {repeat})" if repeat > 1 else "") + ":",
                file=sys.stderr, flush=True)
            rep = run_benchmark(cfg, device, seconds, baselines=False, only=set(rows), log=log)
            run["config"] = rep["config"]
            run["rounds"].append(rep["results"])
    for run in runs:
        run["results"] = _median_results(run["rounds"])
        if "train" in rows:
            ratios = [r["train"]["steps_per_second"] / first["train"]["steps_per_second"]
                      for r, first in zip(run["rounds"], runs[0]["rounds"])]
            run["train_ratio"] = {"median": statistics.median(ratios), "min": min(ratios),
                                  "max": max(ratios), "rounds": ratios}
    return {"device": str(device), "machine": machine_description(device), "seconds": seconds,
            "repeat": repeat, "configs": runs}


def _median_results(rounds: list[dict]) -> dict:
    """One config's measurements over the rounds: each row as in its first round, with the
    figures in ``_SUMMARISED`` replaced by their median over the rounds and their ``{name}_range``
    (min, max) added."""
    out = {}
    for key, first in rounds[0].items():
        row = dict(first)
        for f in _SUMMARISED:
            if f in first:
                vals = [r[key][f] for r in rounds]
                row[f] = statistics.median(vals)
                row[f + "_range"] = [min(vals), max(vals)]
        out[key] = row
    return out


def format_compare(report: dict) -> str:
    many = report.get("repeat", 1) > 1

    def rate(results: dict, key: str) -> str:
        if key not in results:
            return "-"
        r = results[key]
        lo, hi = r.get("steps_per_second_range", (None, None))
        return f"{r['steps_per_second']:,.0f}" + (f" ({lo:,.0f}-{hi:,.0f})" if many else "")

    lines = [f"device {report['device']}; machine: {report['machine']}"
             + (f"; medians of {report['repeat']} rounds (min-max), the configs measured in turn each round"
                if many else ""), "",
             "| config | env | obs | model | batch | policy side | collection | end-to-end | "
             "per update: collect / learn (s) | end-to-end vs first |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for rep in report["configs"]:
        c, r = rep["config"], rep["results"]
        t = r.get("train")
        model = t["model"] if t else "-"
        obs = "x".join(map(str, t["obs_shape"])) if t else "-"
        per_update = f"{t['collect_seconds_per_update']:.2f} / {t['update_seconds_per_update']:.2f}" if t else "-"
        ratio = "-"
        if "train_ratio" in rep:
            q = rep["train_ratio"]
            ratio = f"{q['median']:.2f}x" + (f" ({q['min']:.2f}-{q['max']:.2f})" if many else "")
        lines.append(f"| {rep['name']} | {c['env']} | {obs} | {model} | {c['batch']:,} | "
                     f"{rate(r, 'policy_only')} | {rate(r, 'collect')} | {rate(r, 'train')} | "
                     f"{per_update} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.benchmark",
                                description="Throughput on this machine, side by side: the env-only ceiling, "
                                            "collection with the policy, end-to-end training.")
    p.add_argument("--config", required=True, help="a shipped config's name (--list-configs in train) or a path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set env.num_envs=8")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement (default 20)")
    p.add_argument("--device", type=device_arg, default=None, help=f"{DEVICE_HELP} (overrides run.device)")
    p.add_argument("--no-baselines", action="store_true", help="skip the gymnasium AsyncVectorEnv rows")
    p.add_argument("--only", default="", help="comma-separated subset: " + ", ".join(MEASUREMENTS))
    p.add_argument("--sweep", default="", metavar="NxT,...",
                   help="compare layouts: envs x rollout steps, e.g. 32x512,64x256,128x128")
    p.add_argument("--compare", action="append", default=[], metavar="CONFIG",
                   help="also measure this config (repeatable; the same --set overrides apply to it) and "
                        "print the policy side, collection and end-to-end training of each side by side "
                        "(--only may name a subset of these three)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="with --compare: measure the configs in turn K times and report medians, min-max "
                        "and the median of each round's end-to-end ratio (default 1)")
    p.add_argument("--ranks", default="", metavar="W,...",
                   help="instead: end-to-end training as this many torchrun ranks each, e.g. 1,2 "
                        "(env.num_envs in all, split over the ranks; see ppo_tbptt.benchmark_ranks)")
    p.add_argument("--runs", default="", metavar="K,...",
                   help="instead: K training runs of the config side by side (seeds run.seed, run.seed+1, ...), "
                        "e.g. 1,2,4: each run's steps/s over the same --seconds, their total and each run's "
                        "share of the rate alone (see ppo_tbptt.benchmark_runs)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the figures as JSON")
    add_common(p)
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.repeat > 1 and not args.compare:
        p.error("--repeat applies to --compare")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"run.device={args.device}"] if args.device else [])
    from .train import config_and_device
    try:
        cfg, device = config_and_device(args.config, overrides)
    except ValueError as exc:  # ConfigError, or cuda asked for where there is none
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.runs:
        from .benchmark_runs import main_runs
        return main_runs(args, cfg, device, overrides)
    if args.ranks:
        from .benchmark_ranks import main_ranks
        return main_ranks(args, cfg, device, overrides)
    if cfg.run.torch_threads > 0:
        torch.set_num_threads(cfg.run.torch_threads)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(MEASUREMENTS)
    if unknown:
        print(f"error: --only: unknown {', '.join(sorted(unknown))} (known: {', '.join(MEASUREMENTS)})",
              file=sys.stderr)
        return 2
    if args.compare and (args.sweep or only - set(COMPARE_ROWS)):
        print("error: --compare measures policy_only, collect and train (--only may pick among them); "
              "it does not combine with --sweep or other measurements", file=sys.stderr)
        return 2
    if args.compare:
        try:
            named = [(name, config_and_device(name, overrides)[0]) for name in [args.config, *args.compare]]
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"benchmark comparison: {', '.join(n for n, _ in named)}, {args.seconds:g} s per measurement"
              + (f", {args.repeat} rounds" if args.repeat > 1 else ""), file=sys.stderr, flush=True)
        rows = [r for r in COMPARE_ROWS if not only or r in only]
        report = run_compare(named, device, args.seconds, repeat=args.repeat, rows=rows)
        print(format_compare(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0
    if args.sweep and only:
        print("error: --only does not apply to --sweep (it measures policy_only, collect and train)",
              file=sys.stderr)
        return 2
    if args.sweep:
        try:
            configs = [config_and_device(args.config, overrides + [f"env.num_envs={n}", f"ppo.rollout_steps={t}"])[0]
                       for n, t in parse_layouts(args.sweep)]
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"benchmark sweep: {args.config}, {len(configs)} layouts, {args.seconds:g} s per measurement",
              file=sys.stderr, flush=True)
        sweep = run_sweep(configs, device, args.seconds)
        print(format_sweep(sweep))
        if args.json:
            Path(args.json).write_text(json.dumps(sweep, indent=2))
        return 0
    print(f"benchmark: {args.config}, {args.seconds:g} s per measurement", file=sys.stderr, flush=True)
    report = run_benchmark(cfg, device, args.seconds, baselines=not args.no_baselines, only=only or None)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    sys.exit(main())
