"""``python -m ppo_tbptt.train --config NAME_OR_PATH [--set section.key=value ...]``
``python -m ppo_tbptt.train --resume runs/<name> [--set run.total_steps=N]``
``python -m ppo_tbptt.train --fork runs/<name>[/checkpoints/step_N.pt] [--run-name NEW] [--set ...]``

Exit codes: 0 done; 2 bad input (config, missing/truncated/mismatched checkpoint); 128 + signal
number when SIGINT/SIGTERM stopped training after saving a checkpoint.

Under ``torchrun --nproc_per_node=G -m ppo_tbptt.train ...`` every process is one rank of a
data-parallel run (:mod:`ppo_tbptt.distributed`); with one process this is a plain run. A rank that
loses the others (one died or stopped answering) exits with code 1 and a one-line error.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .cli import DEVICE_HELP, add_common, device_arg
from .config import ConfigError, apply_overrides, dump_yaml, load, resolve_path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.train",
                                description="Train a recurrent PPO agent with truncated BPTT.")
    p.add_argument("--config", default=None,
                   help="a shipped config's name (e.g. mortar_mayhem_grid.yaml; --list-configs) or a path")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint (config from the checkpoint)")
    p.add_argument("--fork", default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                   help="start a new run from a checkpoint (a run folder's latest, or a checkpoint file): "
                        "its weights, optimizer, step and curriculum stage, with any --set (reset "
                        "parameters and curriculum stages too); the episodes start afresh and the "
                        "original run is left as it is")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set ppo.lr=3e-4 --set env.kwargs.delay=12")
    p.add_argument("--device", type=device_arg, default=None,
                   help=f"training device: {DEVICE_HELP} (overrides run.device)")
    p.add_argument("--run-name", default=None, help="run folder name under run.out_dir (must not exist)")
    p.add_argument("--exact", action="store_true",
                   help="train --config as it is on a machine without CUDA too (by default a config with "
                        "run.cpu_config, such as the published mortar_mayhem_grid.yaml, trains that reduced "
                        "CPU config instead when run.device is auto and there is no GPU)")
    p.add_argument("--track", action="store_true",
                   help="track the run in Weights & Biases as well (run.track=wandb; needs wandb installed; "
                        "WANDB_MODE=offline works without an account)")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (--config, --resume or --fork, with --set) as YAML and exit "
                        "without training")
    add_common(p)
    args = p.parse_args(argv)
    if args.list_configs:
        return args
    if sum(x is not None for x in (args.config, args.resume, args.fork)) != 1:
        p.error("give exactly one of --config (new run), --resume RUN_DIR or --fork RUN_DIR_OR_CHECKPOINT")
    if args.resume and args.run_name:
        p.error("--run-name does not apply to --resume (the run keeps its folder)")
    return args


def config_and_device(config: str, overrides: list[str]):
    """A command line's config (with ``--set`` overrides) and its resolved ``run.device``; raises
    ValueError (ConfigError is one) with the message to print."""
    from .utils import resolve_device
    cfg = load(config, overrides)
    return cfg, resolve_device(cfg.run.device)


def check_folder_name(what: str, name: str) -> None:
    """A run name must be one folder name: nothing that leaves run.out_dir or nests folders."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or name != name.strip())
    if bad:
        raise ValueError(f"{what} {name!r}: must be a single folder name inside run.out_dir "
                         "(no '/' or '\\', not '.' or '..', no leading or trailing spaces)")


