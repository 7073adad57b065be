"""The core never reaches the command line layer.

The CLI side is ``blip2cli/cli.py``, ``options.py``, ``completion.py``,
``__main__.py`` and ``blip2cli/commands/``; every other module of ``blip2cli`` is
the core, which the Python library (``blip2cli.load``) and the commands share.
The core never imports typer, click, or the CLI side, at import time or inside a
function: errors name parameters, and the commands map them to flags.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip2cli"

CLI_SIDE = {"cli", "options", "completion", "__main__"}  # plus the commands/ package
FORBIDDEN_PACKAGES = ("typer", "click", "rich")  # rich: the core's progress bar imports it lazily
FORBIDDEN_OURS = ("blip2cli.commands", "blip2cli.cli", "blip2cli.options", "blip2cli.completion")


def core_modules() -> list[str]:
    names = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in CLI_SIDE)
    return ["blip2cli" if n == "__init__" else f"blip2cli.{n}" for n in names]


def test_the_core_is_most_of_the_package():
    modules = core_modules()
    for name in ("blip2cli.caption", "blip2cli.ask", "blip2cli.embed", "blip2cli.job", "blip2cli.parts",
                 "blip2cli.bench", "blip2cli.api", "blip2cli.images", "blip2cli.loader", "blip2cli.tasks"):
        assert name in modules


def _forbidden(module: str) -> bool:
    if module.split(".")[0] in FORBIDDEN_PACKAGES:
        return True
    return any(module == ours or module.startswith(ours + ".") for ours in FORBIDDEN_OURS)


def test_importing_each_core_module_loads_no_cli_module():
    """A fresh interpreter imports the core modules one at a time and reports, after
    each, which CLI-side modules had appeared (the first module listed is the culprit)."""
    code = (
        "import importlib, json, sys\n"
        f"forbidden_packages = {FORBIDDEN_PACKAGES!r}\n"
        f"forbidden_ours = {FORBIDDEN_OURS!r}\n"
        "def bad(m):\n"
        "    return m.split('.')[0] in forbidden_packages or any(m == o or m.startswith(o + '.') for o in forbidden_ours)\n"
        "report = {}\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "    report[name] = sorted(m for m in sys.modules if bad(m))\n"
        "print(json.dumps(report))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == set(core_modules())
    offenders = {name: mods for name, mods in report.items() if mods}
    assert not offenders, offenders


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function bodies too), absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = "blip2cli"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
                if not node.module:  # from . import x
                    out.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
                    continue
            else:
                module = node.module or ""
            out.append((node.lineno, module))
    return out


@pytest.mark.parametrize("module", core_modules())
def test_no_core_module_imports_the_cli_side_even_inside_a_function(module):
    path = PACKAGE / ("__init__.py" if module == "blip2cli" else module.split(".", 1)[1] + ".py")
    bad = [(line, name) for line, name in _imports(path) if _forbidden(name) and not name.startswith("rich")]
    assert not bad, f"{path.name} imports the CLI side: {bad}"


def test_the_static_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from .commands.caption import CaptionTask\n    import typer\n")
    names = [name for _, name in _imports(sample)]
    assert "blip2cli.commands.caption" in names and "typer" in names


# -- each choice declared once ---------------------------------------------------------


def _string_sets(path: Path):
    """(line, what, values) for every str Enum class and every tuple/list of 2+ string literals."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", "")) == "Enum" for b in node.bases):
            values = [s.value.value for s in node.body
                      if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)]
            yield node.lineno, f"class {node.name}", frozenset(values)
        elif isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 2 and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
        ):
            yield node.lineno, "literal", frozenset(e.value for e in node.elts)


