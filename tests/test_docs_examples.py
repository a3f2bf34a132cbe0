"""The Python API example of the docs (docs/python-api.md) runs as printed (with fewer steps)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "run.total_steps=20480" in code
    code = code.replace("run.total_steps=20480", "run.total_steps=1024").replace("run.torch_threads=2",
                                                                                 "run.torch_threads=1")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert re.search(r"step_000000001024\.pt: return [01]\.0", out), out
    assert (tmp_path / "runs" / "api_example" / "train.log").is_file()
