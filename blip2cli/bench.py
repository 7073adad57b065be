"""``blip2 bench``: time the real pipeline on this machine, stage by stage.

Not a second code path: each configuration runs ``pipeline.run`` with the same tasks
``caption``/``ask``/``embed`` use, from JPEG files to JSON Lines records on disk. What
it adds is measurement: forward hooks time the vision tower, the Q-Former and the
language model (with a CUDA synchronise around each on a GPU), ``language_model.generate``
is wrapped to count generated tokens, and the pipeline's own stats give the decode,
per-batch and write times. Warm-up batches are run first and not counted.

``--from-config NAME`` builds a known architecture with random weights and no download
(its text is meaningless); ``--baseline`` also times transformers' documented per-image
usage and one plain batched ``generate`` on the same images.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError

KNOWN_CONFIGS = ("opt-2.7b", "opt-6.7b", "flan-t5-xl", "flan-t5-xxl")
TASKS = ("caption", "ask", "embed")
BENCH_QUESTION = "what is in the picture?"


@dataclass
class BenchRow:
    task: str
    model: str
    device: str
    dtype: str
    quantize: str
    batch_size: int
    images: int
    repeats: int
    load_s: float
    seconds: float  # median over repeats, whole run (files -> records on disk)
    images_per_s: float
    tokens_per_s: float | None
    batch_p50_ms: float | None
    batch_p95_ms: float | None
    stages_s: dict = field(default_factory=dict)  # per image-set run, medians
    peak_cpu_mb: float = 0.0
    peak_gpu_mb: float | None = None
    note: str = ""
    warmup_s: float | None = None  # the untimed warm-up run (with --compile: the first-call cost)
    decode: str = "cpu"  # where JPEGs were decoded: cpu (Pillow, draft) or gpu (nvJPEG)
    qformer_dtype: str = ""  # the Q-Former's parameter dtype during the run


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"size={text!r}: expected WIDTHxHEIGHT, e.g. 640x480", params=["size"]) from None
    if w < 1 or h < 1 or w * h > 100_000_000:
        raise UsageError(f"size={text!r}: out of range", params=["size"])
    return w, h


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"batch_size={text!r}: expected numbers separated by commas, e.g. 1,8,32",
                         params=["batch_size"]) from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError("batch_size: each size must be at least 1", params=["batch_size"])
    return sizes


def synthetic_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """N distinct JPEG files (a real photo, resized, with different noise): quality 90.

    Written by a thread per core (Pillow's encoder releases the GIL): 256 12-megapixel
    files take seconds on a 16-core machine, not minutes."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    here = Path(__file__).resolve().parent.parent / "examples" / "images" / "rocket.jpg"
    if here.exists():
        base = Image.open(here).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    else:  # installed without the examples: a gradient
        x = np.linspace(0, 255, size[0], dtype=np.float32)
        y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None]
        base = Image.fromarray(np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], -1).astype("uint8"))
    arr = np.asarray(base, dtype=np.int16)
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> Path:
        rng = np.random.default_rng(i)
        noisy = (arr + rng.integers(-10, 11, size=arr.shape, dtype=np.int16)).clip(0, 255).astype("uint8")
        path = folder / f"synthetic-{i:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        return path

    with ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1))) as pool:
        return list(pool.map(write, range(n)))


