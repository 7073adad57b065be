"""On the CPU, a real-width shape: blip2 against plain batched generate, and what might help.

    python benchmarks/cpu_account.py [--layers 4] [--vision-layers 4] [--images 8] [--tokens 10]
        [--compile] [--out benchmarks/results/cpu_account]

The full opt-2.7b shape (3.7 B parameters) takes many minutes per configuration on a
2-core machine, so this builds the opt-2.7b *widths* (OPT hidden 2560, FFN 10240, 32
heads; ViT-g hidden 1408, MLP 6144, 16 heads; the 12-layer Q-Former whole) with fewer
layers (--layers of OPT's 32, --vision-layers of ViT-g's 39), random weights. Per-layer
cost is the real one; the fixed per-image work (decode, resize, normalise, write) is
then a larger share than in the full model, which favours blip2's pipeline: the ratio
here is an upper bound of the full shape's.

Configurations, each on the same JPEG files, greedy, exactly --tokens new tokens:
blip2's pipeline (bench.run_config: files -> records on disk) and plain batched
``generate`` (tensors ready: preprocessing not counted) in bf16 with all threads and
with one; float32; the language model's Linear layers int8 weight-only (dynamic
quantisation, float32 activations) with its token agreement; and with --compile
torch.compile of the vision tower (its first-call cost reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(layers: int, vision_layers: int, dtype):
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    from blip2cli.bench import build_random
    from blip2cli.imagespec import ImageSpec
    from blip2cli.loader import Checkpoint, LoadedModel, LoadOptions
    from blip2cli.testing import build_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="cpu-account-"))
    processor = Blip2Processor.from_pretrained(build_tiny_checkpoint(tmp, "opt", verify=False))
    processor.num_query_tokens = 32
    tok = processor.tokenizer
    text = OPTConfig(vocab_size=50272, hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240,
                     num_hidden_layers=layers, num_attention_heads=32, max_position_embeddings=2048,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("\u010a"),
                     pad_token_id=tok.pad_token_id)
    config = Blip2Config(text_config=text.to_dict(), num_query_tokens=32,
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    config.vision_config.num_hidden_layers = vision_layers
    model = build_random(Blip2ForConditionalGeneration, config, dtype, torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters())
    ckpt = Checkpoint(f"opt-2.7b widths, {layers}/32 OPT layers, {vision_layers}/39 ViT-g layers", None,
                      config.to_dict(), "Blip2ForConditionalGeneration", "opt")
    loaded = LoadedModel(model=model, processor=processor, tokenizer=tok, checkpoint=ckpt,
                         device=torch.device("cpu"), dtype=dtype, quantize="none",
                         options=LoadOptions(model=ckpt.source),
                         image_spec=ImageSpec.from_dict(processor.image_processor.to_dict()))
    return loaded, n


def measure(loaded, paths, gen, batch: int, work: Path, label: str, tokens_out: dict) -> dict:
    from blip2cli.bench import baseline, run_config

    row = run_config(loaded, "caption", paths, batch, 2, gen, 1, 1, work, 0.0)
    base = baseline(loaded, paths, gen, batch)
    rec = work / f"caption-b{batch}-r0.jsonl"
    tokens_out[label] = [json.loads(line)["caption"] for line in rec.read_text().splitlines()]
    return {"config": label, "blip2_images_per_s": row.images_per_s,
            "plain_batched_generate_images_per_s": base["plain_batched_generate_images_per_s"],
            "documented_per_image_images_per_s": base["documented_per_image_images_per_s"],
            "ratio_vs_plain": row.images_per_s / base["plain_batched_generate_images_per_s"],
            "stages_s": row.stages_s, "warmup_s": row.warmup_s, "seconds": row.seconds,
            "peak_cpu_mb": row.peak_cpu_mb}


def main() -> int:
    import torch
    import transformers

    from blip2cli.bench import synthetic_images
    from blip2cli.caption import GenerationOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated configs to skip: bf16,fp32,int8,threads1")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_account"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="cpu-account-run-"))
    paths = synthetic_images(work / "images", args.images, (640, 480))
    gen = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=1)
    threads = torch.get_num_threads()
    rows, captions = [], {}
    t0 = time.time()

    def log(r):
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "stages_s"}), flush=True)

    nparams = None
    if "bf16" not in skip:  # emulated on CPUs without AVX-512-BF16/AMX: very slow there
        loaded, nparams = build(args.layers, args.vision_layers, torch.bfloat16)
        log({**measure(loaded, paths, gen, args.images, work, f"bf16, {threads} threads", captions),
             "threads": threads})
        if "threads1" not in skip:
            torch.set_num_threads(1)
            log({**measure(loaded, paths, gen, args.images, work, "bf16, 1 thread", captions), "threads": 1})
            torch.set_num_threads(threads)
        if args.compile:
            tc = time.time()
            loaded.model.vision_model = torch.compile(loaded.model.vision_model)
            r = measure(loaded, paths, gen, args.images, work, "bf16, torch.compile(vision_model)", captions)
            log({**r, "threads": threads, "compile_and_first_call_s": r["warmup_s"],
                 "wall_incl_compile_s": time.time() - tc})
        del loaded
    if not ({"fp32", "int8"} <= skip):
        loaded, nparams32 = build(args.layers, args.vision_layers, torch.float32)
        nparams = nparams or nparams32
        if "fp32" not in skip:
            log({**measure(loaded, paths, gen, args.images, work, "float32", captions), "threads": threads})
        if "int8" not in skip:
            from torch.ao.quantization import quantize_dynamic

            loaded.model.language_model = quantize_dynamic(loaded.model.language_model, {torch.nn.Linear},
                                                           dtype=torch.qint8)
            r = measure(loaded, paths, gen, args.images, work, "float32, LM Linear int8 weight-only (dynamic)",
                        captions)
            ref = captions.get("float32")
            if ref:
                r["captions_equal_to_float32"] = sum(a == b for a, b in zip(captions[r["config"]], ref))
            log({**r, "threads": threads})
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs (shared)", "torch": torch.__version__, "transformers": transformers.__version__,
            "shape": f"opt-2.7b widths, {args.layers}/32 OPT layers, {args.vision_layers}/39 ViT-g layers, "
                     f"Q-Former whole; {nparams / 1e9:.2f} B parameters",
            "images": f"{args.images} synthetic JPEGs 640x480, batch {args.images}, greedy {args.tokens} tokens",
            "command": "python " + " ".join(sys.argv), "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
