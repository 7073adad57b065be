"""Merge the groups' JSON (benchmarks/gpu_run.py) into one JSON and one markdown table.

    python3 benchmarks/gpu_report.py WORK_DIR OUT_DIR --command "bash benchmarks/gpu.sh" [--gpu-txt FILE]

Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md: the card (nvidia-smi), torch / transformers
versions, the date, the command, then one table row per measured configuration with
the issue's targets beside the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

GROUP_ORDER = ("opt", "decode", "t5", "q8", "q4", "int8", "serve")


def load(work: Path) -> dict:
    groups = {}
    for g in GROUP_ORDER:
        p = work / f"{g}.json"
        if p.exists():
            try:
                groups[g] = json.loads(p.read_text())
            except ValueError as exc:
                groups[g] = {"group": g, "steps": [], "error": f"unreadable: {exc}"}
        else:
            groups[g] = {"group": g, "steps": [], "error": "not run (no JSON: the group was killed before it started?)"}
    return groups


def f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def table(groups: dict, card: str = "no GPU") -> list[str]:
    lines = ["| step | configuration | images/s | tokens/s | peak GPU MB | first call s | compared with | ratio | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    targets = {"e2e_640x480_greedy20_qformer_half": ">= 700 img/s and >= 1.5x plain batched",
               "12mp_gpu_decode": ">= 400 img/s", "12mp_pillow_draft_16_workers": ">= 400 img/s",
               "beam5": ">= 1.5x plain batched beam 5", "e2e_flan_t5_xl_bf16": ">= 1.5x plain batched"}
    notes = []
    fp16_ref = None
    for g in GROUP_ORDER:
        for s in groups[g]["steps"]:
            name = s["step"]
            if "skipped" in s:
                lines.append(f"| {name} | skipped: {s['skipped']} | | | | | | | |")
                continue
            if "error" in s:
                lines.append(f"| {name} | ERROR: {s['error'][:160].replace('|', '/')} | | | | | | | |")
                continue
            if "rows" in s:
                base = s.get("baseline")
                for r in s["rows"]:
                    conf = (f"{r['model']}, {r['dtype']}, {r['quantize']}, batch {r['batch_size']}, "
                            f"{r['images']} images, decode {r['decode']}, Q-Former {r['qformer_dtype']}")
                    cmp_, ratio = "-", "-"
                    if base:
                        cmp_ = (f"plain batched generate {base['plain_batched_generate_images_per_s']:.1f} img/s "
                                f"(batch {base['plain_batch']}); documented loop "
                                f"{base['documented_per_image_images_per_s']:.2f}")
                        ratio = f"{r['images_per_s'] / base['plain_batched_generate_images_per_s']:.2f}x"
                    if name.startswith("e2e_640x480_8bit") or name.startswith("e2e_640x480_4bit"):
                        if fp16_ref:
                            cmp_ = f"fp16 batch {fp16_ref['batch_size']}: {fp16_ref['images_per_s']:.1f} img/s, " \
                                   f"{f(fp16_ref['peak_gpu_mb'], '{:.0f}')} MB"
                            ratio = f"{r['images_per_s'] / fp16_ref['images_per_s']:.2f}x"
                    lines.append(f"| {name} | {conf} | {r['images_per_s']:.1f} | {f(r['tokens_per_s'], '{:.0f}')} | "
                                 f"{f(r['peak_gpu_mb'], '{:.0f}')} | {f(r['warmup_s'])} | {cmp_} | {ratio} | "
                                 f"{targets.get(name, '')} |")
                    if name == "e2e_640x480_greedy20_qformer_half" and r["batch_size"] == 256:
                        fp16_ref = r
                    if r.get("note"):
                        notes.append(f"{name}, batch {r['batch_size']}: {r['note']}")
            elif "half_vs_fp32_qformer" in s:
                a = s["half_vs_fp32_qformer"]
                lines.append(f"| {name} | {s['images']} images, {s['dtype']}, greedy 20 | | | | | Q-Former fp32 | "
                             f"captions equal {a['captions_equal']}/{a['captions']}, token positions "
                             f"{a['token_positions_equal_pct']:.1f} %, output rel. diff "
                             f"{s['qformer_output_rel_diff']:.1e} | tokens equal, or rate documented |")
            elif "concurrency" in s:  # the serve group: chat completions against blip2 serve
                b = s["server_batches"]
                buckets = ", ".join(f"{k}: {v}" for k, v in b["calls_by_batch_size"].items())
                conf = (f"blip2 serve on {card}, {s['requests']} chat completions, {s['concurrency']} at once "
                        f"(640x480 JPEG data: URLs, temperature 0, exactly 20 tokens); server: {b['model_calls']} model "
                        f"calls, mean batch {f(b['mean_batch'])} ({buckets})")
                cmp_, ratio, target = "-", "-", ""
                one = next((t for t in groups[g]["steps"] if t.get("concurrency") == 1 and "images_per_s" in t), None)
                if s["concurrency"] > 1 and one:
                    cmp_ = f"one by one {one['images_per_s']:.1f} img/s"
                    ratio = f"{s['images_per_s'] / one['images_per_s']:.2f}x"
                if "answers_equal" in s:
                    cmp_ = f"answers equal to the concurrent ones: {s['answers_equal']}"
                    target = "every answer equal"
                if s.get("stopped_early"):
                    conf += f"; stopped early: {s['stopped_early']}"
                lines.append(f"| {name} | {conf} | {s['images_per_s']:.1f} | {s['tokens_per_s']:.0f} | | | {cmp_} | "
                             f"{ratio} | {target} |")
            elif "exit_code_after_sigterm" in s:
                lines.append(f"| {name} | SIGTERM to blip2 serve, stopped in {s['stop_s']:.1f} s | | | | | | "
                             f"exit code {s['exit_code_after_sigterm']} | exit code 0 |")
            elif "vs_pillow_draft" in s:
                d, u = s["vs_pillow_draft"], s["vs_pillow_full"]
                lines.append(f"| {name} | {s['images']} images, {s['decoded_on_gpu']} decoded on the GPU | | | | | "
                             f"Pillow draft / full decode | max {d['max_abs']} mean {d['mean_abs']:.2f} / "
                             f"max {u['max_abs']} mean {u['mean_abs']:.2f} (uint8 levels) | measured |")
            elif "gpu_decode_resize_images_per_s" in s:
                lines.append(f"| {name} | {s['images']} images, batch {s['batch']}, {s['threads']} threads, "
                             f"decode+resize only | {s['gpu_decode_resize_images_per_s']:.1f} | | | | Pillow draft "
                             f"{s['pillow_draft_images_per_s']:.1f} img/s | "
                             f"{s['gpu_decode_resize_images_per_s'] / s['pillow_draft_images_per_s']:.2f}x | |")
            else:
                extra = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                                  if k not in ("step", "seconds")).replace("|", "/")
                lines.append(f"| {name} | {extra} | | | | | | | |")
    for g in GROUP_ORDER:
        if groups[g].get("error"):
            notes.append(f"group {g}: {groups[g]['error']}")
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def serve_section(group: dict, card: str) -> list[str]:
    """A few sentences on the serve group: the card, throughput both ways, batches, agreement, exit."""
    steps = {s["step"].split("_")[-1] if s["step"].startswith("serve_") else s["step"]: s
             for s in group.get("steps", []) if "error" not in s and "skipped" not in s}
    many = next((s for s in group.get("steps", []) if s.get("concurrency", 1) > 1 and "images_per_s" in s), None)
    one = next((s for s in group.get("steps", []) if s.get("concurrency") == 1 and "images_per_s" in s), None)
    if many is None and one is None:
        return []
    model = ("the tiny random checkpoint, float32 (smoke run)" if group.get("smoke") else
             "opt-2.7b shape, float16, random weights (the saved checkpoint)")
    out = ["## blip2 serve", "", f"On {card}: `blip2 serve -m DIR`, {model}, chat completions with one 640x480 "
           "JPEG each as a data: URL, temperature 0, exactly 20 new tokens (max_tokens = min_tokens = 20)."]
    if many:
        b = many["server_batches"]
        out.append(f"- {many['requests']} requests at once: {many['images_per_s']:.1f} images/s; the server ran "
                   f"{b['model_calls']} model calls, mean batch {f(b['mean_batch'])} (max batch size "
                   f"{many['server_max_batch_size']}, wait {many['batch_wait_ms']} ms).")
    if one:
        out.append(f"- the same {one['requests']} one by one: {one['images_per_s']:.1f} images/s"
                   + (f"; {many['images_per_s'] / one['images_per_s']:.1f}x from batching across requests"
                      if many else "") + ".")
        if "answers_equal" in one:
            out.append(f"- concurrent answers equal to the one-by-one answers: {one['answers_equal']}.")
    if "sigterm" in steps:
        out.append(f"- SIGTERM: exit code {steps['sigterm']['exit_code_after_sigterm']}.")
    return out + [""]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("out")
    ap.add_argument("--command", default="bash benchmarks/gpu.sh")
    ap.add_argument("--gpu-txt", default=None)
    args = ap.parse_args()
    import torch
    import transformers

    groups = load(Path(args.work))
    card = Path(args.gpu_txt).read_text().strip() if args.gpu_txt and Path(args.gpu_txt).exists() else None
    smoke = any(g.get("smoke") for g in groups.values())
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "card": card or "no GPU",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "command": args.command, "smoke": smoke}
    try:
        import bitsandbytes

        meta["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        meta["bitsandbytes"] = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "groups": groups}, indent=1) + "\n")
    md = ["# blip2 on the GPU" + (" (SMOKE RUN on the CPU: tiny model, figures meaningless)" if smoke else ""), "",
          f"- card: {meta['card']}",
          f"- torch {meta['torch']}, transformers {meta['transformers']}, bitsandbytes {meta['bitsandbytes']}, "
          f"python {meta['python']}",
          f"- date: {meta['date']}",
          f"- command: `{meta['command']}`",
          "- random weights in the real shapes (`bench --from-config`; 8-/4-bit: the same saved and loaded "
          "through the loader), 640x480 or 4032x3024 synthetic JPEGs, greedy (or beam 5) with exactly 20 new "
          "tokens; images/s are files in -> JSON Lines records on disk, warm-up excluded; 'first call s' is "
          "the warm-up run (with --compile: the compilation)", "", *table(groups, meta["card"]), "",
          *serve_section(groups.get("serve", {}), meta["card"])]
    (out / "gpu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
