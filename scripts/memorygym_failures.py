"""Where a MemoryGym grid policy fails, on held-out levels: for Mortar Mayhem, which move the agent
made at the command it failed; for Mystery Path, how often it fell off where it had fallen before.

    python scripts/memorygym_failures.py runs/<name> [--stage N] [--episodes 300] [--probe]

**Mortar Mayhem** (``MortarMayhem-Grid-v0``). For each command, how many episodes reached it and carried it
out; a failure at command k (0 = the first) is put in the first of these classes that fits it:
- ``left the tile``: the agent stood on command k's tile when it was checked and stepped off
  while the tiles exploded (a timing error, not a memory error);
- ``previous command's move``: it moved as command k-1 said (repeated the last command);
- ``a later command's move``: as one of commands k+1, k+2, ... said (skipped ahead);
- ``an earlier command's move``: as one of commands 0..k-2 said;
- ``no command's move``: a move no command of the episode asked for.
A move is the agent's tile at the check minus the tile command k-1 ended on. The three middle
classes are errors of order: the agent held a command but produced it at the wrong time. The grid
version has five commands (four moves and stay), so a wrong move often fits one of them by chance;
the ``chance`` row is what the classes would count if each failure at a check had been a wrong move
drawn uniformly from the commands that keep the agent in the arena.

``--probe`` asks, for Mortar Mayhem, where the commands are in the agent's memory: for each step t
and command j, a linear classifier (multinomial logistic regression on the standardised recurrent
state after step t) is fitted on the first 70% of the episodes and scored on the rest. Accuracy
near 1 means command j can be read from the state at step t; near the most frequent command's
share (in brackets) means it cannot. A command that is readable when shown and fades while the
agent acts was written and then lost; one that is never readable was not written.

**Mystery Path** (``MysteryPath-Grid-v0``). Per episode: success, steps, falls (steps onto a cell
off the hidden path, after which the env puts the agent back on the origin), the cells fallen into,
and repeated falls: falls into a cell the agent had already fallen into in that episode. An agent
that remembers where it fell repeats none; one without memory repeats most of its falls. Whether
a fall changed the policy: at each place (cell and heading) the agent stepped forward from and
stood on again later, P(forward) at that first step against P(forward) on every later step there
(waiting and turning away included), for the places where the step fell and, as the control, those
where it led on along the path. The frame is the same each time (the agent, and the origin and goal
where shown), so only the recurrent state can move P(forward) at a place. Read it with care: the
first step is one where forward was drawn (with ``--deterministic``, where it was the most likely
action), which favours a high P wherever P varies from visit to visit, and by more where the agent
is less certain, as it may be where it fell; and a policy that remembers may not come back to a
place at all (it does not turn toward the pit), which shows in how many of the places it fell from
it stands on again, not in P.

Levels are the config's held-out ``env.eval_seeds`` (the first ``--episodes`` of them), actions
are sampled (``--deterministic``: the most likely action), one env in this process. The figures
need the env's state (commands, tiles, the path), which memory-gym's grid envs and their port
(``env.backend: fast``) keep under the same names.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

for _k, _v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
    os.environ.setdefault(_k, _v)

import ppo_tbptt  # noqa: E402,F401  (before torch: it sets OpenMP's waiting, see ppo_tbptt/__init__.py)
import torch  # noqa: E402

FORWARD = 3  # MysteryPath-Grid's actions: 0 nothing, 1 and 2 turn, 3 forward
CLASSES = ("left the tile", "previous command's move", "a later command's move",
           "an earlier command's move", "no command's move")


def classify(commands: list, moves: dict, failed: int, start: tuple, agent: tuple, on_tile: bool) -> str:
    """The class of a failure at command ``failed`` (0-based) of ``commands`` (keys of ``moves``,
    each a tile offset), from ``start`` (the tile command ``failed - 1`` ended on) to ``agent``
    (the agent's tile at the check); ``on_tile``: the check passed and the agent left later."""
    if on_tile:
        return CLASSES[0]
    made = (agent[0] - start[0], agent[1] - start[1])
    said = [tuple(moves[c]) for c in commands]
    if failed > 0 and said[failed - 1] == made:
        return CLASSES[1]
    if made in said[failed + 1:]:
        return CLASSES[2]
    if made in said[:max(0, failed - 1)]:
        return CLASSES[3]
    return CLASSES[4]


def start_tiles(commands: list, moves: dict, last_target: tuple, upto: int) -> list[tuple]:
    """The tile before each command 0..upto, walked back from ``last_target`` (command ``upto``'s tile)."""
    tiles = [tuple(last_target)]
    for c in reversed(commands[:upto + 1]):
        m = moves[c]
        tiles.append((tiles[-1][0] - m[0], tiles[-1][1] - m[1]))
    return tiles[::-1][:upto + 1]


def chance(commands: list, moves: dict, failed: int, start: tuple, allowed: int, size: int) -> dict:
    """For a failure at a check: each class's probability had the agent made one of the wrong
    moves that the first ``allowed`` commands offer (inside a ``size`` x ``size`` arena) at random."""
    right = tuple(moves[commands[failed]])
    wrong = [tuple(m) for m in list(moves.values())[:allowed] if tuple(m) != right
             and 0 <= start[0] + m[0] < size and 0 <= start[1] + m[1] < size]
    out = dict.fromkeys(CLASSES, 0.0)
    for m in wrong:
        out[classify(commands, moves, failed, start, (start[0] + m[0], start[1] + m[1]), False)] += 1 / len(wrong)
    return out


def act(model, obs, state, deterministic: bool, gen: torch.Generator):
    """The policy's action for one observation -> (action, new state, the action probabilities)."""
    with torch.no_grad():
        logits, _, state = model(torch.as_tensor(obs)[None, None], state)
        d = model.dist(logits[:, 0])
        probs = d.probs[0][0]
        if deterministic:
            return int(d.mode()[0, 0]), state, probs
        # drawn from this script's own generator: the same episodes on every run
        return int(torch.multinomial(probs, 1, generator=gen)), state, probs


def mortar_episode(model, env, seed: int, params: dict, deterministic: bool, gen: torch.Generator,
                   keep_states: bool = False) -> dict:
    """One Mortar Mayhem episode -> {"commands": n, "completed": k, "class": the failure's class,
    None on success, "chance": the classes' odds for a random wrong move, None where they do not
    apply}; with ``keep_states`` also "states": the recurrent state after each step ``[T, D]`` and
    "labels": each command's index in memory-gym's command table."""
    from memory_gym.pygame_assets import Command
    obs, _ = env.reset(seed=seed, options=params)
    u = env.unwrapped
    commands = list(u._commands)
    state = model.initial_state(1)
    passed = 0  # checks passed (rewarded commands)
    states = []
    while True:
        action, state, _ = act(model, obs, state, deterministic, gen)
        if keep_states:
            states.append(torch.cat([x[:, 0].reshape(-1) for x in state.tensors()]))
        obs, reward, terminated, truncated, info = env.step(action)
        passed += reward > 0
        if terminated or truncated:
            break
    n = int(u.num_commands)
    completed = round(info["commands_completed"] * n)
    kept = {"states": torch.stack(states), "labels": [list(Command.COMMANDS).index(c) for c in commands]
            } if keep_states else {}
    if info.get("success"):
        return {"commands": n, "completed": completed, "class": None, **kept}
    failed = int(u._current_command) - 1  # the command whose check or explosion ended the episode
    if failed != completed:
        raise RuntimeError(f"seed {seed}: the env counts {completed} commands carried out, the "
                           f"failed command is {failed}")
    start = start_tiles(commands, Command.COMMANDS, u._target_pos, failed)[failed]
    on_tile = passed > failed  # its check was rewarded: the agent left during the explosion
    cls = classify(commands, Command.COMMANDS, failed, start, tuple(u.normalized_agent_position), on_tile)
    odds = None if on_tile else chance(commands, Command.COMMANDS, failed, start,
                                       int(u.reset_params["allowed_commands"]), int(u.reset_params["arena_size"]))
    return {"commands": n, "completed": completed, "class": cls, "chance": odds, **kept}


def mystery_episode(model, env, seed: int, params: dict, deterministic: bool, gen: torch.Generator) -> dict:
    """One Mystery Path episode -> {"success", "steps", "falls", "cells" (distinct cells fallen
    into), "repeats" (falls into a cell fallen into before), "places": for each place (cell and
    heading) the agent stepped forward from, off the path or onto it, [the step fell, P(forward)
    at that step, [P(forward) at each later step there]]}."""
    obs, _ = env.reset(seed=seed, options=params)
    u = env.unwrapped
    state = model.initial_state(1)
    fallen: set = set()
    falls = repeats = steps = 0
    stepped: dict = {}  # (cell, heading) -> [fell, P(forward) at the first forward step, [P(forward) later]]
    while True:
        place, off = (tuple(u.normalized_agent_position), heading(u)), u.is_off_path
        action, state, probs = act(model, obs, state, deterministic, gen)
        p_forward = float(probs[FORWARD])
        if place in stepped:
            stepped[place][2].append(p_forward)
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        if u.is_off_path:  # a fall (the next step puts the agent back on the origin, on the path)
            cell = tuple(u.normalized_agent_position)
            falls += 1
            repeats += cell in fallen
            fallen.add(cell)
        # a step from the path that moved: forward (turns and waits stay, as does forward into a
        # wall; off the path, every action returns the agent to the origin)
        if not off and tuple(u.normalized_agent_position) != place[0]:
            stepped.setdefault(place, [bool(u.is_off_path), p_forward, []])
        if terminated or truncated:
            break
    if falls != info["num_fails"]:
        raise RuntimeError(f"seed {seed}: the env counts {info['num_fails']} falls, this script {falls}")
    if "repeated_falls" in info and repeats != info["repeated_falls"]:
        raise RuntimeError(f"seed {seed}: the env's wrapper counts {info['repeated_falls']} repeated falls, "
                           f"this script {repeats}")
    return {"success": int(info["success"]), "steps": steps, "falls": falls, "cells": len(fallen),
            "repeats": repeats, "places": list(stepped.values())}


def heading(u) -> int:
    """The Mystery Path agent's heading in degrees (the port's ``_rotation``, memory-gym's ``agent.rotation``)."""
    return int(u._rotation) if hasattr(u, "_rotation") else int(u.agent.rotation)


def _returns(places: list, fell: bool) -> dict:
    group = [(p, a) for f, p, a in places if f == fell]
    got = [(p, a) for p, a in group if a]
    return {"places": len(group), "returned": len(got), "first": sum(p for p, _ in got) / len(got) if got else None,
            "again": sum(sum(a) / len(a) for _, a in got) / len(got) if got else None}


def mystery_summary(episodes: list[dict]) -> dict:
    """The episodes' means; with "forward_fell" and "forward_on": of the places the agent stepped
    forward from (and fell, or went on along the path), how many, how many it stood on again later
    ("returned"), and over those, the mean P(forward) at that step ("first") and the mean (per
    place) P(forward) on the later steps there ("again")."""
    n = len(episodes)
    falls = sum(e["falls"] for e in episodes)
    places = [r for e in episodes for r in e.get("places", [])]
    return {"episodes": n, "success": sum(e["success"] for e in episodes) / n,
            "steps": sum(e["steps"] for e in episodes) / n, "falls": falls / n,
            "cells": sum(e["cells"] for e in episodes) / n, "repeats": sum(e["repeats"] for e in episodes) / n,
            "repeated_share": sum(e["repeats"] for e in episodes) / falls if falls else 0.0,
            "forward_fell": _returns(places, True), "forward_on": _returns(places, False)}


def format_mystery(s: dict) -> str:
    line = (f"{s['episodes']} episodes: success {s['success']:.3f}, {s['steps']:.1f} steps, "
            f"per episode {s['falls']:.2f} falls into {s['cells']:.2f} cells, {s['repeats']:.2f} "
            f"of them into a cell fallen into before ({s['repeated_share']:.0%} of the falls)")
    for key, what in (("forward_fell", "fell"), ("forward_on", "went on along the path")):
        r = s.get(key) or {}
        if r.get("returned"):
            line += (f"\nP(forward) where a forward step {what} ({r['places']} places, {r['returned']} "
                     f"stood on again): {r['first']:.2f} at that step, {r['again']:.2f} on coming back")
    return line


def probe(states: list[torch.Tensor], labels: list[int], classes: int, train: float = 0.7) -> dict | None:
    """A linear probe: ``states`` (one ``[D]`` state per episode) -> ``labels``, fitted on the first
    ``train`` share of the episodes and scored on the rest -> {"accuracy", "majority" (the most
    frequent label's share of the scored episodes), "scored"}; None with fewer than 20 episodes to
    fit or 10 to score."""
    cut = int(train * len(states))
    if cut < 20 or len(states) - cut < 10:
        return None
    x, y = torch.stack(states).double(), torch.tensor(labels)
    mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], classes, dtype=torch.float64)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x[:cut]), y[:cut]) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        accuracy = (lin(x[cut:]).argmax(1) == y[cut:]).double().mean().item()
    return {"accuracy": accuracy, "majority": torch.bincount(y[cut:]).max().item() / (len(y) - cut),
            "scored": len(y) - cut}


