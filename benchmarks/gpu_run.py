"""The GPU measurements, one group of steps per process (``benchmarks/gpu.sh`` runs them).

    python3 benchmarks/gpu_run.py GROUP --work DIR [--deadline-s S]

GROUP is one of: decode, opt, t5, q8, q4, int8, serve. Each step runs the code ``blip2 bench`` runs
(``bench.run_config``: JPEG files -> pipeline -> JSON Lines records on disk, warm-up
excluded; ``bench.baseline``: transformers' documented per-image usage and one plain
batched ``generate`` on the same images) and appends its result to ``DIR/GROUP.json``
at once, so a group stopped by its ``timeout`` keeps the steps it finished. A step that
fails is recorded with its error and the group goes on. No step starts when less than
its estimate is left before ``--deadline-s`` (seconds from the group's start).

``BLIP2_GPU_SMOKE=1``: the same steps on the CPU with a tiny random checkpoint
(``blip2cli.testing``), a few small images and Pillow standing in for nvJPEG, so the
script is tested end to end without a GPU; its figures mean nothing.

The ``serve`` group starts ``blip2 serve`` on the saved opt-2.7b checkpoint as a
subprocess on a free loopback port, sends chat completions (data: URL JPEGs) all at
once and then one by one, and stops it with SIGTERM; the server is ended in every case
(the group's own SIGTERM from ``timeout`` included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SMOKE = os.environ.get("BLIP2_GPU_SMOKE") == "1"
GROUPS = ("decode", "opt", "t5", "q8", "q4", "int8", "serve")

# Sizes: (real run, smoke run).
N640 = (1024, 8)
N640_SMALL = (256, 4)
N12MP = (256, 4)
SIZE_12MP = ((4032, 3024), (1600, 1200))
BATCHES_640 = ((256, 512), (2, 4))
B12MP = (128, 2)
BEAM_BATCHES = ((64, 128), (2,))
T5_BATCHES = ((128, 256), (2,))
Q_BATCH = (256, 2)
COMPILE_BATCH = (256, 2)
AGREE_IMAGES = (64, 4)
SERVE_REQUESTS = (64, 8)


def pick(pair):
    return pair[1] if SMOKE else pair[0]


class Recorder:
    def __init__(self, work: Path, group: str, deadline_s: float):
        self.path = work / f"{group}.json"
        self.t0 = time.monotonic()
        self.deadline = deadline_s
        self.data = {"group": group, "smoke": SMOKE, "steps": []}
        self.save()

    def save(self):
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")

    def step(self, name: str, estimate_s: float, fn):
        left = self.deadline - (time.monotonic() - self.t0)
        if SMOKE:
            estimate_s *= 0.2  # tiny shapes
        if left < estimate_s:
            self.data["steps"].append({"step": name, "skipped": f"{left:.0f} s left, step needs about {estimate_s:.0f}"})
            self.save()
            print(f"[{name}] skipped: {left:.0f} s left", flush=True)
            return None
        print(f"[{name}] start ({left:.0f} s left)", flush=True)
        t = time.monotonic()
        try:
            result = fn()
            entry = {"step": name, "seconds": round(time.monotonic() - t, 1), **result}
        except Exception as exc:  # noqa: BLE001 - recorded, the next step still runs
            entry = {"step": name, "seconds": round(time.monotonic() - t, 1),
                     "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                     "traceback": traceback.format_exc()[-3000:]}
            print(entry["traceback"], file=sys.stderr, flush=True)
        self.data["steps"].append(entry)
        self.save()
        print(f"[{name}] done in {entry['seconds']} s" + (f": ERROR {entry['error']}" if "error" in entry else ""),
              flush=True)
        return entry


def image_set(work: Path, name: str, n: int, size) -> list[Path]:
    from blip2cli.bench import synthetic_images

    folder = work / "images" / name
    existing = sorted(folder.glob("*.jpg")) if folder.exists() else []
    if len(existing) >= n:
        return existing[:n]
    return synthetic_images(folder, n, size)


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def gen(tokens=20, beams=1, static=False):
    from blip2cli.caption import GenerationOptions

    g = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams, static_cache=static)
    g.validate()
    return g


def tiny_dir(work: Path, kind: str) -> Path:
    from blip2cli.testing import build_tiny_checkpoint

    folder = work / f"tiny-{kind}"
    if not (folder / "config.json").exists():
        build_tiny_checkpoint(folder, kind, seed=0)
    return folder


def build(work: Path, name: str, dtype: str, quantize: str = "none"):
    """opt-2.7b / flan-t5-xl with random weights (a tiny checkpoint in smoke mode);
    quantized: saved to disk once in float16 and loaded back through the loader."""
    from blip2cli.bench import from_config
    from blip2cli.loader import LoadOptions, load

    if SMOKE:
        folder = tiny_dir(work, "t5" if name.startswith("flan") else "opt")
        return load(LoadOptions(model=str(folder), device="cpu", dtype="bfloat16" if dtype != "float32" else dtype,
                                quantize=quantize))
    if quantize == "none":
        return from_config(name, device(), dtype)
    if quantize == "int8":  # torchao quantizes the model in memory, as the loader's TorchAoConfig does
        return from_config(name, device(), dtype, "int8")
    return load(LoadOptions(model=str(saved(work, name)), device=device(), dtype=dtype, quantize=quantize))


def saved(work: Path, name: str) -> Path:
    """The random-weights checkpoint of ``name`` saved once in float16 (``WORK/saved-NAME``):
    what the 8-/4-bit groups load back and what ``blip2 serve -m`` reads in the serve group."""
    from blip2cli.bench import from_config

    folder = work / f"saved-{name}"
    if not (folder / "config.json").exists():
        loaded = from_config(name, device(), "float16")
        loaded.model.save_pretrained(folder)
        loaded.processor.save_pretrained(folder)
        del loaded
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    return folder


def row_dict(row) -> dict:
    return asdict(row)


def e2e(loaded, paths, batches, g, work: Path, *, decode=True, qformer="half", base=False, workers=None,
        repeats=2, tag="run") -> dict:
    from blip2cli import gpudecode
    from blip2cli.bench import baseline, qformer_dtype, run_config, set_qformer_dtype
    from blip2cli.options import default_workers

    as_loaded = qformer_dtype(loaded.model)
    set_qformer_dtype(loaded, qformer)
    gpu_decode = decode and (SMOKE or gpudecode.available(loaded.device))
    out = work / "records" / tag
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_dict(run_config(loaded, "caption", paths, b, workers or default_workers(), g, repeats, 1, out, 0.0,
                                gpu_decode)) for b in batches]
    result = {"rows": rows, "decode": "gpu" if gpu_decode else "cpu"}
    if base:
        result["baseline"] = baseline(loaded, paths, g, max(batches), as_loaded)
        best = max(r["images_per_s"] for r in rows)
        result["ratio_vs_plain_batched"] = best / result["baseline"]["plain_batched_generate_images_per_s"]
        result["ratio_vs_documented"] = best / result["baseline"]["documented_per_image_images_per_s"]
    set_qformer_dtype(loaded, "float32" if str(as_loaded) == "torch.float32" else "half")
    return result


def with_stand_in():
    """Smoke mode: Pillow stands in for nvJPEG, on the CPU."""
    from blip2cli import gpudecode

    if SMOKE:
        gpudecode.nvjpeg_decoder = gpudecode.pillow_decoder


# -- groups ----------------------------------------------------------------------------
def group_decode(rec: Recorder, work: Path):
    """GPU JPEG decode against Pillow: pixel agreement and decode-only throughput."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import numpy as np
    import torch
    from PIL import Image

    from blip2cli import gpudecode
    from blip2cli.images import prepare
    from blip2cli.imagespec import ImageSpec

    with_stand_in()
    dev = torch.device(device())
    stage_loaded = SimpleNamespace(image_spec=ImageSpec(), device=dev, dtype=torch.float16)

    def oriented(paths, name):
        folder = work / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i, p in enumerate(paths):
            ex = Image.Exif()
            ex[0x0112] = (3, 6, 8, 2)[i % 4]
            q = folder / p.name
            with Image.open(p) as im:
                im.save(q, quality=90, exif=ex)
            out.append(q)
        return out

    def agreement(paths):
        stage = gpudecode.GpuImageStage(stage_loaded)
        gpu = stage.uint8_batch([stage.prepare(str(p)) for p in paths]).permute(0, 2, 3, 1).cpu().numpy()
        res = {"images": len(paths), "decoded_on_gpu": stage.counts["gpu"]}
        for label, fast in (("vs_pillow_draft", True), ("vs_pillow_full", False)):
            cpu = np.stack([prepare(str(p), ImageSpec(), fast=fast) for p in paths])
            d = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
            res[label] = {"max_abs": int(d.max()), "mean_abs": float(d.mean()),
                          "p99_abs": float(np.percentile(d, 99))}
        return res

    def throughput(paths, batch=64, threads=16):
        stage = gpudecode.GpuImageStage(stage_loaded)
        with ThreadPoolExecutor(threads) as pool:
            def gpu_pass():
                for k in range(0, len(paths), batch):
                    prepared = list(pool.map(lambda p: stage.prepare(str(p)), paths[k:k + batch]))
                    stage.uint8_batch(prepared)
                if dev.type == "cuda":
                    torch.cuda.synchronize()

            gpu_pass()  # warm-up: nvJPEG handles, kernels
            t = time.perf_counter()
            gpu_pass()
            gpu_s = time.perf_counter() - t
            t = time.perf_counter()
            list(pool.map(lambda p: prepare(str(p), ImageSpec(), fast=True), paths))
            cpu_s = time.perf_counter() - t
        return {"images": len(paths), "batch": batch, "threads": threads,
                "gpu_decode_resize_images_per_s": len(paths) / gpu_s,
                "pillow_draft_images_per_s": len(paths) / cpu_s}

    p640 = image_set(work, "640", pick(N640_SMALL), (640, 480))
    p12 = image_set(work, "12mp", pick(N12MP), pick(SIZE_12MP))
    rec.step("decode_agreement_640x480", 30, lambda: agreement(p640[:pick((64, 4))]))
    rec.step("decode_agreement_12mp", 40, lambda: agreement(p12[:pick((32, 2))]))
    rec.step("decode_agreement_exif_oriented", 20, lambda: agreement(oriented(p640[:pick((16, 4))], "oriented")))
    rec.step("decode_throughput_12mp", 40, lambda: throughput(p12))
    rec.step("decode_throughput_640x480", 30, lambda: throughput(p640))


