"""scripts/memorygym_failures.py: the classes of a failed Mortar Mayhem command and their chance
row, Mystery Path's repeated falls, and the counts over real episodes (both env backends) agreeing
with the env's own."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ppo_tbptt import config as C
from ppo_tbptt.envs import make_env
from ppo_tbptt.model import build_model

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memorygym_failures", ROOT / "scripts" / "memorygym_failures.py")
mmf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mmf)

MOVES = {"right": (1, 0), "down": (0, 1), "left": (-1, 0), "up": (0, -1), "stay": (0, 0)}
LEFT, PREV, LATER, EARLIER, NONE = mmf.CLASSES


@pytest.mark.parametrize("agent, on_tile, expected", [
    ((3, 2), True, LEFT),      # passed the check, stepped off in the explosion: whatever its tile
    ((2, 3), False, PREV),     # "down" again: command 1's move
    ((2, 1), False, LATER),    # "up": command 3's
    ((1, 2), False, EARLIER),  # "left": command 0's (not the previous one)
    ((2, 2), False, NONE),     # "stay": no command of this episode
    ((3, 3), False, NONE),     # a diagonal: no command at all
])
def test_classify_each_class(agent, on_tile, expected):
    commands = ["left", "down", "right", "up"]  # failing command 2 ("right") from tile (2, 2)
    assert mmf.classify(commands, MOVES, 2, (2, 2), agent, on_tile) == expected


def test_classify_priority_and_bounds():
    # a move that both the previous and a later command made counts as the previous one's
    assert mmf.classify(["up", "down", "right", "down"], MOVES, 2, (2, 2), (2, 3), False) == PREV
    # ... one that a later and an earlier command made, as a later one's
    assert mmf.classify(["down", "up", "right", "down"], MOVES, 2, (2, 2), (2, 3), False) == LATER
    # the first command has no previous one, and the failing command's own move is not "later"
    assert mmf.classify(["up", "up"], MOVES, 0, (2, 2), (2, 1), False) == LATER
    assert mmf.classify(["up", "left"], MOVES, 0, (2, 2), (2, 1), False) == NONE
    # command k-1 is the previous one, not an earlier one
    assert mmf.classify(["left", "up", "right"], MOVES, 2, (2, 2), (2, 1), False) == PREV
    assert mmf.classify(["left", "up", "right"], MOVES, 2, (2, 2), (1, 2), False) == EARLIER


def test_start_tiles_walk_back_from_the_last_target():
    commands = ["right", "down", "down", "left"]
    # from (1, 1): right -> (2, 1), down -> (2, 2), down -> (2, 3), left -> (1, 3)
    assert mmf.start_tiles(commands, MOVES, (2, 3), 2) == [(1, 1), (2, 1), (2, 2)]
    assert mmf.start_tiles(commands, MOVES, (1, 3), 3) == [(1, 1), (2, 1), (2, 2), (2, 3)]


def test_chance_spreads_one_failure_over_the_wrong_moves_in_the_arena():
    commands = ["left", "down", "right", "up"]
    # in the middle: 4 wrong moves (down: previous, up: later, left: earlier, stay: none)
    odds = mmf.chance(commands, MOVES, 2, (2, 2), 5, 5)
    assert odds == {LEFT: 0.0, PREV: 0.25, LATER: 0.25, EARLIER: 0.25, NONE: 0.25}
    # in the bottom-left corner (0, 4): down and left leave the arena; up and stay remain
    odds = mmf.chance(commands, MOVES, 2, (0, 4), 5, 5)
    assert odds == {LEFT: 0.0, PREV: 0.0, LATER: 0.5, EARLIER: 0.0, NONE: 0.5}
    # only the first `allowed` commands count: with 4, "stay" is no option
    odds = mmf.chance(commands, MOVES, 2, (2, 2), 4, 5)
    assert odds == pytest.approx({LEFT: 0.0, PREV: 1 / 3, LATER: 1 / 3, EARLIER: 1 / 3, NONE: 0.0})


def test_breakdown_counts():
    eps = [{"commands": 3, "completed": 3, "class": None, "chance": None},
           {"commands": 3, "completed": 1, "class": PREV, "chance": dict.fromkeys(mmf.CLASSES, 0.2)},
           {"commands": 3, "completed": 0, "class": NONE, "chance": dict.fromkeys(mmf.CLASSES, 0.2)},
           {"commands": 2, "completed": 1, "class": LEFT, "chance": None}]
    rows = mmf.breakdown(eps)
    assert [(r["reached"], r["carried_out"]) for r in rows] == [(4, 3), (3, 1), (1, 1)]
    assert rows[0]["failures"][NONE] == 1 and sum(rows[0]["failures"].values()) == 1
    assert rows[1]["failures"][PREV] == 1 and rows[1]["failures"][LEFT] == 1
    assert rows[1]["chance"][PREV] == pytest.approx(0.2)  # the failure "left the tile" adds no chance


@pytest.mark.parametrize("backend", ["memorygym", "fast"])
def test_episodes_of_an_untrained_policy_agree_with_the_env(backend):
    """Each episode's failed command is the one the env's commands_completed names (the script
    raises otherwise), the tiles walked back start where the agent spawned, and the table adds up."""
    env_cfg = C.EnvConfig(id="MortarMayhem-Grid-v0", downsample=4, backend=backend,
                          reset_params={"command_count": [4]})
    env = make_env(env_cfg)
    model = build_model(env.observation_space, env.action_space, C.ModelConfig(hidden_size=16, hidden_layer=16))
    gen = torch.Generator().manual_seed(0)
    try:
        eps = []
        for seed in range(12):
            obs, _ = env.reset(seed=seed, options={"command_count": [4]})
            spawn = tuple(env.unwrapped.normalized_agent_position)
            e = mmf.mortar_episode(model, env, seed, {"command_count": [4]}, False, gen)
            if e["class"] is not None:
                from memory_gym.pygame_assets import Command
                u = env.unwrapped
                assert mmf.start_tiles(list(u._commands), Command.COMMANDS, u._target_pos, e["completed"])[0] == spawn
            eps.append(e)
    finally:
        env.close()
    rows = mmf.breakdown(eps)
    assert rows[0]["reached"] == 12
    for r in rows:
        assert r["carried_out"] + sum(r["failures"].values()) == r["reached"]
    assert any(e["class"] is not None for e in eps)  # an untrained policy fails somewhere
    text = mmf.format_table(rows, len(eps), sum(e["class"] is None for e in eps))
    assert text.splitlines()[-1].startswith("chance")


def test_cli_refuses_another_env(tmp_path, capsys):
    from eval_helpers import train_tiny
    train_tiny(tmp_path / "run")
    assert mmf.main([str(tmp_path / "run"), "--episodes", "2"]) == 2
    assert "neither MortarMayhem-Grid-v0 nor MysteryPath-Grid-v0" in capsys.readouterr().err
    assert mmf.main([str(tmp_path / "run"), "--episodes", "0"]) == 2
    assert mmf.main([str(tmp_path / "missing")]) == 2


class _Scripted:
    """A policy that plays ``choose()``'s action with certainty, through the model's own dist."""

    def __init__(self, env):
        self.env, self.n = env, env.action_space.n

    def initial_state(self, batch):
        return None

    def __call__(self, obs, state):
        logits = torch.full((1, 1, self.n), -30.0)
        logits[0, 0, self.choose()] = 0.0
        return logits, None, state

    def dist(self, logits):
        from ppo_tbptt.model import ActionDist
        return ActionDist(logits, [self.n])


class _StayThenWalk(_Scripted):
    """Waits until the tiles of a check light up, then walks forward."""

    def choose(self):
        return 3 if self.env.unwrapped._tiles_on else 0


def test_leaving_the_tile_in_the_explosion_is_told_apart_from_a_wrong_move():
    env = make_env(C.EnvConfig(id="MortarMayhem-Grid-v0", downsample=4, backend="fast"))
    policy = _StayThenWalk(env)
    classes = {"stay": [], "move": []}
    try:
        for seed in range(40):
            e = mmf.mortar_episode(policy, env, seed, {"command_count": [3]}, True, torch.Generator())
            classes["stay" if env.unwrapped._commands[0] == "stay" else "move"].append((e["completed"], e["class"]))
    finally:
        env.close()
    # a first command other than "stay": the agent never moved, so it failed that command's check
    assert classes["move"] and all(c == 0 and cls in (LATER, NONE) for c, cls in classes["move"])
    # "stay" first: it passed the check and walked off in the explosion (unless a wall held it)
    assert (0, LEFT) in classes["stay"]
    assert all(cls != LEFT or c == 0 for c, cls in classes["stay"])


class _Forward(_Scripted):
    """Always forward."""

    def choose(self):
        return 3


@pytest.mark.parametrize("backend", ["memorygym", "fast"])
def test_mystery_path_falls_counted_as_the_env_counts_them(backend):
    """Walking straight on from the origin falls into the same cell again and again (every fall
    after the first is a repeat) unless the walk reaches the goal or a wall; the script's falls
    equal the env's num_fails (it raises otherwise)."""
    env = make_env(C.EnvConfig(id="MysteryPath-Grid-v0", downsample=4, backend=backend))
    policy = _Forward(env)
    try:
        eps = [mmf.mystery_episode(policy, env, seed, {}, True, torch.Generator()) for seed in range(10)]
    finally:
        env.close()
    fell = [e for e in eps if e["falls"]]
    assert fell
    for e in fell:
        assert e["cells"] == 1 and e["repeats"] == e["falls"] - 1 and e["falls"] > 2
    s = mmf.mystery_summary(eps)
    assert s["falls"] == pytest.approx(sum(e["falls"] for e in eps) / 10)
    assert s["repeated_share"] == pytest.approx(sum(e["falls"] - 1 for e in fell) / sum(e["falls"] for e in fell))


