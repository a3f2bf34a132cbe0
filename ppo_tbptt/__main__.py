"""``python -m ppo_tbptt COMMAND [ARGS ...]``: the package's commands under one name.

``python -m ppo_tbptt train ...`` is ``python -m ppo_tbptt.train ...``, and so on. Without a
command it lists them (and exits with code 2, as a command line missing an argument does).
"""
from __future__ import annotations

import importlib
import sys

from . import __version__

COMMANDS = {
    "train": "train an agent: a new run (--config) or a resumed one (--resume); --list-configs, --print-config",
    "evaluate": "evaluate a checkpoint on held-out levels",
    "summary": "a run's progress as a text table",
    "benchmark": "env, collection and training throughput on this machine",
    "export": "a trained policy with its recurrent state as an ONNX graph",
    "tune": "hyperparameter search with Optuna (pruned on the periodic evaluation)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m ppo_tbptt COMMAND [ARGS ...]   (or python -m ppo_tbptt.COMMAND ...)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "python -m ppo_tbptt COMMAND --help shows a command's options; --version the version."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"ppo_tbptt {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)}); "
              f"python -m ppo_tbptt --help lists them", file=sys.stderr)
        return 2
    return importlib.import_module(f"ppo_tbptt.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
