"""Data-parallel training over processes started by ``torchrun`` (one rank per GPU, or per CPU slice).

Every rank steps its own slice of the envs with its own worker pool, builds sequences from its own
rollout and splits them into the configured number of minibatches; at each minibatch step the ranks
average their gradients so that every rank takes the step of the masked-mean loss over the union
of their minibatches. The ranks keep identical parameters: they start from rank 0's weights, apply
the same averaged (then clipped) gradient and run the same Adam step.

The maths (proved in the documentation's "Scaling out with torchrun" page, tested in
``tests/test_distributed.py``):

- A rank's loss is a masked mean over its ``n_r`` loss steps, ``L_r = S_r / n_r``. The union's loss
  is ``L = sum_r S_r / n`` with ``n = sum_r n_r``, so ``grad L = sum_r (n_r / n) grad L_r``: each
  rank's gradient is weighted by its share of the union's loss steps, not averaged plainly (ranks
  hold different numbers of real steps: episode ends cut sequences short, padding is not counted).
  One all-reduce per minibatch carries the weighted gradients and the counts together.
- Advantage normalisation (``ppo.norm_advantages``) uses the masked mean and standard deviation of
  the union minibatch (one small all-reduce of the sums), as a single process normalises its whole
  minibatch; normalising per rank would be another estimator.
- Gradient clipping acts on the averaged gradient, so its factor is the same on every rank.

Everything else a rank does on its own: action sampling, the minibatch shuffle and the truncation
strategy's random draws use per-rank streams (rank 0's are a single process's), and env ``i`` of
rank ``r`` is global env ``r * N / W + i`` with that env's level-seed stream, so a run draws the
same levels per env index whatever the number of ranks. Rank 0 alone writes metrics, TensorBoard,
checkpoints and evaluates; it gathers the other ranks' episode statistics and checkpoint parts.

A rank that dies ends the others: the collective that waits for it fails (gloo notices the closed
connection at once; a rank that hangs is given up on after :data:`TIMEOUT_ENV` seconds) and raises
:class:`RankLost`, and torchrun stops the remaining ranks of a failed group. An env that keeps
failing on one rank ends that rank the same way (the trainer's EnvFailure, without saving: the
ranks keep no update-boundary copy, which would cost every update a gather of every rank's state),
so the last periodic checkpoint is what a resume continues from. Signals, by contrast, are agreed
on after each update (:meth:`Distributed.agree`), and all ranks save one checkpoint together.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
from typing import Callable, Iterable

import numpy as np
import torch

from .parallel import SINGLE, RankLost, SingleProcess  # noqa: F401  (SINGLE, RankLost: also named here)

#: Seconds a collective waits for the other ranks before giving up (default :data:`DEFAULT_TIMEOUT`).
TIMEOUT_ENV = "PPO_TBPTT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0

#: The checkpoint entries that differ between ranks (each rank's part is kept).
RANK_KEYS = ("rng", "shuffle_generator", "collector", "truncation")

#: Per-minibatch metrics that are the same on every rank (computed after the gradient all-reduce).
RANK_INVARIANT = ("losses/grad_norm",)


def env_share(num_envs: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first, count)``: the global env indices ``[first, first + count)`` that ``rank`` steps.
    Raises ValueError if ``num_envs`` (the total over all ranks) does not divide by ``world_size``."""
    if num_envs % world_size:
        raise ValueError(_divide_message(num_envs, world_size))
    count = num_envs // world_size
    return rank * count, count


def _divide_message(n: int, w: int) -> str:
    below, above = n - n % w, n + w - n % w
    hint = f"{below} or {above}" if below > 0 else f"{above}"
    return (f"env.num_envs: {n} is the number of envs over all {w} ranks (torchrun's --nnodes x "
            f"--nproc_per_node) and must be a multiple of {w}: try {hint}")


