"""Q-Former in half precision: do the greedy tokens stay the same?

    python benchmarks/qformer_half.py [--seeds 6] [--images 16] [--tokens 20] [--out benchmarks/results/qformer_half]
    python benchmarks/qformer_half.py --from-config opt-2.7b --device cuda --images 64 --out $OUT/qformer_half_gpu

transformers loads BLIP-2 in float16 with the Q-Former and the query tokens kept in
float32 (``_keep_in_fp32_modules``; under bfloat16 they are bfloat16 already). This
runs the same model twice on the same pixels, greedy, ``--tokens`` new tokens: once
with the Q-Former as transformers loads it (float32) and once cast to the model's
half dtype, and counts the captions whose tokens are all equal, the token positions
equal (up to each caption's end), and the relative difference of the Q-Former's
output (the language-model inputs after the projection). The full-float32 model's
tokens are given too, for scale: how much the half-precision rest of the model
already moves them.

Without --from-config: tiny random checkpoints from ``blip2cli.testing`` (weights
re-drawn at gain 1.5, so captions depend on the image), OPT and Flan-T5, several
seeds, float16 and bfloat16, on the CPU. With --from-config: the full-size random
architecture (bench's builder) on the given device, float16.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def images(n: int, size=(320, 240)):
    """``n`` distinct RGB images: the example photos, cropped, flipped and noised."""
    import numpy as np
    from PIL import Image, ImageOps

    folder = ROOT / "examples" / "images"
    base = [Image.open(p).convert("RGB").resize(size) for p in sorted(folder.glob("*.*")) if p.suffix != ".md"]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = base[i % len(base)]
        if (i // len(base)) % 2:
            im = ImageOps.mirror(im)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-20, 21, size=(size[1], size[0], 3))
        out.append(Image.fromarray(arr.clip(0, 255).astype("uint8")))
    return out


def set_qformer(model, dtype) -> None:
    model.qformer.to(dtype)
    model.query_tokens.data = model.query_tokens.data.to(dtype)


def run_model(model, pixels, tokens: int, encdec: bool):
    """Greedy tokens (lists, cut after EOS) and the Q-Former's projected output."""
    import torch

    captured = {}
    hook = model.language_projection.register_forward_hook(lambda m, a, out: captured.setdefault("q", out.float()))
    try:
        with torch.inference_mode():
            out = model.generate(pixel_values=pixels.to(model.device, model.dtype), max_new_tokens=tokens,
                                 num_beams=1, do_sample=False, temperature=None, top_p=None, top_k=None)
    finally:
        hook.remove()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    rows = []
    for row in out.tolist():
        row = row[1:] if encdec else row  # T5's decoder start token
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows, captured["q"]


def agreement(a: list, b: list) -> dict:
    same_seq = sum(x == y for x, y in zip(a, b))
    pos = sum(max(len(x), len(y)) for x, y in zip(a, b))
    same_pos = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(a, b)]
    diverged = [f for f in first if f is not None]
    return {"captions": len(a), "captions_equal": same_seq, "captions_equal_pct": 100 * same_seq / len(a),
            "token_positions_equal_pct": 100 * same_pos / max(1, pos),
            "first_divergence_median": sorted(diverged)[len(diverged) // 2] if diverged else None}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare(build, pixels, dtypes, tokens: int, encdec: bool) -> list[dict]:
    import torch

    ref_model = build(torch.float32)
    ref_tokens, ref_q = run_model(ref_model, pixels, tokens, encdec)
    del ref_model
    rows = []
    for dtype in dtypes:
        model = build(dtype)
        loaded_as = next(model.qformer.parameters()).dtype
        set_qformer(model, torch.float32)
        t32, q32 = run_model(model, pixels, tokens, encdec)
        set_qformer(model, dtype)
        t16, q16 = run_model(model, pixels, tokens, encdec)
        del model
        rows.append({
            "dtype": str(dtype).replace("torch.", ""),
            "qformer_as_loaded": str(loaded_as).replace("torch.", ""),
            "half_vs_fp32_qformer": agreement(t16, t32),
            "fp32_qformer_vs_all_fp32": agreement(t32, ref_tokens),
            "half_qformer_vs_all_fp32": agreement(t16, ref_tokens),
            "qformer_output_rel_diff_half_vs_fp32": rel(q16, q32),
            "qformer_output_rel_diff_fp32_qformer_vs_all_fp32": rel(q32, ref_q),
        })
    return rows


def tiny(args) -> list[dict]:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2cli.testing import build_tiny_checkpoint

    pics = images(args.images)
    dtypes = [torch.float16, torch.bfloat16]
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="qformer-half-"))
    for kind in ("opt", "t5"):
        for seed in range(args.seeds):
            folder = build_tiny_checkpoint(tmp / f"{kind}-{seed}", kind, seed=seed)
            pixels = Blip2Processor.from_pretrained(folder)(images=pics, return_tensors="pt").pixel_values

            def build(dtype, folder=folder):
                return Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()

            for row in compare(build, pixels, dtypes, args.tokens, kind == "t5"):
                results.append({"model": f"tiny {kind} seed {seed}", **row})
                print(json.dumps(results[-1]), flush=True)
    return results


