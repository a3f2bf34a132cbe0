"""The documentation stays true to the code: every command shown in a shell code block of the README
or of ``docs/`` parses, and every config key has the docstring the generated reference shows.

A command is a line that runs ``python -m ppo_tbptt.<module> ...`` (or ``python -m ppo_tbptt
<command> ...``), ``torchrun ... -m ppo_tbptt.train ...`` or ``python scripts/<name>.py ...`` in a
fenced ``bash``/``sh``/``shell``/``console`` block (``console``: the lines after ``$ ``). Its module
(or script) must exist and its argparse parser must accept the arguments, parsed without running
anything; a ``--config`` must name a shipped config or an existing file and load with the command's
``--set`` overrides (``config.load``: every key and value checked as the command line checks them),
and without a config (``--resume``) every ``--set`` key must name a config field.

Shell as the docs write it: ``\\`` continuations, quotes across lines, ``VAR="..."`` assignments
and ``for X in A B; do ...`` loops (X takes its first value), ``$VAR`` expansion, ``ENV=value``
prefixes, ``#`` comments, ``[--optional ...]`` groups (checked as given; a group holding ``...``
is a synopsis and dropped) and placeholders such as ``runs/<name>`` (a sample value). Text blocks
(synopses with ``NAME_OR_PATH`` and the like) are not commands. Where a command names config files
that the text describes rather than ships, the HTML comment
``<!-- docs-test: stand-in CONFIG -->`` right before the block checks its ``--set`` overrides
against that shipped config instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from ppo_tbptt import config as C

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(bash|sh|shell|console)[^\n]*\n(.*?)^```", re.M | re.S)
STAND_IN = re.compile(r"<!--\s*docs-test:\s*stand-in\s+(\S+)\s*-->\s*$")
OPTIONAL = re.compile(r"\s\[(--(?:[^\[\]]|\[[^\[\]]*\])*)\]")  # [--flag ...], one level of [..] inside
PLACEHOLDER = re.compile(r"<[A-Za-z_][A-Za-z_ -]*>")
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)


@dataclasses.dataclass
class Command:
    where: str          # file:line
    line: str           # the logical line as written
    kind: str           # "module" or "script"
    target: str         # ppo_tbptt.<module> or scripts/<name>.py
    argv: list[str]
    stand_in: str | None


def _logical_lines(body: str, console: bool) -> list[tuple[int, str]]:
    """Lines joined across ``\\`` continuations and open quotes, with their first line's offset."""
    raw = body.splitlines()
    if console:
        raw = [line[2:] if line.startswith("$ ") else "" for line in raw]
    out, buf, start = [], "", 0
    for i, line in enumerate(raw):
        if not buf:
            start = i
        buf = f"{buf}\n{line}" if buf else line
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        try:
            shlex.split(buf, comments=True)
        except ValueError:  # an open quote: the string goes on in the next line
            continue
        out.append((start, buf))
        buf = ""
    assert not buf, f"unterminated shell line: {buf!r}"
    return out


def _commands_of(path: Path) -> list[Command]:
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        stand_in = STAND_IN.search(before)
        first_line = text[:m.start(2)].count("\n") + 1
        variables: dict[str, str] = {}
        for offset, line in _logical_lines(m.group(2), m.group(1) == "console"):
            where = f"{path.relative_to(ROOT)}:{first_line + offset}"
            line = OPTIONAL.sub(lambda g: "" if "..." in g.group(1) else " " + g.group(1), line)
            line = PLACEHOLDER.sub("example", line)
            for var, values in re.findall(r"\bfor (\w+) in ([^;]+);", line):
                variables[var] = values.split()[0]

            def expand(g):
                name = g.group(1) or g.group(2)
                assert name in variables, f"{where}: ${name} is not set in its block"
                return variables[name]
            line = re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words: list[str] = []
            for token in list(lexer) + [";"]:
                if token and set(token) <= set(";&|"):
                    found += _command(words, variables, where, line, stand_in and stand_in.group(1))
                    words = []
                else:
                    words.append(token)
    return found


def _command(words, variables, where, line, stand_in) -> list[Command]:
    while words and words[0] in ("do", "then", "else"):
        words = words[1:]
    if len(words) == 1 and ASSIGNMENT.match(words[0]):  # VAR=value alone: a shell variable
        name, value = ASSIGNMENT.match(words[0]).groups()
        variables[name] = value
        return []
    while words and ASSIGNMENT.match(words[0]):  # ENV=value command: the environment of one command
        words = words[1:]
    if not words:
        return []
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        module, argv = words[i + 1], words[i + 2:]
    elif re.fullmatch(r"python[\d.]*", words[0]) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2:
            module, argv = words[2], words[3:]
            if module == "ppo_tbptt" and argv and not argv[0].startswith("-"):
                module, argv = f"ppo_tbptt.{argv[0]}", argv[1:]
        elif words[1].startswith("scripts/"):
            return [Command(where, line, "script", words[1], words[2:], stand_in)]
        else:
            return []
    else:
        return []
    if module != "ppo_tbptt" and not module.startswith("ppo_tbptt."):
        return []
    return [Command(where, line, "module", module, argv, stand_in)]


