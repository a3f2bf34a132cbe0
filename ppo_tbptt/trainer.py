"""The run around the PPO update: schedules, periodic evaluation, checkpoints, stopping, curriculum.

:class:`Trainer` owns one run's envs, model, optimizer and counters. :meth:`Trainer.train_update`
is one iteration of the algorithm (:class:`ppo_tbptt.update.PPOUpdate`: collect -> GAE ->
sequences -> epochs x minibatches) at the schedules' current values; :meth:`Trainer.train` is the
loop around it: after each update it logs, evaluates every ``run.eval_every`` steps, keeps the best
checkpoint, writes one every ``run.checkpoint_every`` steps, promotes the curriculum and stops at
``run.total_steps``, on a signal (:mod:`ppo_tbptt.stopping`) or after ``run.max_seconds``. Its
lines go through :class:`ppo_tbptt.console.Console`; the other ranks of a data-parallel run
through the seam ``dist`` (:mod:`ppo_tbptt.parallel`), chosen once when the trainer is built.
"""
from __future__ import annotations

import copy
import signal
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import curriculum
from .checkpoint import rng_states, set_rng_states
from .config import Config, dump_yaml
from .console import Console, end_lines, eval_line, plan_lines, progress_line, stage_line
from .envs import make_vector_env
from .logger import MetricsWriter
from .model import build_model
from .parallel import SINGLE, SingleProcess
from .ppo import LossCoefs
from .resume import restored_lr_scale
from .rollout import Collector
from .stopping import ENV_ERRORS, EnvFailure, StopNow
from .tracking import open_tracker
from .truncation import make_strategy
from .update import PPOUpdate, TrainingDiverged, episode_scalars
from .utils import format_duration, seed_everything, stream_seed

__all__ = ["Trainer", "TrainingDiverged", "EnvFailure", "collect_threads", "next_multiple",
           "rng_states", "set_rng_states"]