def qformer_agreement(loaded, paths, batch: int) -> dict:
    """Greedy tokens with the Q-Former in float32 (as loaded) and in the model's half dtype."""
    import torch
    from PIL import Image

    from qformer_half import agreement, rel, run_model, set_qformer

    pics = [Image.open(p).convert("RGB") for p in paths]
    pixels = loaded.processor.image_processor(images=pics, return_tensors="pt").pixel_values
    model = loaded.model
    encdec = loaded.is_encoder_decoder
    runs = {}
    for name, dt in (("fp32", torch.float32), ("half", loaded.dtype)):
        set_qformer(model, dt)
        toks, qs = [], []
        for k in range(0, len(pixels), batch):
            t, q = run_model(model, pixels[k:k + batch], 20, encdec)
            toks += t
            qs.append(q)
        runs[name] = (toks, torch.cat(qs))
    set_qformer(model, torch.float32)
    return {"images": len(paths), "dtype": str(loaded.dtype).replace("torch.", ""),
            "half_vs_fp32_qformer": agreement(runs["half"][0], runs["fp32"][0]),
            "qformer_output_rel_diff": rel(runs["half"][1], runs["fp32"][1])}


def group_opt(rec: Recorder, work: Path):
    with_stand_in()
    p640 = image_set(work, "640", pick(N640), (640, 480))
    small = p640[:pick(N640_SMALL)]
    p12 = image_set(work, "12mp", pick(N12MP), pick(SIZE_12MP))
    holder = {}

    def load():
        t = time.perf_counter()
        holder["m"] = build(work, "opt-2.7b", "float16")
        import torch

        return {"build_s": time.perf_counter() - t, "dtype": str(holder["m"].dtype),
                "gpu_mb_after_build": torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None}

    if rec.step("build_opt_2.7b_fp16", 30, load) is None or "m" not in holder:
        return
    m = holder["m"]
    rec.step("e2e_640x480_greedy20_qformer_half", 60,
             lambda: e2e(m, p640, pick(BATCHES_640), gen(), work, base=True, tag="e2e"))
    rec.step("qformer_agreement_full_size", 30, lambda: qformer_agreement(m, small[:pick(AGREE_IMAGES)], 64))
    rec.step("12mp_gpu_decode", 30, lambda: e2e(m, p12, [pick(B12MP)], gen(), work, repeats=1, tag="12gpu"))
    rec.step("12mp_pillow_draft_16_workers", 30,
             lambda: e2e(m, p12, [pick(B12MP)], gen(), work, decode=False, workers=16, repeats=1, tag="12cpu"))
    rec.step("beam5", 50, lambda: e2e(m, small, pick(BEAM_BATCHES), gen(beams=5), work, base=True, repeats=1,
                                      tag="beam5"))
    rec.step("e2e_640x480_qformer_fp32", 20,
             lambda: e2e(m, p640, [max(pick(BATCHES_640))], gen(), work, qformer="float32", repeats=1, tag="q32"))
    rec.step("compile_static_cache", 90,
             lambda: e2e(m, small, [pick(COMPILE_BATCH)], gen(static=True), work, repeats=1, tag="compile"))


