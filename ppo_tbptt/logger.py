"""All metrics flow here: TensorBoard scalars (and a tracker's, e.g. wandb), one JSON line per update,
and ``train.log`` (the console's lines are written by :mod:`ppo_tbptt.console`)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class MetricsWriter:
    """Writes each update's scalars to TensorBoard, to ``metrics.jsonl`` and to ``tracker`` (if any:
    :class:`ppo_tbptt.tracking.WandbTracker`) under the same tags."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 tracker=None):
        """``resume_step``: continuing a run from a checkpoint at that step; rows logged after it
        (by the interrupted process) are dropped from ``metrics.jsonl`` and purged from TensorBoard
        (a tracker keeps them: it plots against ``global_step``, so they overlap the new ones)."""
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.run_dir / "metrics.jsonl", resume_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._curves: dict[str, list] = {}  # curves logged since the last row
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(self.run_dir), purge_step=purge)

    def text(self, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text)

    def curve(self, tag: str, values, global_step: int) -> None:
        """A 1-D curve indexed by lag (e.g. phi_k) as a TensorBoard histogram: bucket k holds
        ``values[k]``, so the histogram's shape is the curve. The next ``metrics.jsonl`` row holds
        it as a list under the same tag."""
        self._curves[tag] = [float(x) if math.isfinite(float(x)) else None for x in values]
        if self.tb is None:
            return
        import numpy as np
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0)
        k = np.arange(len(v), dtype=np.float64)
        total = float(v.sum())
        self.tb.add_histogram_raw(tag, min=0.0, max=float(max(len(v) - 1, 0)), num=total,
                                  sum=float((k * v).sum()), sum_squares=float((k * k * v).sum()),
                                  bucket_limits=(k + 0.5).tolist(), bucket_counts=v.tolist(),
                                  global_step=global_step)

    def scalars(self, global_step: int, scalars: dict, wall_time: float | None = None) -> None:
        t = time.time() if wall_time is None else wall_time
        clean = {k: float(v) for k, v in scalars.items()}
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, global_step, walltime=t)
            self.tb.flush()
        if self.tracker is not None:
            self.tracker.log(global_step, clean)
        rec = {"global_step": int(global_step), "time": t}
        rec.update({k: (v if math.isfinite(v) else None) for k, v in clean.items()})
        rec.update(self._curves)
        self._curves = {}
        self._jsonl.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        self._jsonl.close()


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` (a torn last line is skipped). ValueError if none."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl (expected a run folder or a metrics.jsonl file)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Keep only the rows of ``metrics.jsonl`` with ``global_step <= max_step`` (and drop a torn last
    line); rewritten atomically. Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            keep = int(rec["global_step"]) <= max_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def console(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


LOG_NAME = "train.log"


class RunLog:
    """``train.log`` in the run folder: the lines the trainer prints (not the progress bar), each
    with a time stamp; a resumed run appends to it."""

    def __init__(self, run_dir: Path):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._f = open(Path(run_dir) / LOG_NAME, "a", buffering=1)

    def write(self, text: str) -> None:
        if self._f.closed:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._f.write("".join(f"{stamp} {line}\n" for line in text.splitlines() or [""]))

    def close(self) -> None:
        self._f.close()


def append_log(run_dir: Path, text: str) -> None:
    """Add ``text`` to ``run_dir``'s ``train.log`` (if the folder exists; never raises)."""
    try:
        if Path(run_dir).is_dir():
            log = RunLog(run_dir)
            log.write(text)
            log.close()
    except OSError:
        pass
