"""`blip2 serve`: requests batched across clients, and `blip2 caption --server` against a local run.

    python benchmarks/serve.py [--model DIR] [--device cpu] [--requests 64] [--concurrency 16]

1. A server process on a free loopback port (a tiny random OPT checkpoint unless
   --model is given). 64 chat completions (greedy, the 4 example images in turn)
   sent one by one, then 16 at a time: the rate of each, and every answer equal to
   its image's answer alone (the one-by-one run).
2. `blip2 caption --server URL` on the 4 images against `blip2 caption -m MODEL` (a
   fresh process each, wall clock): the same records, and the time of each.

Results: benchmarks/results/serve.json and serve.md, with the load average before
and after (the machine is shared: ratios are what hold).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random OPT one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve"))
    args = ap.parse_args()
    import httpx

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="blip2-serve-bench-"))
    model = args.model
    if model is None:
        from blip2cli.testing import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(tmp / "tiny-opt", "opt", seed=0))
    images = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))[:4]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BLIP2_SERVER", None)
    env.pop("BLIP2_API_KEY", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "blip2cli", "serve", "-m", model, "--device", args.device, "--port", str(port),
         "--max-batch-size", str(args.concurrency), "--batch-wait-ms", str(args.batch_wait_ms), "--quiet"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"blip2 serve exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        http = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=args.concurrency * 2))
        bodies = {p: {"model": "blip2", "temperature": 0, "max_tokens": args.max_tokens,
                      "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                  "image_url": {"url": data_url(p)}}]}]}
                  for p in images}
        jobs = [images[i % len(images)] for i in range(args.requests)]

        def ask(image: Path) -> tuple[Path, str]:
            reply = http.post("/v1/chat/completions", json=bodies[image])
            reply.raise_for_status()
            return image, reply.json()["choices"][0]["message"]["content"]

        for image in images:  # warm up: first calls build the captioner
            ask(image)
        t0 = time.perf_counter()
        alone = [ask(image) for image in jobs]
        serial_s = time.perf_counter() - t0
        answer = {image: text for image, text in alone}
        assert all(answer[image] == text for image, text in alone), "one image, two answers one by one"

        def metric(name: str) -> float:
            for line in http.get("/metrics").text.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
            return 0.0

        batches_before = metric("blip2_batch_size_count")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            together = list(pool.map(ask, jobs))
        concurrent_s = time.perf_counter() - t0
        batches = metric("blip2_batch_size_count") - batches_before
        equal = sum(answer[image] == text for image, text in together)

        # blip2 caption --server against a local run, a fresh process each
        common = [*map(str, images), "--num-beams", "1", "--max-new-tokens", str(args.max_tokens), "-f", "jsonl"]

        def run(cmd: list[str]) -> tuple[float, list[dict]]:
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
            took = time.perf_counter() - t
            if proc.returncode:
                raise SystemExit(f"{cmd[3:5]} failed: {proc.stderr[-2000:]}")
            return took, [json.loads(line) for line in proc.stdout.splitlines()]

        blip2 = [sys.executable, "-m", "blip2cli", "caption"]
        remote_runs = [run([*blip2, "--server", url, *common]) for _ in range(3)]
        local_runs = [run([*blip2, "-m", model, "--device", args.device, *common]) for _ in range(2)]
        remote_s, remote_records = min(remote_runs, key=lambda r: r[0])
        local_s, local_records = min(local_runs, key=lambda r: r[0])
        http.close()
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=120)
    load_after = os.getloadavg()
    n = args.requests
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model": model if args.model else "tiny random OPT (blip2cli.testing)", "device": args.device,
        "requests": n, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "batch_wait_ms": args.batch_wait_ms, "server_ready_s": round(ready_s, 2),
        "one_by_one_s": round(serial_s, 3), "one_by_one_rps": round(n / serial_s, 2),
        "concurrent_s": round(concurrent_s, 3), "concurrent_rps": round(n / concurrent_s, 2),
        "speedup": round(serial_s / concurrent_s, 2), "model_calls_concurrent": int(batches),
        "answers_equal_alone": f"{equal}/{n}",
        "client_caption_4_images_s": round(remote_s, 3), "local_caption_4_images_s": round(local_s, 3),
        "client_over_local": round(remote_s / local_s, 3), "client_records_equal_local": remote_records == local_records,
        "server_exit_code_after_sigterm": exit_code,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python benchmarks/serve.py" + ("" if args.device == "cpu" else f" --device {args.device}")
    md = [
        "# blip2 serve",
        "",
        f"Machine: {result['machine']}; device {args.device}; model: {result['model']}; "
        f"load average before {result['loadavg_before']}, after {result['loadavg_after']} (a shared machine).",
        f"Command: `{command}`",
        "",
        f"| {n} chat completions (greedy, {args.max_tokens} new tokens, 4 images in turn) | seconds | requests/s |",
        "|---|---|---|",
        f"| one by one | {result['one_by_one_s']} | {result['one_by_one_rps']} |",
        f"| {args.concurrency} at a time (batched across requests) | {result['concurrent_s']} | "
        f"{result['concurrent_rps']} |",
        "",
        f"Speed-up: **{result['speedup']}x**, in {result['model_calls_concurrent']} model calls; answers equal to "
        f"each image's answer alone: {result['answers_equal_alone']}.",
        "",
        "| `blip2 caption` on 4 images, a fresh process | seconds |",
        "|---|---|",
        f"| `--server URL` (no model load, no torch import) | {result['client_caption_4_images_s']} |",
        f"| local (`-m MODEL`) | {result['local_caption_4_images_s']} |",
        "",
        f"Client / local: **{result['client_over_local']}x**; records equal: "
        f"{result['client_records_equal_local']}. Server ready after {result['server_ready_s']} s; exit code after "
        f"SIGTERM: {exit_code}.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