def group_t5(rec: Recorder, work: Path):
    with_stand_in()
    small = image_set(work, "640", pick(N640), (640, 480))[:pick(N640_SMALL)]
    holder = {}

    def load():
        t = time.perf_counter()
        holder["m"] = build(work, "flan-t5-xl", "bfloat16")
        return {"build_s": time.perf_counter() - t}

    if rec.step("build_flan_t5_xl_bf16", 40, load) is None or "m" not in holder:
        return
    rec.step("e2e_flan_t5_xl_bf16", 80,
             lambda: e2e(holder["m"], small, pick(T5_BATCHES), gen(), work, base=True, repeats=1, tag="t5"))


def group_quant(rec: Recorder, work: Path, bits: str):
    with_stand_in()
    small = image_set(work, "640", pick(N640), (640, 480))[:pick(N640_SMALL)]
    holder = {}
    # the CPU has no bitsandbytes: the save -> load route only; torchao (int8) runs on the CPU too
    quantize = "none" if SMOKE and bits != "int8" else bits

    def load():
        t = time.perf_counter()
        holder["m"] = build(work, "opt-2.7b", "float16", quantize)
        return {"build_s": time.perf_counter() - t, "quantize": holder["m"].quantize}

    if rec.step(f"build_opt_2.7b_{bits}", 90, load) is None or "m" not in holder:
        return
    rec.step(f"e2e_640x480_{bits}", 60,
             lambda: e2e(holder["m"], small, [pick(Q_BATCH)], gen(), work, repeats=1, tag=bits))


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # the server's preexec: a SIGKILLed group leaves no server behind
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the finally and the process group still end it
        pass