class _ForwardLessSureAfterEachFall(_Forward):
    """Forward with certainty until the first fall, then, after k falls, forward with P 0.3 + 0.4 / k
    (0.7, 0.5, 0.43, ...; still the most likely action)."""

    def __call__(self, obs, state):
        k = self.env.unwrapped.num_fails
        if not k:
            return super().__call__(obs, state)
        p = 0.3 + 0.4 / k
        logits = torch.zeros((1, 1, self.n))
        logits[0, 0, 3] = float(torch.log(torch.tensor(p / ((1 - p) / 3))))
        return logits, None, state


@pytest.mark.parametrize("backend", ["memorygym", "fast"])
def test_the_forward_probability_where_it_fell_and_on_coming_back(backend):
    """Walking straight on from the origin, every fall is from the same place (the cell before the
    pit, facing it), and after each fall the agent walks back over the places it went on from to
    that one: P(forward) is 1 at the first step from each and 0.3 + 0.4 / k on the return after the
    k-th fall; always forward, 1 on both."""
    env = make_env(C.EnvConfig(id="MysteryPath-Grid-v0", downsample=4, backend=backend))
    try:
        less = [mmf.mystery_episode(_ForwardLessSureAfterEachFall(env), env, seed, {}, True, torch.Generator())
                for seed in range(10)]
        same = [mmf.mystery_episode(_Forward(env), env, seed, {}, True, torch.Generator()) for seed in range(10)]
    finally:
        env.close()
    fell = [e for e in less if e["falls"]]
    assert fell and all(e["falls"] > 2 for e in fell)
    means, went_on = [], 0
    for e in fell:
        assert sum(f for f, _, _ in e["places"]) == 1  # one place fell: the last before the pit
        for f, first, again in e["places"]:
            # once after each later fall; a place it went on from maybe once more, after the last fall
            assert len(again) == e["falls"] - 1 if f else len(again) in (e["falls"] - 1, e["falls"])
            assert first == pytest.approx(1.0) and again == pytest.approx([0.3 + 0.4 / k for k in range(1, len(again) + 1)])
            if f:
                means.append(sum(again) / len(again))
        went_on += len(e["places"]) - 1
    assert went_on > 0  # some levels' paths lead on from the origin's first cell
    s = mmf.mystery_summary(less)
    mean = sum(means) / len(means)
    assert s["forward_fell"] == pytest.approx({"places": len(fell), "returned": len(fell), "first": 1.0, "again": mean})
    # the levels without a fall leave places it went on from and never stood on again
    assert s["forward_on"]["returned"] == went_on and s["forward_on"]["first"] == pytest.approx(1.0)
    assert s["forward_on"]["places"] == sum(not f for e in less for f, _, _ in e["places"]) > went_on
    assert (f"where a forward step fell ({len(fell)} places, {len(fell)} stood on again): 1.00 at that step, "
            f"{mean:.2f} on coming back") in mmf.format_mystery(s)
    s = mmf.mystery_summary(same)
    assert (s["forward_fell"]["again"], s["forward_on"]["again"]) == pytest.approx((1.0, 1.0))
    assert [e["falls"] for e in same] == [e["falls"] for e in less]


