"""The core's messages name parameters; the CLI shows its flags.

The core (every module but ``cli.py``, ``options.py``, ``completion.py``,
``__main__.py`` and ``commands/``) is also the Python library, whose callers pass
``num_beams=3``, not ``--num-beams 3``. So an error the core raises words its
options with the parameters' names and lists them in ``params``; the commands'
``handles_errors`` respells them as flags (``commands.common.flag_spelling``).
A hint may still quote a whole shell command (``blip2 models download NAME
--revision R``): that is an instruction to type, not the name of an option.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip2cli"
CLI_SIDE = {"cli", "options", "completion", "__main__"}  # plus the commands/ package

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# A quoted shell command (`blip2 models download X --revision R`, `hf download ...`)
# or a hint that ends in one (... run blip2 embed PHOTOS -o DIR --layout segments).
SHELL_COMMAND = re.compile(r"`(?:blip2|hf) [^`]*`|\bblip2 [a-z]+ .*$")
# Modules another helper is converting in this same checkout (their files carry
# uncommitted work): listed here so the check covers them the moment they are done.
# Remove an entry when its messages name parameters.
PENDING: dict[str, str] = {}


def core_files() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.stem not in CLI_SIDE)


def _text(node: ast.AST) -> str | None:
    """A string literal or f-string as text, each placeholder shown as {}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _texts(node: ast.AST):
    """Every string in an expression, an f-string whole (not its pieces)."""
    text = _text(node)
    if text is not None:
        yield node.lineno, text
        return
    for child in ast.iter_child_nodes(node):
        yield from _texts(child)


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def messages(path: Path):
    """(line, text) of each string the module shows a user: the arguments of a call to an
    ``...Error`` class or ``console.message``, every ``hint=``, and what a ``..._hint``
    function returns."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            values = list(node.args) if _callee(node).endswith(("Error", "message")) else []
            values += [k.value for k in node.keywords if k.arg in ("hint", "message")]
            for value in values:
                yield from _texts(value)
        elif isinstance(node, ast.FunctionDef) and "hint" in node.name:
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    yield from _texts(ret.value)


def flags_named(text: str) -> list[str]:
    return FLAG.findall(SHELL_COMMAND.sub("", text))


def test_the_scan_finds_messages_and_flags():
    """The check can fail: it sees the messages of a module and a flag in one."""
    found = dict(messages(PACKAGE / "caption.py"))
    assert any("num_beams must be at least 1" in text for text in found.values())
    assert flags_named("--num-beams must be at least 1") == ["--num-beams"]
    assert flags_named("hint: lower --max-new-tokens") == ["--max-new-tokens"]
    assert flags_named("run `blip2 models download x --revision r`, then offline=True") == []
    assert flags_named("delete it and run blip2 embed PHOTOS -o out --layout segments again") == []


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_core_messages_name_parameters_not_flags(path):
    if path.name in PENDING:
        pytest.skip(f"being converted by {PENDING[path.name]}")
    bad = [f"{path.name}:{line}: {text!r}" for line, text in messages(path) if flags_named(text)]
    assert not bad, "core messages naming CLI flags (name the parameter, list it in params=):\n" + "\n".join(bad)


# -- the same errors, as the core words them and as the CLI shows them -----------------
def test_core_errors_name_parameters():
    from blip2cli.ask import check_template
    from blip2cli.bench import parse_size
    from blip2cli.errors import OptionError, UsageError
    from blip2cli.parts import parse_shard

    with pytest.raises(OptionError) as info:
        check_template("no placeholder")
    assert info.value.message.startswith("template must contain {question}") and "--" not in str(info.value)
    assert info.value.params == ("template",)
    with pytest.raises(UsageError) as info:
        parse_shard("9/4")
    assert info.value.message.startswith("shard='9/4': the index must be") and "--" not in str(info.value)
    with pytest.raises(UsageError) as info:
        parse_size("big")
    assert info.value.message.startswith("size='big'") and info.value.params == ("size",)


def test_reworded_keeps_the_class_and_spells_flags():
    from blip2cli.commands.common import flag_spelling
    from blip2cli.errors import DeviceError

    exc = DeviceError("device='cuda:3': there is no such GPU", hint="use device='cpu' (or 'auto')",
                      params=["device"])
    shown = exc.reworded(flag_spelling)
    assert type(shown) is DeviceError and shown.exit_code == exc.exit_code
    assert shown.message == "--device cuda:3: there is no such GPU"
    assert shown.hint == "use --device cpu (or 'auto')"
    assert exc.message == "device='cuda:3': there is no such GPU"  # the original is untouched
    # a value the shell would split is quoted; a dotted or bracketed word is not a parameter
    assert flag_spelling("template", "Q: {question} A:") == "--template 'Q: {question} A:'"
    exc = DeviceError("no model here", hint="point model at model.safetensors; pip install 'x[model]'",
                      params=["model"])
    assert exc.reworded(flag_spelling).hint == "point --model at model.safetensors; pip install 'x[model]'"


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


@pytest.mark.parametrize(
    "args, shown",
    [
        (["ask", "{image}", "-q", "what?", "--template", "no placeholder"],
         ["--template must contain {question}", "hint: for example --template 'Question: {question}"]),
        (["caption", "{image}", "-o", "{out}", "--shard", "9/4"],
         ["--shard 9/4: the index must be between 0 and 3", "--shard 0/4 ... --shard 3/4"]),
        (["caption", "{image}", "-o", "{out}", "--shard", "x"], ["--shard x: expected I/N, e.g. --shard 0/8"]),
        (["caption", "{image}", "{image}", "--metadata"], ["--metadata captions one folder"]),
        (["bench", "--size", "big"], ["--size big: expected WIDTHxHEIGHT"]),
    ],
    ids=["template", "shard-range", "shard-form", "metadata", "bench-size"],
)
def test_the_cli_shows_flags_for_the_cores_errors(args, shown, image, tmp_path):
    argv = [a.format(image=image, out=tmp_path / "out") for a in args]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    for text in shown:
        assert text in res.stderr, res.stderr
    assert "shard=" not in res.stderr and "template=" not in res.stderr and "size=" not in res.stderr


def test_the_library_says_the_parameter_where_the_cli_says_the_flag(tmp_path):
    """The loader's pickle refusal: ``allow_pickle=True`` from ``blip2cli.load``,
    ``--allow-pickle`` from the CLI (tests/test_cli_light.py checks the CLI side)."""
    import blip2cli
    from blip2cli.errors import ModelError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]}')
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelError) as info:
        blip2cli.load(str(folder), device="cpu")
    assert "allow_pickle=True" in str(info.value) and "--" not in str(info.value)
    res = CliRunner().invoke(app, ["caption", str(tmp_path), "--model", str(folder)])
    assert res.exit_code == 2 and "--allow-pickle" in res.stderr and "allow_pickle" not in res.stderr
