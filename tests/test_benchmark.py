"""The throughput benchmark runs every measurement and reports consistent figures (tiny, on a CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall",
                        "--set", "env.vector=pool", "--set", "env.num_envs=4", "--set", "ppo.rollout_steps=16",
                        "--set", "ppo.minibatches=2", "--set", "run.torch_threads=1", "--seconds", "0.3",
                        "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    res = report["results"]
    assert list(res) == ["env_only", "async_env_only", "policy_only", "update_only", "collect", "async_collect",
                         "train", "async_train"]
    for v in res.values():  # the rate is what was counted over the time it took
        assert v["steps"] > 0 and v["seconds"] > 0 and v["steps_per_second"] == v["steps"] / v["seconds"]
    for key in ("policy_only", "collect", "async_collect"):  # whole rollouts of T x N steps after the warm-up
        assert res[key]["steps"] == res[key]["rollouts"] * 16 * 4
    for key in ("train", "async_train"):
        assert res[key]["steps"] == res[key]["updates"] * 64 and res[key]["seconds"] >= 0.3
    u = res["update_only"]  # whole updates, timed by the learning phase alone
    assert u["steps"] == u["updates"] * 64 and u["update_seconds_per_update"] == pytest.approx(u["seconds"] / u["updates"])
    assert u["wall_seconds_updates"] >= 0.3 and u["seconds"] <= u["wall_seconds_updates"]
    b = report["bound"]
    assert b["steps_per_second"] == pytest.approx(64 / (64 / res["env_only"]["steps_per_second"]
                                                        + 64 / res["policy_only"]["steps_per_second"]
                                                        + u["update_seconds_per_update"]))
    assert b["train_vs_bound"] == pytest.approx(res["train"]["steps_per_second"] / b["steps_per_second"])
    assert f"reaches {b['train_vs_bound']:.0%} of the bound" in r.stdout
    assert report["config"]["batch"] == 64 and "pool: " in report["config"]["vector"]
    base = res["env_only"]["steps_per_second"]
    table = r.stdout
    assert "| measurement | envs | steps/s | ratio to env-only |" in table
    for v in res.values():  # every row printed with its ratio to the env-only ceiling
        assert f"| {v['steps_per_second']:,.0f} | {v['steps_per_second'] / base:.2f} |" in table


def test_benchmark_unknown_measurement_exit_2():
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall", "--only", "train,fly"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "unknown fly" in r.stderr


def test_benchmark_bad_input_exit_2():
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall",
                        "--set", "env.num_envs=0"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "env.num_envs" in r.stderr and "Traceback" not in r.stderr


def test_benchmark_sweep_one_row_per_layout(tmp_path):
    out = tmp_path / "sweep.json"
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall",
                        "--set", "env.vector=pool", "--set", "ppo.minibatches=2", "--set", "run.torch_threads=1",
                        "--sweep", "4x16,2x8", "--seconds", "0.2", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    sweep = json.loads(out.read_text())
    assert [(s["config"]["num_envs"], s["config"]["rollout_steps"], s["config"]["batch"]) for s in sweep["layouts"]] \
        == [(4, 16, 64), (2, 8, 16)]
    base = sweep["env_only"]["steps_per_second"]
    for s in sweep["layouts"]:
        res = s["results"]
        assert list(res) == ["policy_only", "collect", "train"]
        assert res["train"]["steps"] == res["train"]["updates"] * s["config"]["batch"]
        n, t = s["config"]["num_envs"], s["config"]["rollout_steps"]
        row = f"| {n} x {t} | {n * t:,} | "
        assert any(line.startswith(row) and line.endswith(f"| {res['train']['steps_per_second'] / base:.2f} |")
                   for line in r.stdout.splitlines()), r.stdout


def test_benchmark_sweep_bad_layout_exit_2():
    for bad in (["--sweep", "64by256"], ["--sweep", "0x16"], ["--sweep", "4x16", "--only", "train"]):
        r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall", *bad],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_benchmark_compare_repeats_the_configs_in_turn(tmp_path):
    other = tmp_path / "cue_small.yaml"  # a second config: cue_recall with a smaller GRU
    text = (ROOT / "ppo_tbptt" / "configs" / "cue_recall.yaml").read_text()
    assert "hidden_size: 64" in text
    other.write_text(text.replace("hidden_size: 64", "hidden_size: 16"))
    out = tmp_path / "cmp.json"
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall",
                        "--compare", str(other), "--only", "train,policy_only", "--repeat", "3",
                        "--set", "env.num_envs=4", "--set", "ppo.rollout_steps=16", "--set", "ppo.minibatches=2",
                        "--set", "run.torch_threads=1", "--seconds", "0.2", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["repeat"] == 3 and [c["name"] for c in rep["configs"]] == ["cue_recall", str(other)]
    # measured in turn: A, B, A, B, A, B
    order = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith("config ")]
    assert order == [f"config {n} (round {k} of 3):" for k in (1, 2, 3) for n in ("cue_recall", str(other))]
    first = rep["configs"][0]["rounds"]
    for c in rep["configs"]:
        assert len(c["rounds"]) == 3 and all(list(rd) == ["policy_only", "train"] for rd in c["rounds"])
        for key in ("policy_only", "train"):
            vals = sorted(rd[key]["steps_per_second"] for rd in c["rounds"])
            assert c["results"][key]["steps_per_second"] == vals[1]  # the median of three
            assert c["results"][key]["steps_per_second_range"] == [vals[0], vals[2]]
        ratios = [rd["train"]["steps_per_second"] / f["train"]["steps_per_second"] for rd, f in zip(c["rounds"], first)]
        q = c["train_ratio"]
        assert q["rounds"] == ratios and q["median"] == sorted(ratios)[1]
        assert (q["min"], q["max"]) == (min(ratios), max(ratios))
        t = c["results"]["train"]
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {c['name']} |"))
        cells = [x.strip() for x in row.strip("|").split("|")]
        lo, hi = t["steps_per_second_range"]
        assert cells[5] == f"{c['results']['policy_only']['steps_per_second']:,.0f} " \
            f"({c['results']['policy_only']['steps_per_second_range'][0]:,.0f}-" \
            f"{c['results']['policy_only']['steps_per_second_range'][1]:,.0f})"
        assert cells[6] == "-"  # collection was not asked for
        assert cells[7] == f"{t['steps_per_second']:,.0f} ({lo:,.0f}-{hi:,.0f})"
        assert cells[9] == f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})"
    assert rep["configs"][0]["train_ratio"]["rounds"] == [1.0, 1.0, 1.0]
    assert "LSTM 64 |" in r.stdout and "LSTM 16 |" in r.stdout


def test_benchmark_compare_bad_input_exit_2():
    for bad in (["--repeat", "0", "--compare", "cue_recall"], ["--repeat", "2"],
                ["--compare", "cue_recall", "--only", "train,env_only"]):
        r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall", *bad],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ranks_rate_is_the_steps_between_the_first_and_last_update():
    from ppo_tbptt.benchmark_ranks import format_ranks, parse_ranks, rate_from_rows
    rows = [{"global_step": 64 * i, "time": 100.0 + 0.5 * i, "time/collect_seconds": 0.1 * i,
             "time/update_seconds": 0.2} for i in range(1, 5)]
    r = rate_from_rows(rows)
    assert r["steps"] == 192 and r["seconds"] == 1.5 and r["steps_per_second"] == 128 and r["updates"] == 3
    assert r["collect_seconds_per_update"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="raise --seconds"):
        rate_from_rows(rows[:1])
    assert parse_ranks("1,2") == [1, 2]
    for bad in ("0", "a", ""):
        with pytest.raises(ValueError, match="--ranks"):
            parse_ranks(bad)
    report = {"machine": "m", "config": {"name": "c", "overrides": [], "num_envs": 4, "rollout_steps": 16,
                                          "vector": "serial", "torch_threads": 1},
              "results": {"1": dict(r, envs_per_rank=4), "2": dict(r, envs_per_rank=2, steps_per_second=192.0)}}
    table = format_ranks(report)
    assert "| 1 | 4 | 128 | 0.300 / 0.200 | 1.00x |" in table and "| 2 | 2 | 192 |" in table and "1.50x" in table


def test_benchmark_ranks_bad_input_exit_2(capsys):
    from ppo_tbptt import benchmark
    for bad, msg in ((["--ranks", "1,3", "--set", "env.num_envs=4"], "must be a multiple of 3"),
                     (["--ranks", "x"], "--ranks"), (["--ranks", "1,2", "--only", "train"], "does not combine")):
        assert benchmark.main(["--config", "cue_recall", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err, err


@pytest.mark.slow
def test_benchmark_ranks_reports_one_and_two_ranks(tmp_path):
    out = tmp_path / "ranks.json"
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall", "--ranks", "1,2",
                        "--set", "env.num_envs=4", "--set", "ppo.rollout_steps=16", "--set", "ppo.minibatches=2",
                        "--set", "run.torch_threads=1", "--seconds", "2", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["1", "2"] and [v["envs_per_rank"] for v in res.values()] == [4, 2]
    for v in res.values():
        assert v["updates"] >= 1 and v["steps"] == 64 * v["updates"]
        assert v["steps_per_second"] == v["steps"] / v["seconds"]
        assert f"| {v['steps_per_second']:,.0f} |" in r.stdout


def test_runs_rate_is_the_steps_inside_the_common_window():
    from ppo_tbptt.benchmark_runs import format_runs, steps_at, window_rate
    rows = [{"global_step": 100 * i, "time": 10.0 + 2.0 * i, "time/collect_seconds": 0.5,
             "time/update_seconds": 1.5} for i in range(1, 6)]  # 100 steps every 2 s, from t = 12
    assert steps_at(rows, 12.0) == 100 and steps_at(rows, 13.0) == 150 and steps_at(rows, 20.0) == 500
    for t in (11.9, 20.1):
        with pytest.raises(ValueError, match="outside"):
            steps_at(rows, t)
    r = window_rate(rows, 13.0, 19.0)  # 150 -> 450 steps in 6 s; updates ending at 14, 16, 18
    assert r["steps"] == 300 and r["steps_per_second"] == 50 and r["updates_in_window"] == 3
    assert r["update_seconds_per_update"] == 1.5
    report = {"machine": "m", "load_average_before": 0.5, "environment": {},
              "config": {"name": "c", "overrides": [], "num_envs": 4, "rollout_steps": 16, "vector": "serial",
                         "torch_threads": 0},
              "results": {"1": {"runs": [{"steps_per_second": 1000.0}], "total_steps_per_second": 1000.0,
                                "total_vs_alone": 1.0, "shares": [1.0]},
                          "2": {"runs": [{"steps_per_second": 450.0}, {"steps_per_second": 350.0}],
                                "total_steps_per_second": 800.0, "total_vs_alone": 0.8, "shares": [0.9, 0.7]}}}
    table = format_runs(report)
    assert "| 1 | 1,000 | 1,000 | 1.00 | 1.00 |" in table and "| 2 | 450 / 350 | 800 | 0.80 | 0.90 / 0.70 |" in table


def test_benchmark_runs_bad_input_exit_2(capsys):
    from ppo_tbptt import benchmark
    for bad, msg in ((["--runs", "0,2"], "--runs"), (["--runs", "two"], "--runs"),
                     (["--runs", "1,2", "--only", "train"], "does not combine")):
        assert benchmark.main(["--config", "cue_recall", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err, err


@pytest.mark.slow
def test_benchmark_runs_trains_one_and_two_runs_side_by_side(tmp_path):
    out = tmp_path / "runs.json"
    r = subprocess.run([sys.executable, "-m", "ppo_tbptt.benchmark", "--config", "cue_recall", "--runs", "1,2",
                        "--set", "env.num_envs=4", "--set", "ppo.rollout_steps=16", "--set", "ppo.minibatches=2",
                        "--seconds", "2", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    res = report["results"]
    assert [len(res[k]["runs"]) for k in ("1", "2")] == [1, 2]
    alone = res["1"]["total_steps_per_second"]
    for k, v in res.items():
        assert v["total_steps_per_second"] == pytest.approx(sum(x["steps_per_second"] for x in v["runs"]))
        assert v["shares"] == pytest.approx([x["steps_per_second"] / (alone / int(k)) for x in v["runs"]])
        for x in v["runs"]:  # every run went on for the whole window
            assert x["steps_per_second"] > 0 and x["steps"] == pytest.approx(x["steps_per_second"] * 2)
    assert "| 2 | " in r.stdout and "OMP_WAIT_POLICY=PASSIVE" in r.stdout
