"""``python -m ppo_tbptt.export RUN_OR_CHECKPOINT --onnx policy.onnx [--opset N] [--no-check]``

A trained policy as one ONNX graph that carries its recurrent state explicitly, for onnxruntime
(or any ONNX runtime) without torch or this package:

inputs
  ``obs``            ``[B, *obs_shape]``, the env's dtype: the observation as
                     :func:`ppo_tbptt.envs.make_env` gives it (uint8 frames as they are, pooled by
                     ``env.downsample``; Tuple / Dict / Discrete observations flattened, see
                     :mod:`ppo_tbptt.envs.spaces`). Scaling and one-hot encoding happen inside.
  ``h``              ``[K, B, H]`` float32, the recurrent state (zeros at the start)
  ``c``              ``[K, B, H]`` float32, LSTM only: its cell state
  ``episode_start``  ``[B]`` float32: 1 where this observation is the first of an episode; the state
                     of those entries is zeroed before the step, as the collector does (a config
                     with ``model.reset_hidden_state: false`` carries the state on: the input is
                     then accepted and ignored)

outputs
  ``action``         ``[B, D]`` the greedy action: int64 argmax of each categorical head, or the
                     Gaussian's mean for Box actions (not clipped: clip to the space's bounds)
  ``logits``         ``[B, sum(nvec)]`` Discrete / MultiDiscrete: every head's logits concatenated
                     (head i takes the columns ``sum(nvec[:i]) .. sum(nvec[:i+1])``; ``nvec`` is in
                     the model's metadata), for sampling
  ``mean``, ``log_std`` ``[B, D]`` Box actions instead of ``logits``: the Gaussian's parameters
  ``value``          ``[B]`` the critic's value
  ``h_out`` (``c_out``)  the next state, to feed back at the next step

The batch axis ``B`` is dynamic. The graph's metadata (``custom_metadata_map`` in onnxruntime)
records the env id, observation shape and dtype, action space, ``nvec``, core, state shape and the
checkpoint. After writing, the export runs a short episode rollout of the env through torch and
onnxruntime side by side and reports the largest difference (``--no-check`` skips it).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli import add_common
from .model import RecurrentActorCritic, RecurrentState

INSTALL_HINT = 'pip install "ppo_tbptt[export]" (onnx, onnxscript, onnxruntime)'


class ExportedPolicy(nn.Module):
    """One step of ``model`` with the state as plain tensors: ``(obs, h[, c], episode_start)`` ->
    ``(action, logits | mean, log_std, value, h_out[, c_out])`` (see the module docstring)."""

    def __init__(self, model: RecurrentActorCritic, reset_on_start: bool = True):
        super().__init__()
        self.model = model
        self.lstm = model.core_type == "lstm"
        self.reset_on_start = reset_on_start

    @property
    def input_names(self) -> list[str]:
        return ["obs", "h"] + (["c"] if self.lstm else []) + ["episode_start"]

    @property
    def output_names(self) -> list[str]:
        head = ["mean", "log_std"] if self.model.continuous else ["logits"]
        return ["action"] + head + ["value", "h_out"] + (["c_out"] if self.lstm else [])

    def forward(self, obs: torch.Tensor, *state_and_start: torch.Tensor):
        *tensors, start = state_and_start
        state = RecurrentState(*tensors)
        if self.reset_on_start:
            state = state.masked(1.0 - start)  # the collector's reset at an episode's first step
        m = self.model
        out, values, new = m(obs.unsqueeze(1), state)  # [B, 1, A], [B, 1]
        out, values = out[:, 0], values[:, 0]
        if m.continuous:
            heads = [out, m.log_std.expand_as(out)]
            action = out
        else:
            heads = [out]
            parts = torch.split(out, m.nvec, dim=-1) if len(m.nvec) > 1 else (out,)
            action = torch.stack([p.argmax(-1) for p in parts], dim=-1)  # [B, D]
        return (action, *heads, values, *new.tensors())


def example_inputs(policy: ExportedPolicy, obs: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Inputs for a batch of observations ``obs [B, ...]``: the zero state, every episode starting."""
    x = torch.as_tensor(obs)
    state = policy.model.initial_state(x.shape[0], "cpu")
    return (x, *state.tensors(), torch.ones(x.shape[0]))