def test_each_enum_is_declared_once():
    """No second Enum, tuple or list spells a choice of blip2cli/choices.py (or sidecar.Existing):
    the loader, the library and the options all take it from there."""
    from blip2cli import choices
    from blip2cli.sidecar import Existing

    declared = {frozenset(choices.names(e)): e.__name__ for e in
                (choices.Dtype, choices.Quantize, choices.Format, choices.Preprocess, choices.Features,
                 choices.Pool, choices.EmbedFormat, choices.ExportLayout, choices.StoreDtype, Existing)}
    assert len(declared) == 10  # no two choices with the same members
    home = {PACKAGE / "choices.py"}
    repeats = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, what, values in _string_sets(path):
            if values in declared and path not in home and not (path.name == "sidecar.py" and what == "class Existing"):
                repeats.append(f"{path.relative_to(ROOT)}:{line} {what} repeats {declared[values]}")
    assert not repeats, repeats


def test_the_choices_match_what_the_core_accepts():
    from blip2cli import choices, embed, loader, storefiles, writers

    assert loader.DTYPES == choices.names(choices.Dtype)
    assert loader.QUANTIZE == choices.names(choices.Quantize)
    assert embed.FEATURES == choices.names(choices.Features)
    assert embed.POOLS == choices.names(choices.Pool)
    assert storefiles.STORE_DTYPES == choices.names(choices.StoreDtype)
    assert set(writers.FORMATS) <= set(choices.names(choices.Format))
    assert set(choices.names(choices.EmbedFormat)) <= set(choices.names(choices.Format))


def test_the_options_hand_typer_the_core_enums():
    from blip2cli import choices, options
    from blip2cli.commands import embed as embed_cmd
    from blip2cli.sidecar import Existing

    assert options.Dtype is choices.Dtype and options.Quantize is choices.Quantize
    assert options.Format is choices.Format and options.Preprocess is choices.Preprocess
    assert options.ExistingOpt is Existing
    assert embed_cmd.Features is choices.Features and embed_cmd.Pool is choices.Pool


# -- the core names parameters; the CLI says flags ---------------------------------------


def test_features_checks_name_parameters_in_the_core_and_flags_in_the_cli(tiny_itm, tiny_opt, example_images):
    from typer.testing import CliRunner

    from blip2cli.cli import app
    from blip2cli.embed import check_for_features
    from blip2cli.errors import OptionError
    from blip2cli.loader import LoadOptions

    with pytest.raises(OptionError) as info:
        check_for_features(LoadOptions(model=str(tiny_itm), quantize="8bit"), features="auto")
    assert "quantize=8bit" in info.value.message and "--" not in str(info.value)
    with pytest.raises(OptionError) as info:
        check_for_features(LoadOptions(model=str(tiny_opt)), features="itc")
    assert "features=itc" in info.value.message and "--" not in str(info.value)

    runner = CliRunner()
    res = runner.invoke(app, ["embed", str(example_images[0]), "-m", str(tiny_itm), "--quantize", "8bit"])
    assert res.exit_code == 2
    assert "--quantize 8bit: a retrieval checkpoint" in res.stderr and "--dtype float16" in res.stderr
    res = runner.invoke(app, ["embed", str(example_images[0]), "-m", str(tiny_opt), "--features", "itc"])
    assert res.exit_code == 2
    assert "--features itc needs a retrieval checkpoint" in res.stderr
    assert "--features vision or --features qformer" in res.stderr and "=" not in res.stderr


# -- no import cycles, no private names across modules --------------------------------------
#
# Counted from the source (ast), not from sys.modules: an import inside a function counts as
# much as one at the top. ``python -m pytest tests/test_layering.py -k "cycle or private"``
# lists what is left.

