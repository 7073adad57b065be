"""The CLI without a model: start-up cost, help, version, completion, usage errors.

Errors that can be found before any weights are read must be: these tests run
without a checkpoint, so reaching the weights would fail them differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli import __version__
from blip2cli.cli import app
from blip2cli.completion import FILES, script

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def heavy_modules_imported(*args: str, env: dict | None = None) -> tuple[str, str]:
    """Run blip2 in a fresh interpreter; report which heavy modules it imported."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['blip2', *{list(args)!r}]\n"
        "try:\n"
        "    runpy.run_module('blip2cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules)\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )
    heavy = [l for l in proc.stderr.splitlines() if l.startswith("HEAVY=")][-1][6:]
    return proc.stdout, heavy


@pytest.mark.parametrize(
    "args",
    [["--help"], ["caption", "--help"], ["--version"], ["embed", "--help"], ["search", "--help"], ["score", "--help"],
     ["ask", "--help"], ["chat", "--help"], ["bench", "--help"], ["merge", "--help"], ["sheet", "--help"],
     ["serve", "--help"]],
)
def test_help_does_not_import_torch_or_transformers(args):
    out, heavy = heavy_modules_imported(*args)
    assert "torch" not in heavy and "transformers" not in heavy, heavy
    assert out.strip()


def test_completion_does_not_import_torch():
    out, heavy = heavy_modules_imported(
        env={"_BLIP2_COMPLETE": "complete_bash", "COMP_WORDS": "blip2 caption --dt", "COMP_CWORD": "2"}
    )
    assert "--dtype" in out
    assert "torch" not in heavy and "transformers" not in heavy, heavy


def test_real_blip2_subprocess_help_and_version():
    exe = Path(sys.executable).with_name("blip2")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "blip2cli"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"blip2 {__version__}"
    proc = subprocess.run([*cmd, "caption", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout


@pytest.mark.parametrize("shell", sorted(FILES))
def test_completion_scripts_are_current(shell):
    committed = (ROOT / "completions" / FILES[shell]).read_text(encoding="utf-8")
    assert committed == script(shell), (
        f"completions/{FILES[shell]} is stale: run python -m blip2cli.completion completions"
    )


def test_version_and_help_in_process():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout
    result = runner.invoke(app, ["caption", "--help"])
    for opt in ("--model", "--device", "--dtype", "--quantize", "--format", "--batch-size",
                "--prompt", "--num-beams", "--num-captions", "--preprocess", "--files-from"):
        assert opt in result.stdout


def test_no_inputs_is_a_usage_error():
    result = runner.invoke(app, ["caption"])
    assert result.exit_code == 2
    assert "no inputs" in result.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--num-captions", "3", "--num-beams", "2"], "needs at least as many beams"),
        (["--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens"),
        (["--format", "xml"], "xml"),
        (["--dtype", "float8"], "float8"),
        (["--quantize", "3bit"], "3bit"),
    ],
)
def test_impossible_options_exit_2(tmp_path, args, words):
    img = tmp_path / "a.png"
    img.write_bytes(b"not used")
    result = runner.invoke(app, ["caption", str(img), "--model", str(tmp_path / "nope"), *args])
    assert result.exit_code == 2, result.output
    assert words in result.stderr


def test_missing_model_folder(tmp_path):
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "hint:" in result.stderr


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "not a BLIP-2 checkpoint" in result.stderr


def test_checkpoint_of_another_model_type(tmp_path):
    ck = tmp_path / "clip"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "clip"}')
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", str(ck)])
    assert result.exit_code == 2
    assert "model_type='clip'" in result.stderr


def test_pickle_only_checkpoint_refused_without_allow_pickle(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]}')
    (ck / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", str(ck)])
    assert result.exit_code == 2
    assert "pickle" in result.stderr and "--allow-pickle" in result.stderr


def test_offline_model_not_in_cache_says_how_to_download(tmp_path):
    result = runner.invoke(
        app, ["caption", str(tmp_path), "--model", "Salesforce/blip2-not-cached-here", "--offline"]
    )
    assert result.exit_code == 2
    assert "not in the Hugging Face cache" in result.stderr
    assert "hf download Salesforce/blip2-not-cached-here" in result.stderr


def test_cuda_asked_for_but_absent(tmp_path, tiny_opt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", str(tiny_opt), "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cuda" in result.stderr and "hint:" in result.stderr


def test_unwritable_output_fails_before_loading(tmp_path):
    result = runner.invoke(
        app, ["caption", str(tmp_path), "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "no" / "x.jsonl")]
    )
    assert result.exit_code != 0
    assert "does not exist" in result.stderr and "mkdir" in result.stderr


def test_model_from_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_MODEL", str(tmp_path / "from-env"))
    result = runner.invoke(app, ["caption", str(tmp_path)])
    assert result.exit_code == 2 and "from-env" in result.stderr


def test_hf_hub_offline_environment_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", "someone/not-cached"])
    assert result.exit_code == 2 and "offline mode is on" in result.stderr


def test_reporter_draws_progress_only_on_a_terminal(monkeypatch):
    import io

    from blip2cli.console import Reporter

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, expect_bar in ((Tty(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        rep = Reporter(total=3)
        rep.advance()
        rep.item_failed("bad.jpg", "truncated\nJPEG")
        rep.close()
        text = stream.getvalue()
        assert ("img/s" in text) is expect_bar
        assert "bad.jpg: truncated JPEG" in text  # one line, whatever the reason held
    quiet = Tty()
    monkeypatch.setattr("sys.stderr", quiet)
    rep = Reporter(total=3, quiet=True)
    rep.advance()
    rep.close()
    assert "img/s" not in quiet.getvalue()
