"""scripts/plot_runs.py: curves of several runs into one PNG; clean errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "scripts" / "plot_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(path: Path, rate: float, with_eval: bool) -> Path:
    path.mkdir(parents=True)
    rows = []
    for i in range(1, 21):
        row = {"global_step": 1024 * i, "time": 1000.0 + i, "time/elapsed_seconds": 0.7 * i,
               "charts/success": min(1.0, rate * i), "charts/episodic_return": min(1.0, rate * i)}
        if with_eval and i % 5 == 0:
            row.update({"eval/success": min(1.0, rate * i), "eval/return": min(1.0, rate * i)})
        rows.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(rows) + "\n" + '{"global_st')  # torn last line
    return path


def test_plot_runs_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    mod = _load_script()
    a = _fake_run(tmp_path / "a", 0.05, with_eval=True)
    b = _fake_run(tmp_path / "b", 0.02, with_eval=False)
    out = tmp_path / "sub" / "curves.png"
    assert mod.main([str(a), str(b), "--out", str(out), "--labels", "fast", "slow"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    assert "wrote" in capsys.readouterr().out
    steps, secs, vals = mod.series(mod.read_metrics(a), "eval/success")
    assert list(steps) == [5120, 10240, 15360, 20480] and secs[0] == pytest.approx(3.5)
    assert np.allclose(mod.smooth(np.array([0.0, 2.0, 4.0, 6.0]), 2), [0.0, 1.0, 3.0, 5.0])


def test_plot_runs_leaves_out_a_row_no_run_has(tmp_path):
    """A task without a success flag (e.g. PendulumNoVelocity) gets the return row only."""
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    mod = _load_script()
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"global_step": 1024 * i, "time/elapsed_seconds": float(i), "charts/episodic_return": -100.0 * i}
            for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    both = _fake_run(tmp_path / "both", 0.05, with_eval=True)
    assert mod.main([str(run), "--out", str(tmp_path / "one.png")]) == 0
    assert mod.main([str(both), "--out", str(tmp_path / "two.png")]) == 0
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert one.size[0] == two.size[0] and one.size[1] < 0.6 * two.size[1]


def test_plot_runs_bad_input_exit_2(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    mod = _load_script()
    assert mod.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    a = _fake_run(tmp_path / "a", 0.05, with_eval=False)
    assert mod.main([str(a), "--labels", "x", "y", "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_step_axis_labels_are_short(tmp_path, monkeypatch):
    """At 200k steps raw tick labels (200000) overlapped: they read 50k, 200k, 1.5M."""
    pytest.importorskip("matplotlib")
    mod = _load_script()
    assert [mod.steps_label(x) for x in (0, 950, 50_000, 200_000, 1_500_000, 163_840_000)] == \
        ["0", "950", "50k", "200k", "1.5M", "164M"]
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
    mod.plot([_fake_run(tmp_path / "a", 0.05, with_eval=True)], ["a"], tmp_path / "c.png")
    (fig,) = figures
    step_axes = [ax for ax in fig.axes if ax.get_xlabel() == "env steps"]
    assert len(step_axes) == 2
    for ax in step_axes:
        assert ax.xaxis.get_major_formatter()(200_000, 0) == "200k"
    labels = [t.get_text() for t in step_axes[0].get_xticklabels()]
    assert any(label.endswith("k") for label in labels), labels


def test_plot_runs_metrics_steps_only_and_eval_only(tmp_path, monkeypatch):
    """--metrics picks the rows (any NAME reads charts/NAME and eval/NAME), --x steps drops the
    wall-clock column, --eval-only draws the held-out evaluations alone."""
    pytest.importorskip("matplotlib")
    mod = _load_script()
    run = _fake_run(tmp_path / "a", 0.05, with_eval=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    for r in rows:
        r["charts/commands_completed"] = 0.5
        if "eval/success" in r:
            r["eval/commands_completed"] = r["global_step"] / 1e5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert mod.main([str(run), "--out", str(tmp_path / "c.png"), "--metrics", "success", "commands_completed",
                     "--x", "steps", "--eval-only"]) == 0
    (fig,) = figures
    assert [ax.get_xlabel() for ax in fig.axes] == ["env steps", "env steps"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["success rate", "commands completed"]
    for ax, tag in zip(fig.axes, ("eval/success", "eval/commands_completed")):
        (line,) = ax.get_lines()  # the evaluations only: no training curve
        steps, _, vals = mod.series(rows, tag)
        assert list(line.get_xdata()) == list(steps) and np.allclose(line.get_ydata(), vals)
    mod.plot([run], ["a"], tmp_path / "d.png", metrics=["commands_completed"], x="time")
    fig = figures[-1]
    (ax,) = fig.axes
    assert ax.get_xlabel() == "wall-clock seconds" and len(ax.get_lines()) == 2  # train curve and evals
    assert np.allclose(ax.get_lines()[0].get_ydata(), 0.5)
