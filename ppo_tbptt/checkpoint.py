"""Checkpoints: atomic writes (temp file + rename), safe loads (weights_only)."""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def atomic_save(obj, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash mid-write never leaves a broken file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() gives the run's other files
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True`` (no code from a foreign file). Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupted, or carrying pickled code
        # torch's own message for a refused pickle suggests weights_only=False: not advice to pass on
        raise CheckpointError(f"checkpoint {path}: cannot be read: truncated, corrupted, or holding "
                              f"more than tensors and plain data ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise CheckpointError(f"checkpoint {path}: not a ppo_tbptt checkpoint (no model/config)")
    return obj


def load_model_weights(model: torch.nn.Module, weights: dict, path: Path | str = "checkpoint") -> None:
    """``model.load_state_dict(weights)``; a checkpoint from another architecture raises a one-line
    CheckpointError naming the first mismatches instead of torch's multi-line RuntimeError."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch: {', '.join(shapes[:2])}{' ...' if len(shapes) > 2 else ''}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model of its config "
                              f"(another architecture?): {'; '.join(parts)}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model: "
                              f"{str(exc).splitlines()[0]}") from None


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """``step_*.pt`` files in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_or_file: Path) -> Path:
    """A checkpoint file itself, or the newest ``step_*.pt`` in a run folder (or its checkpoints/)."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such run folder or checkpoint file")
    for d in (p / "checkpoints", p):
        files = checkpoint_files(d)
        if files:
            return files[-1]
    raise CheckpointError(f"{p}: no checkpoint found (expected {p}/checkpoints/step_*.pt)")


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for p in checkpoint_files(ckpt_dir)[:-keep]:
        p.unlink(missing_ok=True)


def rng_states(device: torch.device) -> dict:
    """python, numpy and torch global RNG states as checkpoint-safe data (no pickled objects)."""
    np_state = np.random.get_state(legacy=False)
    out = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore :func:`rng_states`'s output."""
    random.setstate(_tuplify(states["python"]))
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
