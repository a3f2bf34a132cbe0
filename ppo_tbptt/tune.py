"""``python -m ppo_tbptt.tune --config NAME --trials N [--storage URL] [--search FILE] [--study-name NAME]``

Hyperparameter search with Optuna. Each trial is a normal training run (its own run folder, the
config with the trial's values as ``--set``-style overrides, validated as the command line's are)
with the periodic held-out evaluation on: every evaluation's score is reported to the study, and
the pruner (median by default) stops a trial that falls behind; a pruned run stops cleanly at the
end of that update with a checkpoint, and its folder stays. The objective is the held-out score of
the last evaluation, at the end of the run: success (``--objective success``), return, or
``auto`` (success where the env reports one, else return, as ``eval/best`` does).

The study lives in ``--storage`` (any database URL Optuna's RDB storage takes; default a SQLite file
in the study's folder). The same command again continues it (``load_if_exists``), and several
processes, on one machine or many, work on one study through one storage URL: that is Optuna's own
distributed mode. A trial that does not finish is marked FAIL and its parameters are queued again,
once, for the next trial to take (a Ctrl-C: at once; a crashed or killed process: when a later
process finds its heartbeat stale, after ``--heartbeat`` x 2 seconds). On a new study the config's
own values are queued as the first trial (the baseline; ``--no-baseline`` skips it).

The search space, a YAML mapping from config keys (dotted, as ``--set`` takes them, reaching into
mappings) to ranges or choices::

    ppo.lr.initial: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    ppo.epochs: {type: int, low: 2, high: 8}           # step: N, or log: true
    tbptt.strategy: {type: categorical, choices: [fixed, random]}
    model.hidden_size: [64, 128, 256]                   # a list: categorical

Without ``--search``, :data:`DEFAULT_SPACE` (``--print-search`` shows it). At the end: a table of
the best trials, and Optuna's history and importance plots as PNG in the study's folder.
Exit codes: 0 done; 2 bad input (config, search file, a study created with another config or
space); 130 stopped by Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path

import yaml

from .cli import DEVICE_HELP, add_common, device_arg
from .config import ConfigError, apply_overrides, dump_yaml, from_dict, load, resolve_path

INSTALL_HINT = 'pip install "ppo_tbptt[tune]" (optuna, matplotlib)'

#: The default search space for recurrent PPO. The learning rate and entropy bonus move their
#: schedules' ``initial`` values (a configured ``final`` stays), so a config's annealing stays.
DEFAULT_SPACE = {
    "ppo.lr.initial": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
    "ppo.ent_coef.initial": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True},
    "tbptt.sequence_length": {"type": "categorical", "choices": [8, 16, 32, 64]},
    "tbptt.strategy": {"type": "categorical", "choices": ["fixed", "random"]},
    "model.hidden_size": {"type": "categorical", "choices": [64, 128, 256]},
    "ppo.epochs": {"type": "int", "low": 2, "high": 8},
    "ppo.minibatches": {"type": "categorical", "choices": [2, 4, 8]},
}

OBJECTIVES = {"success": "eval/success", "return": "eval/return"}


class ObjectiveError(ValueError):
    """The evaluation does not report what ``--objective`` asks for."""


class SearchSpaceError(ValueError):
    """A search space that cannot be used: every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# ---- the search space ---------------------------------------------------------------------------------