def batch_histogram(metrics: str) -> dict:
    """``blip2_batch_size`` of a /metrics text: {"le": cumulative count, ..., "sum", "count"}."""
    out: dict = {}
    for line in metrics.splitlines():
        if line.startswith("blip2_batch_size_bucket{"):
            out[line.split('le="')[1].split('"')[0]] = int(float(line.split()[-1]))
        elif line.startswith(("blip2_batch_size_sum ", "blip2_batch_size_count ")):
            out[line.split()[0].rsplit("_", 1)[1]] = float(line.split()[-1])
    return out


def batch_sizes(before: dict, after: dict) -> dict:
    """The model calls between two /metrics readings: how many, images, mean batch size, and
    how many calls fell in each histogram bucket (batch size <= le)."""
    calls = int(after.get("count", 0) - before.get("count", 0))
    images = after.get("sum", 0) - before.get("sum", 0)
    buckets, below = {}, 0
    for le, n in after.items():
        if le in ("sum", "count"):
            continue
        here = n - before.get(le, 0)
        if here - below:
            buckets[f"<={le}"] = here - below
        below = here
    return {"model_calls": calls, "images": int(images), "mean_batch": images / calls if calls else None,
            "calls_by_batch_size": buckets}


def group_serve(rec: Recorder, work: Path, model: str | None = None, requests: int | None = None):
    """``blip2 serve`` under N concurrent chat completions, then the same N one by one."""
    import base64
    import signal
    import subprocess
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    n = requests or pick(SERVE_REQUESTS)
    paths = image_set(work, "640", max(n, pick(N640_SMALL)), (640, 480))[:n]
    urls = ["data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode() for p in paths]
    holder: dict = {}
    dtype = "float32" if SMOKE else "float16"
    max_batch = max(n, 1) if SMOKE else 64

    def checkpoint():
        t = time.perf_counter()
        holder["model"] = model or str(tiny_dir(work, "opt") if SMOKE else saved(work, "opt-2.7b"))
        return {"checkpoint": holder["model"], "seconds_to_save": time.perf_counter() - t}

    if model is None and rec.step("checkpoint_opt_2.7b_fp16", 40, checkpoint) is None:
        return
    if model is not None:
        holder["model"] = model
    if "model" not in holder:
        return
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    cmd = [sys.executable, "-m", "blip2cli", "serve", "-m", holder["model"], "--device", device(),
           "--dtype", dtype, "--port", str(port), "--max-batch-size", str(max_batch), "--batch-wait-ms", "20",
           "--max-queue", str(max(256, 4 * n)), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("BLIP2_API_KEY", None)
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to ask the hub (the device has no network)
    proc = None

    def on_term(signum, frame):  # `timeout` stops the group: end the server on the way out
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)

    def get(path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def chat(url: str) -> dict:
        body = {"model": "blip2", "temperature": 0, "max_tokens": 20, "min_tokens": 20,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        left = max(5.0, rec.deadline - (time.monotonic() - rec.t0))
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=left) as r:
            got = json.loads(r.read())
        return {"text": got["choices"][0]["message"]["content"], "tokens": got["usage"]["completion_tokens"]}

    try:
        def start():
            nonlocal proc
            t = time.perf_counter()
            with open(log, "wb") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT,
                                        preexec_fn=_die_with_parent)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"blip2 serve exited with {proc.returncode} before /health said ok: "
                                       + log.read_text(errors="replace")[-1500:])
                try:
                    if get("/health", 2)[0] == 200:
                        break
                except (OSError, urllib.error.URLError):
                    pass
                if time.monotonic() - rec.t0 > rec.deadline - 20:
                    raise RuntimeError("blip2 serve did not become ready in time: "
                                       + log.read_text(errors="replace")[-1500:])
                time.sleep(0.25)
            ready_s = time.perf_counter() - t
            # warm-up, not timed: one request alone, then all at once (kernels, allocator, batch shapes)
            chat(urls[0])
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(chat, urls))
            return {"command": " ".join(cmd[1:]).replace(holder["model"], "CHECKPOINT"),
                    "start_to_health_ok_s": ready_s, "warmup_s": time.perf_counter() - t - ready_s}

        if rec.step("serve_start", 40, start) is None or proc is None or proc.poll() is not None:
            return
        answers: dict = {}

        def concurrent():
            before = batch_histogram(get("/metrics")[1])
            t = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                answers["concurrent"] = list(pool.map(chat, urls))
            seconds = time.perf_counter() - t
            sizes = batch_sizes(before, batch_histogram(get("/metrics")[1]))
            return {"requests": n, "concurrency": n, "images_per_s": n / seconds, "wall_s": seconds,
                    "tokens_per_s": sum(a["tokens"] for a in answers["concurrent"]) / seconds,
                    "server_max_batch_size": max_batch, "batch_wait_ms": 20, "server_batches": sizes}

        def one_by_one():
            before = batch_histogram(get("/metrics")[1])
            t = time.perf_counter()
            done = answers["sequential"] = []
            for u in urls:  # stops early, 10 s before the deadline, to leave time for the SIGTERM step
                if rec.deadline - (time.monotonic() - rec.t0) < 10:
                    break
                done.append(chat(u))
            seconds = time.perf_counter() - t
            sizes = batch_sizes(before, batch_histogram(get("/metrics")[1]))
            result = {"requests": len(done), "concurrency": 1, "images_per_s": len(done) / seconds,
                      "wall_s": seconds, "tokens_per_s": sum(a["tokens"] for a in done) / seconds,
                      "server_batches": sizes}
            if len(done) < n:
                result["stopped_early"] = f"{len(done)} of {n} sent before the group's deadline"
            if "concurrent" in answers:
                pairs = list(zip(answers["concurrent"], answers["sequential"]))
                equal = sum(a["text"] == b["text"] for a, b in pairs)
                result["answers_equal"] = f"{equal}/{len(pairs)}"
                result["all_answers_equal"] = equal == len(pairs)
                result["differing"] = [{"image": paths[i].name, "concurrent": a["text"], "one_by_one": b["text"]}
                                       for i, (a, b) in enumerate(pairs) if a["text"] != b["text"]][:5]
            return result

        rec.step(f"serve_{n}_concurrent_chat", 15, concurrent)
        rec.step(f"serve_{n}_one_by_one_chat", 15, one_by_one)

        def stop():
            t = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=max(5.0, min(30.0, rec.deadline - (time.monotonic() - rec.t0) - 3)))
            return {"exit_code_after_sigterm": code, "stop_s": time.perf_counter() - t,
                    "log_tail": log.read_text(errors="replace")[-500:] if code else ""}

        rec.step("serve_sigterm", 0, stop)
    finally:
        if proc is not None and proc.poll() is None:  # the step did not stop it (error, timeout, a signal)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("group", choices=GROUPS)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip2-gpu"))
    ap.add_argument("--deadline-s", type=float, default=300)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if SMOKE:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from blip2cli.loader import quiet_libraries

    quiet_libraries()
    rec = Recorder(work, args.group, args.deadline_s)
    if args.group == "decode":
        group_decode(rec, work)
    elif args.group == "opt":
        group_opt(rec, work)
    elif args.group == "t5":
        group_t5(rec, work)
    elif args.group == "serve":
        group_serve(rec, work)
    else:
        group_quant(rec, work, {"q8": "8bit", "q4": "4bit", "int8": "int8"}[args.group])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
