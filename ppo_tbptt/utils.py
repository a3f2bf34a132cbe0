"""Small shared helpers: seeding, device resolution, formatting."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). Env level seeds have their own generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, stream: str) -> int:
    """The seed of the run's random stream named ``stream`` (minibatch shuffle, a truncation
    strategy's sampler), split from ``seed`` as numpy's SeedSequence splits one: the streams are
    independent of each other and of the global RNGs that :func:`seed_everything` seeds with
    ``seed`` (a generator seeded with ``seed`` itself would repeat torch's global stream)."""
    key = [int(b) for b in stream.encode()]
    state = np.random.SeedSequence([int(seed), *key]).generate_state(2, np.uint32).astype(np.uint64)
    return int(state @ np.array([1, 2**32], np.uint64)) % 2**63


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu. Raises ValueError if cuda is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return dev


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
