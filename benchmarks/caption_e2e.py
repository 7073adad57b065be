"""End to end on the CPU: `blip2 caption` against the documented per-image loop.

    python benchmarks/caption_e2e.py [--model DIR] [--n 64] [--out benchmarks/results/caption_e2e]

Both start from JPEG files and end with one JSON record per image on disk; both load the model
(timed inside), greedy decoding with exactly --tokens new tokens (min = max, so random weights
are comparable). Without --model, a tiny random checkpoint is built with blip2cli.testing: its
cost profile (a tiny vision tower) is not the real model's, so the ratio says how much overhead
blip2 removes around the model, not what a GPU run gains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def documented_loop(model_dir: str, paths, tokens: int, out: Path) -> list[str]:
    """The usage from the transformers docs, once per image."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    captions = []
    with out.open("w") as fh:
        for p in paths:
            image = Image.open(p).convert("RGB")
            inputs = processor(images=image, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
            text = processor.batch_decode(ids[:, model.config.num_query_tokens + 1:], skip_special_tokens=True)[0].strip()
            captions.append(text)
            fh.write(json.dumps({"path": str(p), "caption": text}) + "\n")
            fh.flush()
    return captions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/caption_e2e")
    args = ap.parse_args()

    import torch
    import transformers
    from typer.testing import CliRunner

    from blip2cli.cli import app
    from input_pipeline import make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from blip2cli.testing import build_tiny_checkpoint

            model_dir = str(build_tiny_checkpoint(tmp / "tiny", "opt"))
        folder = tmp / "photos"
        folder.mkdir()
        paths = make_jpegs(folder, (640, 480), args.n)

        t0 = time.perf_counter()
        ref = documented_loop(model_dir, paths, args.tokens, tmp / "documented.jsonl")
        t_doc = time.perf_counter() - t0

        out = tmp / "blip2.jsonl"
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["caption", str(folder), "--model", model_dir, "-o", str(out), "--num-beams", "1",
                                       "--max-new-tokens", str(args.tokens), "--min-new-tokens", str(args.tokens),
                                       "--device", "cpu", "--quiet"])
        t_ours = time.perf_counter() - t0
        assert res.exit_code == 0, res.output
        ours = [json.loads(l)["caption"] for l in out.read_text().splitlines()]
    same = sum(a == b for a, b in zip(ref, ours))
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU), {platform.system()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.model or "tiny random OPT checkpoint (blip2cli.testing, seed 0)",
        "command": "python benchmarks/caption_e2e.py " + " ".join(sys.argv[1:]),
        "settings": f"{args.n} JPEGs 640x480, greedy, exactly {args.tokens} new tokens, float32, CPU, "
                    "default batch size and workers",
    }
    rows = {
        "documented_loop_s": t_doc,
        "blip2_caption_s": t_ours,
        "documented_images_per_s": args.n / t_doc,
        "blip2_images_per_s": args.n / t_ours,
        "speedup": t_doc / t_ours,
        "captions_equal": f"{same}/{args.n}",
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": rows}, indent=1) + "\n")
    lines = [
        "# End to end on the CPU: blip2 caption vs the documented per-image loop",
        "",
        *[f"- {k}: {v}" for k, v in meta.items()],
        "",
        "| path | seconds | images/s |",
        "|---|---|---|",
        f"| documented usage, one image at a time (processor + generate) | {t_doc:.2f} | {args.n / t_doc:.1f} |",
        f"| `blip2 caption` | {t_ours:.2f} | {args.n / t_ours:.1f} |",
        "",
        f"Speed-up: **{t_doc / t_ours:.1f}x**; captions equal to the documented usage: {same}/{args.n}. "
        "Both include loading the model and writing one JSON record per image.",
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
