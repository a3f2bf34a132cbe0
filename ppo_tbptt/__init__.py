"""ppo_tbptt: recurrent PPO trained by truncated backpropagation through time on memory tasks."""
import os as _os

# OpenMP threads that finish their share of a torch op wait for the next one. By default they
# spin on the core for a while first; when other processes need the cores (several runs side by
# side, a pool's env workers) the spinning steals their time and every op waits for a descheduled
# thread: a small CueRecall update went from 0.2 s to 10 s beside one other job. Passive waiting
# (sleep at once) costs a single run nothing measurable. OpenMP reads this when torch loads its
# runtime, so it takes effect where ppo_tbptt is imported before torch (every command line here);
# set OMP_WAIT_POLICY yourself to choose otherwise. See "Several runs on one machine" in the docs
# (docs/throughput.md).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
