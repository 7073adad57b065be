"""`blip2 caption --server`: batches sent ahead (pipelined) against one batch at a time.

    python benchmarks/client_overlap.py [--images 256] [--latency-ms 200] [--repeats 3]

The server is a stand-in (standard library HTTP, every request answered after
``--latency-ms``, captions made up): what is measured is the client, i.e. how much
of a remote server's time per batch (network and model) the client hides by keeping
the next batches in flight (``RemoteStage.in_flight``, 2) while it writes the last
one, against ``in_flight = 0`` (the pipeline waits for each batch). Both run in this
process, interleaved, best of ``--repeats``; the records of both are compared.

Results: benchmarks/results/client_overlap.json and .md, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGES = ROOT / "examples" / "images"


def fake_server(latency: float) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer({"model": "stand-in", "ready": True, "settings": {}, "max_body_bytes": 64 << 20,
                         "max_batch_size": 16, "max_queue": 256})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            self.answer({"records": [{"path": e["name"], "caption": f"a photo {len(e.get('data', ''))}",
                                      "captions": [f"a photo {len(e.get('data', ''))}"], "error": None}
                                     for e in request["images"]]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from typer.testing import CliRunner

    from blip2cli import client
    from blip2cli.cli import app

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp())
    photos = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))
    folder = work / "photos"
    folder.mkdir()
    for i in range(args.images):
        shutil.copy(photos[i % len(photos)], folder / f"{i:05d}{photos[i % len(photos)].suffix}")
    server, url = fake_server(args.latency_ms / 1000)
    runner = CliRunner()
    times: dict[str, list[float]] = {"one batch at a time": [], "batches sent ahead": []}
    outputs: dict[str, bytes] = {}
    try:
        for _ in range(args.repeats):
            for name, ahead in (("one batch at a time", 0), ("batches sent ahead", 2)):
                client.RemoteStage.in_flight = ahead
                out = work / f"{ahead}.jsonl"
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()
                result = runner.invoke(app, ["caption", str(folder), "--server", url, "-q", "-o", str(out)])
                times[name].append(time.perf_counter() - t0)
                assert result.exit_code == 0, result.output
                outputs[name] = out.read_bytes()
    finally:
        client.RemoteStage.in_flight = 2
        server.shutdown()
        shutil.rmtree(work)
    best = {name: min(ts) for name, ts in times.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "images": args.images, "latency_ms": args.latency_ms, "repeats": args.repeats,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "best_s": {name: round(t, 3) for name, t in best.items()},
        "speedup": round(best["one batch at a time"] / best["batches sent ahead"], 2),
        "records_equal": len(set(outputs.values())) == 1,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "client_overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "client_overlap.md").write_text(
        "# `--server`: batches sent ahead\n\n"
        f"Machine: {result['machine']}; load average before {result['loadavg_before']}, after "
        f"{result['loadavg_after']}.\nCommand: `python benchmarks/client_overlap.py --images {args.images} "
        f"--latency-ms {args.latency_ms:g} --repeats {args.repeats}` (a stand-in server answering each request "
        f"after {args.latency_ms:g} ms: the client is what is measured).\n\n"
        "| client | best of runs (s) | runs (s) |\n|---|---|---|\n"
        + "".join(f"| {name} | {best[name]} | {', '.join(map(str, result['seconds'][name]))} |\n" for name in times)
        + f"\nSpeed-up: **{result['speedup']}x**; records equal: {result['records_equal']}.\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
