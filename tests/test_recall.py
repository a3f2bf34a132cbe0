"""``model.recall_lags``: an auxiliary head that predicts, from the core's output at step p and a
lag k, the observation of step p - k of the same sequence; its loss trains the recurrent state to
keep what the episode showed."""
import copy
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from ppo_tbptt import config as C
from ppo_tbptt.model import build_model

OBS = gym.spaces.Box(0.0, 1.0, (5,), np.float32)


def _model(lags: int, seed: int = 0, obs=OBS, hidden: int = 16):
    torch.manual_seed(seed)
    cfg = C.ModelConfig(core="gru", hidden_size=hidden, hidden_layer=32, recall_lags=lags)
    return build_model(obs, gym.spaces.Discrete(3), cfg)


class Oracle(nn.Module):
    """A recall head that knows the answer: the core output's first entry carries the position p,
    the one-hot the lag k, and it returns frame p - k minus frame p (frame p is ``p * p``
    everywhere). It records every (p, k) it was asked for."""

    def __init__(self, lags: int):
        super().__init__()
        self.lags, self.asked = lags, []

    def forward(self, x):
        p = x[:, 0].round().long()
        k = x[:, -self.lags:].argmax(dim=1) + 1
        assert torch.all(x[:, -self.lags:].sum(dim=1) == 1)  # a one-hot of the lag
        self.asked.append(torch.stack([p, k], dim=1))
        return ((p - k) ** 2 - p ** 2).float()[:, None].expand(-1, 5)


def _oracle_batch(s: int, l: int):
    pos = torch.arange(l, dtype=torch.float32)
    obs = (pos ** 2)[None, :, None].expand(s, l, 5).clone()  # frame p is p * p everywhere
    core_out = torch.zeros(s, l, 16)
    core_out[..., 0] = pos
    return obs, core_out


def test_the_target_is_the_change_from_k_steps_back_with_k_uniform_in_1_to_min_K_p():
    lags, s, l = 6, 64, 20
    model = _model(lags)
    model.recall_head = Oracle(lags)
    obs, core_out = _oracle_batch(s, l)
    mask = torch.ones(s, l)
    loss = model.recall_loss(core_out, obs, mask, torch.Generator().manual_seed(0))
    assert float(loss) == 0.0  # every target is frame p - k minus frame p
    asked = torch.cat(model.recall_head.asked)
    p, k = asked[:, 0], asked[:, 1]
    assert len(asked) == s * (l - 1)  # every step but each sequence's first
    assert torch.all(k >= 1) and torch.all(k <= torch.clamp(p, max=lags))
    for pos in (1, 3, 12):  # every lag available is drawn, about equally often
        counts = torch.bincount(k[p == pos], minlength=lags + 1)[1:min(pos, lags) + 1].float()
        assert torch.all(counts > 0)
        assert float(counts.max() / counts.min()) < 2.5 if pos > 1 else True


def test_steps_outside_the_mask_and_the_first_step_are_left_out():
    lags, s, l = 4, 8, 10
    model = _model(lags)
    model.recall_head = Oracle(lags)
    obs, core_out = _oracle_batch(s, l)
    mask = torch.ones(s, l)
    mask[:, 7:] = 0  # padding: the oracle is wrong there
    core_out[:, 7:, 0] += 100.0
    mask[0] = 0  # a sequence with no loss step at all
    assert float(model.recall_loss(core_out, obs, mask, torch.Generator().manual_seed(1))) == 0.0
    asked = torch.cat(model.recall_head.asked)
    assert len(asked) == (s - 1) * 6
    none = torch.zeros(s, l)
    assert float(model.recall_loss(core_out, obs, none)) == 0.0