def make_run_dir(out_dir: str, run_name: str | None, default_prefix: str, seed: int) -> Path:
    """Create the run folder ``out_dir/run_name`` (default name: prefix, seed, start time).
    Raises ValueError with the message to print (an existing run, a folder that cannot be made)."""
    root = Path(out_dir)
    if run_name is not None:
        check_folder_name("--run-name", run_name)
        path = root / run_name
        if path.exists():
            raise FileExistsError(f"run folder {path} already exists; choose another --run-name")
    else:
        base = f"{default_prefix}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        path, i = root / base, 1
        while path.exists():
            i += 1
            path = root / f"{base}-{i}"
    try:
        path.mkdir(parents=True)
    except OSError as exc:  # a file where a folder should be, no permission, an unreachable parent
        blocker = next((p for p in [root, *root.parents] if p.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
               else exc.strerror or type(exc).__name__)
        raise ValueError(f"run.out_dir={out_dir!r}: cannot create the run folder {path}: {why}") from None
    return path


def resume(args, overrides: list[str], dist=None) -> int:
    from .checkpoint import CheckpointError
    from .trainer import Trainer
    from .envs.wrappers import EnvStateError
    run_dir = Path(args.resume)
    if run_dir.is_file():
        print(f"error: --resume takes the run folder, not a checkpoint file: try --resume "
              f"{run_dir.parent.parent if run_dir.parent.name == 'checkpoints' else run_dir.parent}",
              file=sys.stderr)
        return 2
    from .resume import plan_resume
    try:
        plan = plan_resume(run_dir, overrides, dist)  # (with ranks: rank 0 reads, the others receive)
        done, total = plan.steps_done, plan.cfg.run.total_steps
        if done >= total:  # (every rank has the same plan: all return the same code, rank 0 says why)
            again = f"python -m ppo_tbptt.train --resume {run_dir} --set run.total_steps=N"
            if total == plan.previous.run.total_steps:  # a finished run, resumed as it is
                if dist is None or dist.is_main:
                    print(f"nothing to train: {run_dir} has trained {done:,} env steps of its run.total_steps "
                          f"{total:,}; to train further: {again} (N > {done:,})", flush=True)
                return 0
            print(f"error: run.total_steps={total:,} is not above the {done:,} env steps {run_dir} has "
                  f"trained already; to train further: {again} with N > {done:,}", file=sys.stderr)
            return 2
        trainer = Trainer.from_plan(plan, dist=dist)
    except ConfigError as exc:
        print(f"error: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    except (CheckpointError, EnvStateError, ValueError) as exc:  # EnvConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.dist.is_main:
        print(f"resuming {run_dir} from {trainer.resumed_from} at step {trainer.global_step:,}  "
              f"device: {trainer.device}{_ranks(trainer.dist)}", flush=True)
    return run(trainer)


def plan_fork(source: Path, overrides: list[str], dist=None):
    """``(checkpoint path, its contents, the config it was written with, the fork's config,
    lines to show: notes, warnings)`` for ``--fork source``: the checkpoint's config with the
    overrides, any field allowed. As on resume, a larger ``run.total_steps`` keeps the horizon of
    the schedules that ran over the old total (:func:`resume.pin_schedule_horizons`; an explicit
    ``--set`` wins). Raises CheckpointError or ConfigError (ValueError: nothing left to train)."""
    from . import checkpoint as ckpt
    from .config import from_dict
    from .parallel import SINGLE
    from .resume import keep_schedule_horizons, lr_scale_changes, schedule_changes
    path, state = (SINGLE if dist is None else dist).load_latest(source)
    for key in ("optimizer", "global_step", "update"):
        if key not in state:
            raise ckpt.CheckpointError(f"checkpoint {path}: no '{key}' entry; it holds weights only "
                                       "and cannot be forked (a new run can still start from scratch)")
    try:
        previous = from_dict(state["config"])
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: config invalid: " + "; ".join(exc.problems)) from None
    raw, problems = apply_overrides(state["config"], overrides)
    if problems:
        raise ConfigError(problems)
    cfg = from_dict(raw)
    done = int(state["global_step"])
    if cfg.run.total_steps <= done:
        raise ValueError(f"run.total_steps={cfg.run.total_steps:,} is not above the {done:,} env steps of "
                         f"checkpoint {path}: --set run.total_steps=N with N > {done:,}")
    added_head = previous.model.recall_lags == 0 and cfg.model.recall_lags > 0
    if cfg.model.recall_lags != previous.model.recall_lags and not added_head:
        raise ConfigError([f"model.recall_lags: the checkpoint's model has {previous.model.recall_lags}, the fork asks "
                           f"for {cfg.model.recall_lags}; a fork can add a recall head to a model without one, "
                           "not change or remove one (a new run can)"])
    cfg, note = keep_schedule_horizons(state["config"], previous, cfg, overrides, done)
    notes, warnings = lr_scale_changes(previous, cfg, state, "fork")
    if added_head:
        notes.append(f"model.recall_lags 0 -> {cfg.model.recall_lags}: the recall head is drawn afresh; "
                     "every other weight and Adam moment comes from the checkpoint")
    if cfg.model.chrono_init != previous.model.chrono_init:
        warnings.append(f"model.chrono_init {previous.model.chrono_init} -> {cfg.model.chrono_init} changes "
                        "nothing: it only draws the initial weights, and a fork starts from the checkpoint's")
    return path, state, previous, cfg, [f"note: {line}" for line in ([note] if note else []) + notes] + [
        f"warning: {line}" for line in schedule_changes(previous, cfg, done, "fork") + warnings]


def copy_metrics(source_run: Path, run_dir: Path, step: int) -> bool:
    """Copy ``source_run``'s metrics.jsonl rows up to ``step`` into ``run_dir`` (the fork's curve
    then begins where its origin's ends); False if it has none."""
    import json
    src = Path(source_run) / "metrics.jsonl"
    if not src.is_file():
        return False
    kept = []
    for line in src.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # (a row cut by a crash)
        if isinstance(row, dict) and int(row.get("global_step", 0)) <= step:
            kept.append(line)
    (Path(run_dir) / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))
    return True


def fork(args, overrides: list[str], dist=None) -> int:
    import json
    from .checkpoint import CheckpointError
    source = Path(args.fork)
    try:
        path, state, _, cfg, lines = plan_fork(source, overrides, dist)
        from .utils import resolve_device
        device = dist.place(cfg, resolve_device(cfg.run.device))
    except (CheckpointError, ValueError) as exc:  # ConfigError is a ValueError
        return error(exc)
    step = int(state["global_step"])
    # the run the checkpoint belongs to: the folder given, or the one above a checkpoints/ folder
    origin_run = (source if source.is_dir() else
                  path.parent.parent if path.parent.name == "checkpoints" else None)

    def record(run_dir: Path) -> None:
        copied = origin_run is not None and copy_metrics(origin_run, run_dir, step)
        (run_dir / "fork.json").write_text(json.dumps(
            {"checkpoint": str(path.resolve()), "step": step, "overrides": overrides,
             "metrics_from": str(origin_run.resolve()) if copied else None}, indent=1) + "\n")
        if not copied:
            lines.append(f"note: no metrics.jsonl of the run of {path} found: the fork's curve begins at "
                         f"step {step:,}")

    def say(trainer) -> None:
        if trainer.dist.is_main:
            for line in lines:
                (trainer.warn(line[len("warning: "):]) if line.startswith("warning: ")
                 else trainer.say(line))

    origin_name = cfg.run.name or (origin_run.name if origin_run is not None else path.stem)
    return new_run(cfg, args.run_name, f"{origin_name}_fork{step}", device, dist,
                   about=f"a fork of {path} at step {step:,}; ", record=record, before=say,
                   fork=state, fork_path=path)


def new_run(cfg, run_name: str | None, prefix: str, device, dist, about: str = "", record=None,
            before=None, **trainer_kw) -> int:
    """Make the run folder (rank 0; its ``config.yaml``, then ``record(folder)``), build the
    trainer (``trainer_kw``), call ``before(trainer)`` and train. A trainer that cannot be built
    (bad env, model, tracker or checkpoint) leaves no folder behind: exit code 2."""
    from .checkpoint import CheckpointError
    from .envs import EnvConfigError
    from .model import ModelConfigError
    from .tracking import TrackingError
    from .trainer import Trainer

    def new_run_dir() -> str:  # (rank 0 alone: the others write nothing)
        path = make_run_dir(cfg.run.out_dir, run_name, prefix, cfg.run.seed)
        (path / "config.yaml").write_text(dump_yaml(cfg))
        if record is not None:
            record(path)
        return str(path)

    try:
        run_dir = Path(dist.from_main(new_run_dir, (FileExistsError, ValueError, OSError)))
    except (FileExistsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dist.is_main:
        print(f"run folder: {run_dir}  ({about}tensorboard --logdir {cfg.run.out_dir})  device: {device}{_ranks(dist)}",
              flush=True)
    try:
        trainer = Trainer(cfg, run_dir, device, dist=dist, **trainer_kw)
    except (ConfigError, CheckpointError, EnvConfigError, ModelConfigError, TrackingError) as exc:
        if dist.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was trained: leave no empty run behind
        return error(exc)
    if before is not None:
        before(trainer)
    return run(trainer)


def error(exc: Exception) -> int:
    """Print ``exc`` as one ``error:`` line (a ConfigError's problems joined); exit code 2."""
    print(f"error: {'; '.join(exc.problems) if isinstance(exc, ConfigError) else exc}", file=sys.stderr)
    return 2


def _ranks(dist) -> str:
    return f"  ranks: {dist.world_size} ({dist.backend})" if dist.enabled else ""


def run(trainer) -> int:
    from .logger import append_log
    from .trainer import EnvFailure, TrainingDiverged
    try:
        trainer.train()
    except KeyboardInterrupt:
        print("stopped at once (second signal); the last checkpoint on disk is intact", file=sys.stderr)
        if trainer.dist.is_main:
            append_log(trainer.run_dir, "stopped at once (second signal)")
        return 130
    except (TrainingDiverged, EnvFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        details = getattr(exc, "details", "")
        # (a diverged update is seen by every rank alike: rank 0 records it; an env fails on one rank)
        if trainer.dist.is_main or isinstance(exc, EnvFailure):
            append_log(trainer.run_dir, f"error: {exc}" + (f"\n{details}" if details else ""))
        return 1
    if trainer.interrupted is not None:
        return 128 + trainer.interrupted
    return 0


def list_configs() -> str:
    """The shipped configs, one line each: name, env, layout, length, the file's first comment."""
    from .config import CONFIG_DIR
    rows = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        about = next((line.lstrip("#").strip() for line in path.read_text().splitlines()
                      if line.startswith("#")), "")
        try:
            c = load(str(path))
            what = (f"{c.env.id}, {c.env.num_envs} envs x {c.ppo.rollout_steps} steps, "
                    f"{c.model.core.upper()} {c.model.hidden_size}, {c.run.total_steps:,} env steps")
        except ConfigError as exc:
            what = f"invalid: {exc.problems[0]}"
        rows.append((path.name, what, about))
    if not rows:
        return f"no configs in {CONFIG_DIR}"
    width = max(len(r[0]) for r in rows)
    lines = [f"configs in {CONFIG_DIR} (--config NAME; --print-config shows one resolved):"]
    for name, what, about in rows:
        lines.append(f"  {name:<{width}}  {what}")
        if about:
            lines.append(f"  {'':<{width}}  {about}")
    return "\n".join(lines)


def substitute_for_cpu(name: str, cfg, device, overrides: list[str], exact: bool):
    """``(config name, cfg, note)``: ``run.cpu_config`` in place of ``name`` where ``run.device`` is
    ``auto``, there is no CUDA device and ``--exact`` was not given; ``note`` says what happened
    and why (None when nothing was substituted)."""
    if exact or not cfg.run.cpu_config or cfg.run.device != "auto" or device.type != "cpu":
        return name, cfg, None
    sub = cfg.run.cpu_config
    sub_path = resolve_path(sub)
    about = next((line.lstrip("#").strip() for line in sub_path.read_text().splitlines()
                  if line.startswith("#")), "")
    new = load(sub, overrides)
    note = (f"no CUDA device: training {sub_path.name} instead of {resolve_path(name).name} (its "
            f"run.cpu_config). {about}\n"
            f"The published GPU settings train at a few hundred steps/s on a CPU and need days here; "
            f"add --exact to train {resolve_path(name).name} as it is.")
    return sub, new, note


def print_config(args, overrides: list[str]) -> int:
    """``--print-config``: the config a run (a resume, a fork) would use, as YAML; nothing is trained."""
    from .checkpoint import CheckpointError
    try:
        if args.resume:
            from .resume import plan_resume
            plan = plan_resume(Path(args.resume), overrides)
            cfg = plan.cfg
            head = [f"# the config of a resume of {args.resume} from {plan.path} (step {plan.steps_done:,})"]
            head += [f"# note: {line}" for line in plan.notes] + [f"# warning: {line}" for line in plan.warnings]
        elif args.fork:
            path, state, _, cfg, lines = plan_fork(Path(args.fork), overrides)
            head = [f"# the config of a fork of {path} (step {int(state['global_step']):,})"]
            head += [f"# {line}" for line in lines]
        else:
            cfg, device = config_and_device(args.config, overrides)
            name, cfg, note = substitute_for_cpu(args.config, cfg, device, overrides, args.exact)
            head = [f"# {resolve_path(name)}" + (" with " + " ".join(f"--set {o}" for o in overrides)
                                                 if overrides else "")]
            if note:
                head += [f"# {line}" for line in note.splitlines()]
    except (CheckpointError, ValueError) as exc:  # ConfigError is a ValueError
        return error(exc)
    print("\n".join(head))
    print(dump_yaml(cfg), end="")
    return 0


def _launched_rank() -> int:
    """This process's RANK under torchrun (0 for a plain process), read without joining the group."""
    import os
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_configs or args.print_config:  # nothing to train: no process group (rank 0 prints)
        if _launched_rank() != 0:
            return 0
        if args.list_configs:
            print(list_configs())
            return 0
        return print_config(args, _overrides(args))
    from .parallel import RankLost, from_environment
    try:  # one rank of a torchrun group, or a plain single process
        dist = from_environment()
    except (RuntimeError, ValueError, KeyError) as exc:
        print(f"error: cannot join the torchrun process group: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        return train_main(args, dist)
    except RankLost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.track:
        overrides.append("run.track=wandb")
    if args.device:
        overrides.append(f"run.device={args.device}")
    return overrides


def train_main(args, dist) -> int:
    """:func:`main` once this process knows its place in the run (``dist``, the seam of
    :mod:`ppo_tbptt.parallel`: :data:`~ppo_tbptt.parallel.SINGLE` for a plain run)."""
    from .tracking import check_installed
    overrides = _overrides(args)
    if args.resume:
        return resume(args, overrides, dist)
    if args.fork:
        return fork(args, overrides, dist)
    try:
        cfg, device = config_and_device(args.config, overrides)
        name, cfg, note = substitute_for_cpu(args.config, cfg, device, overrides, args.exact)
        device = dist.place(cfg, device)  # (env.num_envs is the total over the ranks)
        check_installed(cfg)
    except ValueError as exc:  # ConfigError, TrackingError, or cuda asked for where there is none
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if note and dist.is_main:
        print(note, flush=True)
    return new_run(cfg, args.run_name, cfg.run.name or resolve_path(name).stem, device, dist)


if __name__ == "__main__":
    sys.exit(main())