MAX_PRIVATE_IMPORTS = 3  # issue 18: at most 3 (27 on main before it)


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, package: str = "blip2cli"):
    """(edges, private): edges maps each module of ``package`` to {imported module: [lines]};
    private lists (module, line, other module, name) for each ``_name`` one module takes from
    another, by ``from m import _name`` or as ``m._name`` after ``from . import m``.

    Relative (``from .x import y``, ``from .. import x``, ``from . import x``) and absolute
    (``import blip2cli.x``, ``from blip2cli.x import y``) imports are resolved; ``from p import x``
    is an edge to the module ``p.x`` where there is one, else to ``p``. The package itself
    (``from . import __version__``) is no edge: Python has imported it before any of its modules."""
    modules = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    edges: dict[str, dict[str, list[int]]] = {}
    private: list[tuple[str, int, str, str]] = []
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        out: dict[str, list[int]] = {}
        aliases: dict[str, str] = {}  # a local name bound to one of our modules

        def edge(target: str, line: int) -> None:
            if target != name and target != package:
                out.setdefault(target, []).append(line)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        edge(alias.name, node.lineno)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.split(".")[0] != package:
                    continue
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:  # from . import x: the module x
                        edge(f"{target}.{alias.name}", node.lineno)
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
                        continue
                    edge(target, node.lineno)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                        private.append((name, node.lineno, target, alias.name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                private.append((name, node.lineno, aliases[node.value.id], node.attr))
        edges[name] = {t: lines for t, lines in out.items() if t in modules}
    return edges, private


def import_cycles(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Each group of modules that reach one another (Tarjan's strongly connected components
    of two or more), as one cycle through them, e.g. ``[a, b, c, a]``, with its import lines."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        # the shortest way from the group's first module back to itself, within the group
        start, members = group[0], set(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in came_from:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w in members and w not in came_from:
                        came_from[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(came_from[path[-1]])
        path.reverse()
        cycles.append([f"{len(group)} modules: {', '.join(m.split('.', 1)[-1] for m in group)}"]
                      + [f"{a} -> {b} (line {edges[a][b][0]})" for a, b in zip(path, path[1:])]
                      + ["all imports within them: " + ", ".join(
                          f"{a.split('.', 1)[-1]}->{b.split('.', 1)[-1]}" for a in group for b in sorted(edges[a])
                          if b in members)])
    return cycles


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "a.py").write_text("from . import __version__\nfrom .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n    return c._hidden\n")
    (pkg / "c.py").write_text("import pkg.sub.d\n_hidden = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("def g():\n    from ..a import _private\n    from .. import a as alias\n")
    edges, private = import_graph(tmp_path, "pkg")
    assert edges["pkg.a"] == {"pkg.b": [2]}  # the package itself is no edge
    assert edges["pkg.b"] == {"pkg.c": [2]}  # inside a function; from . import c
    assert edges["pkg.c"] == {"pkg.sub.d": [1]}  # absolute
    assert edges["pkg.sub.d"] == {"pkg.a": [2, 3]}  # two levels up
    assert sorted(private) == [("pkg.b", 3, "pkg.c", "_hidden"), ("pkg.sub.d", 2, "pkg.a", "_private")]
    (cycle,) = import_cycles(edges)
    assert cycle[0] == "4 modules: a, b, c, sub.d"
    assert cycle[1:-1] == ["pkg.a -> pkg.b (line 2)", "pkg.b -> pkg.c (line 2)",
                           "pkg.c -> pkg.sub.d (line 1)", "pkg.sub.d -> pkg.a (line 2)"]
    assert cycle[-1] == "all imports within them: a->b, b->c, c->sub.d, sub.d->a"
    (pkg / "c.py").write_text("_hidden = 1\n")
    assert import_cycles(import_graph(tmp_path, "pkg")[0]) == []


def test_no_import_cycle_between_blip2cli_modules():
    """STYLE 17: if two modules import each other, even inside functions, one of them owns a
    piece that belongs to a third, lower module: move it there."""
    edges, _ = import_graph()
    assert "blip2cli.caption" in edges["blip2cli.api"]  # the graph sees imports inside functions
    cycles = import_cycles(edges)
    assert not cycles, "\n\n".join("\n".join(c) for c in cycles)


def test_private_names_stay_in_their_module():
    """A name another module needs is public; at most a few private names cross modules."""
    _, private = import_graph()
    listed = [f"{m}:{line} takes {other}.{name}" for m, line, other, name in private]
    assert len(private) <= MAX_PRIVATE_IMPORTS, f"{len(private)} private names imported:\n" + "\n".join(listed)
