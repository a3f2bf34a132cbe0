"""MkDocs hooks (declared in ``mkdocs.yml``): two reference pages generated at build time, so that
neither can drift from the code and neither is a committed file.

- ``config-keys.md``: every key of every config dataclass in ``ppo_tbptt/config.py``, as
  ``section.key`` with its type, its default and its field docstring. Field docstrings exist only
  in the source (Python keeps no attribute docstrings at runtime), so they are read with ``ast``;
  defaults come from the dataclasses themselves. A field without a docstring is a warning, which
  fails ``mkdocs build --strict``.
- ``api.md``: ``::: ppo_tbptt.<module>`` for every public module of the package, found with
  ``pkgutil`` on the package's folders (nothing is imported), so a new or renamed module appears
  without editing a list.

Rendered docstrings keep Sphinx roles such as ``:mod:`x``` as they are written; the page's HTML
drops the role name and keeps the code span.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "ppo_tbptt"
CONFIG_SOURCE = ROOT / PACKAGE / "config.py"
log = logging.getLogger("mkdocs.hooks.docs_hooks")  # under "mkdocs": its warnings count for --strict


@dataclasses.dataclass
class Key:
    """One config field: ``section.key`` (for the schedule's fields ``schedule.key``)."""
    name: str
    type: str
    default: str
    doc: str


def field_docstrings(source: str = None) -> dict[str, dict[str, tuple[str, str]]]:
    """Per dataclass of ``config.py``: its fields in order, each ``(annotation, docstring)``; the
    docstring is the string literal right after the field ("" when there is none)."""
    tree = ast.parse(CONFIG_SOURCE.read_text() if source is None else source)
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or not any(
                "dataclass" in ast.unparse(d) for d in node.decorator_list):
            continue
        fields: dict[str, tuple[str, str]] = {}
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                doc = (nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                       and isinstance(nxt.value.value, str) else "")
                fields[stmt.target.id] = (ast.unparse(stmt.annotation), doc)
        out[node.name] = fields
    return out


def _default(f: dataclasses.Field) -> str:
    from ppo_tbptt.config import Schedule
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, Schedule):
        return repr(value.initial)  # a constant schedule reads as its number, as a config writes it
    return repr(value)


def config_keys(source: str = None) -> tuple[list[tuple[str, str, list[Key]]], list[str]]:
    """The sections of ``Config`` (name, class docstring, keys) and the schedule's keys as a last
    section, plus the problems found (fields without a docstring)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ppo_tbptt import config as C
    docs = field_docstrings(source)
    sections, problems = [], []
    classes = [(f.name, f.type if isinstance(f.type, type) else getattr(C, str(f.type)))
               for f in dataclasses.fields(C.Config)] + [("schedule", C.Schedule)]
    for section, cls in classes:
        keys = []
        for f in dataclasses.fields(cls):
            annotation, doc = docs.get(cls.__name__, {}).get(f.name, ("", ""))
            if not doc.strip():
                problems.append(f"config.py: {cls.__name__}.{f.name} ({section}.{f.name}) has no docstring")
            keys.append(Key(f"{section}.{f.name}", annotation, _default(f), _clean(doc)))
        sections.append((section, _clean(cls.__doc__ or ""), keys))
    return sections, problems


def _clean(doc: str) -> str:
    """A docstring as Markdown: dedented, paragraphs kept."""
    import inspect
    return inspect.cleandoc(doc) if doc else ""


def config_keys_page() -> tuple[str, list[str]]:
    sections, problems = config_keys()
    lines = ["# Every config key", "",
             "Generated from the config dataclasses of `ppo_tbptt/config.py` when the site is built: each "
             "key as `--set` and the YAML files name it (`section.key`), its type, its default and its "
             "field docstring. A config file sets any of them under its section; `--print-config` shows "
             "a config with every key resolved. See [Configs](configs.md) for the shipped configs.", ""]
    for section, doc, keys in sections:
        if section == "schedule":
            lines += ["## Schedules", "",
                      "`ppo.lr`, `ppo.clip` and `ppo.ent_coef` take a number or a mapping of these keys "
                      "(`--set ppo.lr.steps=N` sets one of them).", "", doc, ""]
        else:
            lines += [f"## `{section}`", ""]
        for k in keys:
            lines += [f"### `{k.name}` {{#{k.name.replace('.', '-')}}}", "",
                      f"type `{k.type}` · default `{k.default}`", "", k.doc or "*(no docstring)*", ""]
    return "\n".join(lines), problems


def public_modules(package_dir: Path = ROOT / PACKAGE, prefix: str = PACKAGE) -> list[str]:
    """Every public module and subpackage under the package, in file order, without importing any
    (a name starting with ``_`` is private; ``__main__`` too)."""
    names = [prefix]
    for info in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        if info.ispkg:
            names += public_modules(package_dir / info.name, f"{prefix}.{info.name}")
        else:
            names.append(f"{prefix}.{info.name}")
    return names


def api_page() -> str:
    lines = ["# API reference", "",
             "Generated when the site is built: every public module of the package, from its docstrings "
             "(private names, those starting with `_`, are left out). "
             "[Using the package from Python](python-api.md) shows the entry points in use.", ""]
    for name in public_modules():
        lines += [f"::: {name}", "    options:", "      show_root_heading: true", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# MkDocs events

def on_files(files, config):
    from mkdocs.structure.files import File
    page, problems = config_keys_page()
    for p in problems:
        log.warning(p)
    files.append(File.generated(config, "config-keys.md", content=page))
    files.append(File.generated(config, "api.md", content=api_page()))
    return files


_ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj):(<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub(r"\1", html)