COMMANDS = [c for p in DOCS for c in _commands_of(p)]


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def _parse_without_running(run) -> argparse.Namespace:
    """Run ``run()`` until its first ``ArgumentParser.parse_args`` returns: the namespace, then stop."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            run()
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError("the command parsed no arguments with argparse")


def parse_command(cmd: Command) -> argparse.Namespace:
    """The namespace the command's parser gives its argv (SystemExit where argparse refuses it)."""
    if cmd.kind == "script":
        path = ROOT / cmd.target
        assert path.is_file(), f"{cmd.where}: no script {cmd.target}"

        def run():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sys, "argv", [str(path)] + cmd.argv)
                mp.syspath_prepend(str(path.parent))
                runpy.run_path(str(path), run_name="__main__")
        return _parse_without_running(run)
    assert importlib.util.find_spec(cmd.target) is not None, f"{cmd.where}: no module {cmd.target}"
    module = importlib.import_module(cmd.target)
    if hasattr(module, "parse_args"):  # the command's own parse_args, with its checks after argparse
        return module.parse_args(cmd.argv)
    return _parse_without_running(lambda: module.main(cmd.argv))


def key_exists(dotted: str) -> bool:
    """Whether ``section.key[.sub...]`` names a config field (a mapping field takes any sub-key, a
    schedule its own fields), as ``--set`` writes it."""
    parts = dotted.split(".")
    if len(parts) < 2:
        return False
    cls = C.Config
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        value = getattr(cls(), part) if cls is not C.Schedule else None
        if i == len(parts) - 1:
            return True
        if isinstance(value, dict) or fields[part].type in ("dict", dict):
            return True
        if isinstance(value, C.Schedule):
            cls = C.Schedule
        elif dataclasses.is_dataclass(value):
            cls = type(value)
        else:
            return False
    return True


def check_config(cmd: Command, ns: argparse.Namespace) -> None:
    overrides = list(getattr(ns, "overrides", None) or getattr(ns, "set", None) or [])
    name = getattr(ns, "config", None)
    if isinstance(name, str):
        try:
            C.resolve_path(name)
        except C.ConfigError:
            assert cmd.stand_in, f"{cmd.where}: --config {name}: no such shipped config or file"
            name = cmd.stand_in
        try:
            C.load(name, overrides)
        except C.ConfigError as exc:
            raise AssertionError(f"{cmd.where}: {cmd.line}\n{exc}") from None
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        assert "=" in item and key_exists(key), f"{cmd.where}: --set {item!r} names no config key"


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds what it is meant to find (a broken pattern would make the test vacuous)."""
    targets = {c.target for c in COMMANDS}
    assert {"ppo_tbptt.train", "ppo_tbptt.evaluate", "ppo_tbptt.export", "ppo_tbptt.benchmark",
            "ppo_tbptt.tune", "ppo_tbptt.summary", "scripts/plot_runs.py"} <= targets, targets
    assert any(c.line.lstrip().startswith("torchrun") for c in COMMANDS)
    assert len(COMMANDS) >= 40, len(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where}:{c.target}" for c in COMMANDS])
def test_a_documented_command_parses(cmd, capsys):
    try:
        ns = parse_command(cmd)
    except SystemExit as exc:
        raise AssertionError(f"{cmd.where}: {cmd.line}\nargparse refused {cmd.argv}: "
                             f"{capsys.readouterr().err.strip()}") from None
    check_config(cmd, ns)


def test_key_lookup_tells_keys_from_typos():
    assert key_exists("ppo.lr") and key_exists("ppo.lr.steps") and key_exists("env.kwargs.delay")
    assert key_exists("env.reset_params") and key_exists("curriculum.stages")
    assert not key_exists("ppo.learning_rate") and not key_exists("ppo.lr.stepz")
    assert not key_exists("envs.id") and not key_exists("run")


def test_every_config_key_has_the_docstring_the_reference_shows():
    """The generated reference (docs_hooks.py) finds a docstring for every field of every section
    and of the schedule, and names every field of the dataclasses (none missed by the ast reader)."""
    hooks = runpy.run_path(str(ROOT / "docs_hooks.py"))
    sections, problems = hooks["config_keys"]()
    assert problems == []
    listed = {k.name for _, _, keys in sections for k in keys}
    expected = {f"{s.name}.{f.name}" for s in dataclasses.fields(C.Config)
                for f in dataclasses.fields(getattr(C.Config(), s.name))}
    expected |= {f"schedule.{f.name}" for f in dataclasses.fields(C.Schedule)}
    assert listed == expected
    assert all(k.doc.strip() for _, _, keys in sections for k in keys)
    # a field whose docstring is taken away is reported
    source = (ROOT / "ppo_tbptt" / "config.py").read_text()
    stripped = source.replace('    """Number of parallel environments N."""\n', "", 1)
    assert stripped != source
    _, problems = hooks["config_keys"](stripped)
    assert problems == ["config.py: EnvConfig.num_envs (env.num_envs) has no docstring"]


def test_the_api_reference_lists_every_public_module():
    hooks = runpy.run_path(str(ROOT / "docs_hooks.py"))
    modules = hooks["public_modules"]()
    on_disk = set()
    for p in (ROOT / "ppo_tbptt").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            on_disk.add(".".join(parts))
    assert set(modules) == on_disk and "ppo_tbptt.trainer" in on_disk
    page = hooks["api_page"]()
    assert all(f"::: {m}\n" in page for m in modules)


def test_ci_installs_and_tests_as_the_readme_says():
    """.ci/run installs as the README's quick start does and runs its test command."""
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):]
    install, test = re.search(r"```bash\n(.*?)\n(.*?)\n```", quick, re.S).groups()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test == "python -m pytest"
    assert re.search(r"^\s*python -m pytest\b", ci, re.M)
    for step in ("pip install torch==2.13.0 uv", 'uv pip install -e ".[dev]"'):
        assert step in install
        assert step.replace("install ", "install -q ") in ci or step in ci, step