def probe_table(episodes: list[dict], every: int, classes: int) -> list[dict]:
    """For every ``every``-th step t and each command j: the probe of command j on the states after
    step t of the episodes still running then."""
    rows = []
    for t in range(0, max(len(e["states"]) for e in episodes), every):
        running = [e for e in episodes if len(e["states"]) > t]
        cells = [probe([e["states"][t] for e in running], [e["labels"][j] for e in running], classes)
                 for j in range(max(e["commands"] for e in episodes))]
        if any(cells):
            rows.append({"step": t, "episodes": len(running), "commands": cells})
    return rows


def format_probes(rows: list[dict]) -> str:
    n = max(len(r["commands"]) for r in rows)
    head = ["step", "episodes"] + [f"command {j}" for j in range(n)]
    lines = ["probe accuracy on the scored episodes (the most frequent command's share)",
             " | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([str(r["step"]), str(r["episodes"])] + [
            "-" if c is None else f"{c['accuracy']:.2f} ({c['majority']:.2f})" for c in r["commands"]]))
    return "\n".join(lines)


def breakdown(episodes: list[dict]) -> list[dict]:
    """Per command: reached, carried out, and the failures by class."""
    out = []
    for k in range(max((e["commands"] for e in episodes), default=0)):
        reached = [e for e in episodes if e["commands"] > k and e["completed"] >= k]
        if not reached:
            continue
        fails = [e for e in reached if e["completed"] == k]
        failed = Counter(e["class"] for e in fails)
        odds = Counter()
        for e in fails:
            odds.update(e["chance"] or {})
        out.append({"command": k, "reached": len(reached), "carried_out": len(reached) - len(fails),
                    "failures": {c: failed.get(c, 0) for c in CLASSES},
                    "chance": {c: odds.get(c, 0.0) for c in CLASSES}})
    return out


