"""blip2 bench: the real pipeline, measured; numbers are checked for consistency, not speed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()


def test_bench_json_rows_stages_tokens_and_baseline(tiny_opt):
    res = runner.invoke(app, ["bench", "--model", str(tiny_opt), "--synthetic", "8", "--size", "320x240",
                              "-b", "2,4", "--repeat", "1", "--json", "--baseline", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    rows = data["rows"]
    assert [r["batch_size"] for r in rows] == [2, 4]
    for r in rows:
        assert r["images"] == 8 and r["images_per_s"] > 0
        # min = max new tokens: every image yields exactly 5 tokens
        assert round(r["tokens_per_s"] * r["seconds"]) == 8 * 5
        assert r["batch_p50_ms"] <= r["batch_p95_ms"]
        assert set(r["stages_s"]) >= {"vision", "qformer", "language_model", "write"}
        assert r["stages_s"]["vision"] > 0 and r["stages_s"]["language_model"] > 0
        assert r["peak_cpu_mb"] > 0 and r["peak_gpu_mb"] is None
    assert data["baseline"]["documented_per_image_images_per_s"] > 0
    assert data["meta"]["repeats"].startswith("median of 1 timed runs")


def test_bench_table_and_tasks(tiny_opt, example_images, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in example_images:
        shutil.copy(p, folder / p.name)
    res = runner.invoke(app, ["bench", "--model", str(tiny_opt), "--images", str(folder), "-b", "2",
                              "--repeat", "1", "--task", "ask", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "images/s" in res.stdout and "4 images from" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["--from-config", "opt-99b"], "unknown"),
    (["--task", "dance"], "--task"),
    (["-b", "0"], "at least 1"),
    (["--size", "big"], "WIDTHxHEIGHT"),
])
def test_bench_usage_errors(tiny_opt, args, words):
    res = runner.invoke(app, ["bench", "--model", str(tiny_opt), "--synthetic", "2", *args])
    assert res.exit_code == 2 and words in res.stderr
