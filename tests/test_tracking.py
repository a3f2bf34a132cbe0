"""run.track: wandb, tested offline (WANDB_MODE=offline): the wandb run's records, read back from its
``.wandb`` files, hold the scalars that TensorBoard and metrics.jsonl got, the resolved config, the
run folder's name; a resume continues the same wandb run id; ``evaluate`` adds its results and GIF.
Untracked runs never import wandb."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppo_tbptt import evaluate as evaluate_cli
from ppo_tbptt import train as train_cli
from ppo_tbptt.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def wandb_records(path: Path):
    """The records of a ``.wandb`` file (LevelDB log format: 32 KiB blocks of chunks, each with a
    7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last; a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def items(entries) -> dict:
    """key -> value; a media object's fields come as nested keys (``evaluate/video/path``)."""
    return {(e.key or "/".join(e.nested_key)): json.loads(e.value_json) for e in entries}


def offline_runs(run_dir: Path) -> list[dict]:
    """Per process that opened the wandb run (in start order): its id, name, config and history."""
    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name):
        for _ in range(100):  # wandb's service process may still be writing the file after finish()
            run = {"history": [], "config": {}, "file": f, "ended": False}
            for rec in wandb_records(f):
                kind = rec.WhichOneof("record_type")
                if kind == "run":
                    run["id"], run["name"] = rec.run.run_id, rec.run.display_name
                elif kind == "config":
                    run["config"].update(items(rec.config.update))
                elif kind == "history":
                    run["history"].append(items(rec.history.item))
                elif kind == "exit":
                    run["ended"] = True
            if run["ended"]:
                break
            time.sleep(0.1)
        out.append(run)
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                 ("WANDB_CONFIG_DIR", tmp_path / "wandb_config"), ("WANDB_CACHE_DIR", tmp_path / "wandb_cache"),
                 ("WANDB_DATA_DIR", tmp_path / "wandb_data")):
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path


TINY = ["--set", "env.num_envs=4", "--set", "ppo.rollout_steps=16", "--set", "model.hidden_size=16",
        "--set", "model.hidden_layer=16", "--set", "run.eval_every=64", "--set", "run.eval_episodes=4",
        "--set", "run.checkpoint_every=64", "--set", "run.torch_threads=1", "--device", "cpu"]


def test_wandb_gets_the_scalars_config_and_evaluation_and_a_resume_continues_its_run(offline, capsys):
    out_dir = offline / "runs"
    assert train_cli.main(["--config", "cue_recall", "--track", "--run-name", "tracked", "--set",
                           f"run.out_dir={out_dir}", "--set", "run.total_steps=128", *TINY]) == 0
    run_dir = out_dir / "tracked"
    run_id = (run_dir / "wandb_id").read_text().strip()
    (first,) = offline_runs(run_dir)
    assert first["id"] == run_id and first["name"] == "tracked"  # the run folder's name
    assert first["config"]["env"]["id"] == "CueRecall-v0" and first["config"]["run"]["track"] == "wandb"
    assert first["config"]["ppo"]["rollout_steps"] == 16  # the resolved config, --set included
    rows = read_metrics(run_dir)
    assert [r["global_step"] for r in rows] == [64, 128]

    def logged(history):  # what wandb got, as metrics.jsonl writes it (its bookkeeping keys aside)
        return [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]

    def written(rows):  # metrics.jsonl rows: the same scalars, the time stamp and non-finite ones aside
        return [{k: v for k, v in r.items() if k != "time" and v is not None} for r in rows]

    assert logged(first["history"]) == written(rows)
    assert "eval/success" in first["history"][0] and "losses/approx_kl" in first["history"][0]

    # a resume continues the same wandb run (the id kept in the run folder)
    assert train_cli.main(["--resume", str(run_dir), "--set", "run.total_steps=192"]) == 0
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and runs[1]["id"] == run_id and runs[1]["config"]["run"]["total_steps"] == 192
    assert logged(runs[1]["history"]) == written(read_metrics(run_dir)[2:])

    # evaluate adds its figures and GIF to it
    gif = offline / "eval.gif"
    capsys.readouterr()
    assert evaluate_cli.main([str(run_dir), "--episodes", "3", "--video", str(gif), "--video-episodes", "1",
                              "--quiet", "--device", "cpu"]) == 0
    assert f"logged to wandb run {run_id}" in capsys.readouterr().out
    runs = offline_runs(run_dir)
    assert len(runs) == 3 and runs[2]["id"] == run_id
    (row,) = runs[2]["history"]
    assert row["global_step"] == 192 and row["evaluate/episodes"] == 3 and 0 <= row["evaluate/success_rate"] <= 1
    assert row["evaluate/video/_type"] == "video-file", row
    media = runs[2]["file"].parent / "files" / row["evaluate/video/path"]
    assert media.read_bytes() == gif.read_bytes()


def test_an_untracked_run_does_not_import_wandb(tmp_path):
    code = ("import sys; from ppo_tbptt import train; "
            f"rc = train.main(['--config', 'cue_recall', '--set', 'run.out_dir={tmp_path}', "
            "'--set', 'run.total_steps=64', '--set', 'env.num_envs=4', '--set', 'ppo.rollout_steps=16', "
            "'--set', 'run.torch_threads=1', '--device', 'cpu']); "
            "assert rc == 0, rc; assert 'wandb' not in sys.modules, 'wandb imported'")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_track_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    base = ["--config", "cue_recall", "--set", f"run.out_dir={tmp_path}", "--device", "cpu"]
    assert train_cli.main([*base, "--set", "run.track=tensorboard"]) == 2
    assert "run.track: must be wandb or empty (off), got 'tensorboard'" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert train_cli.main([*base, "--track"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.track: wandb is not installed: pip install wandb" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder left behind
