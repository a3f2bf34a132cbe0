"""What a resume will train: the checkpoint's config with the ``--set`` overrides, checked in
config-field terms before any env starts.

Schedules (``lr``, ``clip``, ``ent_coef``) with ``steps <= 0`` run over ``run.total_steps``, so a
resume that extends the run would rewrite their past (the lr of a run at its end jumping back up).
Such a resume pins their horizon at the old total instead (``steps: <old total>``, recorded in
the run folder's ``config.yaml``): they go on from where they are and stay at their final values.
Any schedule whose value at the current step still changes (an explicit ``--set ppo.lr.steps=N``)
is reported with both values.

A resume restores every env's episode, the recurrent states and the weights, so the fields they
depend on must stay as the run began (:data:`FROZEN`); everything else (``run.*``, ``ppo.*``,
``tbptt.*``, how the envs are stepped (``env.backend`` too: both give the same episodes), the
evaluation levels) may change.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from . import checkpoint as ckpt
from .config import Config, ConfigError, Schedule, apply_overrides, dump_yaml, from_dict

#: Fields a resume cannot change, and why.
FROZEN = {
    "env.id": "the envs' episodes are restored by replay",
    "env.num_envs": "there is one saved episode and recurrent state per env",
    "env.kwargs": "the envs' episodes are restored by replay",
    "env.reset_params": "the envs' episodes are restored by replay",
    "env.train_seeds": "each env's level-seed stream continues where it stopped",
    "env.downsample": "the saved observations and the weights depend on it",
    "model.core": "the weights depend on it",
    "model.hidden_size": "the weights and the saved recurrent states depend on it",
    "model.num_layers": "the weights and the saved recurrent states depend on it",
    "model.hidden_layer": "the weights depend on it",
    "model.encoder": "the weights depend on it",
    "model.chrono_init": "the run's initial weights were drawn with it, and its config records how",
    "model.recall_lags": "the weights depend on it",
    "model.memoryless": "a run is the ablation or not from its first step: one curve would mix the two",
    "curriculum.stages": "each env's stage and the episodes in flight depend on it",
}

ALLOWED = ("run.*, ppo.*, tbptt.*, env.vector, env.envs_per_worker, env.groups, env.eval_seeds, env.backend, "
           "model.encoder_dtype, model.core_kernel, model.reset_hidden_state, curriculum.window, "
           "curriculum.threshold, curriculum.min_updates, curriculum.share")


@dataclasses.dataclass
class ResumePlan:
    """A checkpoint to continue from and the config the resumed run uses."""

    run_dir: Path
    path: Path                  # the checkpoint
    state: dict                 # its contents
    cfg: Config                 # what the resumed run uses (overrides applied)
    previous: Config            # the config the checkpoint was written with
    notes: list = dataclasses.field(default_factory=list)  # lines to show before training
    warnings: list = dataclasses.field(default_factory=list)  # ... and loudly

    @property
    def steps_done(self) -> int:
        return int(self.state["global_step"])


def _field(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def plan_resume(run_dir: Path, overrides: list[str] | None = None, dist=None) -> ResumePlan:
    """Load ``run_dir``'s latest checkpoint and the config a resume with ``overrides`` would use.

    ``dist`` (the seam of :mod:`ppo_tbptt.parallel`; in a data-parallel run, rank 0 alone reads the
    checkpoint and sends it to the other ranks (their machines need no copy of the run folder));
    every rank then makes the same checks below, so all raise the same error, and a checkpoint of
    another number of ranks is refused here, before any env starts. Without ``dist`` (e.g.
    ``--print-config``) the checkpoint's number of ranks is not checked here.

    Raises CheckpointError (missing, unreadable, weights only, its own config invalid, another
    number of ranks) or ConfigError (a bad override, or one that changes a field a resume cannot
    change)."""
    from .parallel import SINGLE
    run_dir = Path(run_dir)
    path, state = (SINGLE if dist is None else dist).load_latest(run_dir)  # (with one process: read here)
    try:
        previous = from_dict(state["config"])
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: config invalid: " + "; ".join(exc.problems)) from None
    for key in ("optimizer", "rng", "shuffle_generator", "collector", "global_step", "update"):
        if key not in state:
            raise ckpt.CheckpointError(f"checkpoint {path}: no '{key}' entry; it holds weights only "
                                       "and cannot resume training")
    raw, problems = apply_overrides(state["config"], overrides)
    if problems:
        raise ConfigError(problems)
    cfg = from_dict(raw)  # ConfigError: the override's value is invalid
    frozen = [f"{name}: the run has {_field(previous, name)!r}, the resume asks for {_field(cfg, name)!r}; "
              f"a resume cannot change it ({why})"
              for name, why in FROZEN.items() if _field(previous, name) != _field(cfg, name)]
    if frozen:
        raise ConfigError(frozen + [f"a resume may change {ALLOWED}; for other changes start a new run "
                                    "(--config with --set)"])
    if dist is not None:
        dist.check_world_size(state, path)
    plan = ResumePlan(run_dir, path, state, cfg, previous)
    plan.cfg, note = keep_schedule_horizons(state["config"], previous, cfg, overrides, plan.steps_done)
    plan.notes.extend([note] if note else [])
    plan.warnings.extend(schedule_changes(previous, plan.cfg, plan.steps_done))
    notes, warnings = lr_scale_changes(previous, plan.cfg, state, "resume")
    plan.notes.extend(notes)
    plan.warnings.extend(warnings)
    return plan


def keep_schedule_horizons(raw: dict, previous: Config, cfg: Config, overrides: list[str] | None,
                           step: int) -> tuple[Config, str | None]:
    """``cfg`` (``raw``, the checkpoint's config as plain data, with ``overrides``), where its
    ``run.total_steps`` differs from ``previous``'s, with the schedules that ran over the old total
    pinned to it (an explicit ``--set`` still wins); and the note that says so (None: nothing
    pinned)."""
    if cfg.run.total_steps == previous.run.total_steps:
        return cfg, None
    raw_pinned, pinned = pin_schedule_horizons(raw, previous)
    if not pinned:
        return cfg, None
    cfg = from_dict(apply_overrides(raw_pinned, overrides)[0])
    kept = [n for n in pinned if _field(cfg, n).steps == previous.run.total_steps]
    if not kept:
        return cfg, None
    return cfg, (f"run.total_steps {previous.run.total_steps:,} -> {cfg.run.total_steps:,}: "
                 f"{', '.join(kept)} keep{'s' if len(kept) == 1 else ''} the horizon of "
                 f"{previous.run.total_steps:,} steps they had (steps: {previous.run.total_steps} in "
                 "config.yaml), so they go on from where they are and stay at their final values from "
                 f"there; to anneal over the new total instead, --set {kept[0]}.steps=N (which changes "
                 f"its value at step {step:,})")


def _schedules(cfg: Config) -> list[str]:
    """Dotted names of the config's Schedule fields (``ppo.lr``, ...)."""
    return [f"{sec.name}.{f.name}" for sec in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, sec.name))
            if isinstance(getattr(getattr(cfg, sec.name), f.name), Schedule)]