def metadata(model: RecurrentActorCritic, cfg, file: Path, step: int, obs_dtype) -> dict[str, str]:
    return {
        "producer": "ppo_tbptt", "env_id": cfg.env.id, "checkpoint": str(file), "global_step": str(step),
        "obs_shape": json.dumps(list(model.obs_shape)), "obs_dtype": str(np.dtype(obs_dtype)),
        "action": "box" if model.continuous else "categorical",
        "action_nvec": json.dumps(model.nvec), "action_dims": str(model.action_dims),
        "core": model.core_type, "state_shape": json.dumps([model.num_layers, "B", model.hidden_size]),
        "reset_on_episode_start": str(bool(cfg.model.reset_hidden_state)).lower(),
    }


def export_onnx(model: RecurrentActorCritic, sample_obs: np.ndarray, path: str | Path,
                reset_on_start: bool = True, meta: dict[str, str] | None = None,
                opset: int = 18) -> Path:
    """Write ``model`` as the ONNX graph of :class:`ExportedPolicy` to ``path`` (torch's
    ``torch.export``-based ONNX exporter); ``sample_obs [B, ...]`` gives the observation's shape and
    dtype (the batch axis is dynamic). A bfloat16 encoder is exported in float32. Raises
    ImportError without onnx / onnxscript."""
    import onnx
    import warnings
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()  # (the caller's model stays where it is)
    model.encoder_bf16 = False
    policy = ExportedPolicy(model, reset_on_start).eval()
    batch = torch.export.Dim("batch")
    state = ({1: batch},) * (2 if policy.lstm else 1)
    sample_obs = np.asarray(sample_obs)
    if sample_obs.shape[0] < 2:  # (torch.export fixes an axis of size 1 as a constant)
        sample_obs = np.concatenate([sample_obs, sample_obs])
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a note per torchvision operator the exporter skips
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.export's notes on its own internals
            torch.onnx.export(policy, example_inputs(policy, sample_obs), str(path), dynamo=True,
                              input_names=policy.input_names, output_names=policy.output_names,
                              dynamic_shapes=({0: batch}, (*state, {0: batch})), opset_version=opset,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    for key, value in (meta or {}).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))
    return path


# ---- side by side ---------------------------------------------------------------------------------
def record_episodes(model: RecurrentActorCritic, env_cfg, num_envs: int, steps: int, first_seed: int,
                    reset_on_start: bool = True) -> dict:
    """Drive ``num_envs`` envs for ``steps`` steps with the torch model's greedy actions, as the
    collector steps it: the state carried from step to step and zeroed after an episode ends (if
    ``reset_on_start``); each episode on the next level seed from ``first_seed`` on.

    Returns numpy arrays over the steps: ``obs [T, B, ...]``, ``episode_start [T, B]`` (float32),
    and torch's ``action``, ``logits`` (Box: ``mean`` and ``log_std``), ``value`` and the state
    after each step, ``h_out`` (and ``c_out``) ``[T, K, B, H]``."""
    import itertools
    from .envs import make_env
    from .envs.vector import env_actions
    from .envs.wrappers import LevelSeedWrapper
    from .evaluation import no_seed
    model = copy.deepcopy(model).cpu().eval()
    seeds = itertools.count(int(first_seed))
    envs = [LevelSeedWrapper(make_env(env_cfg), no_seed, env_cfg.reset_params) for _ in range(num_envs)]
    rec: dict[str, list] = {}
    try:
        obs = np.stack([env.reset(seed=next(seeds))[0] for env in envs])
        state = model.initial_state(num_envs, "cpu")
        start = np.ones(num_envs, bool)
        with torch.no_grad():
            for _ in range(steps):
                logits, values, new = model(torch.from_numpy(obs)[:, None], state)  # [B, 1, ...]
                action = model.dist(logits[:, 0]).mode()
                heads = ({"mean": logits[:, 0], "log_std": model.log_std.expand_as(logits[:, 0])}
                         if model.continuous else {"logits": logits[:, 0]})
                names = ["h_out", "c_out"][:len(new.tensors())]
                step = {"obs": obs.copy(), "episode_start": start.astype(np.float32), "action": action,
                        **heads, "value": values[:, 0], **dict(zip(names, new.tensors()))}
                for k, v in step.items():
                    rec.setdefault(k, []).append(v.numpy().copy() if torch.is_tensor(v) else v)
                acts = env_actions(action.numpy(), envs[0].action_space)
                for j, env in enumerate(envs):
                    o, _, term, trunc, _ = env.step(acts[j])
                    start[j] = term or trunc
                    obs[j] = env.reset(seed=next(seeds))[0] if start[j] else o
                state = new.masked(torch.from_numpy(~start)) if reset_on_start else new
    finally:
        for env in envs:
            env.close()
    return {k: np.stack(v) for k, v in rec.items()}


