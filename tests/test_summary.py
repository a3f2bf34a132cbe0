"""The per-interval progress table of a run."""
import json

import pytest

from eval_helpers import train_tiny
from ppo_tbptt import summary


def _write(tmp_path, rows):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_intervals_weight_updates_by_their_episodes(tmp_path):
    rows = [
        {"global_step": 100, "time/elapsed_seconds": 30.0, "charts/episodes": 1, "charts/success": 1.0,
         "charts/episodic_return": 2.0},
        {"global_step": 200, "time/elapsed_seconds": 60.0, "charts/episodes": 3, "charts/success": 0.0,
         "charts/episodic_return": 0.0},
        {"global_step": 260, "time/elapsed_seconds": 90.0},  # no episode ended in this update
        {"global_step": 500, "time/elapsed_seconds": 150.0, "charts/episodes": 2, "charts/success": 0.5,
         "charts/episodic_return": 1.0, "eval/success": 0.75, "eval/return": 3.0},
    ]
    out = summary.summarize(summary.read_metrics(_write(tmp_path, rows)), 60)
    assert [s["until_seconds"] for s in out] == [60, 120, 180]
    assert [s["global_step"] for s in out] == [200, 260, 500]
    assert out[0]["success"] == pytest.approx(0.25) and out[0]["return"] == pytest.approx(0.5)
    assert out[0]["episodes"] == 4 and out[0]["steps_per_second"] == pytest.approx(200 / 60)
    assert out[1]["success"] is None and out[1]["episodes"] == 0
    assert out[1]["steps_per_second"] == pytest.approx(60 / 30)
    assert out[2]["eval_success"] == 0.75 and out[2]["success"] == 0.5
    rows[3]["eval/success"] = None  # a task without a success flag: eval return alone still shows
    assert summary.summarize(rows, 60)[2]["eval_return"] == 3.0
    assert out[2]["steps_per_second"] == pytest.approx(240 / 60)
    table = summary.format_table(out, 60)
    assert "| 1 | 200 | 3 | 4 | 0.250 | 0.500 | - | - |" in table.splitlines()


def test_cli_on_a_real_run_and_clean_errors(tmp_path, capsys):
    train_tiny(tmp_path / "run", "run.eval_every=128", "run.eval_episodes=4")
    assert summary.main([str(tmp_path / "run"), "--every", "1000", "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 1000 | 448 |")  # the whole tiny run in one interval
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["episodes"] > 0 and 0 <= rows[0]["success"] <= 1 and rows[0]["eval_success"] is not None
    assert summary.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert summary.main([str(tmp_path / "run"), "--every", "0"]) == 2
    assert "--every must be > 0" in capsys.readouterr().err


def test_success_is_weighted_by_the_episodes_that_report_it(tmp_path):
    rows = [  # 10 episodes ended, only 2 reported success (both solved); then 2 of 2 failed
        {"global_step": 10, "time/elapsed_seconds": 1.0, "charts/episodes": 10, "charts/success_episodes": 2,
         "charts/success": 1.0, "charts/episodic_return": 0.0},
        {"global_step": 20, "time/elapsed_seconds": 2.0, "charts/episodes": 2, "charts/success_episodes": 2,
         "charts/success": 0.0, "charts/episodic_return": 6.0},
    ]
    out = summary.summarize(summary.read_metrics(_write(tmp_path, rows)), 60)
    assert out[0]["success"] == pytest.approx(0.5)  # 2 solved of 4 reporting, not 10 of 12
    assert out[0]["return"] == pytest.approx(1.0)  # returns: every episode counts


@pytest.mark.parametrize("bad", ['[1, 2]', '{"time/elapsed_seconds": 1.0}', '{"global_step": 5}'])
def test_rows_that_are_not_trainer_rows_give_a_clean_error(tmp_path, capsys, bad):
    (tmp_path / "metrics.jsonl").write_text(bad + "\n")
    assert summary.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: metrics row 1") and "Traceback" not in err
