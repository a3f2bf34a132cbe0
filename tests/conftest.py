import os

for k, v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
    os.environ.setdefault(k, v)

import pytest
import torch

from ppo_tbptt import config as C


@pytest.fixture(autouse=True)
def _torch_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_cue_config(core: str = "lstm", seq_len: int = 4, **run) -> C.Config:
    """A CueRecall config small enough for unit tests."""
    raw = {
        "env": {"id": "CueRecall-v0", "num_envs": 3, "kwargs": {"num_cues": 3, "delay": 3}},
        "model": {"core": core, "hidden_size": 8, "hidden_layer": 8, "num_layers": 2},
        "tbptt": {"sequence_length": seq_len},
        "ppo": {"rollout_steps": 13, "epochs": 2, "minibatches": 2, "lr": 1e-3},
        "run": {"total_steps": 3 * 13 * 2, "device": "cpu", "checkpoint_every": 0, **run},
    }
    return C.from_dict(raw)