def onnx_session(path: str | Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(path: str | Path, rec: dict) -> dict:
    """Run the ONNX graph at ``path`` over :func:`record_episodes`' steps, its own state carried
    from each step to the next (``h_out`` fed back as ``h``, starting from zeros) and the recorded
    observations and episode starts: ``max_abs`` (per output, the largest difference from torch
    over every step and env), ``action_mismatches`` (entries whose greedy action differs), ``steps``."""
    sess = onnx_session(path)
    out_names = [o.name for o in sess.get_outputs()]
    state_names = [n for n in ("h", "c") if n in [i.name for i in sess.get_inputs()]]
    steps, batch = rec["episode_start"].shape
    state = {n: np.zeros_like(rec["h_out"][0]) for n in state_names}
    worst = {n: 0.0 for n in out_names if n != "action"}
    mismatches = 0
    for t in range(steps):
        got = dict(zip(out_names, sess.run(None, {"obs": rec["obs"][t], "episode_start": rec["episode_start"][t],
                                                  **state})))
        for name, g in got.items():
            ref = rec[name][t]
            if g.shape != ref.shape:
                raise AssertionError(f"{name}: ONNX gives shape {g.shape}, torch {ref.shape}")
            if name == "action" and g.dtype.kind == "i":
                mismatches += int((g != ref).sum())
            else:
                worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(g.astype(np.float64) - ref))))
        state = {n: got[f"{n}_out"] for n in state_names}
    return {"max_abs": worst, "action_mismatches": mismatches, "steps": steps, "envs": batch}


# ---- command line -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppo_tbptt.export",
                                description="Export a trained policy with its recurrent state as ONNX.")
    p.add_argument("path", help="run folder (its latest checkpoint) or a checkpoint file")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX graph")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the side-by-side check of torch and onnxruntime after writing")
    add_common(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import checkpoint as ckpt
    from .envs import make_env
    from .evaluate import load_policy

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        if not args.no_check:
            import onnxruntime  # noqa: F401
    except ImportError as exc:
        return fail(f"{exc.name} is not installed: {INSTALL_HINT}")
    if not args.onnx.endswith(".onnx"):
        return fail(f"--onnx {args.onnx!r}: expected a file name ending in .onnx")
    try:
        model, cfg, state, file = load_policy(args.path, torch.device("cpu"))
    except (ckpt.CheckpointError, ValueError) as exc:
        return fail(str(exc))
    env = make_env(cfg.env)
    try:
        obs, _ = env.reset(seed=int(cfg.env.eval_seeds[0]))
        space_dtype = env.observation_space.dtype
    finally:
        env.close()
    reset = bool(cfg.model.reset_hidden_state)
    if model.encoder_bf16:
        print("note: the encoder runs in float32 in the exported graph (model.encoder_dtype bfloat16 is an "
              "autocast in torch); the check compares it with torch in float32 too")
        model.encoder_bf16 = False
    meta = metadata(model, cfg, file, int(state.get("global_step", 0)), space_dtype)
    out = export_onnx(model, np.asarray(obs)[None], args.onnx, reset, meta, args.opset)
    policy = ExportedPolicy(model, reset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {file}: inputs "
          f"{', '.join(policy.input_names)}; outputs {', '.join(policy.output_names)}")
    if not args.no_check:
        res = compare(out, record_episodes(model, cfg.env, 4, 64, cfg.env.eval_seeds[0], reset))
        worst = max(res["max_abs"].values())
        print(f"checked: onnxruntime against torch over {res['steps']} steps of 4 envs (held-out levels): "
              f"max |difference| {worst:.2e}, greedy actions differing: {res['action_mismatches']}")
        if res["action_mismatches"] or worst > 1e-4:
            print("warning: the exported graph does not match torch closely", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
