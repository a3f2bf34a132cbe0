"""OpenMP worker threads spin only briefly before they sleep by default, so that runs sharing the
cores do not slow each other down (a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# CPU seconds per wall second of a process whose 2 torch threads run a short parallel op every 2 ms:
# threads that spin between ops burn CPU while the process sleeps, passive ones do not
PROBE = """
import sys, time
import ppo_tbptt, torch
torch.set_num_threads(2)
x = torch.ones(2_000_000)
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(100):
    x.mul_(1.0)
    time.sleep(0.002)
print((time.process_time() - c0) / (time.perf_counter() - w0))
"""


def _clean() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}


def _cpu_per_wall(**env) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE], env=dict(_clean(), PYTHONPATH=str(ROOT), **env),
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return float(r.stdout)


def test_importing_the_package_makes_openmp_threads_sleep_soon():
    passive = _cpu_per_wall()
    spinning = _cpu_per_wall(GOMP_SPINCOUNT="300000")  # libgomp's own default: spin before sleeping
    assert passive < 0.6 * spinning, (passive, spinning)
    for user, expected in [({}, "PASSIVE 1000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE -"),
                           ({"GOMP_SPINCOUNT": "5"}, "PASSIVE 5")]:  # a setting of the user's stays
        r = subprocess.run([sys.executable, "-c", "import os, ppo_tbptt; e = os.environ; "
                            "print(e['OMP_WAIT_POLICY'], e.get('GOMP_SPINCOUNT', '-'))"],
                           env=dict(_clean(), PYTHONPATH=str(ROOT), **user), capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == expected, (user, r.stdout, r.stderr)


def _first_imports(path: Path) -> dict[str, int]:
    """The line of the first import of each top-level package anywhere in ``path``."""
    import ast
    first: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for n in names:
            top = n.split(".")[0]
            first[top] = min(first.get(top, node.lineno), node.lineno)
    return first


def test_scripts_import_the_package_before_torch():
    """The waiting policy above reaches a script only if it imports ppo_tbptt before torch loads
    OpenMP: a script that imports torch first times its updates with libgomp's long spinning."""
    checked = 0
    for path in sorted((ROOT / "scripts").glob("*.py")):
        first = _first_imports(path)
        if "torch" in first:
            assert first.get("ppo_tbptt", 10**9) < first["torch"], f"{path.name}: torch is imported first"
            checked += 1
    assert checked >= 4
