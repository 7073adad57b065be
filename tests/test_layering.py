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