def format_table(rows: list[dict], episodes: int, successes: int) -> str:
    head = ["command", "reached", "carried out"] + list(CLASSES)
    lines = [f"{episodes} episodes, {successes} carried out every command",
             " | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([str(r["command"]), str(r["reached"]), str(r["carried_out"])]
                                + [str(r["failures"][c]) for c in CLASSES]))
    total, odds = Counter(), Counter()
    for r in rows:
        total.update(r["failures"])
        odds.update(r["chance"])
    lines.append(" | ".join(["all", "", ""] + [str(total[c]) for c in CLASSES]))
    lines.append(" | ".join(["chance", "", ""] + ["-" if c == CLASSES[0] else f"{odds[c]:.1f}" for c in CLASSES]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--stage", type=int, default=None, help="curriculum stage (default: the target task)")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--probe", action="store_true",
                   help="Mortar Mayhem: also fit linear probes of each command on the recurrent state at each step")
    p.add_argument("--probe-every", type=int, default=4, metavar="N", help="probe every N-th step (default 4)")
    args = p.parse_args(argv)
    from ppo_tbptt import curriculum
    from ppo_tbptt.checkpoint import CheckpointError
    from ppo_tbptt.config import ConfigError
    from ppo_tbptt.envs import make_env
    from ppo_tbptt.evaluate import load_policy
    from ppo_tbptt.evaluation import seeds_from_range
    if args.episodes < 1 or args.probe_every < 1:
        print(f"error: --episodes and --probe-every must be >= 1, got {args.episodes} and {args.probe_every}",
              file=sys.stderr)
        return 2
    try:
        model, cfg, _, file = load_policy(args.run, torch.device("cpu"))
        env_cfg = curriculum.stage_env(cfg, args.stage)
        seeds = seeds_from_range(tuple(cfg.env.eval_seeds), args.episodes)
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.env.id == "MortarMayhem-Grid-v0":
        episode = mortar_episode
    elif cfg.env.id == "MysteryPath-Grid-v0":
        episode = mystery_episode
    else:
        print(f"error: {cfg.env.id} is neither MortarMayhem-Grid-v0 nor MysteryPath-Grid-v0", file=sys.stderr)
        return 2
    if args.probe and episode is not mortar_episode:
        print("error: --probe is for Mortar Mayhem (its commands are what the probes read)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    model.eval()
    env = make_env(env_cfg)
    gen = torch.Generator().manual_seed(0)
    try:
        keep = {"keep_states": True} if args.probe else {}
        episodes = [episode(model, env, s, dict(env_cfg.reset_params), args.deterministic, gen, **keep)
                    for s in seeds]
    finally:
        env.close()
    out = {"checkpoint": str(file), "env_id": cfg.env.id, "reset_params": env_cfg.reset_params}
    print(f"{file}, reset params {curriculum.describe(env_cfg.reset_params)}")
    if episode is mystery_episode:
        out.update(mystery_summary(episodes))
        print(format_mystery(out))
    else:
        rows = breakdown(episodes)
        successes = sum(e["class"] is None for e in episodes)
        out.update(episodes=len(episodes), successes=successes, commands=rows)
        print(format_table(rows, len(episodes), successes))
        if args.probe:
            from memory_gym.pygame_assets import Command
            out["probes"] = probe_table(episodes, args.probe_every, len(Command.COMMANDS))
            print(format_probes(out["probes"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
