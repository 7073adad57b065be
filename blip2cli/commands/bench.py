"""``blip2 bench``: throughput of the real pipeline on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from .common import handles_errors, load_options

BENCH = "Benchmark"


@handles_errors
@o.expands
def bench(
    model: o.Model = o.DEFAULT_MODEL,
    from_config: Annotated[
        Optional[str],
        typer.Option("--from-config", metavar="NAME", rich_help_panel=BENCH, show_default=False,
                     help="Random weights in a known shape, no download: opt-2.7b, opt-6.7b, flan-t5-xl, flan-t5-xxl."),
    ] = None,
    images: Annotated[
        Optional[Path],
        typer.Option("--images", metavar="DIR", rich_help_panel=BENCH, show_default=False, help="A folder of your own images."),
    ] = None,
    synthetic: Annotated[int, typer.Option("--synthetic", metavar="N", min=1, rich_help_panel=BENCH, help="How many synthetic JPEGs.")] = 64,
    size: Annotated[str, typer.Option("--size", metavar="WxH", rich_help_panel=BENCH, help="Size of the synthetic JPEGs, WxH.")] = "640x480",
    batch_sizes: Annotated[
        Optional[str],
        typer.Option("--batch-size", "-b", metavar="N,N,...", rich_help_panel=BENCH, show_default=False,
                     help="Batch sizes to measure, comma-separated. Default: 1,16 on the CPU, 8,32,128 on a GPU."),
    ] = None,
    task: Annotated[str, typer.Option("--task", metavar="[caption|ask|embed]", rich_help_panel=BENCH, help="The task to time.")] = "caption",
    loading: o.Bundle = o.LOADING.without("model"),
    max_new_tokens: Annotated[int, typer.Option(metavar="N", min=1, rich_help_panel=o.GENERATION)] = 20,
    min_new_tokens: Annotated[
        Optional[int], typer.Option(metavar="N", min=0, rich_help_panel=o.GENERATION, show_default=False,
                                    help="Default: --max-new-tokens, so random weights are comparable."),
    ] = None,
    num_beams: Annotated[int, typer.Option(metavar="N", min=1, rich_help_panel=o.GENERATION)] = 1,
    workers: o.Workers = None,
    compile_: o.Compile = False,
    decode: Annotated[
        str, typer.Option("--decode", metavar="[auto|gpu|cpu]", rich_help_panel=o.PERFORMANCE,
                          help="Where JPEGs are decoded: gpu (nvJPEG through torchvision, on CUDA), cpu (Pillow, "
                          "draft mode for large JPEGs), auto (gpu when it can)."),
    ] = "auto",
    qformer_dtype: Annotated[
        str, typer.Option("--qformer-dtype", metavar="[auto|float32|half]", rich_help_panel=o.PERFORMANCE,
                          help="The Q-Former's precision: auto (as transformers loads it: float32 under "
                          "float16), float32, or half (the model's float16/bfloat16)."),
    ] = "auto",
    repeat: Annotated[int, typer.Option("--repeat", metavar="N", min=1, rich_help_panel=BENCH, help="Timed runs per configuration (median reported).")] = 2,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, rich_help_panel=BENCH, help="Untimed warm-up batches.")] = 1,
    baseline: Annotated[bool, typer.Option("--baseline", rich_help_panel=BENCH, help="Also time the documented per-image usage and one plain batched generate.")] = False,
    as_json: Annotated[bool, typer.Option("--json", rich_help_panel=BENCH, help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure throughput on this machine with the real pipeline: files in, records on disk.

    Reports per configuration: model load time, images/s, tokens/s, per-batch latency p50/p95,
    time per stage (decode+preprocess, vision, Q-Former, language model, write) and peak memory.
    Warm-up is excluded; the number of timed runs is printed."""
    import tempfile

    from ..bench import baseline as run_baseline, environment, parse_size, qformer_dtype as qformer_dtype_of
    from ..bench import parse_batch_sizes, rows_to_json, run_config, set_qformer_dtype
    from ..gpudecode import choose as choose_decode

    _check_flags(task, decode, qformer_dtype, from_config, loading)
    gen = _generation(max_new_tokens, min_new_tokens, num_beams, compile_)
    wh = parse_size(size)
    tmp = Path(tempfile.mkdtemp(prefix="blip2-bench-"))
    paths, source = _bench_images(images, synthetic, wh, tmp)
    loaded, load_s = _load(model, from_config, loading, task)
    gpu_decode = choose_decode(decode, loaded.device)
    qformer_as_loaded = qformer_dtype_of(loaded.model)
    set_qformer_dtype(loaded, qformer_dtype)
    sizes = parse_batch_sizes(batch_sizes or ("1,16" if loaded.device.type == "cpu" else "8,32,128"))
    rows = [
        run_config(loaded, task, paths, bs, workers or o.default_workers(), gen, repeat, warmup, tmp, load_s,
                   gpu_decode)
        for bs in sizes
    ]
    base = (run_baseline(loaded, paths, gen, max(sizes), qformer_as_loaded)
            if baseline and task == "caption" else None)
    meta = environment({
        "model": from_config and f"{from_config} (random weights: the text is meaningless)" or model,
        "images": source, "task": task, **_run_notes(gen, compile_, repeat, warmup, gpu_decode, rows),
    })
    if as_json:
        typer.echo(rows_to_json(rows, meta, base))
        return
    _print_table(rows, meta, base)


