"""The ``--server`` client against a stand-in server (standard library HTTP, no model):
the runner's guarantees when the server fails part way."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import cli, jsonl


class StandIn:
    """Answers /v1/blip2/info and caption requests (made-up captions); after ``fail_after``
    caption requests every further one gets a 500."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls = 0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.answer(200, {"model": "stand-in", "ready": True, "settings": {"model": "stand-in"},
                                  "max_body_bytes": 64 << 20, "max_batch_size": 4, "max_queue": 64})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    stand_in.calls += 1
                    failing = stand_in.fail_after is not None and stand_in.calls > stand_in.fail_after
                if failing:
                    self.answer(500, {"error": {"message": "the model fell over", "type": "server_error"}})
                    return
                self.answer(200, {"records": [
                    {"path": e["name"], "caption": f"size {len(e['data'])}", "captions": [f"size {len(e['data'])}"],
                     "error": None, "model": "stand-in"} for e in request["images"]]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def folder(tmp_path, example_images):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        src = example_images[i % len(example_images)]
        (photos / f"{i:03d}{src.suffix}").write_bytes(src.read_bytes())
    return photos


def test_a_server_failing_part_way_leaves_whole_records_and_says_resume(folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    failing = StandIn(fail_after=3)
    try:
        result = cli("caption", folder, "--server", failing.url, "-b", "4", "-o", out)
    finally:
        failing.close()
    assert result.exit_code == 1, result.output
    assert "answered 500" in result.output and "--resume" in result.output and "whole" in result.output
    written = jsonl(out.read_text())
    assert out.read_bytes().endswith(b"\n") and 0 < len(written) < 24
    assert [r["path"] for r in written] == [str(p) for p in sorted(folder.iterdir())][:len(written)]
    working = StandIn()
    try:
        result = cli("caption", folder, "--server", working.url, "-b", "4", "-o", out, "--resume")
    finally:
        working.close()
    assert result.exit_code == 0, result.output
    records = jsonl(out.read_text())
    assert [r["path"] for r in records] == [str(p) for p in sorted(folder.iterdir())]  # each once, in order
