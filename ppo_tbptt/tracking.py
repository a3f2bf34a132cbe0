"""Experiment tracking besides TensorBoard: Weights & Biases, with ``run.track: wandb``.

wandb is imported only here, and only when a run is tracked (the optional ``track`` extra). A
tracked run's wandb run is named after the run folder and writes its local files into it
(``RUN/wandb/``); its id is kept in ``RUN/wandb_id``, so that ``--resume`` continues the same
wandb run and ``evaluate`` adds its results to it. Every scalar logged against ``global_step``,
the same as TensorBoard's. ``WANDB_MODE=offline`` works without an account (``wandb sync
RUN/wandb/offline-run-*`` uploads the pieces of a resumed run in order); ``WANDB_PROJECT`` and
``WANDB_ENTITY`` choose where the run goes (project default: ``ppo_tbptt``).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

ID_FILE = "wandb_id"
TRACKERS = ("wandb",)
INSTALL_HINT = "pip install wandb (or the package's extra: ppo_tbptt[track])"


class TrackingError(ValueError):
    """The tracker cannot start (wandb missing, not logged in): a one-line reason."""


def check_installed(cfg) -> None:
    """Raise TrackingError at once if ``cfg.run.track`` names a package that is not installed
    (found without importing it), before a run folder is made or an env started."""
    if cfg.run.track and importlib.util.find_spec(cfg.run.track) is None:
        raise TrackingError(f"run.track: {cfg.run.track} is not installed: {INSTALL_HINT}; "
                            "or train untracked with --set run.track=")


def tracked_run_id(run_dir: Path) -> str | None:
    """The wandb run id kept in ``run_dir`` (None if the run was never tracked)."""
    path = Path(run_dir) / ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


class WandbTracker:
    """One process's handle on the wandb run of ``run_dir`` (a new one, or the one whose id the
    folder keeps). ``config``: the resolved config, recorded as the run's config."""

    def __init__(self, run_dir: Path, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise TrackingError(f"run.track: wandb is not installed: {INSTALL_HINT}") from None
        self.run_dir = Path(run_dir)
        run_id = tracked_run_id(self.run_dir)
        if run_id is None:
            from wandb.sdk.lib.runid import generate_id
            run_id = generate_id()
        kwargs = {} if os.environ.get("WANDB_PROJECT") else {"project": "ppo_tbptt"}
        try:
            self.run = wandb.init(id=run_id, resume="allow", name=self.run_dir.name, dir=str(self.run_dir),
                                  **kwargs)
        except Exception as exc:  # not logged in, no network, a bad WANDB_* setting: wandb's own reason
            raise TrackingError(f"run.track: wandb cannot start: {type(exc).__name__}: {exc} "
                                "(WANDB_MODE=offline tracks without an account)") from None
        tmp = self.run_dir / f"{ID_FILE}.tmp"
        tmp.write_text(run_id + "\n")
        os.replace(tmp, self.run_dir / ID_FILE)
        if config is not None:
            self.run.config.update(config, allow_val_change=True)  # a resume may change fields
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, global_step: int, scalars: dict) -> None:
        """Scalars at ``global_step`` (non-finite values left out, as in TensorBoard)."""
        row = {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}
        self.run.log({**row, "global_step": int(global_step)})

    def log_evaluation(self, global_step: int, summary: dict, gif: Path | None = None) -> None:
        """An ``evaluate`` command's figures (numbers under ``evaluate/``, the whole summary in the
        run's summary) and its GIF, at the checkpoint's ``global_step``."""
        import wandb
        row = {f"evaluate/{k}": float(v) for k, v in summary.items() if k != "global_step"
               and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if gif is not None:
            row["evaluate/video"] = wandb.Video(str(gif), format="gif")
        self.run.log({**row, "global_step": int(global_step)})
        self.run.summary["evaluate"] = summary

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg, run_dir: Path) -> WandbTracker | None:
    """The tracker ``cfg.run.track`` asks for, or None (then nothing is imported)."""
    if cfg.run.track == "wandb":
        return WandbTracker(run_dir, cfg.to_dict())
    return None


def track_evaluation(cfg, checkpoint: Path, summary: dict, gif: Path | None = None) -> str | None:
    """Add an ``evaluate`` command's results (and GIF) to the wandb run of the checkpoint's run
    folder, if that run is tracked; the line to print, or None when it is not tracked. Raises
    TrackingError (wandb missing or unable to start)."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    run_id = tracked_run_id(run_dir)
    if cfg.run.track != "wandb" or run_id is None:
        return None
    tracker = WandbTracker(run_dir)
    try:
        tracker.log_evaluation(int(summary.get("global_step", 0)), summary, gif)
    finally:
        tracker.close()
    return f"logged to wandb run {run_id} ({run_dir.name})"
