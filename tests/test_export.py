"""The ONNX export (``python -m ppo_tbptt.export``): onnxruntime and torch side by side over
recorded episodes, the state carried through and episode starts honoured. Needs the ``export``
extra (onnx, onnxscript, onnxruntime); skipped where it is missing."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from ppo_tbptt import config as C  # noqa: E402
from ppo_tbptt import export as E  # noqa: E402
from ppo_tbptt.envs import make_env  # noqa: E402
from ppo_tbptt.model import build_model  # noqa: E402
from ppo_tbptt.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(scope="module")
def cue_run(tmp_path_factory):
    """A CueRecall agent trained for 6 updates (a few seconds), as a run folder with a checkpoint."""
    run = tmp_path_factory.mktemp("export") / "cue"
    cfg = C.load("cue_recall", ["run.total_steps=6144", "run.torch_threads=1"])
    tr = Trainer(cfg, run, torch.device("cpu"), log=False, quiet=True)
    tr.train(handle_signals=False)
    return run


def untrained(name: str, overrides: list[str]):
    cfg = C.load(name, overrides)
    env = make_env(cfg.env)
    try:
        obs, _ = env.reset(seed=0)
        torch.manual_seed(0)
        model = build_model(env.observation_space, env.action_space, cfg.model)
    finally:
        env.close()
    return model, cfg, np.asarray(obs)[None]


def check_parity(model, cfg, sample_obs, path, envs=3, steps=60) -> dict:
    E.export_onnx(model, sample_obs, path, cfg.model.reset_hidden_state)
    rec = E.record_episodes(model, cfg.env, envs, steps, cfg.env.eval_seeds[0], cfg.model.reset_hidden_state)
    assert rec["episode_start"][1:].sum() >= 2, "the recording should cross episode starts"
    res = E.compare(path, rec)
    print(f"{cfg.env.id} {cfg.model.core}: {res}")
    assert res["action_mismatches"] == 0
    assert max(res["max_abs"].values()) <= TOL, res
    return res


@pytest.fixture(scope="module")
def cue_export(cue_run, tmp_path_factory):
    """The docs' export command (docs/evaluation.md) run on ``cue_run`` (as ``runs/cue_recall`` in a fresh folder):
    (that folder, the ONNX file, the command's output)."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text[text.index("## Exporting a policy to ONNX"):]
    command = re.search(r"```bash\n(python -m ppo_tbptt\.export .*?)\n```", section).group(1)
    args = command.split()[3:]
    folder = tmp_path_factory.mktemp("docs")
    (folder / "runs").mkdir()
    (folder / args[0]).symlink_to(cue_run)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        import contextlib, io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert E.main(args) == 0
    return folder, folder / args[args.index("--onnx") + 1], buf.getvalue()


def test_trained_cue_recall_agent_runs_alike_in_onnxruntime_and_torch(cue_run, cue_export):
    from ppo_tbptt.evaluate import load_policy
    model, cfg, state, _ = load_policy(cue_run, torch.device("cpu"))
    assert cfg.model.core == "lstm" and state["global_step"] == 6144
    # 8 envs (the export traced 2): the batch axis is dynamic; 120 steps cross 8 x 11 episode starts
    rec = E.record_episodes(model, cfg.env, 8, 120, cfg.env.eval_seeds[0])
    assert rec["episode_start"][1:].sum() >= 80
    res = E.compare(cue_export[1], rec)
    print(f"trained CueRecall LSTM: {res}")
    assert res["action_mismatches"] == 0 and max(res["max_abs"].values()) <= TOL, res
    assert set(res["max_abs"]) == {"logits", "value", "h_out", "c_out"}


@pytest.mark.parametrize("core,reset", [("gru", "true"), pytest.param("lstm", "true", marks=pytest.mark.slow),
                                        pytest.param("gru", "false", marks=pytest.mark.slow)])
def test_memorygym_grid_agent_runs_alike_in_onnxruntime_and_torch(core, reset, tmp_path):
    """MortarMayhem-Grid's CPU model, untrained (GRU as configured, and LSTM); with
    ``model.reset_hidden_state: false`` the state carries over episode starts in both."""
    # the curriculum's first stage (one command: ~10-step episodes), so the recording crosses starts
    model, cfg, obs = untrained("mortar_mayhem_grid_cpu", ["env.vector=serial", f"model.core={core}",
                                                           f"model.reset_hidden_state={reset}",
                                                           "curriculum.stages=null",
                                                           "env.reset_params={command_count: [1]}"])
    assert obs.dtype == np.uint8 and obs.shape == (1, 21, 21, 3)  # frames as the env gives them
    check_parity(model, cfg, obs, tmp_path / f"grid_{core}.onnx", envs=2, steps=40)


@pytest.mark.parametrize("act", ["multidiscrete", pytest.param("box", marks=pytest.mark.slow)])
def test_structured_observations_and_other_action_spaces_export(act, tmp_path):
    import space_envs  # noqa: F401  (registers Spaces-v0)
    model, cfg, obs = untrained("cue_recall", ["env.id=space_envs:Spaces-v0", "env.kwargs={}",
                                               f"env.kwargs.act={act}", "env.kwargs.obs=dict"])
    if act == "box":
        with torch.no_grad():
            model.log_std.copy_(torch.tensor([-0.5, 0.3]))  # (it starts at 0, the std of 1)
    res = check_parity(model, cfg, obs, tmp_path / f"{act}.onnx", envs=2, steps=30)
    assert set(res["max_abs"]) >= ({"mean", "log_std"} if act == "box" else {"logits"})
    sess = E.onnx_session(tmp_path / f"{act}.onnx")
    outputs = {o.name: o for o in sess.get_outputs()}
    if act == "box":  # the Gaussian's mean as the greedy action
        assert "logits" not in outputs and outputs["action"].type == "tensor(float)"
    else:  # one argmax per head of the concatenated logits
        assert outputs["action"].type == "tensor(int64)" and outputs["logits"].shape[1] == 3 + 2


def test_episode_start_zeroes_the_state_and_only_there(cue_export):
    sess = E.onnx_session(cue_export[1])
    rng = np.random.default_rng(0)
    h, c = (rng.normal(size=(1, 2, 64)).astype(np.float32) for _ in range(2))
    two = np.zeros((2, 5), np.uint8)
    two[:, 1] = 1  # both show cue 0
    got = sess.run(None, {"obs": two, "h": h, "c": c, "episode_start": np.array([1, 0], np.float32)})
    zero = sess.run(None, {"obs": two, "h": 0 * h, "c": 0 * c, "episode_start": np.zeros(2, np.float32)})
    for g, z in zip(got[1:], zero[1:]):  # logits, value, h_out, c_out: [B, ...] or [K, B, H]
        g, z = (np.moveaxis(a, 1, 0) if a.ndim == 3 else a for a in (g, z))
        np.testing.assert_allclose(g[0], z[0], atol=1e-6)  # started: as from the zero state
        assert np.abs(g[1] - z[1]).max() > 1e-3  # not started: the state counts


def test_command_line_checks_and_records_metadata(cue_export):
    text = cue_export[2]
    m = re.search(r"max \|difference\| (\S+), greedy actions differing: 0", text)
    assert m and float(m.group(1)) <= TOL, text
    meta = E.onnx_session(cue_export[1]).get_modelmeta().custom_metadata_map
    assert meta["env_id"] == "CueRecall-v0" and meta["core"] == "lstm"
    assert json.loads(meta["action_nvec"]) == [4] and json.loads(meta["state_shape"]) == [1, "B", 64]
    assert meta["obs_dtype"] == "uint8" and meta["global_step"] == "6144"


def test_command_line_errors_are_one_line_exit_2(tmp_path, capsys):
    assert E.main([str(tmp_path / "nothing"), "--onnx", str(tmp_path / "p.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such run folder" in err and "\n" not in err
    assert E.main([str(tmp_path), "--onnx", str(tmp_path / "p.txt")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err


def test_docs_onnx_loop_runs(cue_export, monkeypatch, capsys):
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text[text.index("## Exporting a policy to ONNX"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(cue_export[0])  # where the docs' command wrote policy.onnx
    exec(compile(code, "docs/evaluation.md (ONNX)", "exec"), {"__name__": "docs_onnx"})
    m = re.search(r"(\d+) episodes, (\d+) successes", capsys.readouterr().out)
    assert m and int(m.group(1)) >= 5