def next_multiple(step: int, every: int) -> int | None:
    """The smallest multiple of ``every`` above ``step`` (None if ``every`` <= 0)."""
    return (step // every + 1) * every if every > 0 else None


def collect_threads(cfg: Config, device: torch.device, learn_threads: int) -> int:
    """torch threads while collecting (``run.collect_threads``; 0 = auto, see its docstring)."""
    if cfg.run.collect_threads > 0:
        return cfg.run.collect_threads
    if device.type == "cpu" and cfg.env.vector in ("pool", "gym_async"):
        return 1
    return learn_threads


def kl_adapted_scale(scale: float, kl: float, target: float, factor: float, lo: float, hi: float) -> float:
    """``ppo.kl_target``: the learning-rate scale after an update whose mean approximate KL was
    ``kl``: divided by ``factor`` above twice the target, multiplied by it below half of it,
    unchanged between, and kept within [``lo``, ``hi``]. A non-finite KL lowers it."""
    if not kl <= 2.0 * target:  # (NaN too)
        scale /= factor
    elif kl < 0.5 * target:
        scale *= factor
    return min(max(scale, lo), hi)


def fork_stage(cfg: Config, state: dict, path) -> int:
    """The curriculum stage a fork of checkpoint ``state`` into ``cfg`` starts in: the checkpoint's
    where both have a curriculum, else 0. Raises ConfigError if ``cfg`` has no such stage."""
    from .config import ConfigError
    saved = state.get("curriculum")
    if not curriculum.enabled(cfg) or saved is None:
        return 0
    stage, n = int(saved["stage"]), curriculum.num_stages(cfg)
    if stage >= n:
        raise ConfigError([f"curriculum.stages: the checkpoint {path} is in stage {stage}, and the "
                           f"fork's curriculum has stages 0..{n - 1}"])
    return stage


class Trainer:
    """Owns the envs, model, optimizer and counters of one run.

    ``resume``: a checkpoint dict (from :func:`checkpoint.load_checkpoint`) to continue from; then
    every bit of state that influences later updates is restored (see :meth:`state_dict`).
    ``fork``: instead, a checkpoint dict (of this or another run) to branch from: the weights,
    optimizer and counters are taken from it, the rest starts afresh (see :meth:`load_fork_state`).
    ``dist``: this process's place in the run (:mod:`ppo_tbptt.parallel`; None: one process). A
    rank of a data-parallel run (:class:`ppo_tbptt.distributed.Distributed`) steps its share of
    ``env.num_envs``, and only rank 0 logs, evaluates and writes checkpoints.
    """

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, log: bool = True,
                 quiet: bool = False, resume: dict | None = None, resume_path: Path | None = None,
                 dist: SingleProcess | None = None, fork: dict | None = None, fork_path: Path | None = None):
        self.cfg = cfg
        self.dist = SINGLE if dist is None else dist
        self.device = device = self.dist.place(cfg, device)
        self.run_dir = Path(run_dir)
        self.quiet = quiet or not self.dist.is_main
        log = log and self.dist.is_main  # the run's files: rank 0 alone writes them
        self.console = Console(self.run_dir, self.quiet, log, self.dist.rank_prefix)
        self.stop = self.dist.stopping(self.console)  # how a signal stops this process
        if cfg.run.torch_threads > 0:
            torch.set_num_threads(cfg.run.torch_threads)
        self.learn_threads = torch.get_num_threads()
        self.collect_threads = collect_threads(cfg, device, self.learn_threads)
        seed_everything(cfg.run.seed)
        env_kw = self.dist.env_kwargs(cfg.env)  # {} with one process: all the envs
        self.first_env = env_kw.get("first_env", 0)
        t0 = time.perf_counter()
        local = (f" ({env_kw['num_envs']} on each of {self.dist.world_size} ranks)" if env_kw else "")
        self.console.task(f"starting {cfg.env.num_envs} {cfg.env.id} envs{local} (env.vector: {cfg.env.vector})")
        try:
            self.envs = make_vector_env(cfg.env, cfg.run.seed, device=device.type,
                                        curriculum=cfg.curriculum, **env_kw)
        except BaseException:
            self.console.close()
            raise
        if hasattr(self.envs, "on_warning"):  # a worker pool that replaced a dead worker says so
            self.envs.on_warning = self.warn
        self.console.task(f"envs ready in {time.perf_counter() - t0:.1f} s; building the model"
                          + (f" and restoring {resume_path}" if resume is not None else "")
                          + (f" and branching from {fork_path}" if fork is not None else ""))
        try:
            self._build(cfg, device, log, resume, resume_path, fork, fork_path)
        except BaseException:
            self.envs.close()  # a bad checkpoint or config must not leave worker processes behind
            self.console.close()
            raise
        self.console.ready(self.total_updates)

    def _build(self, cfg: Config, device: torch.device, log: bool, resume: dict | None,
               resume_path: Path | None, fork: dict | None = None, fork_path: Path | None = None) -> None:
        """The rest of ``__init__``, once the envs exist (they are closed if this raises)."""
        if fork is not None:  # the envs start in the checkpoint's stage: before their first reset
            stage = fork_stage(cfg, fork, fork_path or "checkpoint")
            if stage:
                self.envs.set_stage(stage)
        self.model = build_model(self.envs.single_observation_space, self.envs.single_action_space,
                                 cfg.model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.ppo.lr.initial,
                                          eps=cfg.ppo.adam_eps)
        self.collector = Collector(self.envs, self.model, cfg.ppo.rollout_steps, device,
                                   cfg.model.reset_hidden_state)
        self.collector.progress = self._on_collect_step
        self.shuffle_gen = torch.Generator().manual_seed(stream_seed(cfg.run.seed, "minibatch shuffle"))
        self.truncation = make_strategy(cfg)
        # every rank from rank 0's weights, with its own action, shuffle and cut streams
        self.dist.start(self.model, cfg.run.seed, [self.shuffle_gen] + [
            g for g in vars(self.truncation).values() if isinstance(g, torch.Generator)])
        self.ppo_update = PPOUpdate(cfg, self.model, self.optimizer, self.collector, self.truncation,
                                    self.shuffle_gen, self.dist, device, first_env=self.first_env,
                                    collect_threads=self.collect_threads, learn_threads=self.learn_threads,
                                    on_phase=self.console.phase, on_minibatch=self._on_minibatch)
        self.batch_size = self.ppo_update.batch_size  # env steps per update, all ranks' together
        self.total_updates = -(-cfg.run.total_steps // self.batch_size)
        self.planned_steps = self.total_updates * self.batch_size  # total_steps in whole updates
        self.global_step = 0
        self.update = 0
        self.elapsed = 0.0  # training wall-clock seconds, summed over resumed segments
        self.best_eval: float | None = None
        self.lr_scale = 1.0  # ppo.kl_target: what multiplies ppo.lr's value (1 without it)
        self.evaluator = None
        self.time_limited = False  # train() stopped at run.max_seconds
        # the curriculum's promotion rule (None without one); a stage reached, to announce
        self.promotion = (curriculum.Promotion(cfg.curriculum, curriculum.num_stages(cfg))
                          if curriculum.enabled(cfg) else None)
        self._stage_note: str | None = None
        if resume is not None:
            self.load_state_dict(resume, resume_path or "checkpoint")
        if fork is not None:
            self.load_fork_state(fork, fork_path or "checkpoint")
        if resume is not None or fork is not None:  # (the batch may differ from the checkpoint's)
            left = max(0, -(-(cfg.run.total_steps - self.global_step) // self.batch_size))
            self.total_updates = self.update + left
            self.planned_steps = self.global_step + left * self.batch_size
        tracker = open_tracker(cfg, self.run_dir) if log else None  # run.track: wandb (None: off)
        self.writer = MetricsWriter(self.run_dir, resume_step=self.global_step if resume or fork else None,
                                    tracker=tracker) if log else None
        if self.writer is not None:
            self.writer.text("config", "```\n" + dump_yaml(cfg) + "\n```")

    @classmethod
    def from_run(cls, run_dir: Path, device: torch.device | None = None,
                 overrides: list[str] | None = None, **kw) -> "Trainer":
        """Continue the run in ``run_dir`` from its latest checkpoint (config from the checkpoint).

        ``overrides`` (``section.key=value``) may change e.g. ``run.total_steps``; ``device`` None
        resolves ``run.device``. Raises CheckpointError or ConfigError with a one-line reason
        (see :func:`resume.plan_resume`; with ``dist``, rank 0 reads the checkpoint and sends it to
        the other ranks)."""
        from .resume import plan_resume
        return cls.from_plan(plan_resume(run_dir, overrides, dist=kw.get("dist")), device, **kw)

    @classmethod
    def from_plan(cls, plan, device: torch.device | None = None, **kw) -> "Trainer":
        """The trainer of a :class:`resume.ResumePlan`."""
        from .utils import resolve_device
        if device is None:
            device = resolve_device(plan.cfg.run.device)
        trainer = cls(plan.cfg, plan.run_dir, device, resume=plan.state, resume_path=plan.path, **kw)
        trainer.resumed_from = plan.path
        if kw.get("log", True) and trainer.dist.is_main:
            from .resume import record_config
            record_config(plan.run_dir, plan.cfg)  # the run folder records what the run now uses
        for line in plan.notes:
            trainer.say(f"note: {line}")
        if trainer.dist.is_main:  # (every rank has the same plan)
            for line in plan.warnings:
                trainer.warn(line)
        return trainer

    # ---- one update -----------------------------------------------------------------------------
    def coefs(self) -> tuple[float, LossCoefs]:
        """The learning rate and loss coefficients of the schedules at ``global_step`` (the rate
        times its KL-adapted scale with ``ppo.kl_target``)."""
        o, total = self.cfg.ppo, self.cfg.run.total_steps
        lr = o.lr.value(self.global_step, total) * (self.lr_scale if o.kl_target > 0 else 1.0)
        coefs = LossCoefs(clip=o.clip.value(self.global_step, total),
                          ent_coef=o.ent_coef.value(self.global_step, total), vf_coef=o.vf_coef,
                          norm_advantages=o.norm_advantages, clip_value_loss=o.clip_value_loss)
        return lr, coefs

    def train_update(self) -> dict:
        """One PPO update (:class:`ppo_tbptt.update.PPOUpdate`) at the schedules' current values,
        then the curriculum's step: the update's scalars. Raises TrainingDiverged if a loss or a
        gradient was not finite."""
        lr, coefs = self.coefs()
        result = self.ppo_update(lr, coefs)  # collect -> GAE -> sequences -> epochs x minibatches
        self.global_step += self.batch_size
        if not result.finite:
            raise TrainingDiverged(
                f"non-finite loss or gradient in update {self.update + 1} (env steps {self.global_step - self.batch_size:,}"
                f"..{self.global_step:,}): training stopped and nothing was saved from it; the weights "
                "are no longer usable, the run's last checkpoint is intact (try a lower ppo.lr or "
                "ppo.max_grad_norm, or look for non-finite rewards or observations)")
        self.update += 1
        scalars = dict(result.losses)
        scalars.update(episode_scalars(result.episodes))
        scalars.update({"charts/learning_rate": lr, "charts/ent_coef": coefs.ent_coef, "charts/clip": coefs.clip,
                        "charts/update": float(self.update)})
        o = self.cfg.ppo
        if o.kl_target > 0:  # the next update's rate, from this one's step (the same on every rank)
            scalars["charts/lr_scale"] = self.lr_scale
            self.lr_scale = kl_adapted_scale(self.lr_scale, result.losses["losses/approx_kl"], o.kl_target,
                                             o.kl_lr_factor, o.kl_lr_min_scale, o.kl_lr_max_scale)
        scalars.update(result.batch)
        scalars.update(self._curriculum_step(result.episodes))
        if self.writer is not None:
            for tag, curve in self.truncation.curves().items():
                self.writer.curve(tag, curve, self.global_step)
        return scalars

    def _curriculum_step(self, episodes: list) -> dict:
        """After an update: the curriculum sees its finished episodes (rank 0 holds every rank's)
        and decides, on rank 0 for all ranks, whether every env moves to the next stage now, at
        this update boundary. Returns the ``curriculum/*`` scalars of the stage this update trained."""
        p = self.promotion
        if p is None:
            return {}
        missing = p.observe(episodes)
        scalars = p.scalars()
        if missing and p.missing_success == missing:  # (once: the first such episodes)
            self.warn(f"curriculum: {missing} {self.cfg.env.id} episodes reported no success: they "
                      "count as failures, so the stage may never advance")
        ready = self.dist.broadcast_object(p.ready() if self.dist.is_main else None,
                                           "sharing the curriculum's decision")
        if ready:
            won = p.window_success()  # (rank 0's: the others hold no window)
            stage = p.advance(self.global_step, self.elapsed)
            self.envs.set_stage(stage)
            self._stage_note = stage_line(self.cfg, p, self.global_step, won)
        return scalars

    def _announce_stage(self) -> None:
        """The console line of a stage reached in the last update (with the run's wall clock)."""
        if self._stage_note is None:
            return
        self.promotion.history[-1]["elapsed"] = self.elapsed
        self.say(self._stage_note.format(elapsed=format_duration(self.elapsed)))
        self._stage_note = None

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, handle_signals: bool = True) -> dict:
        """Train to ``run.total_steps`` (rounded up to whole updates), or until ``run.max_seconds``
        have passed (then ``time_limited`` is true; a checkpoint is saved either way).

        SIGINT/SIGTERM (when ``handle_signals`` and in the main thread) stop at once: the update in
        flight (collection, learning or its evaluation) is abandoned at its next env step,
        minibatch or episode, the state of the last update boundary (kept as a copy at the start of
        every update) is saved as its checkpoint, the envs are closed and train() returns (see
        ``interrupted``); a second signal raises KeyboardInterrupt at once (the envs are still
        closed). A non-finite loss or gradient raises TrainingDiverged (nothing saved); an env that
        keeps failing raises EnvFailure after the last update boundary is saved.

        In a data-parallel run (``dist``) a signal instead finishes the update in flight on every
        rank; the ranks agree after each update whether to stop (any rank's signal, any rank's
        time limit), then save one checkpoint together. No update-boundary copy is kept there (it
        would cost every update a gather of every rank's state): an env that keeps failing on one
        rank raises EnvFailure on that rank without saving, the other ranks' next collective fails
        (RankLost) and the last periodic checkpoint stays as it is (see :mod:`ppo_tbptt.stopping`)."""
        cfg = self.cfg
        start, start_step, elapsed0 = time.time(), self.global_step, self.elapsed
        next_ckpt = next_multiple(self.global_step, cfg.run.checkpoint_every)
        next_eval = next_multiple(self.global_step, cfg.run.eval_every)
        limit, clock0 = cfg.run.max_seconds, time.monotonic()
        self.time_limited = False
        scalars: dict = {}
        self.console.reopen(self.total_updates)  # (closed by an earlier train())
        for line in ([] if self.quiet else self._plan()):
            self.say(line)
        with self.stop.handlers(handle_signals):
            try:
                path = None
                aborted = False
                boundary = self.stop.boundary(self, None)  # what a stop inside the next update saves
                while self.global_step < cfg.run.total_steps and self.stop.signal is None:
                    if self.progress is not None:
                        self.progress.start_update(self.update + 1)
                    evaluated = False
                    try:
                        scalars = self.train_update()
                        if next_eval is not None and self.global_step >= next_eval:
                            evaluated = True
                            if self.dist.is_main:  # (the other ranks wait for its score)
                                scalars.update(self.evaluate())
                    except StopNow:
                        path, aborted = self._discard_update(boundary), True
                        break
                    except ENV_ERRORS as exc:
                        self.stop.env_failure(self, exc, boundary)
                    update_seconds = self.progress.end_update() if self.progress is not None else None
                    new_best = False
                    if evaluated:
                        next_eval = next_multiple(self.global_step, cfg.run.eval_every)
                        new_best = self._note_eval(scalars)
                    self._log_update(scalars, start, start_step, elapsed0, update_seconds, evaluated)
                    boundary = self.stop.boundary(self, boundary)
                    if new_best:
                        state = self.state_dict() if boundary is None else boundary  # (all ranks: a gather)
                        if self.dist.is_main:
                            ckpt.atomic_save(state, self.run_dir / "checkpoints" / "best.pt")
                    if next_ckpt is not None and self.global_step >= next_ckpt:
                        path = self.save_checkpoint(boundary)
                        next_ckpt = next_multiple(self.global_step, cfg.run.checkpoint_every)
                    # every rank stops after the same update (signals and clocks differ)
                    over = self.stop.after_update(limit > 0 and time.monotonic() - clock0 >= limit)
                    if over and self.global_step < cfg.run.total_steps:
                        self.time_limited = True
                        break
                if path is None or path.stem != f"step_{self.global_step:012d}":
                    path = self.save_checkpoint(boundary)
                how = ("interrupted" if self.stop.signal is not None else
                       "time limit" if self.time_limited else "done")
                self.say(end_lines(how, self.global_step, self.run_dir, path, aborted=aborted, limit=limit,
                                   total_steps=cfg.run.total_steps, seconds=time.time() - start))
            finally:
                self.close()
        return scalars

    def _discard_update(self, boundary: dict) -> Path:
        """A signal stopped the update in flight: back to ``boundary``, saved; its checkpoint."""
        phase = self.console.phase_text()
        if self.progress is not None:
            self.progress.abandon_update()
            self.progress.flush_notices()  # the signal's own line first
        path = self.stop_at_boundary(boundary)
        self.say(f"stopped during update {self.update + 1:,}{phase}: that update is discarded")
        return path

    def _note_eval(self, scalars: dict) -> bool:
        """After an evaluation: its score (rank 0's, on every rank); whether it is the best so far."""
        score = self.dist.broadcast_object(self.eval_score(scalars) if self.dist.is_main else None)
        if self.best_eval is None or score > self.best_eval:
            self.best_eval = score
            scalars["eval/best"] = score
            return True
        return False

    def _log_update(self, scalars: dict, start: float, start_step: int, elapsed0: float,
                    update_seconds: float | None, evaluated: bool) -> None:
        """The update's row (metrics.jsonl, TensorBoard) and console lines, with the run's clock."""
        elapsed = time.time() - start
        self.elapsed = elapsed0 + elapsed
        sps = (self.global_step - start_step) / max(elapsed, 1e-9)
        scalars["charts/SPS"] = sps
        scalars["time/elapsed_seconds"] = self.elapsed
        if self.writer is not None:
            self.writer.scalars(self.global_step, scalars)
        self.say(progress_line(self.update, self.total_updates, self.global_step,
                               self.planned_steps, sps, scalars, self.elapsed, update_seconds))
        self._announce_stage()
        if evaluated:
            self.say(eval_line(self.global_step, scalars))

    def _plan(self) -> list[str]:
        """What this process will train (and that totals round to whole updates), said at the start."""
        return plan_lines(self.cfg, self.batch_size, self.envs.num_envs, self.dist.world_size, self.update,
                          self.total_updates, self.global_step, self.planned_steps, self.promotion)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict | None = None) -> Path:
        """Write ``state`` (default :meth:`state_dict`) as ``checkpoints/step_<global_step>.pt``
        (rank 0 alone writes) and prune old ones to ``run.keep_checkpoints``; returns the path."""
        path = self.run_dir / "checkpoints" / f"step_{self.global_step:012d}.pt"
        state = self.state_dict() if state is None else state
        if self.dist.is_main:
            ckpt.atomic_save(state, path)
            ckpt.prune(path.parent, self.cfg.run.keep_checkpoints)
        return path

    def state_dict(self) -> dict:
        """Everything a bit-exact resume needs, as tensors and plain data (loads with weights_only):
        model, optimizer, counters, global RNG states, the minibatch shuffle generator, and the
        collector's carry-over (env states replayable from level seed + actions, last obs,
        recurrent state, episode starts) and the truncation strategy's state (random cut sampler;
        adaptive K, its estimate and window sampler). Schedules are functions of ``global_step``.
        In a data-parallel run every rank calls this together; rank 0 gets the whole run's state
        (every rank's RNG, shuffle, collector and truncation parts), the others None."""
        return self.dist.gather_state({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "global_step": self.global_step,
            "update": self.update,
            "elapsed": self.elapsed,
            "best_eval": self.best_eval,
            "lr_scale": self.lr_scale,
            "rng": rng_states(self.device),
            "shuffle_generator": self.shuffle_gen.get_state(),
            "collector": self.collector.get_state(),
            "truncation": self.truncation.state_dict(),
            **({"curriculum": self.promotion.state_dict()} if self.promotion is not None else {}),
        }, self.model)

    def load_state_dict(self, state: dict, path: Path | str = "checkpoint") -> None:
        """Restore :meth:`state_dict`'s output (raises CheckpointError naming ``path`` if the
        weights do not fit, or if it was written by a run of another number of ranks)."""
        state = self.dist.rank_state(state, path)  # this rank's own envs, RNG streams, ...
        ckpt.load_model_weights(self.model, state["model"], path)
        self._load_optimizer(state["optimizer"])
        self.global_step = int(state["global_step"])
        self.update = int(state["update"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.best_eval = state.get("best_eval")
        self.lr_scale = restored_lr_scale(self.cfg, state, "resume")
        self.shuffle_gen.set_state(state["shuffle_generator"])
        self.collector.set_state(state["collector"])
        trunc = state.get("truncation")
        if trunc is not None and trunc.get("name") == self.truncation.name:
            self.truncation.load_state_dict(trunc)  # (a strategy changed on resume starts afresh)
        if self.promotion is not None and state.get("curriculum") is not None:
            self.promotion.load_state_dict(state["curriculum"])
        set_rng_states(state["rng"], self.device)

    def _load_optimizer(self, state: dict) -> None:
        """Adam's moments and step counts from a checkpoint, with this config's ``ppo.adam_eps``
        (the learning rate is the schedule's, set before every update)."""
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group["eps"] = self.cfg.ppo.adam_eps

    def load_fork_state(self, state: dict, path: Path | str = "checkpoint") -> None:
        """Branch from a checkpoint (:meth:`state_dict`'s output, of any run whose weights fit this
        model): its weights, Adam's moments, step and update counters, training time and, with a
        curriculum in both, its stage (and the record of the stages reached). Everything else starts
        afresh as in a new run of this config: every env's episode (from the level seeds a new run
        starts with, in that stage's reset parameters), the recurrent states, the random streams,
        the learning rate's KL-adapted scale (1: see :func:`ppo_tbptt.resume.restored_lr_scale`), the
        truncation strategy's state, the stage's success window (its episodes may have played other reset
        parameters) and the best evaluation. Raises CheckpointError if the weights do not fit.
        (The envs were put in the checkpoint's stage before their first reset: :func:`fork_stage`.)"""
        weights, optimizer = state["model"], state["optimizer"]
        if self.model.recall_head is not None and not any(k.startswith("recall_head.") for k in weights):
            weights, optimizer = self._with_new_recall_head(weights, optimizer)
        ckpt.load_model_weights(self.model, weights, path)
        self._load_optimizer(optimizer)
        self.global_step = int(state["global_step"])
        self.update = int(state["update"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.lr_scale = restored_lr_scale(self.cfg, state, "fork")
        saved = state.get("curriculum")
        if self.promotion is not None and saved is not None:
            self.promotion.load_state_dict({**saved, "successes": [], "updates_in_stage": 0,
                                            "missing_success": 0})
        elif self.promotion is not None:  # a curriculum begins at the fork
            self.promotion.history = [{"stage": 0, "step": self.global_step, "elapsed": self.elapsed}]

    def _with_new_recall_head(self, weights: dict, optimizer: dict) -> tuple[dict, dict]:
        """A fork that adds ``model.recall_lags`` to a run without it: the checkpoint's weights and
        Adam state with this model's freshly drawn recall head beside them (its parameters come
        last in the model, so the checkpoint's keep their optimizer indices; Adam starts their
        moments at the first step)."""
        head = {k: v for k, v in self.model.state_dict().items() if k.startswith("recall_head.")}
        groups = optimizer.get("param_groups", [])
        known = sum(len(g["params"]) for g in groups)
        added = sum(1 for n, _ in self.model.named_parameters() if n.startswith("recall_head."))
        if len(groups) != 1 or known + added != len(list(self.model.parameters())):
            return weights, optimizer  # not a checkpoint of this model without the head: let the load say so
        group = {**groups[0], "params": list(groups[0]["params"]) + list(range(known, known + added))}
        return {**weights, **head}, {**optimizer, "param_groups": [group]}

    def boundary_state(self) -> dict:
        """:meth:`state_dict` at an update boundary, detached from the live model and optimizer (a
        copy of their tensors; everything else is plain data or copies already): what a stop in
        the middle of the next update saves. Costs a copy of the weights and Adam's moments."""
        state = self.state_dict()
        state["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
        state["optimizer"] = copy.deepcopy(state["optimizer"])
        state["truncation"] = copy.deepcopy(state["truncation"])
        return state

    def stop_at_boundary(self, boundary: dict) -> Path:
        """Abandon the update in flight: counters, weights and optimizer back to ``boundary``, which
        is saved as that step's checkpoint (unless one is on disk already: then it is the same)."""
        self.global_step = int(boundary["global_step"])
        self.update = int(boundary["update"])
        self.elapsed = float(boundary["elapsed"])
        self.lr_scale = float(boundary["lr_scale"])
        self.model.load_state_dict(boundary["model"])
        self.optimizer.load_state_dict(boundary["optimizer"])
        path = self.run_dir / "checkpoints" / f"step_{self.global_step:012d}.pt"
        if not path.is_file():
            self.save_checkpoint(boundary)
        return path

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Evaluate on the first ``run.eval_episodes`` held-out level seeds -> ``eval/*`` scalars.

        With a curriculum, ``eval/*`` is the target task (the last stage), and while training is
        in an earlier stage, the same levels are played in that stage too (``eval_stage/*``).
        Uses a private sampling generator, so training's RNG streams are untouched."""
        from .evaluation import Evaluator, seeds_from_range
        r = self.cfg.run
        seeds = seeds_from_range(self.cfg.env.eval_seeds, r.eval_episodes)
        p = self.promotion
        runs = [("eval/", None)]  # (prefix, reset params: None = the evaluator's, the target's)
        if p is not None and p.stage != curriculum.target_stage(self.cfg):
            runs.append(("eval_stage/", curriculum.stage_params(self.cfg, p.stage)))
        t0 = time.perf_counter()
        scalars: dict = {}
        saved = rng_states(self.device)  # env construction must not shift training's RNG streams
        try:
            if self.evaluator is None:
                self.evaluator = Evaluator(curriculum.stage_env(self.cfg), min(self.cfg.env.num_envs, len(seeds)))
            for prefix, params in runs:
                self.console.phase("evaluate", len(seeds))
                result = self.evaluator.run(self.model, seeds, deterministic=False, device=self.device,
                                            sample_seed=self.cfg.run.seed, progress=self._on_episode,
                                            reset_params=params)
                scalars.update(result.scalars(prefix))
        finally:
            set_rng_states(saved, self.device)
        if len(runs) > 1:
            scalars["eval_stage/stage"] = float(p.stage)
        scalars["time/eval_seconds"] = time.perf_counter() - t0
        return scalars

    @staticmethod
    def eval_score(scalars: dict) -> float:
        """What "best" means: eval success, or eval return for tasks without a success flag."""
        return float(scalars.get("eval/success", scalars.get("eval/return")))

    # ---- console, progress and signals ----------------------------------------------------------
    @property
    def progress(self):
        """The :class:`~ppo_tbptt.progress.UpdateProgress` of the update in flight (None: quiet)."""
        return self.console.progress

    def say(self, line: str, err: bool = False) -> None:
        """A console line (not with ``quiet``), also written to the run's ``train.log``."""
        self.console.say(line, err)

    def warn(self, message: str) -> None:
        """A warning (also with ``quiet``, and on every rank): stderr and ``train.log``."""
        self.console.warn(message)

    def _on_collect_step(self, steps: int) -> None:
        self.stop.check()
        # (rank 0's steps stand for every rank's: the ranks step alike)
        self.console.advance(steps * self.dist.world_size)

    def _on_minibatch(self, done: int) -> None:
        self.stop.check()
        self.console.advance(done)

    def _on_episode(self, done: int, total: int, episodes: list) -> None:
        self.stop.check()
        self.console.advance(done)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop at the next update boundary: save a checkpoint, close the envs, return from train()
        (ranks: once they agree, at the end of the update in flight)."""
        self.stop.request(signum)

    def _on_signal(self, signum, frame) -> None:
        self.stop.on_signal(signum, frame)

    def _on_wakeup(self, signum: int) -> None:
        self.stop.on_wakeup(signum)

    @property
    def _stop_now(self) -> bool:
        return self.stop.now

    @property
    def interrupted(self) -> int | None:
        """The signal number that stopped training early, or None."""
        return self.stop.signal

    def close(self) -> None:
        """Close the evaluator, the envs, the metrics writer and the console (train() does this)."""
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator = None
        self.envs.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.console.close()