def _check_flags(task: str, decode: str, qformer_dtype: str, from_config: str | None, loading) -> None:
    """Refuse what cannot run, before any model is loaded."""
    from ..bench import KNOWN_CONFIGS, QFORMER_DTYPES, TASKS
    from ..errors import UsageError
    from ..gpudecode import DECODE_CHOICES, choose as choose_decode

    if task not in TASKS:
        raise UsageError(f"--task {task!r}: use one of {', '.join(TASKS)}")
    if decode not in DECODE_CHOICES:
        raise UsageError(f"--decode {decode!r}: use one of {', '.join(DECODE_CHOICES)}")
    if qformer_dtype not in QFORMER_DTYPES:
        raise UsageError(f"--qformer-dtype {qformer_dtype!r}: use one of {', '.join(QFORMER_DTYPES)}")
    if from_config is not None and from_config not in KNOWN_CONFIGS:
        raise UsageError(f"--from-config {from_config!r}: unknown", hint=f"one of {', '.join(KNOWN_CONFIGS)}")
    if from_config is not None and loading.quantize.value not in ("none", "int8"):
        raise UsageError(f"--quantize {loading.quantize.value} needs real weights to quantize (bitsandbytes "
                         "quantizes while loading); drop --from-config, or use --quantize int8")
    if from_config is not None and task == "embed":
        raise UsageError("--from-config builds captioning models; embed needs a retrieval checkpoint")
    if decode == "gpu":  # before a model is loaded: say at once when it cannot be
        from ..loader import resolve_device

        choose_decode(decode, resolve_device(loading.device))


def _generation(max_new_tokens: int, min_new_tokens: int | None, num_beams: int, compile_: bool):
    """The generation options, checked (``min_new_tokens`` defaults to ``max_new_tokens``)."""
    from ..caption import GenerationOptions

    gen = GenerationOptions(max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens if min_new_tokens is None else min_new_tokens,
                            num_beams=num_beams, static_cache=compile_)
    gen.validate()
    return gen


def _run_notes(gen, compile_: bool, repeat: int, warmup: int, gpu_decode: bool, rows) -> dict[str, str]:
    """How the runs were made, for the report's header."""
    return {
        "generation": f"beams {gen.num_beams}, new tokens {gen.min_new_tokens}-{gen.max_new_tokens}"
                      + (", static KV cache (--compile)" if compile_ else ""),
        "repeats": f"median of {repeat} timed runs after {warmup} warm-up batch(es)",
        "decode": "gpu (nvJPEG)" if gpu_decode else "cpu (Pillow, draft mode)",
        "qformer_dtype": ", ".join(sorted({r.qformer_dtype for r in rows})),
    }


def _bench_images(images: Path | None, synthetic: int, wh: tuple[int, int], tmp: Path) -> tuple[list[Path], str]:
    """The images to time (``--images`` or synthetic JPEGs written under ``tmp``) and how to name them."""
    from ..bench import synthetic_images
    from ..errors import UsageError

    if images is not None:
        from ..sources import InputResolver

        paths = [Path(i.name) for i in InputResolver().resolve([str(images)]) if i.error is None]
        if not paths:
            raise UsageError(f"--images {images}: no images found")
        return paths, f"{len(paths)} images from {images}"
    return synthetic_images(tmp / "images", synthetic, wh), f"{synthetic} synthetic JPEGs {wh[0]}x{wh[1]}"


def _load(model: str, from_config: str | None, loading, task: str):
    """(the loaded model, seconds it took): random weights for --from-config, else the checkpoint."""
    import time

    t0 = time.perf_counter()
    if from_config is not None:
        from ..bench import from_config as build_from_config

        loaded = build_from_config(from_config, loading.device, loading.dtype.value, loading.quantize.value)
    else:
        from ..loader import ALL_ARCHITECTURES, GENERATIVE, load

        loaded = load(
            load_options(model, **vars(loading)),
            architectures=ALL_ARCHITECTURES if task == "embed" else GENERATIVE, task=task,
        )
    return loaded, time.perf_counter() - t0


def _print_table(rows, meta, base) -> None:
    import sys

    lines = [f"{k}: {v}" for k, v in meta.items() if v is not None]
    header = ["batch", "load s", "images/s", "tokens/s", "p50 ms", "p95 ms", "decode s", "vision s",
              "qformer s", "LM s", "write s", "peak CPU MB", "peak GPU MB"]
    table = []
    for r in rows:
        st = r.stages_s
        table.append([
            str(r.batch_size), f"{r.load_s:.1f}", f"{r.images_per_s:.1f}",
            f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "-",
            f"{r.batch_p50_ms:.0f}" if r.batch_p50_ms is not None else "-",
            f"{r.batch_p95_ms:.0f}" if r.batch_p95_ms is not None else "-",
            f"{st['decode+preprocess (worker threads, summed)']:.2f}", f"{st['vision']:.2f}",
            f"{st['qformer']:.2f}", f"{st['language_model']:.2f}", f"{st['write']:.3f}",
            f"{r.peak_cpu_mb:.0f}", f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "-",
        ])
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(*header, title="blip2 bench")
        for row in table:
            t.add_row(*row)
        console = Console()
        for line in lines:
            console.print(line, markup=False, highlight=False)
        console.print(t)
    else:
        print("\n".join(lines))
        print("\t".join(header))
        for row in table:
            print("\t".join(row))
    if base:
        best = max(r.images_per_s for r in rows)
        print(f"documented per-image usage: {base['documented_per_image_images_per_s']:.1f} images/s "
              f"-> blip2 {best / base['documented_per_image_images_per_s']:.1f}x")
        print(f"plain batched generate (batch {base['plain_batch']}, tensors ready): "
              f"{base['plain_batched_generate_images_per_s']:.1f} images/s -> blip2 "
              f"{best / base['plain_batched_generate_images_per_s']:.2f}x")