class Zeros(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.zeros(x.shape[0], self.dim)


def test_the_loss_is_the_squared_error_summed_over_the_observation():
    model = _model(1)  # lag 1 only
    model.recall_head = Zeros(5)
    obs = 0.5 * (torch.arange(4) % 2).float()[None, :, None].expand(2, 4, 5)  # frames 0, 0.5, 0, 0.5
    # each step with a target misses a change of 0.5 in each of 5 entries: 5 * 0.25
    assert float(model.recall_loss(torch.zeros(2, 4, 16), obs, torch.ones(2, 4))) == pytest.approx(1.25)
    pixels = gym.spaces.Box(0, 255, (2, 2, 1), np.uint8)  # integer frames are scaled as the encoder's
    model = _model(1, obs=pixels)
    model.recall_head = Zeros(4)
    obs = (255 * (torch.arange(3) % 2)).to(torch.uint8)[None, :, None, None, None].expand(1, 3, 2, 2, 1)
    assert float(model.recall_loss(torch.zeros(1, 3, 16), obs, torch.ones(1, 3))) == pytest.approx(4.0)
    still = torch.full((1, 3, 2, 2, 1), 200, dtype=torch.uint8)  # nothing changed: nothing to recall
    assert float(model.recall_loss(torch.zeros(1, 3, 16), still, torch.ones(1, 3))) == 0.0


def test_the_head_starts_silent_so_no_recall_gradient_reaches_the_core():
    model = _model(4)
    assert torch.count_nonzero(model.recall_head[-1].weight) == 0
    x = torch.rand(3, 6, 5)
    out, _ = model.run_core(model.encode(x), model.initial_state(3))
    loss = model.recall_loss(out, x, torch.ones(3, 6), torch.Generator().manual_seed(0))
    core = list(model.core.parameters())
    grads = torch.autograd.grad(loss, core + [model.recall_head[-1].weight])
    assert float(loss.detach()) > 0 and all(torch.count_nonzero(g) == 0 for g in grads[:-1])
    assert torch.count_nonzero(grads[-1]) > 0  # the head itself learns


def test_recall_trains_the_state_to_keep_what_was_shown():
    # frames of random bits, each shown once: only a state that keeps them can predict them later
    lags, s, l = 3, 64, 10
    gen = torch.Generator().manual_seed(0)

    def train(detach_core):
        model = _model(lags, hidden=64)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)

        def loss_on(obs):
            out, _ = model.run_core(model.encode(obs), model.initial_state(s))
            return model.recall_loss(out.detach() if detach_core else out, obs, torch.ones(s, l), gen)

        for _ in range(500):
            loss = loss_on(torch.randint(0, 2, (s, l, 5), generator=gen).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(loss_on(torch.randint(0, 2, (s, l, 5), generator=gen).float()))

    # a head that knows the frame now but not the one before errs by 0.25 a bit (0.5 - now)
    guess = 5 * 0.25
    # the head alone reads only what an untrained core happens to keep (1.1 of 1.25 here)
    assert train(detach_core=True) > 0.7 * guess
    assert train(detach_core=False) < 0.3 * guess  # trained through the core, it keeps them (0.2)


def test_the_head_is_built_last_and_only_when_asked():
    off, on = _model(0), _model(8)
    assert off.recall_head is None
    assert not any(n.startswith("recall_head") for n, _ in off.named_parameters())
    shared = dict(off.named_parameters())
    for name, p in on.named_parameters():
        if not name.startswith("recall_head"):
            assert torch.equal(p, shared[name]), name  # the rest is the same network
    assert on.recall_head[0].in_features == 16 + 8 and on.recall_head[-1].out_features == 5
    with pytest.raises(ValueError, match="recall_lags"):
        off.recall_loss(torch.zeros(1, 2, 16), torch.zeros(1, 2, 5), torch.ones(1, 2))


@pytest.mark.parametrize("raw, key", [
    ({"model": {"recall_lags": -1}}, "model.recall_lags"),
    ({"model": {"recall_lags": 4, "memoryless": True}}, "model.recall_lags: the memoryless ablation"),
    ({"model": {"recall_lags": 4}, "tbptt": {"sequence_length": 1}}, "model.recall_lags: sequences of one step"),
    ({"ppo": {"recall_coef": -0.1}}, "ppo.recall_coef"),
    ({"ppo": {"recall_coef": float("nan")}}, "ppo.recall_coef"),
    ({"ppo": {"recall_coef": float("inf")}}, "ppo.recall_coef")])
def test_bad_recall_settings_are_config_errors(raw, key):
    with pytest.raises(C.ConfigError, match=key):
        C.from_dict(raw)


def test_recall_needs_a_box_observation():
    from ppo_tbptt.envs.spaces import flat_observation_space
    from ppo_tbptt.model import ModelConfigError
    space = flat_observation_space(gym.spaces.Tuple((gym.spaces.Discrete(3), OBS)))
    cfg = C.ModelConfig(hidden_size=16, hidden_layer=16, recall_lags=4)
    with pytest.raises(ModelConfigError, match="model.recall_lags"):
        build_model(space, gym.spaces.Discrete(3), cfg)
    build_model(space, gym.spaces.Discrete(3), dataclasses.replace(cfg, recall_lags=0))


@pytest.mark.parametrize("strategy", [[], ["tbptt.strategy=overlap", "tbptt.stride=4", "tbptt.burn_in=true"],
                                      ["tbptt.strategy=random", "tbptt.mean_length=3"]],
                         ids=["fixed", "overlap", "random"])
def test_training_with_recall_logs_its_loss_and_trains_the_head(tmp_path, strategy):
    from eval_helpers import metric_rows, tiny_config
    from ppo_tbptt.trainer import Trainer
    trainer = Trainer(tiny_config("model.recall_lags=4", "run.total_steps=128", *strategy), tmp_path / "run",
                      torch.device("cpu"), quiet=True)
    initial = copy.deepcopy(trainer.model.recall_head.state_dict())
    trainer.train(handle_signals=False)
    rows = [r for r in metric_rows(tmp_path / "run") if "losses/recall" in r]
    assert len(rows) == 2 and all(np.isfinite(r["losses/recall"]) and r["losses/recall"] > 0 for r in rows)
    trained = trainer.model.recall_head.state_dict()
    assert all(not torch.equal(initial[k], trained[k]) for k in initial)


def test_a_run_with_recall_resumes_bit_exact(tmp_path):
    from eval_helpers import interrupt_after, metric_rows, tiny_config, train_tiny
    from ppo_tbptt.trainer import Trainer
    extra = ["model.recall_lags=4", "run.total_steps=192", "run.checkpoint_every=64"]
    train_tiny(tmp_path / "full", *extra)
    part = Trainer(tiny_config(*extra), tmp_path / "part", torch.device("cpu"), quiet=True)
    interrupt_after(part, 2)
    part.train(handle_signals=False)
    assert part.global_step == 128
    Trainer.from_run(tmp_path / "part", quiet=True).train(handle_signals=False)
    assert metric_rows(tmp_path / "part") == metric_rows(tmp_path / "full")


def test_a_resume_or_a_fork_refuses_a_new_recall_head(tmp_path, capsys):
    from eval_helpers import train_tiny
    from ppo_tbptt import train as train_cli
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=64", "model.recall_lags=4")
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--set", "model.recall_lags=8",
                           "--set", "run.total_steps=128"]) == 2
    assert "model.recall_lags: the run has 4, the resume asks for 8" in capsys.readouterr().err
    assert train_cli.main(["--fork", str(run), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", "model.recall_lags=0", "--set", "run.total_steps=128"]) == 2
    assert "model.recall_lags: the checkpoint's model has 4, the fork asks for 0" in capsys.readouterr().err
    assert train_cli.main(["--fork", str(run), "--run-name", "h", "--set", f"run.out_dir={tmp_path}",
                           "--set", "model.recall_lags=8", "--set", "run.total_steps=128"]) == 2
    assert train_cli.main(["--fork", str(run), "--run-name", "g", "--set", f"run.out_dir={tmp_path}",
                           "--set", "ppo.recall_coef=0.5", "--set", "run.total_steps=128"]) == 0


def test_the_recall_gradient_reaches_the_core_in_training(tmp_path):
    # without clipping, the two runs' core gradients differ only by the recall loss's share
    from eval_helpers import train_tiny
    runs = [train_tiny(tmp_path / f"c{coef}", "model.recall_lags=4", f"ppo.recall_coef={coef}",
                       "ppo.max_grad_norm=1e9", "run.total_steps=64").model for coef in (0.0, 1.0)]
    for name in ("core.weight_hh_l0", "encoder.net.0.weight"):
        a, b = (dict(m.named_parameters())[name] for m in runs)
        assert not torch.equal(a, b), name


def test_a_fork_adds_a_recall_head_to_a_run_without_one(tmp_path, capsys):
    from eval_helpers import tiny_config, train_tiny
    from ppo_tbptt import checkpoint as ckpt
    from ppo_tbptt import train as train_cli
    from ppo_tbptt.trainer import Trainer
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=64", "run.checkpoint_every=64")
    source = torch.load(ckpt.checkpoint_files(run / "checkpoints")[-1], weights_only=False)
    # what the fork starts from: the checkpoint's weights and moments, a head as a new run draws it
    fork = Trainer(tiny_config("model.recall_lags=4", "run.total_steps=128"), tmp_path / "x", torch.device("cpu"),
                   quiet=True, fork=source)
    torch.manual_seed(fork.cfg.run.seed)
    fresh = build_model(fork.envs.single_observation_space, fork.envs.single_action_space, fork.cfg.model)
    for name, p in fork.model.state_dict().items():
        want = fresh.state_dict()[name] if name.startswith("recall_head.") else source["model"][name]
        assert torch.equal(p, want), name
    moments = fork.optimizer.state_dict()["state"]
    n = len(source["optimizer"]["state"])
    for i in range(n):
        assert torch.equal(moments[i]["exp_avg"], source["optimizer"]["state"][i]["exp_avg"])
    assert len(fork.optimizer.param_groups[0]["params"]) == n + 4 and not any(i in moments for i in range(n, n + 4))
    fork.close()
    capsys.readouterr()
    assert train_cli.main(["--fork", str(run), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", "model.recall_lags=4", "--set", "run.total_steps=128"]) == 0
    assert "note: model.recall_lags 0 -> 4: the recall head is drawn afresh" in capsys.readouterr().out
    assert train_cli.main(["--resume", str(tmp_path / "f"), "--set", "run.total_steps=192"]) == 0