def full(args) -> list[dict]:
    import torch

    from blip2cli.bench import from_config

    pics = images(args.images, (640, 480))
    loaded = from_config(args.from_config, args.device, "float16")
    pixels = loaded.processor.image_processor(images=pics, return_tensors="pt").pixel_values
    model = loaded.model
    encdec = args.from_config.startswith("flan")
    results = []
    # The float32 reference would double the memory of the big shapes: compare the two
    # Q-Former precisions only (the quantity the option changes).
    t32, q32 = [], []
    set_qformer(model, torch.float32)
    for k in range(0, len(pixels), args.batch):
        t, q = run_model(model, pixels[k:k + args.batch], args.tokens, encdec)
        t32 += t
        q32.append(q)
    set_qformer(model, torch.float16)
    t16, q16 = [], []
    for k in range(0, len(pixels), args.batch):
        t, q = run_model(model, pixels[k:k + args.batch], args.tokens, encdec)
        t16 += t
        q16.append(q)
    results.append({"model": f"{args.from_config} random weights", "dtype": "float16",
                    "qformer_as_loaded": "float32", "half_vs_fp32_qformer": agreement(t16, t32),
                    "qformer_output_rel_diff_half_vs_fp32": rel(torch.cat(q16), torch.cat(q32))})
    print(json.dumps(results[-1]), flush=True)
    return results


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Q-Former in half precision: token agreement", "",
             f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · transformers {meta['transformers']}",
             f"`{meta['command']}`", "",
             "Greedy, up to %d new tokens, %d images per model. 'half vs fp32 Q-Former': the model in the "
             "half dtype, Q-Former cast to it vs kept in float32 (transformers' float16 default). "
             "'vs all fp32': against the whole model in float32, for scale." % (meta["tokens"], meta["images"]), "",
             "| model | dtype | Q-Former as loaded | captions equal (half vs fp32 Q-Former) | token positions equal "
             "| Q-Former output rel. diff | fp32-Q-Former model vs all fp32: captions equal | half-Q-Former vs all fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a = r["half_vs_fp32_qformer"]
        b = r.get("fp32_qformer_vs_all_fp32")
        c = r.get("half_qformer_vs_all_fp32")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['qformer_as_loaded']} | {a['captions_equal']}/{a['captions']} "
                     f"| {a['token_positions_equal_pct']:.1f} % | {r['qformer_output_rel_diff_half_vs_fp32']:.1e} "
                     f"| {b['captions_equal']}/{b['captions'] if b else '-'} | "
                     f"{c['captions_equal']}/{c['captions'] if c else '-'} |" if b else
                     f"| {r['model']} | {r['dtype']} | {r['qformer_as_loaded']} | {a['captions_equal']}/{a['captions']} "
                     f"| {a['token_positions_equal_pct']:.1f} % | {r['qformer_output_rel_diff_half_vs_fp32']:.1e} | - | - |")
    summary = {}
    for r in rows:
        s = summary.setdefault(r["dtype"], [0, 0])
        s[0] += r["half_vs_fp32_qformer"]["captions_equal"]
        s[1] += r["half_vs_fp32_qformer"]["captions"]
    lines += ["", "Total, half vs fp32 Q-Former: " + "; ".join(
        f"{d}: {a}/{b} captions equal ({100 * a / b:.1f} %)" for d, (a, b) in summary.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="generate batch (--from-config)")
    ap.add_argument("--from-config", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qformer_half"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    rows = full(args) if args.from_config else tiny(args)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
                        f"{platform.machine()} CPU"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "command": "python " + " ".join(sys.argv), "tokens": args.tokens, "images": args.images,
            "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