def config_problems(cfg, world_size: int) -> list[str]:
    """What a config cannot do with ``world_size`` ranks: ``env.num_envs`` not a multiple of it, or
    a rank's share of envs too small for ``ppo.minibatches`` or ``env.groups`` (empty if fine)."""
    if world_size <= 1:
        return []
    n = cfg.env.num_envs
    if n % world_size:
        return [_divide_message(n, world_size)]
    from .config import validate
    local = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, num_envs=n // world_size))
    return [f"with {world_size} ranks of env.num_envs / {world_size} = {n // world_size} envs each: {p}"
            for p in validate(local) if p.startswith(("ppo.minibatches", "env.groups"))]


def derived_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own random streams, independent of ``seed``'s (rank 0 keeps ``seed``)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, np.uint32)
               .astype(np.uint64) @ np.array([1, 2**32], np.uint64)) % 2**63


def param_digest(model: torch.nn.Module) -> str:
    """A hash of the model's parameters and buffers, bit for bit."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _import_compiler() -> None:
    """Import ``torch._dynamo`` before the process group exists. Its first import (which the first
    optimizer triggers) keeps references to the default process group that
    ``destroy_process_group`` does not drop: the group's gloo threads (and rank 0's store server)
    would then outlive :meth:`Distributed.close` and be torn down, if at all, while the
    interpreter exits, where a rank can abort in C++ ("terminate called without an active
    exception"). Imported first, it holds no reference to the group, and closing ends them."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # a build without the compiler: nothing to hold the group either
        pass


class Distributed(SingleProcess):
    """This process's place in a data-parallel run of ``world_size`` (2 or more) ranks: the
    methods of the seam :class:`ppo_tbptt.parallel.SingleProcess`, as collectives.

    A plain run of one process never gets here: :meth:`from_environment` gives it
    :data:`ppo_tbptt.parallel.SINGLE`."""

    def __init__(self, rank: int = 0, world_size: int = 2, local_rank: int = 0, local_world_size: int = 1,
                 backend: str | None = None):
        if int(world_size) < 2:
            raise ValueError(f"a data-parallel run has two or more ranks, not {world_size}; one process "
                             "is ppo_tbptt.parallel.SINGLE")
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_rank, self.local_world_size = int(local_rank), int(local_world_size)
        self.backend = backend

    @property
    def rank_prefix(self) -> str:
        """``rank r of W: ``, before a message (every rank may write one)."""
        return f"rank {self.rank} of {self.world_size}: "

    def __repr__(self) -> str:
        return (f"Distributed(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"backend={self.backend})")

    # ---- set-up ----------------------------------------------------------------------------------
    @classmethod
    def from_environment(cls, environ=None, timeout: float | None = None) -> "Distributed":
        """Join the process group that torchrun (or any launcher setting ``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``) describes; :data:`SINGLE` without one (``WORLD_SIZE``
        unset or 1). The backend is gloo for CPU tensors and, where CUDA is present, nccl for CUDA
        tensors; each rank's current CUDA device is its ``LOCAL_RANK``."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return SINGLE
        import torch.distributed as dist
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        if timeout is None:
            timeout = float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        cuda = torch.cuda.is_available()
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        _import_compiler()
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        return cls(rank, world, local_rank, local_world, backend)

    def close(self) -> None:
        """Leave the process group (its threads end here: see :func:`_import_compiler`)."""
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group whose peers are gone: nothing left to tidy
                pass

    def place(self, cfg, device: torch.device) -> torch.device:
        """Raise ConfigError if the config cannot be split over the ranks (:meth:`check_config`),
        ValueError if ``device`` does not fit this rank (:meth:`device`); else this rank's device."""
        self.check_config(cfg)
        return self.device(device)

    def device(self, device: torch.device) -> torch.device:
        """The training device of this rank: a CUDA device becomes ``cuda:LOCAL_RANK``."""
        if device.type != "cuda":
            return device
        if device.index is not None and device.index != self.local_rank:
            raise ValueError(f"run.device={device} names one GPU, but under torchrun each rank trains on "
                             f"the GPU of its LOCAL_RANK: use run.device=cuda (or auto)")
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"rank {self.rank} has LOCAL_RANK {self.local_rank} but this machine has "
                             f"{count} CUDA device{'s' if count != 1 else ''}: start at most one process "
                             f"per GPU (torchrun --nproc_per_node={count})")
        return torch.device("cuda", self.local_rank)

    def env_kwargs(self, env_cfg) -> dict:
        """``make_vector_env`` arguments for this rank's slice of the envs:
        its env count, its first global env index, and its share of the machine's cores for a pool."""
        first, count = env_share(env_cfg.num_envs, self.rank, self.world_size)
        from .envs.pool import usable_cpus
        return {"num_envs": count, "first_env": first,
                "workers": max(1, usable_cpus() // max(1, self.local_world_size))}

    def check_config(self, cfg) -> None:
        """Raise ConfigError if the config cannot be split over this run's ranks."""
        problems = config_problems(cfg, self.world_size)
        if problems:
            from .config import ConfigError
            raise ConfigError(problems)

    # ---- collectives (each raises RankLost when another rank is gone) -----------------------------
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo / nccl: a closed connection, a timeout, an aborted group
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RankLost(f"rank {self.rank} of {self.world_size}: {what} failed, another rank died or "
                           f"stopped answering ({first[:300]}); stopping this rank too") from None

    def all_reduce(self, tensor: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of ``tensor`` (``op`` sum or max); returns it."""
        import torch.distributed as dist
        self._call(what, dist.all_reduce, tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def broadcast_object(self, obj, what: str = "a broadcast from rank 0"):
        """Rank 0's ``obj`` on every rank (picklable)."""
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        self._call(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather_objects(self, obj, what: str) -> list | None:
        """Every rank's ``obj`` as a list in rank order on rank 0; None on the other ranks."""
        import torch.distributed as dist
        out = [None] * self.world_size if self.is_main else None
        self._call(what, dist.gather_object, obj, out, dst=0)
        return out

    def from_main(self, fn: Callable, errors: tuple = (Exception,)):
        """``fn()`` run on rank 0 only, its result on every rank; one of ``errors`` raised there is
        raised on every rank (so all ranks stop with the same message)."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except errors as exc:
                error = exc
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    # ---- start-up --------------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, seed: int, generators: Iterable[torch.Generator]) -> None:
        """Every rank from rank 0's weights (:meth:`broadcast_model`), with its own random streams
        (:meth:`seed_rank`)."""
        self.broadcast_model(model)
        self.seed_rank(seed, generators)

    def stopping(self, console):
        """How a signal stops the ranks (:class:`ppo_tbptt.stopping.StopTogether`: after the update
        in flight, once they agree)."""
        from .stopping import StopTogether
        return StopTogether(console, self)

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        import torch.distributed as dist
        with torch.no_grad():
            for t in model.state_dict().values():
                self._call("broadcasting the initial weights", dist.broadcast, t, src=0)

    def seed_rank(self, seed: int, generators: Iterable[torch.Generator]) -> None:
        """Give ranks other than 0 their own python / numpy / torch streams and reseed
        ``generators`` (minibatch shuffle, a truncation strategy's sampler) from their initial
        seeds: the ranks must not draw the same actions or cuts. Rank 0 keeps a single process's."""
        if self.rank == 0:
            return
        from .utils import seed_everything
        seed_everything(derived_seed(seed, self.rank))
        for g in generators:
            g.manual_seed(derived_seed(g.initial_seed(), self.rank))

    # ---- one update ------------------------------------------------------------------------------
    def gather_episodes(self, episodes: list, first_env: int) -> list:
        """All ranks' finished episodes (env indices made global) on rank 0; [] elsewhere."""
        mine = [dataclasses.replace(e, env_index=e.env_index + first_env) for e in episodes]
        parts = self.gather_objects(mine, "gathering episode statistics")
        return [] if parts is None else [e for p in parts for e in p]

    def sync_truncation(self, strategy, episode_start: torch.Tensor | None = None) -> None:
        """Strategies that estimate something from the rollout (adaptive's K) use rank 0's estimate
        on every rank, so that all ranks train with the same truncation; when the strategy chose
        anew this update, rank 0 chooses again with every rank's ``episode_start [T, N_r]`` side
        by side, so that the choice holds for the whole run's rollout."""
        if hasattr(strategy, "K") and hasattr(strategy, "estimate"):
            if episode_start is not None and strategy.estimated:
                parts = self.gather_objects(episode_start.cpu(), "gathering the ranks' episode starts")
                if self.is_main:
                    strategy.choose(torch.cat(parts, dim=1).to(episode_start.device))
            strategy.K, strategy.estimate = self.broadcast_object(
                (strategy.K, strategy.estimate), "sharing the adaptive truncation estimate")

    def truncation_metrics(self, strategy) -> dict:
        """The strategy's scalars, its ratios (:meth:`TruncationStrategy.ratios`) summed over all
        ranks (one all-reduce): figures of the whole run's rollout."""
        out = strategy.metrics()
        ratios = strategy.ratios()
        if not ratios:
            return out
        keys = sorted(ratios)
        vec = torch.tensor([ratios[k][i] for i in (0, 1) for k in keys], dtype=torch.float64)
        self.all_reduce(vec, "the truncation metrics all-reduce")
        num, den = vec[:len(keys)].tolist(), vec[len(keys):].tolist()
        out.update({k: (n / d if d else float("nan")) for k, n, d in zip(keys, num, den)})
        return out

    def normalise_advantages(self, mb, coefs):
        """With ``coefs.norm_advantages``: ``mb`` with its advantages normalised by the masked mean
        and standard deviation over the union of the ranks' minibatches, and ``coefs`` that do not
        normalise again."""
        if not coefs.norm_advantages:
            return mb, coefs
        m = mb.mask.to(torch.float64)
        a = mb.advantages.to(torch.float64)
        stats = torch.stack([(a * m).sum(), m.sum(), (a * a * m).sum()])  # [3]
        self.all_reduce(stats, "the advantage statistics all-reduce")
        n = stats[1]
        mean = stats[0] / n.clamp_min(1.0)
        var = ((stats[2] - n * mean * mean) / (n - 1.0).clamp_min(1.0)).clamp_min(0.0)
        adv = (mb.advantages - mean.to(mb.advantages.dtype)) / (var.sqrt().to(mb.advantages.dtype) + 1e-8)
        return dataclasses.replace(mb, advantages=adv), dataclasses.replace(coefs, norm_advantages=False)

    def average_gradients(self, params: Iterable[torch.nn.Parameter], mask: torch.Tensor):
        """Replace each rank's gradients (of its masked-mean loss over ``mask``'s loss steps) by the
        gradient of the masked mean over the union of the ranks' minibatches: ``sum_r (n_r / n)
        grad_r``. Returns this rank's share ``n_r / n`` (a 0-d tensor).
        A parameter without a gradient on every rank keeps none."""
        params = list(params)
        count = mask.sum().to(torch.float32)
        dev = mask.device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) * count
                 for p in params]
        flat = torch.cat(parts + [has, count.reshape(1)])  # [sum of numels + P + 1]
        self.all_reduce(flat, "the gradient all-reduce")
        total = flat[-1].clamp_min(1.0)
        present = flat[-1 - len(params):-1].tolist()
        offset = 0
        for p, here in zip(params, present):
            k = p.numel()
            p.grad = (flat[offset:offset + k] / total).view_as(p).to(p.dtype) if here else None
            offset += k
        return count / total

    def weigh(self, metrics: dict, share) -> dict:
        """A minibatch's metrics weighted by this rank's share of its loss steps (summed over the
        ranks at the end of the update: the union minibatch's masked means)."""
        return {k: v * share for k, v in metrics.items()}

    def reduce_update(self, sums: dict, first_kl, finite: torch.Tensor):
        """End of an update: the metric sums (weighted by :meth:`weigh`) and the first minibatch's
        KL summed over the ranks, and whether every rank's losses and gradients were finite (one
        all-reduce)."""
        keys = sorted(k for k in sums if k not in RANK_INVARIANT)
        dev = finite.device
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=dev) for k in keys]
                          + [torch.as_tensor(first_kl, dtype=torch.float32, device=dev),
                             (~finite).to(torch.float32)])
        self.all_reduce(vec, "the end-of-update metrics all-reduce")
        out = dict(sums)
        out.update({k: vec[i] for i, k in enumerate(keys)})
        return out, vec[-2], vec[-1] == 0

    def rollout_scalars(self, rollout, batch) -> dict:
        """Statistics of the whole rollout over all ranks: explained variance, sequences and the
        padding share (one all-reduce)."""
        y = rollout.returns.flatten().to(torch.float64)
        d = y - rollout.values.flatten().to(torch.float64)
        mask = batch.mask
        vec = torch.stack([torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device), y.sum(),
                           (y * y).sum(), d.sum(), (d * d).sum(),
                           torch.tensor(float(batch.num_sequences), dtype=torch.float64, device=y.device),
                           mask.sum().to(torch.float64),
                           torch.tensor(float(mask.numel()), dtype=torch.float64, device=y.device)])
        self.all_reduce(vec, "the rollout statistics all-reduce")
        n, sy, syy, sd, sdd, seqs, real, cells = vec.tolist()
        var_y = (syy - sy * sy / n) / max(n - 1.0, 1.0)
        var_d = (sdd - sd * sd / n) / max(n - 1.0, 1.0)
        return {"losses/explained_variance": float("nan") if var_y <= 0 else 1.0 - var_d / var_y,
                "tbptt/sequences_per_batch": seqs, "tbptt/padding_fraction": 1.0 - real / cells}

    def agree(self, signal_seen: int | None, over_time: bool) -> tuple[int | None, bool]:
        """Whether to stop after this update, decided by all ranks together: the largest signal
        number any rank has seen (None if none), and whether any rank's time budget is spent."""
        flags = torch.tensor([0 if signal_seen is None else int(signal_seen), int(bool(over_time))],
                             dtype=torch.int64)
        self.all_reduce(flags, "agreeing on whether to stop", op="max")
        sig, over = (int(x) for x in flags.tolist())
        return (sig or None), bool(over)

    # ---- checkpoints -----------------------------------------------------------------------------
    def gather_state(self, state: dict, model: torch.nn.Module) -> dict | None:
        """A checkpoint of the whole run on rank 0 (None elsewhere): ``state`` (rank 0's) with a
        ``distributed`` entry holding the world size and every rank's :data:`RANK_KEYS` parts.
        Also checks that all ranks hold the same parameters (they must, bit for bit)."""
        part = {k: state[k] for k in RANK_KEYS if k in state}
        part["digest"] = param_digest(model)
        parts = self.gather_objects(part, "gathering the ranks' checkpoint parts")
        if parts is None:
            return None
        digests = [p.pop("digest") for p in parts]
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks' parameters differ (digests {digests}); data-parallel "
                               "training has lost its invariant, and no checkpoint is written")
        out = dict(state)
        out["distributed"] = {"world_size": self.world_size, "ranks": parts}
        return out

    def rank_state(self, state: dict, path) -> dict:
        """``state`` (a checkpoint) as this rank restores it: its own :data:`RANK_KEYS` parts.
        Raises CheckpointError if the checkpoint was written by a run of another world size."""
        self.check_world_size(state, path)
        saved = state.get("distributed")
        if saved is None:
            return state
        out = dict(state)
        out.update(saved["ranks"][self.rank])
        return out
