"""``python tests/rank_entry.py RC_DIR ARGS...``: ``python -m ppo_tbptt.train ARGS...`` that also
writes its exit code to ``RC_DIR/rank<RANK>.rc``, so a test can read every torchrun rank's code.
A rank that dies of a fatal signal (an abort in C++ included) prints its threads' Python stacks."""
import faulthandler
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    faulthandler.enable(all_threads=True)
    rc_dir = Path(sys.argv[1])
    code = 1
    try:
        from ppo_tbptt.train import main
        code = main(sys.argv[2:])
    finally:
        (rc_dir / f"rank{os.environ.get('RANK', '0')}.rc").write_text(str(code))
    sys.exit(code)
