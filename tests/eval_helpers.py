"""Tiny CueRecall runs shared by the evaluation / resume / checkpoint tests (seconds on a CPU)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ppo_tbptt.config import Config, load

TINY = [
    "env.num_envs=4", "env.kwargs.delay=3", "model.hidden_size=16", "model.hidden_layer=16",
    "ppo.rollout_steps=16", "ppo.epochs=2", "ppo.minibatches=2", "tbptt.sequence_length=8",
    "run.total_steps=448", "run.checkpoint_every=0", "run.torch_threads=1", "run.device=cpu",
]


def tiny_config(*extra: str) -> Config:
    return load("cue_recall", TINY + list(extra))


def train_tiny(run_dir: Path, *extra: str):
    from ppo_tbptt.trainer import Trainer
    trainer = Trainer(tiny_config(*extra), Path(run_dir), torch.device("cpu"), quiet=True)
    trainer.train(handle_signals=False)
    return trainer


def interrupt_after(trainer, update: int) -> None:
    """Make ``trainer`` ask itself to stop (as a SIGTERM would) once update ``update`` is done."""
    import signal
    original = trainer.train_update

    def update_then_interrupt():
        out = original()
        if trainer.update == update:
            trainer.request_stop(signal.SIGTERM)
        return out

    trainer.train_update = update_then_interrupt


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock dependent values (time, time/*, SPS)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.append({k: v for k, v in rec.items()
                     if k != "time" and not k.startswith("time/") and k != "charts/SPS"})
    return rows


def _cuda_param():
    import pytest
    return pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])


#: Devices to parametrize device-dependent tests over: the CPU always, CUDA where present
#: (those cases carry the ``gpu`` marker: ``pytest -m gpu`` runs just them).
DEVICES = ["cpu", _cuda_param()]


@contextmanager
def exact_cuda():
    """cuDNN with deterministic kernels and without TF32 (full float32 in convolutions and the
    recurrent matmuls), so CUDA results can be compared as tightly as CPU results; restored after."""
    b = torch.backends.cudnn
    prev = (b.deterministic, b.benchmark, b.allow_tf32)
    b.deterministic, b.benchmark, b.allow_tf32 = True, False, False
    try:
        yield
    finally:
        b.deterministic, b.benchmark, b.allow_tf32 = prev