class _TinyPath:
    """A Mystery Path stand-in under the names the script reads: a 3x3 grid whose path is the origin
    (0, 1) and (1, 1); headings and moves as in the port (0 north, 90 west, 270 east), a step off the
    path shows the agent there, the next puts it back on the origin with its heading."""

    def __init__(self, steps):
        self.unwrapped, self.steps = self, steps

    def reset(self, seed=None, options=None):
        from ppo_tbptt.envs.fast_grid import _FORWARD
        self.forward, self.t, self.num_fails, self.is_off_path = _FORWARD, 0, 0, False
        self.normalized_agent_position, self._rotation = (0, 1), 0
        return torch.zeros(1), {}

    def step(self, action):
        if self.is_off_path:
            self.normalized_agent_position, self.is_off_path = (0, 1), False
        elif action in (1, 2):
            self._rotation = (self._rotation + (90 if action == 1 else -90)) % 360
        elif action == 3:
            (x, y), (dx, dy) = self.normalized_agent_position, self.forward[self._rotation]
            if 0 <= x + dx < 3 and 0 <= y + dy < 3:
                self.normalized_agent_position = (x + dx, y + dy)
                self.is_off_path = self.normalized_agent_position not in ((0, 1), (1, 1))
                self.num_fails += self.is_off_path
        self.t += 1
        done = self.t == self.steps
        return torch.zeros(1), 0.0, done, False, {"success": 0, "num_fails": self.num_fails} if done else {}


