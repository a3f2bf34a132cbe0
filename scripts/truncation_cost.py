"""What each truncation strategy costs: forward + backward time and graph memory per epoch.

Builds one synthetic rollout (random uint8 frames, episodes of geometric length), then for every
setting cuts it as the strategy does and times the training pass over it the way the trainer runs
an epoch (minibatches of whole sequences: forward, PPO loss, backward): the process's CPU time on
a CPU (run with one thread, so other load on the machine does not count), wall-clock on CUDA. Memory is the size of the
tensors autograd saves for the backward pass (the activations; deduplicated by storage, so the
same on every device), the largest over the minibatches; on CUDA also the peak allocated memory.
Each row is compared with ``fixed`` at equal chunk (the span the strategy's gradient covers at
most, e.g. what randomized truncation estimates without bias) and at equal reach (how far back its
gradient reaches on average).

    python scripts/truncation_cost.py                       # ~1 minute on one CPU core
    python scripts/truncation_cost.py --device cuda --repeats 10
    python scripts/truncation_cost.py --only fixed,random --core lstm

Prints a markdown table (and writes it to ``--out`` if given).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--package" in sys.argv:  # measure another checkout's ppo_tbptt (rows its config rejects are skipped)
    ROOT = Path(sys.argv[sys.argv.index("--package") + 1]).resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ppo_tbptt  # noqa: E402,F401  (before torch: it sets OpenMP's waiting, see ppo_tbptt/__init__.py)
import torch  # noqa: E402


def settings(m: int, L: int) -> list[dict]:
    """(label, overrides, reach, chunk label, reach label). ``m`` is the short reach, ``L`` a
    chunk length; whole-fragment rows use sequence_length 0."""
    f = "tbptt.strategy=fixed"
    return [
        dict(label=f"fixed L={m}", o=[f, f"tbptt.sequence_length={m}"], chunk=None, reach=None),
        dict(label=f"fixed L={2 * m - 1}", o=[f, f"tbptt.sequence_length={2 * m - 1}"], chunk=None, reach=None),
        dict(label=f"fixed L={L}", o=[f, f"tbptt.sequence_length={L}"], chunk=None, reach=None),
        dict(label="fixed whole fragments", o=[f, "tbptt.sequence_length=0"], chunk=None, reach=None),
        dict(label=f"overlap k1={m // 2} k2={m}", o=["tbptt.strategy=overlap", f"tbptt.sequence_length={m}",
                                                    f"tbptt.stride={m // 2}"],
             chunk=f"fixed L={m}", reach=f"fixed L={m}"),
        dict(label=f"overlap k1={m // 2} k2={m}, burn-in",
             o=["tbptt.strategy=overlap", f"tbptt.sequence_length={m}", f"tbptt.stride={m // 2}",
                "tbptt.burn_in=true"], chunk=f"fixed L={m}", reach=None),
        dict(label=f"random mean={m} in L={L}", o=["tbptt.strategy=random", f"tbptt.sequence_length={L}",
                                                   f"tbptt.mean_length={m}"],
             chunk=f"fixed L={L}", reach=f"fixed L={m}"),
        dict(label=f"random mean={m} segment={m // 2} in L={L}",
             o=["tbptt.strategy=random", f"tbptt.sequence_length={L}", f"tbptt.mean_length={m}",
                f"tbptt.segment_length={m // 2}"], chunk=f"fixed L={L}", reach=f"fixed L={m}"),
        dict(label=f"random mean={m} in whole fragments",
             o=["tbptt.strategy=random", "tbptt.sequence_length=0", f"tbptt.mean_length={m}"],
             chunk="fixed whole fragments", reach=f"fixed L={m}"),
        dict(label=f"random mean={m} segment={m // 2} in whole fragments",
             o=["tbptt.strategy=random", "tbptt.sequence_length=0", f"tbptt.mean_length={m}",
                f"tbptt.segment_length={m // 2}"], chunk="fixed whole fragments", reach=f"fixed L={m}"),
        dict(label=f"adaptive K={m} (training pass)", adaptive_K=m,
             o=["tbptt.strategy=adaptive", f"tbptt.k_min={m}", f"tbptt.k_max={m}"],
             chunk=f"fixed L={2 * m - 1}", reach=f"fixed L={m}"),
    ]


def synthetic(args, device):
    """A model and a rollout with stored states from the model's own unroll."""
    import gymnasium as gym

    from ppo_tbptt import config as C
    from ppo_tbptt.model import build_model
    from ppo_tbptt.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    shape = tuple(int(x) for x in args.obs.split("x"))
    mcfg = C.ModelConfig(core=args.core, hidden_size=args.hidden, hidden_layer=args.hidden)
    model = build_model(gym.spaces.Box(0, 255, shape, np.uint8), gym.spaces.Discrete(4), mcfg).to(device)
    T, N = args.steps, args.envs
    r = Rollout.allocate(T, N, shape, np.uint8, 1, 1, args.hidden, args.core == "lstm", device)
    r.obs.copy_(torch.randint(0, 256, (T, N, *shape), generator=g, dtype=torch.uint8).to(device))
    starts = (torch.rand(T, N, generator=g) < 1.0 / args.episode).to(device)
    starts[0] = True
    r.episode_start.copy_(starts)
    state = model.initial_state(N, device)
    with torch.no_grad():
        for t in range(T):
            state = state.masked(~starts[t])
            r.state_h[t] = state.h
            if r.state_c is not None:
                r.state_c[t] = state.c
            a, lp, v, state = model.act(r.obs[t], state)
            r.actions[t], r.logprobs[t], r.values[t] = a, lp, v
    r.advantages.copy_(torch.randn(T, N, generator=g).to(device))
    r.returns.copy_(r.values + torch.randn(T, N, generator=g).to(device))
    return model, r


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (each storage counted once)."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            self.seen[key] = max(self.seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:  # tensors without storage (e.g. some views) count as nothing
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def epoch(strategy, model, batch, minibatches: int, coefs, device) -> tuple[float, int]:
    """One pass over the batch in minibatches; returns (seconds, peak saved bytes per minibatch)."""
    from ppo_tbptt.ppo import ppo_loss_from_outputs
    from ppo_tbptt.sequences import minibatch_indices
    gen = torch.Generator().manual_seed(0)
    peak = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # on a CPU the process's CPU time: with one torch thread it is the work done, whatever else
    # the machine runs (wall-clock on a shared 2-core box moved by 50-100% between runs)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync()
    t0 = clock()
    for idx in minibatch_indices(batch.num_sequences, minibatches, gen):
        mb = batch.select(idx.to(device))
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            logits, values = strategy.forward(model, mb)
            loss = ppo_loss_from_outputs(model, mb, logits, values, coefs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        peak = max(peak, saved.total)
    sync()
    return clock() - t0, peak


def measure(s: dict, model, rollout, args, device) -> dict:
    from ppo_tbptt import config as C
    from ppo_tbptt.ppo import LossCoefs
    from ppo_tbptt.truncation import make_strategy
    base = {"env": {"id": "CueRecall-v0", "num_envs": args.envs},
            "model": {"core": args.core, "hidden_size": args.hidden, "hidden_layer": args.hidden},
            "ppo": {"rollout_steps": args.steps, "minibatches": args.minibatches}, "run": {"seed": 1}}
    raw, problems = C.apply_overrides(base, s["o"])
    if problems:
        raise C.ConfigError(problems)
    cfg = C.from_dict(raw)
    strategy = make_strategy(cfg)
    if "adaptive_K" in s:
        strategy.K = s["adaptive_K"]  # the training pass only; the probe is timed separately
    coefs = LossCoefs(0.2, 0.01, 0.5)
    model.train()
    times, peak, cuda_peak = [], 0, 0
    batch = strategy.build(rollout)
    for i in range(args.repeats + 1):
        batch = strategy.build(rollout)  # (random cuts are drawn anew, as in training)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec, p = epoch(strategy, model, batch, args.minibatches, coefs, device)
        if i > 0:  # the first pass warms up
            times.append(sec)
            peak = max(peak, p)
            if device.type == "cuda":
                cuda_peak = max(cuda_peak, torch.cuda.max_memory_allocated(device))
    out = dict(label=s["label"], ms=1000 * statistics.median(times), mb=peak / 2 ** 20,
               cuda_mb=cuda_peak / 2 ** 20, seqs=batch.num_sequences, length=batch.length,
               reach=strategy.metrics()["tbptt/K"], chunk=s["chunk"], reach_ref=s["reach"])
    if "adaptive_K" in s:  # one estimate of K (the probe), at the study's probe settings
        K = s["adaptive_K"]
        raw, _ = C.apply_overrides(raw, [f"tbptt.adapt_window={2 * K}", "tbptt.adapt_burn_in=4",
                                         f"tbptt.adapt_tau={K}", "tbptt.adapt_samples=64", "tbptt.k_min=2",
                                         f"tbptt.k_max={2 * K}"])
        cfg = C.from_dict(raw)
        probe = make_strategy(cfg)
        t0 = time.perf_counter()
        probe.before_update(model, rollout)
        out["probe_ms"] = 1000 * (time.perf_counter() - t0)
    return out


def table(rows: list[dict], args, device) -> str:
    by = {r["label"]: r for r in rows}
    cuda = device.type == "cuda"
    lines = [f"{args.core.upper()} {args.hidden}, {args.obs} frames, {args.envs} envs x {args.steps} steps, "
             f"episodes ~{args.episode} steps, {args.minibatches} minibatches; one epoch (forward + PPO loss "
             f"+ backward over every minibatch), median of {args.repeats}, {device.type}"
             + (f", {torch.get_num_threads()} thread(s), CPU time" if not cuda else ", wall-clock") + ".", "",
             "| setting | reach | sequences x length | ms / epoch | graph MB" + (" | CUDA peak MB" if cuda else "")
             + " | time vs fixed, equal chunk | time vs fixed, equal reach |",
             "|---|---|---|---|---|" + ("---|" if cuda else "") + "---|---|"]

    def ratio(r, ref):
        return f"{r['ms'] / by[ref]['ms']:.2f}x ({ref})" if ref in by else ""

    for r in rows:
        extra = f" (+{r['probe_ms']:.0f} ms per estimate)" if "probe_ms" in r else ""
        lines.append(f"| {r['label']} | {r['reach']:g} | {r['seqs']} x {r['length']} | {r['ms']:.0f}{extra} | "
                     f"{r['mb']:.0f} |" + (f" {r['cuda_mb']:.0f} |" if cuda else "")
                     + f" {ratio(r, r['chunk'])} | {ratio(r, r['reach_ref'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--core", default="gru", choices=["gru", "lstm"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--obs", default="21x21x3", help="frame shape HxWxC (default: the grid envs' 4x-pooled frames)")
    p.add_argument("--envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--episode", type=float, default=100.0, help="mean episode length")
    p.add_argument("--minibatches", type=int, default=8)
    p.add_argument("--reach", type=int, default=8, help="the short gradient reach m")
    p.add_argument("--chunk", type=int, default=64, help="the chunk length L randomized truncation covers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated families (fixed,overlap,random,adaptive)")
    p.add_argument("--out", default="", help="also write the table here")
    p.add_argument("--package", default=str(ROOT), help="checkout whose ppo_tbptt to measure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, rollout = synthetic(args, device)
    only = {x for x in args.only.split(",") if x}
    chosen = [s for s in settings(args.reach, args.chunk)
              if not only or s["label"].split(" ")[0] in only or s["label"].startswith("fixed")]
    from ppo_tbptt.config import ConfigError
    print(f"ppo_tbptt from {ROOT}", file=sys.stderr)
    measure(chosen[0], model, rollout, args, device)  # warm up the process (allocator, kernels)
    rows = []
    for s in chosen:
        try:
            rows.append(measure(s, model, rollout, args, device))
        except ConfigError as exc:
            print(f"  {s['label']}: skipped ({exc.problems[0]})", file=sys.stderr)
            continue
        print(f"  {s['label']}: {rows[-1]['ms']:.0f} ms", file=sys.stderr, flush=True)
    md = table(rows, args, device)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
