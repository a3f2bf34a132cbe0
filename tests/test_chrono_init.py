"""``model.chrono_init``: the recurrent core's keep gates start with retention times spread up to T
steps, so that a gradient reaches tens of steps back from the first update (with zero biases it
shrinks about tenfold every five steps)."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from ppo_tbptt import config as C
from ppo_tbptt.model import build_model

OBS = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)


def _model(core: str, chrono: int, layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    cfg = C.ModelConfig(core=core, hidden_size=64, hidden_layer=32, num_layers=layers, chrono_init=chrono)
    return build_model(OBS, gym.spaces.Discrete(3), cfg)


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_chrono_init_sets_the_keep_gate_of_every_layer_and_nothing_else(core):
    h, horizon = 64, 50
    model = _model(core, horizon, layers=2)
    for k in range(2):
        b_ih = getattr(model.core, f"bias_ih_l{k}").detach()
        assert torch.count_nonzero(getattr(model.core, f"bias_hh_l{k}")) == 0
        gates = b_ih.view(-1, h)  # GRU: r, z, n; LSTM: i, f, g, o
        keep = gates[1]
        # sigmoid(log u) = u / (1 + u): a unit keeps its state for 1 + u steps, u in [1, T - 1]
        steps = 1.0 / (1.0 - torch.sigmoid(keep))
        assert steps.min() >= 2.0 - 1e-4 and steps.max() <= horizon + 1e-3
        assert steps.max() > horizon / 2 and steps.min() < 10  # spread over the range, not one value
        others = [0, 2] if core == "gru" else [2, 3]
        assert torch.count_nonzero(gates[others]) == 0
        if core == "lstm":
            torch.testing.assert_close(gates[0], -keep)  # writes little where it keeps long
    assert not torch.equal(model.core.bias_ih_l0, model.core.bias_ih_l1)  # drawn per layer


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_chrono_init_changes_only_the_core_input_biases_of_the_same_seed(core):
    off, on = _model(core, 0), _model(core, 128)
    assert all(torch.count_nonzero(p) == 0 for n, p in off.core.named_parameters() if "bias" in n)
    changed = [n for (n, a), b in zip(off.named_parameters(), on.parameters()) if not torch.equal(a, b)]
    assert changed == ["core.bias_ih_l0"]  # drawn after every other weight: an on/off pair differs there alone


def _reach(model, gap: int, length: int = 100) -> float:
    """|d out[last] / d x[last - gap]| relative to |d out[last] / d x[last - 1]| at initialisation,
    through ``run_core`` (on a CPU with gradients on: the training kernels)."""
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(8, length, 32, generator=g)).requires_grad_()
    out, _ = model.run_core(x, model.initial_state(8))
    grad, = torch.autograd.grad(out[:, -1].sum(), x)
    norms = grad.norm(dim=(0, 2))
    return float(norms[length - 1 - gap] / norms[length - 2])


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_chrono_init_carries_the_gradient_60_steps_back_where_zero_biases_lose_it(core):
    # Mortar Mayhem's commands are acted on 40-60 steps after they are shown; with zero biases
    # every unit keeps half its state a step, and 60 steps back nothing of the gradient is left
    zero, chrono = _reach(_model(core, 0), 60), _reach(_model(core, 128), 60)
    assert zero < 1e-6
    assert chrono > 1e-2


@pytest.mark.parametrize("value", [1, 2, -2])
def test_a_chrono_horizon_below_3_is_a_config_error(value):
    with pytest.raises(C.ConfigError, match="model.chrono_init"):
        C.from_dict({"model": {"chrono_init": value}})


def test_a_resume_refuses_a_new_chrono_init_and_a_fork_warns_that_it_changes_nothing(tmp_path, capsys):
    from eval_helpers import train_tiny
    from ppo_tbptt import train as train_cli
    run = tmp_path / "run"
    train_tiny(run, "run.total_steps=64", "model.chrono_init=16")
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--set", "model.chrono_init=32",
                           "--set", "run.total_steps=128"]) == 2
    assert "model.chrono_init: the run has 16, the resume asks for 32" in capsys.readouterr().err
    assert train_cli.main(["--fork", str(run), "--run-name", "f", "--set", f"run.out_dir={tmp_path}",
                           "--set", "model.chrono_init=0", "--set", "run.total_steps=128"]) == 0
    assert "warning: model.chrono_init 16 -> 0 changes nothing" in capsys.readouterr().err


def test_the_gradient_reach_script_prints_the_chrono_variant_reaching_further(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    from eval_helpers import train_tiny
    path = Path(__file__).resolve().parents[1] / "scripts" / "gradient_reach.py"
    spec = importlib.util.spec_from_file_location("gradient_reach", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = train_tiny(tmp_path / "run", "run.total_steps=64", "model.chrono_init=32")
    common = ["--config", "cue_recall", "--set", "env.kwargs.delay=24", "--gaps", "2", "20", "--sequences", "2"]
    script.main(common + ["--variant", "chrono=model.chrono_init=32", "--seeds", "2",
                          "--run", f"tiny={tmp_path / 'run'}"])
    rows = {line.split("|")[1].strip(): [float(c.split()[0]) for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "variant" not in line}
    assert set(rows) == {"config", "chrono", "tiny"}
    assert rows["config"][1] < 1e-3 < 1e-1 < rows["chrono"][1]  # 20 steps back: lost with zero biases, kept with chrono
    # the trained row is the checkpoint's model, measured as an independent full Jacobian gives it
    model = trained.model
    episodes = script.episodes(C.load("cue_recall", ["env.kwargs.delay=24"]), 2, 21)
    from ppo_tbptt.envs import make_env
    env = make_env(C.load("cue_recall", ["env.kwargs.delay=24"]).env)
    env.reset(seed=0)
    decisions, done = 1, False  # observations an action is taken on: the terminal one is not
    while not done:
        _, _, term, trunc, _ = env.step(0)
        done = term or trunc
        decisions += 0 if done else 1
    assert [len(o) for o in episodes] == [decisions] * 2
    expected = []
    for o in episodes:
        x = model.encode(torch.as_tensor(o[None])).detach()

        def last_policy(inp):
            out, _ = model.run_core(inp, model.initial_state(1))
            logits = model.heads(out[:, -1])[0][0]
            return logits - logits.mean()  # softmax-invariant shift removed

        jac = torch.autograd.functional.jacobian(last_policy, x)[:, 0]  # [A, L, F]
        norms = jac.pow(2).sum((0, 2)).sqrt()  # [L]
        expected.append([float(norms[-1 - k] / norms[-2]) for k in (2, 20)])
    medians = [float(torch.tensor([e[i] for e in expected]).median()) if len(expected) % 2 else
               sum(e[i] for e in expected) / len(expected) for i in range(2)]
    assert rows["tiny"] == pytest.approx([float(f"{v:.1e}") for v in medians], rel=1e-9)
    with pytest.raises(SystemExit):  # a run of another env is refused
        script.main(["--config", "mortar_mayhem_grid_cpu", "--run", str(tmp_path / "run")])
    assert "not the config's MortarMayhem-Grid-v0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="give smaller --gaps"):  # no episode is that long
        script.main(["--config", "cue_recall", "--gaps", "200", "--sequences", "1"])
