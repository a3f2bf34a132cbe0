"""Truncation settings: validation messages, and one trainer update per strategy with its instruments."""
from __future__ import annotations

import json

import pytest
import torch

from ppo_tbptt.config import ConfigError
from ppo_tbptt.trainer import Trainer

from trunc_helpers import tiny_config

torch.set_num_threads(1)  # small shared CPUs


@pytest.mark.parametrize("overrides,needle", [
    (["tbptt.strategy=overlap", "tbptt.sequence_length=4", "tbptt.stride=6"], "k1 = 6 must be <= k2"),
    (["tbptt.strategy=overlap", "tbptt.sequence_length=0"], "overlap needs a window length"),
    (["tbptt.stride=-1"], "tbptt.stride: must be >= 0"),
    (["tbptt.strategy=random", "tbptt.mean_length=1"], "tbptt.mean_length: must be > 1"),
    (["tbptt.strategy=random", "tbptt.segment_length=4", "tbptt.mean_length=4"],
     "tbptt.mean_length: must be > 4 = tbptt.segment_length"),
    (["tbptt.strategy=random", "tbptt.segment_length=0"], "tbptt.segment_length: must be >= 1"),
    (["tbptt.strategy=adaptive", "tbptt.k_min=8", "tbptt.k_max=4"], "tbptt.k_max: must be >= tbptt.k_min = 8"),
    (["tbptt.strategy=adaptive", "tbptt.target_bias=1.5"], "tbptt.target_bias: must be in (0, 1)"),
    (["tbptt.strategy=adaptive", "tbptt.adapt_tau=40", "tbptt.adapt_window=20"], "tbptt.adapt_tau"),
    (["tbptt.strategy=adaptive", "tbptt.adapt_window=20", "tbptt.adapt_burn_in=8"],
     "window 20 + burn-in 8 = 28 steps must fit in ppo.rollout_steps = 24"),
    (["tbptt.strategy=adaptive", "tbptt.k_max=24", "ppo.minibatches=8"],
     "ceil(24 steps / tbptt.k_max 24)"),
    (["tbptt.strategy=chunky"], "fixed, overlap, random, adaptive"),
])
def test_bad_truncation_settings_are_reported(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        tiny_config(*overrides)
    assert needle in str(exc.value)


def test_good_truncation_settings_load():
    cfg = tiny_config("tbptt.strategy=overlap", "tbptt.sequence_length=8", "tbptt.stride=2",
                      "tbptt.burn_in=true", "tbptt.refresh_states=true")
    assert (cfg.tbptt.stride, cfg.tbptt.sequence_length, cfg.tbptt.burn_in) == (2, 8, True)


ADAPTIVE = ["tbptt.strategy=adaptive", "tbptt.adapt_window=12", "tbptt.adapt_burn_in=2",
            "tbptt.adapt_tau=4", "tbptt.adapt_samples=8", "tbptt.k_max=12"]


@pytest.mark.parametrize("overrides,expected", [
    (["tbptt.strategy=fixed", "tbptt.sequence_length=4"], {"tbptt/K": 4.0}),
    (["tbptt.strategy=overlap", "tbptt.sequence_length=6", "tbptt.stride=2", "tbptt.burn_in=true"],
     {"tbptt/K": 6.0}),
    (["tbptt.strategy=random", "tbptt.sequence_length=0", "tbptt.mean_length=3"], {"tbptt/K": 3.0}),
    (ADAPTIVE, {}),
    (["tbptt.strategy=fixed", "tbptt.sequence_length=4", "tbptt.refresh_states=true"], {}),
])
def test_each_strategy_runs_one_update_and_logs_its_instruments(tmp_path, overrides, expected):
    cfg = tiny_config(*overrides)
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), log=True, quiet=True)
    try:
        scalars = trainer.train_update()
        trainer.writer.scalars(trainer.global_step, scalars)
    finally:
        trainer.close()
    assert abs(scalars["losses/first_minibatch_kl"]) < 1e-6  # ratio 1 at the first minibatch
    for key in ("tbptt/K", "tbptt/padding_fraction", "tbptt/sequences_per_batch"):
        assert key in scalars
    for key, value in expected.items():
        assert scalars[key] == value
    if cfg.tbptt.strategy == "adaptive":
        assert cfg.tbptt.k_min <= scalars["tbptt/K"] <= cfg.tbptt.k_max
        assert scalars["tbptt/beta"] >= 0 and scalars["tbptt/delta_hat"] >= 0
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(tmp_path))
        acc.Reload()
        assert "tbptt/phi_k" in acc.Tags()["histograms"]
        (event,) = acc.Histograms("tbptt/phi_k")
        assert len(event.histogram_value.bucket) == cfg.tbptt.adapt_window
    if cfg.tbptt.refresh_states:
        assert scalars["tbptt/staleness_kl"] >= 0
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["tbptt/K"] == scalars["tbptt/K"]
    if cfg.tbptt.strategy == "adaptive":  # the phi_k curve goes to metrics.jsonl too, as a list
        phi = rec["tbptt/phi_k"]
        assert len(phi) == cfg.tbptt.adapt_window and all(v is None or v >= 0 for v in phi)
        assert list(event.histogram_value.bucket) == pytest.approx([v or 0.0 for v in phi])
    else:
        assert "tbptt/phi_k" not in rec


def test_the_shuffle_and_strategy_streams_are_not_the_global_rngs(tmp_path):
    """The minibatch shuffle generator and the strategies' samplers draw their own streams, split
    from the run seed, not copies of torch's global stream (which the policy samples actions from)."""
    from ppo_tbptt.utils import stream_seed
    cfg = tiny_config("tbptt.strategy=random", "tbptt.sequence_length=0", "tbptt.mean_length=3")
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), log=False, quiet=True)
    try:
        global_draw = torch.rand(16, generator=torch.Generator().manual_seed(cfg.run.seed))
        gens = [trainer.shuffle_gen, trainer.truncation.generator]
        draws = [torch.rand(16, generator=torch.Generator().manual_seed(g.initial_seed())) for g in gens]
    finally:
        trainer.close()
    assert not torch.equal(draws[0], global_draw) and not torch.equal(draws[1], global_draw)
    assert not torch.equal(draws[0], draws[1])
    seeds = {stream_seed(s, name) for s in (0, 1) for name in ("minibatch shuffle", "random truncation")}
    assert len(seeds) == 4
