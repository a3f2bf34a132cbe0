"""What a resume will train: the checkpoint's config with the ``--set`` overrides, checked in
config-field terms before any env starts.

A resume restores every env's episode, the recurrent states and the weights, so the fields they
depend on must stay as the run began (:data:`FROZEN`); everything else (``run.*``, ``ppo.*``,
``tbptt.*``, how the envs are stepped, the evaluation levels) may change.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import checkpoint as ckpt
from .config import Config, ConfigError, apply_overrides, from_dict

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
}

ALLOWED = ("run.*, ppo.*, tbptt.*, env.vector, env.envs_per_worker, env.groups, env.eval_seeds, "
           "model.encoder_dtype, model.reset_hidden_state")


@dataclasses.dataclass
class ResumePlan:
    """A checkpoint to continue from and the config the resumed run uses."""

    run_dir: Path
    path: Path                  # the checkpoint
    state: dict                 # its contents
    cfg: Config                 # what the resumed run uses (overrides applied)
    previous: Config            # the config the checkpoint was written with
    notes: list = dataclasses.field(default_factory=list)  # lines to show before training

    @property
    def steps_done(self) -> int:
        return int(self.state["global_step"])


def _field(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def plan_resume(run_dir: Path, overrides: list[str] | None = None) -> ResumePlan:
    """Load ``run_dir``'s latest checkpoint and the config a resume with ``overrides`` would use.

    Raises CheckpointError (missing, unreadable, weights only, its own config invalid) or
    ConfigError (a bad override, or one that changes a field a resume cannot change)."""
    run_dir = Path(run_dir)
    path = ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(path)
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
    return ResumePlan(run_dir, path, state, cfg, previous)
