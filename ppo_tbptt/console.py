"""What the trainer tells its user: the console's lines (above the progress bar) and ``train.log``.

:class:`Console` owns the feedback of one run: the :class:`~ppo_tbptt.progress.UpdateProgress` bar
or plain lines within an update, and the run's :class:`~ppo_tbptt.logger.RunLog`. The functions
below it compose the text of the lines the trainer prints: its plan at the start, the line after
each update and each evaluation, a curriculum stage reached, and how the run ended.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import curriculum
from .logger import RunLog
from .progress import PHASES, UpdateProgress
from .utils import format_duration


class Console:
    """The lines of one run's process, and the progress within its updates.

    ``quiet``: no console lines and no progress (warnings still go to stderr). ``log``: write the
    lines to the run folder's ``train.log`` too. ``rank_prefix``: put before a warning (``rank r of
    W: `` in a data-parallel run, where every rank warns)."""

    def __init__(self, run_dir: Path, quiet: bool = False, log: bool = True, rank_prefix: str = ""):
        self.quiet = quiet
        self.rank_prefix = rank_prefix
        # feedback while starting and within each update (not with quiet)
        self.progress: UpdateProgress | None = None if quiet else UpdateProgress(0)
        self.log = RunLog(run_dir) if log else None  # train.log: the console's lines

    def say(self, line: str, err: bool = False) -> None:
        """A console line (not with ``quiet``), also written to the run's ``train.log``."""
        if not self.quiet:
            if self.progress is not None:
                self.progress.write(line, err)
            else:
                print(line, file=sys.stderr if err else sys.stdout, flush=True)
        if self.log is not None:
            self.log.write(line)

    def warn(self, message: str) -> None:
        """A warning (also with ``quiet``, and on every rank): stderr and ``train.log``."""
        line = f"warning: {self.rank_prefix}{message}"
        if self.progress is not None:
            self.progress.write(line, err=True)
        else:
            print(line, file=sys.stderr, flush=True)
        if self.log is not None:
            self.log.write(line)

    def task(self, text: str) -> None:
        """A start-up step that may take a while (repeated with its seconds while it lasts)."""
        if self.progress is not None:
            self.progress.start_task(text)
        elif not self.quiet:
            print(text, flush=True)
        if self.log is not None:
            self.log.write(text)

    def ready(self, total_updates: int) -> None:
        """Start-up is over: the progress counts ``total_updates`` from here."""
        if self.progress is not None:
            self.progress.end_task()
            self.progress.total_updates = total_updates

    def reopen(self, total_updates: int) -> None:
        """Progress again after :meth:`close` (a second ``train()``)."""
        if self.progress is None and not self.quiet:
            self.progress = UpdateProgress(total_updates)

    def phase(self, name: str, total: int) -> None:
        """The update in flight enters phase ``name`` (see :data:`ppo_tbptt.progress.PHASES`)."""
        if self.progress is not None:
            self.progress.start_phase(name, total)

    def advance(self, done: int) -> None:
        """``done`` of the phase's total are done (env steps, minibatches or episodes)."""
        if self.progress is not None:
            self.progress.advance(done)

    def phase_text(self) -> str:
        """`` (collecting: 1,024 of 4,096 env steps)``: where the update in flight was (or "")."""
        p = self.progress
        if p is None or p.phase is None:
            return ""
        verb, unit = PHASES[p.phase]
        return f" ({verb}: {p.done:,} of {p.total:,} {unit})"

    def close(self) -> None:
        """Stop the progress (its pending notices are printed) and close ``train.log``."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.log is not None:
            self.log.close()
            self.log = None


def _s(n: int, word: str, plural: str | None = None) -> str:
    return word if n == 1 else (plural or word + "s")


def plan_lines(cfg, batch: int, local_envs: int, world_size: int, update: int, total_updates: int,
               global_step: int, planned_steps: int, promotion=None) -> list[str]:
    """What a run will train, said at the start of :meth:`ppo_tbptt.trainer.Trainer.train`:
    ``batch`` env steps per update (``local_envs`` on each of ``world_size`` ranks), the updates
    to go, the curriculum's stage, and a note if ``run.total_steps`` rounds to whole updates."""
    todo = max(0, total_updates - update)
    ranks = f", {world_size} ranks of {local_envs} envs" if world_size > 1 else ""
    p = cfg.ppo
    lines = [f"{batch:,} env steps per update ({cfg.env.num_envs} envs x {p.rollout_steps} steps{ranks}), "
             f"{p.epochs} {_s(p.epochs, 'epoch')} x {p.minibatches} {_s(p.minibatches, 'minibatch', 'minibatches')}; "
             f"{todo:,} {_s(todo, 'update')} to go (env steps {global_step:,} -> {planned_steps:,})"]
    if promotion is not None:
        n, c = curriculum.num_stages(cfg), cfg.curriculum
        lines.append(f"curriculum: stage {promotion.stage} of 0..{n - 1}"
                     f"{' (the target task)' if promotion.final else ''}: "
                     f"{curriculum.describe(curriculum.stage_params(cfg, promotion.stage))}"
                     + ("" if promotion.final else f"; the next stage at a success of {c.threshold:g} over "
                                                   f"{c.window} episodes")
                     + (f"; earlier stages in {c.share:.0%} of episodes" if c.share and promotion.stage else ""))
    if planned_steps != cfg.run.total_steps:
        what = ("is less than one update" if cfg.run.total_steps < batch
                else "is not a whole number of updates")
        lines.append(f"note: run.total_steps = {cfg.run.total_steps:,} {what} of {batch:,} env steps: "
                     f"training {total_updates:,} {_s(total_updates, 'update')} = {planned_steps:,} steps")
    return lines