class _Script:
    """Plays the given actions in turn (the most likely action each time) with the given P(forward)."""

    def __init__(self, moves):
        self.moves, self.t = moves, 0

    def initial_state(self, batch):
        return None

    def __call__(self, obs, state):
        action, p = self.moves[self.t]
        self.t += 1
        probs = torch.full((4,), (1 - p) / 3 if action == 3 else 0.01)
        probs[3] = p
        if action != 3:
            probs[action] = 1 - p - 0.02
        return torch.log(probs).view(1, 1, 4), None, state

    def dist(self, logits):
        from ppo_tbptt.model import ActionDist
        return ActionDist(logits, [4])


def test_the_forward_probability_follows_places_through_turns_waits_and_walls():
    """Forward from the origin facing north falls (place A); back on the origin it waits and turns
    right, so facing east, and steps on along the path (place B), then on off it (C, never stood on
    again); back on the origin it turns left (at B) and left again (at A, now facing west), steps
    into the wall (no move: no place) and waits. Steps off the path and the wall's place count
    nowhere."""
    moves = [(3, 0.7),   # A = ((0, 1), 0): falls into (0, 0)
             (0, 0.3),   # off the path: back on the origin
             (0, 0.1),   # at A: waits
             (2, 0.2),   # at A: turns right, to 270 (east)
             (3, 0.6),   # B = ((0, 1), 270): on to (1, 1)
             (3, 0.8),   # C = ((1, 1), 270): falls into (2, 1)
             (0, 0.05),  # off the path: back on the origin, still facing east
             (1, 0.25),  # at B: turns left, to 0
             (1, 0.15),  # at A: turns left, to 90 (west)
             (3, 0.65),  # ((0, 1), 90): into the wall
             (0, 0.3)]   # there again: a place no forward step moved from
    e = mmf.mystery_episode(_Script(moves), _TinyPath(len(moves)), 0, {}, True, torch.Generator())
    assert (e["falls"], e["cells"], e["repeats"], e["steps"]) == (2, 2, 0, 11)
    assert e["places"] == [[True, pytest.approx(0.7), pytest.approx([0.1, 0.2, 0.15])],
                           [False, pytest.approx(0.6), pytest.approx([0.25])],
                           [True, pytest.approx(0.8), []]]
    s = mmf.mystery_summary([e, {**e, "places": [[True, 0.5, [0.41]]]}])
    # per place, then over places: A's mean 0.15 and the other episode's 0.41
    assert s["forward_fell"] == pytest.approx({"places": 3, "returned": 2, "first": 0.6, "again": 0.28})
    assert s["forward_on"] == pytest.approx({"places": 1, "returned": 1, "first": 0.6, "again": 0.25})
    text = mmf.format_mystery(s)
    assert "where a forward step fell (3 places, 2 stood on again): 0.60 at that step, 0.28 on coming back" in text
    assert "where a forward step went on along the path (1 places, 1 stood on again): 0.60 at that step, 0.25" in text