def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_space(raw, where: str = "search space") -> dict[str, dict]:
    """A search space (plain data, see the module docstring) -> ``{key: spec}`` normalised (a list
    becomes ``{type: categorical, choices: list}``). Raises SearchSpaceError listing every problem
    of form; :func:`check_space` then checks the keys and values against a config."""
    if not isinstance(raw, dict) or not raw:
        raise SearchSpaceError([f"{where}: expected a mapping of config keys to ranges or choices, "
                                f"got {type(raw).__name__ if raw else 'nothing'}"])
    problems, out = [], {}
    for key, spec in raw.items():
        at = f"{where}: {key}"
        if not isinstance(key, str) or len([k for k in key.split(".") if k]) < 2:
            problems.append(f"{at}: a key is a config field as --set names it (section.key)")
            continue
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict):
            problems.append(f"{at}: expected {{type: float|int|categorical, ...}} or a list of choices, got {spec!r}")
            continue
        kind = spec.get("type")
        allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
                   "categorical": {"type", "choices"}}
        if kind not in allowed:
            problems.append(f"{at}: type must be float, int or categorical, got {kind!r}")
            continue
        extra = sorted(set(spec) - allowed[kind])
        if extra:
            problems.append(f"{at}: unknown entries {', '.join(map(str, extra))} for type {kind} "
                            f"(known: {', '.join(sorted(allowed[kind]))})")
            continue
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                problems.append(f"{at}: choices must be a non-empty list")
            elif not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                problems.append(f"{at}: choices must be numbers, strings, booleans or null")
            elif len(set(map(repr, choices))) != len(choices):
                problems.append(f"{at}: choices repeat a value")
            else:
                out[key] = {"type": kind, "choices": list(choices)}
            continue
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        whole = kind == "int"
        if not (_number(low) and _number(high)) or (whole and not (float(low).is_integer() and float(high).is_integer())):
            problems.append(f"{at}: low and high must be {'integers' if whole else 'numbers'}, got {low!r}, {high!r}")
        elif not low < high:
            problems.append(f"{at}: low ({low}) must be below high ({high})")
        elif not isinstance(log, bool):
            problems.append(f"{at}: log must be true or false, got {log!r}")
        elif log and low <= 0:
            problems.append(f"{at}: a log range needs low > 0, got {low}")
        elif step is not None and (not _number(step) or step <= 0 or (whole and not float(step).is_integer())):
            problems.append(f"{at}: step must be a positive {'integer' if whole else 'number'}, got {step!r}")
        elif step is not None and log and not (whole and step == 1):
            problems.append(f"{at}: step and log cannot be combined")
        else:
            s = {"type": kind, "low": int(low) if whole else float(low), "high": int(high) if whole else float(high),
                 "log": log}
            if step is not None:
                s["step"] = int(step) if whole else float(step)
            out[key] = s
    if problems:
        raise SearchSpaceError(problems)
    return out


def load_space(path: str | None) -> dict[str, dict]:
    """The space of a YAML file (``None``: :data:`DEFAULT_SPACE`); raises SearchSpaceError."""
    if path is None:
        return parse_space(DEFAULT_SPACE)
    p = Path(path)
    if not p.is_file():
        raise SearchSpaceError([f"--search {path}: no such file"])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SearchSpaceError([f"--search {path}: not valid YAML: {str(exc).splitlines()[0]}"]) from None
    return parse_space(raw, where=str(path))


def value_text(value) -> str:
    """A value as ``--set`` reads it back (YAML: ``1.0e-05``, not ``1e-05``, which YAML reads as text)."""
    return yaml.safe_dump(value, default_flow_style=True).split("\n")[0]


def overrides_for(params: dict) -> list[str]:
    return [f"{k}={value_text(v)}" for k, v in params.items()]


def trial_config(base_raw: dict, params: dict):
    """The config of a trial: the base config (plain data) with ``params`` set as ``--set`` would
    set them. Raises ConfigError listing every problem."""
    raw, problems = apply_overrides(base_raw, overrides_for(params))
    if problems:
        raise ConfigError(problems)
    return from_dict(raw)


def check_space(space: dict[str, dict], base_raw: dict) -> None:
    """Every key must name a config field, and each end of a range and each choice, set alone on
    the base config, must give a valid config (SearchSpaceError listing every problem)."""
    problems = []
    for key, spec in space.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for v in values:
            try:
                trial_config(base_raw, {key: v})
            except ConfigError as exc:
                problems.append(f"{key}={value_text(v)}: " + "; ".join(exc.problems))
                break
    if problems:
        raise SearchSpaceError(problems)


def base_values(space: dict[str, dict], base_raw: dict) -> dict | None:
    """The base config's own value of every key, or None if one lies outside the space."""
    out = {}
    for key in space:
        node = base_raw
        for k in key.split("."):
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        spec = space[key]
        if spec["type"] == "categorical":
            if node not in spec["choices"]:
                return None
        elif not (_number(node) and spec["low"] <= node <= spec["high"]):
            return None
        out[key] = node
    return out