def pin_schedule_horizons(raw: dict, cfg: Config) -> tuple[dict, list[str]]:
    """``raw`` (``cfg`` as plain data) with every schedule that runs over ``run.total_steps``
    (not constant, ``steps <= 0``) given ``steps: run.total_steps``; and their names."""
    import copy
    raw = copy.deepcopy(raw)
    pinned = []
    for name in _schedules(cfg):
        s = _field(cfg, name)
        if s.kind != "constant" and s.final is not None and s.steps <= 0:
            section, key = name.split(".")
            raw[section][key] = {**dataclasses.asdict(s), "steps": cfg.run.total_steps}
            pinned.append(name)
    return raw, pinned


def schedule_changes(before: Config, after: Config, step: int, what: str = "resume") -> list[str]:
    """A line for each schedule whose value at ``step`` differs between the two configs (``what``
    changes it: a resume, a fork)."""
    out = []
    for name in _schedules(after):
        a = _field(before, name).value(step, before.run.total_steps)
        b = _field(after, name).value(step, after.run.total_steps)
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
            out.append(f"{name} at step {step:,} changes from {a:.4g} to {b:.4g}: the {what} changes its "
                       "schedule, so the run's past and its continuation follow different schedules")
    return out


def restored_lr_scale(cfg: Config, state: dict, what: str = "resume") -> float:
    """The learning rate's KL-adapted scale (``ppo.kl_target``) a run goes on with from a
    checkpoint: a resume's is the saved one within ``cfg``'s bounds; a fork's starts at 1, so that
    the fork's first rate is its ``ppo.lr``'s value (its KL moves it from there)."""
    if what == "fork":
        return 1.0
    o = cfg.ppo
    return min(max(float(state.get("lr_scale", 1.0)), o.kl_lr_min_scale), o.kl_lr_max_scale)


def lr_scale_changes(before: Config, after: Config, state: dict, what: str = "resume") -> tuple[list[str], list[str]]:
    """``(notes, warnings)`` on the learning rate's KL-adapted scale across a resume or fork
    (``what``) from ``state``, a checkpoint written with config ``before``, into ``after``."""
    saved = float(state.get("lr_scale", 1.0))
    scale = restored_lr_scale(after, state, what)
    was, now = before.ppo.kl_target > 0, after.ppo.kl_target > 0
    step = int(state["global_step"])
    base = before.ppo.lr.value(step, before.run.total_steps)
    notes, warnings = [], []
    if now and what == "resume":
        notes.append(f"ppo.kl_target: the learning rate's scale goes on from {scale:.4g}")
        if scale != saved:
            warnings.append(f"the saved learning-rate scale {saved:.4g} is outside [ppo.kl_lr_min_scale, "
                            f"ppo.kl_lr_max_scale] = [{after.ppo.kl_lr_min_scale:g}, "
                            f"{after.ppo.kl_lr_max_scale:g}]: it goes on from {scale:.4g}")
    elif now and was and saved != 1.0:
        notes.append(f"ppo.kl_target: the fork's learning-rate scale starts at 1 (the checkpoint's was "
                     f"{saved:.4g}), so its first rate is ppo.lr's value")
    if was and not now and saved != 1.0:
        warnings.append(f"ppo.kl_target is off from here: the learning rate at step {step:,} changes from "
                        f"{base * saved:.4g} (ppo.lr's {base:.4g} times the adapted scale {saved:.4g}) to "
                        "ppo.lr's value alone")
    return notes, warnings


def record_config(run_dir: Path, cfg: Config) -> None:
    """Write ``config.yaml`` (atomically): what the run (now) uses."""
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, path)