def stage_line(cfg, promotion, step: int, won: float | None) -> str:
    """The line of a curriculum stage reached at ``step`` (``won``: the success that earned it);
    its ``{elapsed}`` is filled in once the update's wall clock is known."""
    stage, n = promotion.stage, curriculum.num_stages(cfg)
    return (f"curriculum: stage {stage} of 0..{n - 1}{' (the target task)' if promotion.final else ''} "
            f"reached at step {step:,}, {{elapsed}} of training"
            + (f" (stage {stage - 1}: success {won:.3f} over its last {promotion.window} episodes)"
               if won is not None else "")
            + f": {curriculum.describe(curriculum.stage_params(cfg, stage))}")


def end_lines(how: str, step: int, run_dir: Path, path: Path, *, aborted: bool = False,
              limit: float = 0.0, total_steps: int = 0, seconds: float = 0.0) -> str:
    """The last line(s) of :meth:`ppo_tbptt.trainer.Trainer.train`: ``how`` the run ended
    (``interrupted``, ``time limit`` or ``done``) at ``step`` with checkpoint ``path``."""
    again = f"resume with: python -m ppo_tbptt.train --resume {run_dir}"
    if how == "interrupted":
        return (f"interrupted at {step:,} steps; checkpoint {path}"
                f"{' (the last update boundary)' if aborted else ''}\n{again}")
    if how == "time limit":
        return (f"time limit run.max_seconds={limit:g} reached at {step:,} of {total_steps:,} steps; "
                f"checkpoint {path}\n{again}")
    return f"done: {step:,} steps in {seconds:.1f}s; checkpoint {path}"


def progress_line(update: int, total_updates: int, step: int, total_steps: int, sps: float,
                  scalars: dict, elapsed: float, update_seconds: float | None = None) -> str:
    """The line printed after each update. ``total_steps``: the steps the run will have trained
    when it ends (whole updates). ``update_seconds``: the expected time per update, if known."""
    ret = scalars.get("charts/episodic_return")
    succ = scalars.get("charts/success")
    eta = (total_steps - step) / sps if sps > 0 else float("inf")
    parts = [f"update {update}/{total_updates}", f"step {step:,}/{total_steps:,} ({100 * step / total_steps:.1f}%)",
             f"SPS {sps:,.0f}"]
    if scalars.get("curriculum/stage") is not None:
        parts.append(f"stage {scalars['curriculum/stage']:.0f}")
    parts += [f"return {ret:.3f}" if ret is not None else "return -",
              f"success {succ:.2f}" if succ is not None else "success -",
              f"kl {scalars.get('losses/approx_kl', float('nan')):.4f}"]
    if update_seconds is not None:
        parts.append(f"{update_seconds:.1f} s/update")
    parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]
    return " | ".join(parts)


def eval_line(step: int, scalars: dict) -> str:
    """The console line of a periodic evaluation (``eval/*`` scalars)."""
    n = scalars.get("eval/episodes")
    parts = [f"eval at step {step:,}" + (f" ({n:.0f} held-out episodes)" if n is not None else "")]
    if scalars.get("eval/success") is not None:
        lo, hi = scalars.get("eval/success_low"), scalars.get("eval/success_high")
        ci = f" (95% CI {lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else ""
        target = "target task " if scalars.get("eval_stage/stage") is not None else ""
        parts.append(f"{target}success {scalars['eval/success']:.3f}{ci}")
    if scalars.get("eval/return") is not None:
        parts.append(f"return {scalars['eval/return']:.3f}")
    if scalars.get("eval/length") is not None:
        parts.append(f"length {scalars['eval/length']:.1f}")
    if scalars.get("eval_stage/stage") is not None:
        stage_success = scalars.get("eval_stage/success")
        parts.append(f"stage {scalars['eval_stage/stage']:.0f} success "
                     + (f"{stage_success:.3f}" if stage_success is not None else "-"))
    if "eval/best" in scalars:
        parts.append("new best: checkpoints/best.pt")
    return " | ".join(parts)