def suggest(trial, space: dict[str, dict]) -> dict:
    """Draw every key of ``space`` from ``trial`` (Optuna's ``suggest_*``)."""
    params = {}
    for key, s in space.items():
        if s["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, s["choices"])
        elif s["type"] == "int":
            params[key] = trial.suggest_int(key, s["low"], s["high"], step=s.get("step", 1), log=s["log"])
        else:
            params[key] = trial.suggest_float(key, s["low"], s["high"], step=s.get("step"), log=s["log"])
    return params


# ---- trials -------------------------------------------------------------------------------------------
def trial_trainer_class():
    """A :class:`~ppo_tbptt.trainer.Trainer` whose periodic evaluation reports to an Optuna trial and
    stops the run (as a signal would: at the end of the update, with a checkpoint) once the pruner
    says so."""
    from .trainer import Trainer

    class TrialTrainer(Trainer):
        trial = None
        objective = "auto"
        on_eval = None
        pruned_at: int | None = None
        may_prune = True
        last_eval: tuple[int, float] | None = None

        def evaluate(self) -> dict:
            scalars = super().evaluate()
            score = objective_value(scalars, self.objective)
            self.last_eval = (self.global_step, score)
            if self.trial is not None:
                self.trial.report(score, step=self.global_step)
                if self.may_prune and self.pruned_at is None and self.trial.should_prune():
                    self.pruned_at = self.global_step
                    self.request_stop()
            if self.on_eval is not None:
                self.on_eval(self.global_step, score, self.pruned_at is not None)
            return scalars

    return TrialTrainer


def objective_value(scalars: dict, objective: str) -> float:
    from .trainer import Trainer
    if objective == "auto":
        return Trainer.eval_score(scalars)
    key = OBJECTIVES[objective]
    if scalars.get(key) is None:
        raise ObjectiveError(f"--objective {objective}: the evaluation reports no {key} (this env has no "
                             "success flag: use --objective return or auto)")
    return float(scalars[key])


def make_trial_dir(root: Path, number: int, seed: int) -> Path:
    from .train import make_run_dir
    try:
        return make_run_dir(str(root), f"trial_{number:04d}", "", seed)
    except FileExistsError:  # (another storage's trial of this number left a folder here)
        return make_run_dir(str(root), None, f"trial_{number:04d}", seed)


def run_trial(trial, base_raw: dict, space: dict, root: Path, device, objective: str, say) -> float:
    """One trial: draw its values, train its run, report each evaluation; the objective value, or
    optuna.TrialPruned (the run stopped, its folder kept)."""
    import optuna
    from .logger import append_log
    params = suggest(trial, space)
    sets = overrides_for(params)
    trial.set_user_attr("overrides", sets)
    try:
        cfg = trial_config(base_raw, params)
    except ConfigError as exc:  # a combination the config refuses (each value alone passed)
        trial.set_user_attr("error", "; ".join(exc.problems))
        say(f"trial {trial.number}: {' '.join(sets)} is not a valid config: {'; '.join(exc.problems)}")
        raise optuna.TrialPruned("invalid config") from None
    run_dir = make_trial_dir(root, trial.number, cfg.run.seed)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("host", socket.gethostname())
    say(f"trial {trial.number}: {' '.join(sets)}  ->  {run_dir}")

    def on_eval(step: int, score: float, pruned: bool) -> None:
        say(f"trial {trial.number}: eval at step {step:,}: {score:.3f}" + ("  (pruned)" if pruned else ""))

    t0 = time.time()
    from .trainer import EnvFailure, TrainingDiverged
    try:
        trainer = trial_trainer_class()(cfg, run_dir, device, quiet=True)
        trainer.trial, trainer.objective, trainer.on_eval = trial, objective, on_eval
        trainer.train()
        stopped = trainer.interrupted is not None and trainer.pruned_at is None
    except KeyboardInterrupt:  # a second Ctrl-C: the trainer stopped at once
        stopped = True
    except (TrainingDiverged, EnvFailure, ValueError) as exc:  # (EnvConfigError, ModelConfigError)
        trial.set_user_attr("error", str(exc).splitlines()[0])
        say(f"trial {trial.number}: failed: {str(exc).splitlines()[0]}")
        raise
    if stopped:  # Ctrl-C or SIGTERM: the trial fails (Optuna marks it), its values go again once
        requeue(trial)
        raise KeyboardInterrupt
    if trainer.pruned_at is not None:
        append_log(run_dir, f"pruned by the study at step {trainer.pruned_at:,} "
                            f"(score {trainer.last_eval[1]:.3f})")
        say(f"trial {trial.number}: pruned at step {trainer.pruned_at:,} ({time.time() - t0:.0f} s)")
        raise optuna.TrialPruned(f"pruned at step {trainer.pruned_at}")
    if trainer.last_eval is None or trainer.last_eval[0] != trainer.global_step:
        trainer.may_prune = False  # the run is over: this score is its value
        try:
            trainer.evaluate()  # the final score, at the end of the run (reported too)
        finally:
            if trainer.evaluator is not None:
                trainer.evaluator.close()
    score = trainer.last_eval[1]
    append_log(run_dir, f"trial {trial.number} of study {trial.study.study_name}: value {score:.4f}")
    say(f"trial {trial.number}: {score:.3f} at step {trainer.global_step:,} ({time.time() - t0:.0f} s)")
    return score


def retry_callback():
    """Optuna's callback that queues a failed trial's values again, once (a retry is not retried)."""
    from optuna import storages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (marked experimental)
        retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
        return retry(max_retry=1) if retry is not None else storages.RetryFailedTrialCallback(max_retry=1)


def requeue(trial) -> None:
    """Queue the values of ``trial`` (in progress, about to fail) again, as Optuna's retry of a
    stale trial does: same parameters and attributes, the retry history in its system attributes."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    retry_callback()(trial.study, frozen)


# ---- the study ------------------------------------------------------------------------------------------
_CREATE_ATTEMPTS = 5


def _lost_creation_race(exc: BaseException) -> bool:
    """Whether ``exc`` is what a process sees when another one created the same tables or rows
    first (SQLite, PostgreSQL and MySQL wordings)."""
    if type(exc).__name__ not in ("OperationalError", "IntegrityError", "ProgrammingError"):
        return False
    text = str(exc).lower()
    return any(k in text for k in ("already exists", "unique constraint", "duplicate"))


def storage_for(url: str, heartbeat: int):
    """Optuna's RDB storage at ``url`` with a heartbeat: a trial whose process died is found stale
    by a later process, marked FAIL, and its parameters queued again once."""
    import optuna
    from optuna import storages
    retry = retry_callback()
    kw = ({"heartbeat_stale_trial_callback": retry} if hasattr(storages, "RetryHeartbeatStaleTrialCallback")
          else {"failed_trial_callback": retry})
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the heartbeat is marked experimental)
                    return storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat, **kw)
            except Exception as exc:
                # processes started together on a new database race to create its tables and its
                # version row: the loser sees "already exists" or a unique-key clash; by the next
                # try the winner has made them, and opening finds them in place
                if attempt + 1 == _CREATE_ATTEMPTS or not _lost_creation_race(exc):
                    raise
                time.sleep(0.1 * (attempt + 1))
    except (optuna.exceptions.OptunaError, ValueError, ImportError) as exc:
        raise ValueError(f"--storage {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # sqlalchemy's own errors: no such driver, cannot connect
        raise ValueError(f"--storage {url}: cannot open it: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}") from None


def make_pruner(spec: str, warmup_steps: int = 0):
    """``median``, ``none`` or ``threshold:X``; no trial is pruned before env step ``warmup_steps``."""
    import optuna
    if spec == "none":
        return optuna.pruners.NopPruner()
    if spec == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup_steps)
    if spec.startswith("threshold:"):
        return optuna.pruners.ThresholdPruner(lower=float(spec.split(":", 1)[1]), n_warmup_steps=warmup_steps)
    raise ValueError(spec)


def pruner_arg(text: str) -> str:
    if text in ("median", "none"):
        return text
    if text.startswith("threshold:"):
        try:
            float(text.split(":", 1)[1])
            return text
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected median, none or threshold:X (prune a trial whose score is "
                                      f"below X), got {text!r}")


def summary_table(study, top: int = 5) -> str:
    """The best completed trials (value, parameters, run folder) and the counts by state."""
    import optuna
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in (S.COMPLETE, S.PRUNED, S.FAIL, S.RUNNING, S.WAITING)}
    lines = [f"study {study.study_name}: {len(trials)} trials (" +
             ", ".join(f"{n} {k}" for k, n in counts.items() if n) + ")"]
    done = sorted((t for t in trials if t.state == S.COMPLETE), key=lambda t: -t.value)
    if not done:
        return "\n".join(lines + ["no completed trial yet"])
    keys = list(dict.fromkeys(k for t in done for k in t.params))
    head = ["trial", "value"] + keys
    shown = done[:top] + [t for t in done[top:] if t.user_attrs.get("baseline")]  # the baseline always
    rows = [[_label(t), f"{t.value:.3f}"] + [_fmt(t.params.get(k)) for k in keys] for t in shown]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    best = done[0]
    lines.append(f"best: trial {best.number}, value {best.value:.3f}, run {best.user_attrs.get('run_dir', '?')}")
    sets = study.user_attrs.get("overrides", []) + best.user_attrs.get("overrides", [])
    config = shlex.quote(study.user_attrs.get("config_arg", "CONFIG"))
    lines.append(" ".join(["train it: python -m ppo_tbptt.train --config", config]
                          + [f"--set {shlex.quote(o)}" for o in sets]))
    return "\n".join(lines)


def _label(t) -> str:
    notes = (["baseline"] if t.user_attrs.get("baseline") else []) + (
        [f"retry of {t.system_attrs['failed_trial']}"] if "failed_trial" in t.system_attrs else [])
    return f"{t.number}" + (f" ({', '.join(notes)})" if notes else "")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def write_plots(study, folder: Path) -> list[str]:
    """Optuna's optimization history and parameter importance plots as PNG in ``folder``; lines
    saying what was written or why not (importance needs two completed trials)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    plots = [("history.png", vis.plot_optimization_history, 1), ("importance.png", vis.plot_param_importances, 2)]
    for name, plot, need in plots:
        if len(done) < need:
            out.append(f"{name}: not drawn, it needs {need} completed trial{'s' if need > 1 else ''} "
                       f"({len(done)} so far)")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the plots are marked experimental)
                ax = plot(study)
            fig = (ax if not hasattr(ax, "figure") else ax.figure)
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=100)
            plt.close(fig)
            out.append(f"wrote {folder / name}")
        except Exception as exc:  # e.g. no parameter varies: the study's results stand without the plot
            out.append(f"{name}: not drawn: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            plt.close("all")
    return out


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.tune",
                                description="Hyperparameter search with Optuna, pruned on the periodic "
                                            "held-out evaluation.")
    p.add_argument("--config", help="config name (ppo_tbptt/configs/) or a path: what each trial trains")
    p.add_argument("--trials", type=int, default=None, help="trials this process runs (required)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL shared by every process of the study, e.g. sqlite:///study.db or "
                        "postgresql://host/db (default: sqlite:///<run.out_dir>/<study>/study.db)")
    p.add_argument("--study-name", default=None, help="default: the config's name followed by _tune")
    p.add_argument("--search", default=None, metavar="FILE.yaml", help="the search space (default: --print-search)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a field of the base config for every trial (repeatable)")
    p.add_argument("--objective", choices=["auto", "success", "return"], default="auto",
                   help="held-out score to maximise (default auto: success where the env reports one, else return)")
    p.add_argument("--pruner", type=pruner_arg, default="median",
                   help="median (default: below the median of earlier trials at the same step, after 2 "
                        "completed trials), none, or threshold:X")
    p.add_argument("--prune-after", type=float, default=0.5, metavar="FRACTION",
                   help="no pruning in the first FRACTION of a run (default 0.5: on memory tasks the early "
                        "evaluations are at chance for every setting and say nothing); 0 prunes from the first")
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="seed of the TPE sampler (leave unset when several processes share a study: they "
                        "would draw the same values)")
    p.add_argument("--total-trials", type=int, default=None,
                   help="also stop once the study holds this many finished trials (over all processes)")
    p.add_argument("--no-baseline", action="store_true", help="do not queue the config's own values as the first trial")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats (a killed process's trial is found "
                        "stale after twice this; default 60)")
    p.add_argument("--out-dir", default=None,
                   help="folder of the study's trial runs and plots (default: <run.out_dir>/<study>)")
    p.add_argument("--device", type=device_arg, default=None, help=f"training device: {DEVICE_HELP}")
    p.add_argument("--print-search", action="store_true", help="print the search space as YAML and exit")
    add_common(p)
    args = p.parse_args(argv)
    if args.print_search:
        return args
    if args.config is None or args.trials is None:
        p.error("--config and --trials are required")
    if args.trials < 0:
        p.error(f"--trials must be >= 0, got {args.trials}")
    if not 0 <= args.prune_after <= 1:
        p.error(f"--prune-after must be in [0, 1], got {args.prune_after}")
    if args.heartbeat < 1:
        p.error(f"--heartbeat must be >= 1, got {args.heartbeat}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        space = load_space(args.search)
    except SearchSpaceError as exc:
        return fail("; ".join(exc.problems))
    if args.print_search:
        print("\n".join(f"{k}: {yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip()}"
                        for k, v in space.items()))
        return 0
    try:
        import optuna
    except ImportError:
        return fail(f"optuna is not installed: {INSTALL_HINT}")
    from .utils import resolve_device
    overrides = list(args.overrides) + ([f"run.device={args.device}"] if args.device else [])
    try:
        cfg = load(args.config, overrides)
        device = resolve_device(cfg.run.device)
        base_raw = cfg.to_dict()
        check_space(space, base_raw)
    except ConfigError as exc:
        return fail("; ".join(exc.problems))
    except SearchSpaceError as exc:
        return fail(f"search space {args.search or '(default)'}: " + "; ".join(exc.problems))
    except ValueError as exc:
        return fail(str(exc))
    notes = []
    if cfg.run.eval_every <= 0:  # pruning needs the periodic evaluation
        every = max(1, cfg.run.total_steps // 4)
        base_raw["run"]["eval_every"] = every
        notes.append(f"run.eval_every was 0: each trial evaluates every {every:,} env steps (a quarter of "
                     "run.total_steps), to report to the pruner; --set run.eval_every=N to choose")
    name = args.study_name or f"{resolve_path(args.config).stem}_tune"
    from .train import check_folder_name
    try:
        check_folder_name("--study-name", name)
    except ValueError as exc:
        return fail(str(exc))
    root = Path(args.out_dir) if args.out_dir else Path(cfg.run.out_dir) / name
    url = args.storage or f"sqlite:///{root / 'study.db'}"
    try:
        storage = storage_for(url, args.heartbeat)
    except ValueError as exc:
        return fail(str(exc))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=args.sampler_seed)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                pruner=make_pruner(args.pruner, int(args.prune_after * cfg.run.total_steps)),
                                load_if_exists=True)
    identity = {"config": resolve_path(args.config).stem, "overrides": list(args.overrides), "space": json.dumps(space, sort_keys=True),
                "objective": args.objective}
    if "space" in study.user_attrs:
        differ = [k for k, v in identity.items() if study.user_attrs.get(k) != v]
        if differ:
            return fail(f"study {name!r} in {url} was created with another {', '.join(differ)} "
                        f"(it has --config {study.user_attrs.get('config')}); continue it with the same, "
                        "or give another --study-name")
        print(f"continuing study {name!r} ({len(study.trials)} trials so far) in {url}")
    else:
        for k, v in identity.items():
            study.set_user_attr(k, v)
        study.set_user_attr("config_arg", str(args.config))  # (for the summary's command line)
        print(f"new study {name!r} in {url}")
        if not args.no_baseline:
            base = base_values(space, base_raw)
            if base is None:
                notes.append("the config's own values lie outside the search space: no baseline trial")
            else:
                study.enqueue_trial(base, user_attrs={"baseline": True})
    for line in notes:
        print(f"note: {line}")
    print(f"trial runs in {root}; objective: held-out {args.objective} of the last evaluation; "
          f"pruner: {args.pruner}" + (f" from step {int(args.prune_after * cfg.run.total_steps):,}"
                                      if args.pruner != "none" else ""), flush=True)

    def say(line: str) -> None:
        print(line, flush=True)

    def objective(trial):
        return run_trial(trial, base_raw, space, root, device, args.objective, say)

    callbacks = []
    if args.total_trials is not None:
        S = optuna.trial.TrialState
        callbacks.append(optuna.study.MaxTrialsCallback(args.total_trials, states=(S.COMPLETE, S.PRUNED)))
    code = 0
    try:
        from .envs import EnvConfigError
        from .model import ModelConfigError
        from .trainer import EnvFailure, TrainingDiverged
        study.optimize(objective, n_trials=args.trials, callbacks=callbacks, gc_after_trial=True,
                       catch=(TrainingDiverged, EnvFailure, EnvConfigError, ModelConfigError))
    except ObjectiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"stopped: the trial in progress is marked failed and its values queued again; continue with "
              f"the same command (storage {url})", file=sys.stderr)
        code = 130
    print(summary_table(study))
    for line in write_plots(study, root):
        print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