def test_mystery_summary_of_an_agent_that_never_falls_twice():
    eps = [{"success": 1, "steps": 30, "falls": 2, "cells": 2, "repeats": 0},
           {"success": 0, "steps": 128, "falls": 4, "cells": 3, "repeats": 1}]
    s = mmf.mystery_summary(eps)
    assert (s["success"], s["steps"], s["falls"], s["cells"], s["repeats"]) == (0.5, 79.0, 3.0, 2.5, 0.5)
    assert s["repeated_share"] == pytest.approx(1 / 6)
    assert "17% of the falls" in mmf.format_mystery(s)
    assert s["forward_fell"] == {"places": 0, "returned": 0, "first": None, "again": None}
    assert "P(forward)" not in mmf.format_mystery(s)


@pytest.mark.parametrize("name, key", [("mystery_path_grid_cpu", "repeated_share"), ("mortar_mayhem_grid_cpu", "commands")])
def test_cli_on_each_env(name, key, tmp_path, monkeypatch, capsys):
    """The whole command on an untrained policy of the shipped config (the target task)."""
    import ppo_tbptt.evaluate as ev
    cfg = C.load(name, ["env.vector=serial"])
    env = make_env(cfg.env)
    model = build_model(env.observation_space, env.action_space, cfg.model)
    env.close()
    monkeypatch.setattr(ev, "load_policy", lambda path, device: (model, cfg, {}, Path(path)))
    out = tmp_path / "f.json"
    assert mmf.main(["somewhere", "--episodes", "3", "--json", str(out)]) == 0
    import json
    got = json.loads(out.read_text())
    assert got["env_id"] == cfg.env.id and key in got
    from ppo_tbptt import curriculum
    target = curriculum.stage_params(cfg)  # the last stage: the published task
    assert got["reset_params"] == target
    assert f"reset params {curriculum.describe(target)}" in capsys.readouterr().out


