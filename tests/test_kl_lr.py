"""``ppo.kl_target``: the learning rate's scale follows each update's approximate KL, reaches the
optimizer, travels in checkpoints (a resume goes on with it, bit-exact; a fork starts at 1), and
bad settings are config errors."""
from __future__ import annotations

import math

import pytest
import torch

from eval_helpers import interrupt_after, metric_rows, tiny_config, train_tiny
from ppo_tbptt import checkpoint as ckpt
from ppo_tbptt import config as C
from ppo_tbptt.resume import plan_resume
from ppo_tbptt.train import plan_fork
from ppo_tbptt.trainer import Trainer, kl_adapted_scale


def test_scale_moves_by_the_factor_outside_the_band_and_stays_in_its_bounds():
    # target 0.01: the band is [0.005, 0.02]
    assert kl_adapted_scale(1.0, 0.03, 0.01, 1.5, 0.1, 10) == pytest.approx(1 / 1.5)
    assert kl_adapted_scale(1.0, 0.0201, 0.01, 1.5, 0.1, 10) == pytest.approx(1 / 1.5)
    assert kl_adapted_scale(1.0, 0.004, 0.01, 1.5, 0.1, 10) == pytest.approx(1.5)
    for kl in (0.005, 0.01, 0.02):  # inside the band (edges included): unchanged
        assert kl_adapted_scale(2.0, kl, 0.01, 1.5, 0.1, 10) == 2.0
    assert kl_adapted_scale(9.0, 0.0, 0.01, 1.5, 0.1, 10) == 10  # capped above
    assert kl_adapted_scale(0.12, 1.0, 0.01, 1.5, 0.1, 10) == 0.1  # and below
    assert kl_adapted_scale(1.0, math.nan, 0.01, 2.0, 0.1, 10) == 0.5  # a NaN KL is not "small"


def _rates(run_dir) -> list[tuple[float, float | None]]:
    return [(r["charts/learning_rate"], r.get("charts/lr_scale")) for r in metric_rows(run_dir)]


@pytest.mark.parametrize("target,lr,expected_scales", [
    (1.0, 1e-3, [1, 2, 4, 4, 4]),              # every update's KL is far below half of 1: up, to the cap
    (1e-8, 1e-2, [1, 0.5, 0.25, 0.25, 0.25])  # ... far above twice 1e-8: down, to the floor
], ids=["small-kl", "large-kl"])
def test_each_update_trains_at_the_schedule_times_the_scale(tmp_path, target, lr, expected_scales):
    sets = [f"ppo.kl_target={target}", "ppo.kl_lr_factor=2", "ppo.kl_lr_min_scale=0.25",
            "ppo.kl_lr_max_scale=4", f"ppo.lr={{initial: {lr}, final: {lr / 2}, kind: linear}}",
            "run.total_steps=320"]
    seen = []
    tr = Trainer(tiny_config(*sets), tmp_path, torch.device("cpu"), quiet=True)
    step = tr.optimizer.step

    def spy(*a, **k):  # the rate Adam actually used
        seen.append(tr.optimizer.param_groups[0]["lr"])
        return step(*a, **k)

    tr.optimizer.step = spy
    tr.train(handle_signals=False)
    rows = metric_rows(tmp_path)
    assert len(rows) == 5
    for r, scale in zip(rows, expected_scales):
        base = lr - lr / 2 * (r["global_step"] - 64) / 320  # the schedule at the update's first step
        assert r["charts/lr_scale"] == pytest.approx(scale)
        assert r["charts/learning_rate"] == pytest.approx(base * scale)
        assert (r["losses/approx_kl"] < 0.5 * target) == (target == 1.0)
        assert (r["losses/approx_kl"] > 2 * target) == (target < 1.0)
    per_update = len(seen) // 5  # epochs x minibatches
    assert [seen[i * per_update] for i in range(5)] == pytest.approx([r["charts/learning_rate"] for r in rows])
    assert tr.lr_scale == pytest.approx(expected_scales[-1])


def test_without_a_target_the_rate_is_the_schedules(tmp_path):
    train_tiny(tmp_path, "ppo.lr=7.0e-4", "run.total_steps=192")
    assert _rates(tmp_path) == [(7e-4, None)] * 3


def test_resume_continues_with_the_saved_scale(tmp_path):
    sets = ["ppo.kl_target=1.0", "ppo.kl_lr_factor=1.5", "run.total_steps=384", "run.checkpoint_every=64"]
    train_tiny(tmp_path / "full", *sets)
    part = Trainer(tiny_config(*sets), tmp_path / "part", torch.device("cpu"), quiet=True)
    interrupt_after(part, 3)
    part.train(handle_signals=False)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "part"))
    assert state["lr_scale"] == pytest.approx(1.5 ** 3)

    # (at step 192) a resume keeps the saved scale within its (new) bounds, and says so
    plan = plan_resume(tmp_path / "part", ["ppo.kl_lr_max_scale=2"])
    assert any("goes on from 2" in line for line in plan.notes)
    assert any("3.375 is outside" in line for line in plan.warnings)
    clamped = Trainer(plan.cfg, tmp_path / "clamped", torch.device("cpu"), quiet=True)
    clamped.load_state_dict(state)
    base = clamped.cfg.ppo.lr.value(192, 384)
    assert clamped.lr_scale == 2 and clamped.coefs()[0] == pytest.approx(2 * base)
    clamped.close()
    off = plan_resume(tmp_path / "part", ["ppo.kl_target=0"])
    assert any("ppo.kl_target is off" in line for line in off.warnings)

    # a fork starts its scale at 1: its first rate is its ppo.lr's value
    _, _, _, cfg, lines = plan_fork(tmp_path / "part", [])
    assert any("starts at 1 (the checkpoint's was 3.375)" in line for line in lines)
    forked = Trainer(cfg, tmp_path / "fork", torch.device("cpu"), quiet=True)
    forked.load_fork_state(state)
    assert forked.global_step == 192 and forked.lr_scale == 1.0
    assert forked.coefs()[0] == pytest.approx(base)
    forked.close()
    _, _, _, _, lines = plan_fork(tmp_path / "part", ["ppo.kl_target=0"])
    assert any("ppo.kl_target is off" in line for line in lines)

    # the resume itself, to the end
    Trainer.from_run(tmp_path / "part", quiet=True).train(handle_signals=False)
    full, again = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "part")
    assert [r["charts/lr_scale"] for r in full] == pytest.approx([1.5 ** k for k in range(6)])
    assert again == full


@pytest.mark.parametrize("field,value", [("kl_target", -0.01), ("kl_target", math.nan), ("kl_lr_factor", 1.0),
                                         ("kl_lr_min_scale", 0.0), ("kl_lr_min_scale", 1.5),
                                         ("kl_lr_max_scale", 0.5), ("kl_lr_max_scale", math.inf)])
def test_bad_settings_are_config_errors(field, value):
    with pytest.raises(C.ConfigError, match=f"ppo.{field}"):
        C.from_dict({"ppo": {field: value}})