# -- stage timing ----------------------------------------------------------------
class StageTimer:
    """Forward hooks on the model's parts; counts tokens out of language_model.generate."""

    PARTS = {"vision": "vision_model", "qformer": "qformer", "language_model": "language_model"}

    def __init__(self, model, device):
        import torch

        self.model = model
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.seconds = {k: 0.0 for k in self.PARTS}
        self.tokens = 0
        self._starts: dict[str, float] = {}
        self._handles = []
        for name, attr in self.PARTS.items():
            module = getattr(model, attr, None)
            if module is None:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        self._lm = getattr(model, "language_model", None)
        self._generate = None
        if self._lm is not None and hasattr(self._lm, "generate"):
            self._generate = self._lm.generate
            encdec = bool(getattr(self._lm.config, "is_encoder_decoder", False))

            def counted(*args, **kwargs):
                out = self._generate(*args, **kwargs)
                ids = kwargs.get("input_ids")
                width = 1 if encdec else (ids.shape[1] if ids is not None else 0)
                self.tokens += int(out.shape[0]) * max(0, int(out.shape[1]) - width)
                return out

            self._lm.generate = counted
        self._torch = torch

    def _sync(self):
        if self.cuda:
            self._torch.cuda.synchronize()

    def _pre(self, name):
        def hook(module, args):
            self._sync()
            self._starts[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self._sync()
            self.seconds[name] += time.perf_counter() - self._starts.pop(name, time.perf_counter())

        return hook

    def reset(self):
        self.seconds = {k: 0.0 for k in self.PARTS}
        self.tokens = 0

    def close(self):
        for h in self._handles:
            h.remove()
        if self._generate is not None:
            self._lm.generate = self._generate


# -- models ----------------------------------------------------------------------
def from_config(name: str, device: str, dtype: str, quantize: str = "none"):
    """A known architecture with random weights, built in memory: no download, no disk.

    ``quantize``: ``int8`` quantizes the built model as ``load`` would (torchao's int8
    weight-only layers); bitsandbytes' 8bit/4bit need a checkpoint on disk."""
    if name not in KNOWN_CONFIGS:
        raise UsageError(f"from_config={name!r}: unknown", hint=f"one of {', '.join(KNOWN_CONFIGS)}",
                         params=["from_config"])
    if quantize not in ("none", "int8"):
        raise UsageError(f"quantize={quantize!r} needs real weights to quantize (bitsandbytes quantizes "
                         "while loading a checkpoint)", hint="drop from_config, or use quantize='int8'",
                         params=["quantize", "from_config"])
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from .imagespec import ImageSpec
    from .loader import (
        Checkpoint,
        LoadedModel,
        LoadOptions,
        import_model_libraries,
        quantization_config,
        resolve_device,
    )
    from .testing import build_tiny_checkpoint

    import_model_libraries(quantize)

    kind = "t5" if name.startswith("flan") else "opt"
    tmp = Path(tempfile.mkdtemp(prefix="blip2-bench-"))
    processor = Blip2Processor.from_pretrained(build_tiny_checkpoint(tmp, kind))
    processor.num_query_tokens = 32
    tok = processor.tokenizer
    if kind == "opt":
        from transformers import OPTConfig

        hidden, ffn = {"opt-2.7b": (2560, 10240), "opt-6.7b": (4096, 16384)}[name]
        text = OPTConfig(vocab_size=50272, hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=ffn,
                         num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("\u010a"),
                         pad_token_id=tok.pad_token_id)
    else:
        from transformers import T5Config

        d_model, d_ff, heads = {"flan-t5-xl": (2048, 5120, 32), "flan-t5-xxl": (4096, 10240, 64)}[name]
        text = T5Config(vocab_size=32128,  # type: ignore[call-arg, assignment]  # T5Config takes **kwargs d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=24,
                        num_decoder_layers=24, num_heads=heads, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                        bos_token_id=1)
    # The vision and Q-Former defaults of transformers are BLIP-2's ViT-g/14 and Q-Former.
    config = Blip2Config(text_config=text.to_dict(), num_query_tokens=32,
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    dev = resolve_device(device)
    torch_dtype = {"auto": torch.float16 if dev.type == "cuda" and kind == "opt" else
                   (torch.bfloat16 if dev.type == "cuda" else torch.float32),
                   "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    from .console import status

    status(f"building {name} with random weights ({str(torch_dtype).replace('torch.', '')}, {dev}), "
           "no download: this takes a while for the larger shapes…")
    quantization_config(quantize, torch_dtype, dev)  # torchao installed, the device able: else a clear error
    model = build_random(Blip2ForConditionalGeneration, config, torch_dtype, dev)
    if quantize == "int8":
        from .loader import quantize_int8_in_place

        quantize_int8_in_place(model)
    ckpt = Checkpoint(f"config:{name}", None, config.to_dict(), "Blip2ForConditionalGeneration", kind)
    return LoadedModel(model=model, processor=processor, tokenizer=tok, checkpoint=ckpt, device=dev,
                       dtype=torch_dtype, quantize=quantize,
                       options=LoadOptions(model=f"config:{name}", quantize=quantize),
                       image_spec=ImageSpec.from_dict(processor.image_processor.to_dict()))


def build_random(cls, config, dtype, device):
    """``cls`` with random weights, each parameter created in ``dtype`` on ``device``.

    Not built in float32 and converted after: that held a float32 copy (twice the
    bfloat16 weights) and made bench's peak-memory figure a lie (15.2 GB for
    opt-2.7b in bfloat16, whose weights are 7.7 GB). Under float16 the modules
    transformers keeps in float32 when loading (BLIP-2's Q-Former and query tokens)
    are kept in float32 here too, so the model is the one ``load`` would give."""
    import torch

    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    if dtype == torch.float16 and keep:
        for name, param in model.named_parameters():
            if any(part in keep for part in name.split(".")):
                param.data = param.data.float()
    return model.eval()


QFORMER_DTYPES = ("auto", "float32", "half")


def qformer_dtype(model):
    """The dtype of the Q-Former's parameters (None when the model has none)."""
    qformer = getattr(model, "qformer", None)
    if qformer is None:
        return None
    return next(qformer.parameters()).dtype


def set_qformer_dtype(loaded, mode: str):
    """``--qformer-dtype``: ``auto`` leaves the model as loaded (transformers keeps the
    Q-Former and the query tokens in float32 under float16, in bfloat16 under bfloat16);
    ``float32`` puts them in float32; ``half`` in the model's compute dtype (float16 or
    bfloat16; a float32 model is left as it is). Returns the dtype the Q-Former then has."""
    import torch

    if mode not in QFORMER_DTYPES:
        raise UsageError(f"qformer_dtype={mode!r}: use one of {', '.join(QFORMER_DTYPES)}", params=["qformer_dtype"])
    model = loaded.model
    if mode == "auto" or getattr(model, "qformer", None) is None:
        return qformer_dtype(model)
    target = torch.float32 if mode == "float32" else loaded.dtype
    model.qformer.to(target)
    query = getattr(model, "query_tokens", None)
    if query is not None:
        query.data = query.data.to(target)
    return target


def make_task(task: str, loaded, gen, batch_size: int, gpu_decode: bool = False):
    """The pipeline task ``task`` uses; with ``gpu_decode`` its image stage decodes JPEGs
    on the GPU (``gpudecode.GpuImageStage``, same contract as ``ImageStage``)."""
    made = _make_task(task, loaded, gen, batch_size)
    if gpu_decode:
        from .gpudecode import GpuImageStage

        made.stage = GpuImageStage(loaded)
    return made


def _make_task(task: str, loaded, gen, batch_size: int):
    from .images import ImageStage

    stage_kind = "fast"
    if task == "caption":
        from .caption import CaptionTask, Captioner

        return CaptionTask(loaded, Captioner(loaded, gen), stage_kind)
    if task == "ask":
        from .ask import PAIRS_PER_IMAGE, AskTask, Asker

        return AskTask(Asker(loaded, gen, pairs_per_call=batch_size * PAIRS_PER_IMAGE),
                       ImageStage(loaded, stage_kind), [BENCH_QUESTION], "Question: {question} Answer:")
    from .embed import Embedder, EmbedTask

    return EmbedTask(loaded, Embedder(loaded, "auto", "none"), stage_kind)


class _NullWriter:
    def write(self, record):
        pass


def run_config(loaded, task_name: str, paths: list[Path], batch_size: int, workers: int, gen,
               repeats: int, warmup: int, out_dir: Path, load_s: float, gpu_decode: bool = False) -> BenchRow:
    """Warm up, then run the real pipeline ``repeats`` times over all images."""
    import torch

    from .caption import caption_schema
    from .pipeline import run
    from .sources import Item
    from .writers import Sink, make_writer

    task = make_task(task_name, loaded, gen, batch_size, gpu_decode)
    timer = StageTimer(loaded.model, loaded.device)
    items = [Item(name=str(p), source=str(p)) for p in paths]
    warmup_s = None
    try:
        if warmup:
            t0 = time.perf_counter()
            run(items[: batch_size * warmup], task, _NullWriter(), batch_size=batch_size, workers=workers)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for r in range(repeats):
            timer.reset()
            out = out_dir / f"{task_name}-b{batch_size}-r{r}.jsonl"
            sink = Sink(str(out)).open()
            try:
                writer = make_writer("jsonl", sink, caption_schema(1))
                t0 = time.perf_counter()
                stats = run(items, task, writer, batch_size=batch_size, workers=workers)
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            finally:
                sink.close()
            if stats.failed:
                raise UsageError(f"bench: {stats.failed} images failed; see {out}")
            runs.append((wall, stats, dict(timer.seconds), timer.tokens))
    finally:
        timer.close()
    runs.sort(key=lambda r: r[0])
    wall, stats, parts, tokens = runs[len(runs) // 2]
    batches = sorted(s for _, st, _, _ in runs for s in st.batch_seconds)

    def pct(q):
        return 1000 * batches[min(len(batches) - 1, int(q * len(batches)))] if batches else None

    stages = {
        "decode+preprocess (worker threads, summed)": stats.stage_seconds["decode"],
        "waiting for decode (main thread)": stats.stage_seconds["wait_decode"],
        "vision": parts["vision"],
        "qformer": parts["qformer"],
        "language_model": parts["language_model"],
        "write": stats.stage_seconds["write"],
    }
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if loaded.device.type == "cuda" else None
    describe = getattr(getattr(task, "stage", None), "describe", None)
    return BenchRow(
        task=task_name, model=loaded.options.model, device=str(loaded.device),
        dtype=str(loaded.dtype).replace("torch.", ""), quantize=loaded.quantize, batch_size=batch_size,
        images=len(paths), repeats=repeats, load_s=load_s, seconds=wall, images_per_s=len(paths) / wall,
        tokens_per_s=(tokens / wall) if tokens else None, batch_p50_ms=pct(0.5), batch_p95_ms=pct(0.95),
        stages_s=stages, peak_cpu_mb=_peak_rss_mb(), peak_gpu_mb=peak_gpu,
        note=describe() if describe else "", warmup_s=warmup_s, decode="gpu" if gpu_decode else "cpu",
        qformer_dtype=str(qformer_dtype(loaded.model)).replace("torch.", ""),
    )


def baseline(loaded, paths: list[Path], gen, batch_size: int, qformer_as_loaded=None) -> dict:
    """transformers' documented per-image usage, and one plain batched generate, same images.

    Plain means as documented: a dynamic KV cache (``--compile``'s static cache is
    dropped) and the Q-Former in the dtype the model was loaded with
    (``qformer_as_loaded``, put back for the baseline if ``--qformer-dtype`` changed it)."""
    import torch
    from PIL import Image

    processor, model = loaded.processor, loaded.model
    kwargs = gen.generate_kwargs()
    kwargs.pop("cache_implementation", None)
    if qformer_as_loaded is not None and qformer_dtype(model) != qformer_as_loaded:
        set_qformer_dtype(loaded, "float32" if qformer_as_loaded == torch.float32 else "half")
    n = min(len(paths), max(8, min(batch_size, 16)))  # its rate settles fast; 2 images/s on a GPU
    t0 = time.perf_counter()
    for p in paths[:n]:
        inputs = processor(images=Image.open(p).convert("RGB"), return_tensors="pt").to(loaded.device, loaded.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        processor.batch_decode(out, skip_special_tokens=True)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    per_image = n / (time.perf_counter() - t0)

    pixels = processor.image_processor(images=[Image.open(p).convert("RGB") for p in paths[:batch_size]],
                                       return_tensors="pt").pixel_values.to(loaded.device, loaded.dtype)
    with torch.inference_mode():
        model.generate(pixel_values=pixels[:1], **kwargs)  # warm-up
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(pixel_values=pixels, **kwargs)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
    batched = len(pixels) / (time.perf_counter() - t0)
    return {"documented_per_image_images_per_s": per_image, "documented_images": n,
            "plain_batched_generate_images_per_s": batched, "plain_batch": len(pixels)}


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rows_to_json(rows: list[BenchRow], meta: dict, baselines: dict | None) -> str:
    return json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "baseline": baselines}, indent=1)


def environment(args: dict) -> dict:
    import platform

    import torch
    import transformers

    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "blip2": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **args,
    }