def test_probe_reads_a_written_command_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=gen).tolist()
    noise = [torch.randn(64, generator=gen) for _ in labels]
    written = [x + 6 * torch.nn.functional.pad(torch.eye(5)[y], (0, 59)) for x, y in zip(noise, labels)]
    got = mmf.probe(written, labels, 5)
    assert got["scored"] == 90 and got["accuracy"] > 0.95
    # noise: scored on episodes the probe was not fitted on, so no better than guessing
    # (fitted and scored on the same 210 episodes, 64 dimensions would score far higher)
    got = mmf.probe(noise, labels, 5)
    assert got["accuracy"] < got["majority"] + 0.15
    assert mmf.probe(noise[:25], labels[:25], 5) is None  # too few to fit and score
    skewed = [0] * 250 + [1] * 20 + [2] * 30  # the scored 90: 20 ones, 30 twos, 40 zeros
    assert mmf.probe(noise, skewed, 5)["majority"] == pytest.approx(40 / 90)


def test_kept_states_are_the_models_state_after_each_step():
    env_cfg = C.EnvConfig(id="MortarMayhem-Grid-v0", downsample=4, backend="fast")
    env = make_env(env_cfg)
    model = build_model(env.observation_space, env.action_space, C.ModelConfig(hidden_size=16, hidden_layer=16))
    try:
        e = mmf.mortar_episode(model, env, 3, {"command_count": [2]}, True, torch.Generator(), keep_states=True)
        steps = len(e["states"])
        obs, _ = env.reset(seed=3, options={"command_count": [2]})
    finally:
        env.close()
    with torch.no_grad():
        _, _, state = model(torch.as_tensor(obs)[None, None], model.initial_state(1))
    assert torch.equal(e["states"][0], state.h[0, 0]) and e["states"].shape[1] == 16
    assert steps > 8  # the two commands are shown for 8 steps before the agent acts
    from memory_gym.pygame_assets import Command
    assert e["labels"] == [list(Command.COMMANDS).index(c) for c in env.unwrapped._commands]


def test_probe_table_follows_the_running_episodes():
    gen = torch.Generator().manual_seed(1)
    eps = []
    for i in range(200):
        y = [int(torch.randint(0, 5, (), generator=gen)) for _ in range(2)]
        T = 8 if i % 2 else 3  # half the episodes end after 3 steps
        # command 0 is readable from step 2 on, command 1 never
        states = torch.randn(T, 16, generator=gen)
        states[2:, :5] += 4 * torch.eye(5)[y[0]]
        eps.append({"commands": 2, "states": states, "labels": y})
    rows = mmf.probe_table(eps, 2, 5)
    assert [(r["step"], r["episodes"]) for r in rows] == [(0, 200), (2, 200), (4, 100), (6, 100)]
    first = [r["commands"][0]["accuracy"] for r in rows]
    second = [r["commands"][1]["accuracy"] for r in rows]
    assert first[0] < 0.5 and min(first[1:]) > 0.9 and max(second) < 0.5
    assert "command 1" in mmf.format_probes(rows).splitlines()[1]


def test_cli_probe(tmp_path, monkeypatch, capsys):
    import json
    import ppo_tbptt.evaluate as ev
    from ppo_tbptt import curriculum
    for name in ("mortar_mayhem_grid_cpu", "mystery_path_grid_cpu"):
        cfg = C.load(name, ["env.vector=serial", "model.hidden_size=16"])
        env = make_env(cfg.env)
        model = build_model(env.observation_space, env.action_space, cfg.model)
        env.close()
        monkeypatch.setattr(ev, "load_policy", lambda path, device, m=model, c=cfg: (m, c, {}, Path(path)))
        out = tmp_path / f"{name}.json"
        code = mmf.main(["somewhere", "--stage", "0", "--episodes", "40", "--probe", "--json", str(out)])
        if name.startswith("mystery"):
            assert code == 2 and "--probe is for Mortar Mayhem" in capsys.readouterr().err
            continue
        assert code == 0
        got = json.loads(out.read_text())
        assert got["reset_params"] == curriculum.stage_params(cfg, 0)
        # one command, shown at step 0: the probes have its column, scored on 12 of 40 episodes
        assert got["probes"][0]["step"] == 0 and got["probes"][0]["commands"][0]["scored"] == 12
    assert mmf.main(["somewhere", "--probe-every", "0"]) == 2
