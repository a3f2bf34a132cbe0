"""ppo_tbptt: recurrent PPO trained by truncated backpropagation through time on memory tasks."""
import os as _os

# OpenMP threads that finish their share of a torch op wait for the next one. libgomp's default
# lets them spin on the core for up to 300,000 rounds first; when other processes need the cores
# (several runs side by side) the spinning steals their time and every op waits for a descheduled
# thread: a small CueRecall update went from 0.2 s to 10 s beside one other job. Waiting passively
# (sleeping at once) fixes that but makes a run alone pay a wake-up for each of the thousands of
# small parallel ops of an update: on a 2-core VM the Mortar Mayhem CPU update took 1.5x as long
# as with spinning. So threads spin briefly (1,000 rounds, microseconds: enough to bridge the gap
# between two ops of one update) and then sleep. OpenMP reads these when torch loads its runtime,
# so they take effect where ppo_tbptt is imported before torch (every command line here); a user's
# own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. See "Several runs on one machine" in the docs
# (docs/throughput.md).
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "1000"  # libgomp (torch's Linux wheels)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (other OpenMP runtimes: sleep at once)

__version__ = "0.1.0"
