"""A non-editable install finds its configs: the wheel ships ``ppo_tbptt/configs/*.yaml``, and the
README's commands run from a fresh venv holding only that wheel (its dependencies come from this
interpreter's site-packages, so nothing is downloaded), in a folder outside the checkout."""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "ppo_tbptt" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel . --no-deps`` of a copy of the checkout (an in-tree build would leave build/ in it),
    built without isolation so that the installed setuptools builds it, offline."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp / "dist")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("ppo_tbptt-*.whl")
    return whl


def test_the_wheel_ships_every_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert CONFIGS and "mortar_mayhem_grid.yaml" in CONFIGS
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("ppo_tbptt/configs/")) == CONFIGS


@pytest.mark.slow
def test_readme_commands_run_from_an_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    (purelib,) = {Path(p) for p in subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.split()}
    # this interpreter's packages (torch, gymnasium, memory-gym ...) behind the venv's own: a plain
    # path line, so the .pth files there (an editable install of this checkout) are not processed
    (purelib / "reuse_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    work = tmp_path / "elsewhere"  # outside the checkout: no configs/ next to the cwd
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy", PYGAME_HIDE_SUPPORT_PROMPT="1",
               OMP_NUM_THREADS="1")

    def run(*args):
        r = subprocess.run([py, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    where = run("-c", "import ppo_tbptt; print(ppo_tbptt.__file__)").strip()
    assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not this checkout
    listed = run("-m", "ppo_tbptt.train", "--list-configs")
    assert all(f"  {n}  " in listed for n in CONFIGS) and "invalid" not in listed
    printed = run("-m", "ppo_tbptt.train", "--config", "mortar_mayhem_grid.yaml", "--print-config")
    # read from the installed configs (without CUDA its run.cpu_config, found there by name too)
    assert printed.startswith(f"# {purelib / 'ppo_tbptt' / 'configs'}/mortar_mayhem_grid"), printed
    assert yaml.safe_load(printed)["env"]["id"] == "MortarMayhem-Grid-v0"
    out = run("-m", "ppo_tbptt.train", "--config", "cue_recall.yaml", "--set", "run.total_steps=1024",
              "--set", "run.torch_threads=1", "--run-name", "wheel")  # one update of 16 x 64 steps
    assert "update 1/1" in out
    assert (work / "runs" / "wheel" / "config.yaml").is_file()
