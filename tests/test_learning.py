"""Learning on CueRecall: gradients that reach back over the delay are needed, and enough."""
import numpy as np
import pytest
import torch

from ppo_tbptt import config as C
from ppo_tbptt.trainer import Trainer


def final_success(tmp_path, seq_len: int, seed: int = 1, *extra: str) -> float:
    cfg = C.load("cue_recall.yaml", [f"tbptt.sequence_length={seq_len}", f"run.seed={seed}", *extra])
    torch.set_num_threads(2)
    tr = Trainer(cfg, tmp_path / f"L{seq_len}_{len(extra)}", torch.device("cpu"), log=False, quiet=True)
    history = []
    try:
        while tr.global_step < cfg.run.total_steps:
            history.append(tr.train_update().get("charts/success", np.nan))
    finally:
        tr.close()
    return float(np.nanmean(history[-10:]))


@pytest.mark.slow
def test_cue_recall_needs_gradients_over_the_delay(tmp_path):
    # delay 8 -> episodes of 10 steps; L = 16 covers them, L = 1 is BPTT(1, 1)
    full = final_success(tmp_path, 16)
    one = final_success(tmp_path, 1)
    print(f"CueRecall(4 cues, delay 8) success over the last 10 updates: L=16 {full:.3f}, L=1 {one:.3f}")
    assert full >= 0.9
    assert one <= 0.6
    assert full - one >= 0.3


@pytest.mark.slow
def test_cue_recall_learns_with_a_bfloat16_encoder(tmp_path):
    """The encoder in bfloat16 still hands the float32 core what it needs to carry the cue."""
    full = final_success(tmp_path, 16, 1, "model.encoder_dtype=bfloat16")
    print(f"CueRecall, bfloat16 encoder: L=16 {full:.3f}")
    assert full >= 0.9
