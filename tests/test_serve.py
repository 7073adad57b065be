"""``blip2 serve`` through real HTTP clients against a real server process.

One server per module (a tiny OPT checkpoint, a key, a small body limit, a folder
it may read), started on a free loopback port and stopped at the end; the unit tests
at the bottom need no server. Every result is compared with what the CLI writes
locally for the same images and options.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import cli, jsonl

KEY = "test-key-0123456789"
ROOT = Path(__file__).resolve().parents[1]
MAX_BODY_MB = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc, url: str, log: Path, allowed: Path, model: Path):
        self.proc, self.url, self.log, self.allowed, self.model = proc, url, log, allowed, model

    def headers(self, key: str | None = KEY) -> dict:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body, *, key: str | None = KEY, timeout: float = 120, **kw):
        import httpx

        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **self.headers(key), **kw.pop("headers", {})}
        return httpx.post(self.url + path, content=data, headers=headers, timeout=timeout, **kw)

    def get(self, path: str, *, key: str | None = KEY):
        import httpx

        return httpx.get(self.url + path, headers=self.headers(key), timeout=30)

    def metric(self, name: str) -> float:
        text = self.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not in /metrics")


def start_server(model: Path, log: Path, *args: str, key: str | None = KEY) -> tuple[subprocess.Popen, str]:
    """``blip2 serve -m MODEL ARGS`` on a free loopback port, once /health answers 200."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("BLIP2_SERVER", None)
    env.pop("BLIP2_API_KEY", None)
    if key:
        env["BLIP2_API_KEY"] = key
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blip2cli", "serve", "-m", str(model), "--device", "cpu", "--port", str(port), *args],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"blip2 serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("blip2 serve did not become ready: " + log.read_text()[-2000:])
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def served(tiny_opt, tmp_path_factory, example_images):
    """``blip2 serve`` on the tiny OPT checkpoint; torn down (SIGTERM) at the end of the module."""
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "cat.png").write_bytes(example_images[0].read_bytes())
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(example_images[1].read_bytes())
    (allowed / "link.png").symlink_to(outside / "secret.png")
    log = tmp_path_factory.mktemp("log") / "serve.err"
    proc, url = start_server(tiny_opt, log, "--batch-wait-ms", "30", "--max-batch-size", "16",
                             "--max-body-mb", str(MAX_BODY_MB), "--allow-files", str(allowed))
    yield Served(proc, url, log, allowed, tiny_opt)
    stop_server(proc)


def data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def chat_body(image: Path | str, text: str | None = None, **options) -> dict:
    url = image if isinstance(image, str) else data_url(image)
    content = ([{"type": "text", "text": text}] if text else []) + [{"type": "image_url", "image_url": {"url": url}}]
    return {"model": "blip2", "messages": [{"role": "user", "content": content}], **options}


def local(*args) -> list[dict]:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return jsonl(result.stdout)


GREEDY = ["--num-beams", "1", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def local_captions(tiny_opt, example_images) -> dict:
    records = local("caption", "-m", tiny_opt, "--device", "cpu", *example_images, *GREEDY, "-f", "jsonl")
    return {r["path"]: r["caption"] for r in records}


QUESTION = "what is in the picture?"


@pytest.fixture(scope="module")
def local_answers(tiny_opt, example_images) -> dict:
    records = local("ask", "-m", tiny_opt, "--device", "cpu", *example_images, QUESTION, *GREEDY, "-f", "jsonl")
    return {r["path"]: r["answer"] for r in records}


# -- OpenAI compatibility -------------------------------------------------------------------
@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_openai_client_caption_and_answer_equal_the_cli(served, example_images, local_captions, local_answers):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    models = client.models.list()
    assert len(models.data) == 1
    model = models.data[0].id
    assert local_captions and len(set(local_captions.values())) > 1  # the images are told apart
    for image in example_images:
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}])
        assert reply.choices[0].message.content == local_captions[str(image)]
        assert reply.usage.completion_tokens >= 1
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.choices[0].finish_reason in ("stop", "length")
        answer = client.chat.completions.create(
            model=model, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                   {"type": "image_url", "image_url": {"url": data_url(image)}}]}])
        assert answer.choices[0].message.content == local_answers[str(image)]
        # The prompt holds the question (template included) after the image tokens.
        assert answer.usage.prompt_tokens > reply.usage.prompt_tokens
    # stream: true gives the same text as server-sent events, usage last when asked for
    chunks = list(client.chat.completions.create(
        model=model, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == local_captions[str(image)]
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_a_conversation_carries_its_turns_as_blip2_chat_does(served, tiny_opt, example_images):
    import blip2cli

    image = example_images[3]
    chat = blip2cli.load(tiny_opt, device="cpu").chat(image, num_beams=1, max_new_tokens=8)
    questions = ["what is it?", "what color is it?", "where is it?"]
    messages: list = []
    for i, question in enumerate(questions):
        want = chat.ask(question)
        content = [{"type": "text", "text": question}]
        if i == 0:
            content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
        messages.append({"role": "user", "content": content})
        got = served.post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 8})
        assert got.status_code == 200, got.text
        answer = got.json()["choices"][0]["message"]["content"]
        assert answer == want, (i, answer, want)
        messages.append({"role": "assistant", "content": answer})
    assert len(chat.history) >= 2  # later turns did carry earlier ones
    alone = [served.post("/v1/chat/completions", chat_body(image, q, temperature=0, max_tokens=8)).json()
             ["choices"][0]["message"]["content"] for q in questions[1:]]
    assert alone != [m["content"] for m in messages[3::2]], "the turns made no difference: the test proves nothing"


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_n_and_beams_map_onto_the_cli_options(served, tiny_opt, example_images):
    image = example_images[1]
    got = served.post("/v1/chat/completions", chat_body(image, n=2, num_beams=3, max_tokens=8))
    assert got.status_code == 200, got.text
    texts = [c["message"]["content"] for c in got.json()["choices"]]
    want = local("caption", "-m", tiny_opt, "--device", "cpu", image, "--num-captions", "2", "--num-beams", "3",
                 "--max-new-tokens", "8", "-f", "jsonl")[0]["captions"]
    assert texts == want
    # n > beams at temperature 0 (greedy) is impossible: the error names n.
    bad = served.post("/v1/chat/completions", chat_body(image, n=2, temperature=0))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    # Sampling with a seed is repeatable.
    a, b = (served.post("/v1/chat/completions", chat_body(image, temperature=1.0, top_p=0.9, seed=7, max_tokens=8))
            for _ in range(2))
    assert a.status_code == 200 and a.json()["choices"][0]["message"]["content"] == \
        b.json()["choices"][0]["message"]["content"]


# -- batching ------------------------------------------------------------------------------------
@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_concurrent_requests_are_batched_and_each_equals_its_image_alone(served, example_images, local_captions):
    from concurrent.futures import ThreadPoolExecutor

    batches_before = served.metric("blip2_batch_size_count")
    images_before = served.metric("blip2_images_total")
    jobs = [example_images[i % 4] for i in range(16)]

    def one(image):
        return image, served.post("/v1/chat/completions", chat_body(image, temperature=0, max_tokens=12))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    for image, reply in results:
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == local_captions[str(image)]
    # ... and to transformers' documented usage, image by image (tests/helpers.py)
    from helpers import reference_model, reference_tokens

    tokenizer = reference_model(served.model)[0].tokenizer
    for image in example_images:
        (ids,) = reference_tokens(served.model, image, None, max_new_tokens=12, num_beams=1, do_sample=False)
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == local_captions[str(image)]
    batches = served.metric("blip2_batch_size_count") - batches_before
    images = served.metric("blip2_images_total") - images_before
    assert images == 16
    assert batches < images, f"{batches} model calls for {images} images: nothing was batched"


# -- the native endpoints and blip2 caption --server -----------------------------------------------
@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_caption_and_ask_with_server_write_the_local_records(served, tiny_opt, example_images, tmp_path, monkeypatch):
    """The client's records (and CSV) equal a local run's, settings included; it imports no torch."""
    monkeypatch.setenv("BLIP2_API_KEY", KEY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BLIP2_API_KEY": KEY}
    code = (
        "import sys, runpy\n"
        "sys.argv = ['blip2', *sys.argv[1:]]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('blip2cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules)\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
        "sys.exit(code)\n"
    )
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    inputs = [*map(str, example_images), str(bad)]
    opts = ["--num-beams", "2", "--max-new-tokens", "9", "--prompt", "a photo of"]
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"remote.{fmt}"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, "caption", "--server", served.url, "-m", str(tiny_opt),
                               *inputs, *opts, "-o", str(out)], check=False, capture_output=True, text=True, env=env, timeout=120,
                              cwd=ROOT)
        took = time.perf_counter() - started
        assert proc.returncode == 1, proc.stderr  # the broken file: exit 1, as locally
        heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY=")][-1][6:]
        assert "torch" not in heavy and "transformers" not in heavy, heavy
        assert took < 30
        mine = tmp_path / f"local.{fmt}"
        result = cli("caption", "-m", tiny_opt, "--device", "cpu", *inputs, *opts, "-o", mine)
        assert result.exit_code == 1, result.output
        if fmt == "jsonl":
            assert jsonl(out.read_text()) == jsonl(mine.read_text())
            records = jsonl(out.read_text())
            assert records[-1]["error"] and all(r["caption"] for r in records[:-1])
        else:
            assert out.read_text() == mine.read_text()
    # ask: one record per image and question
    out = tmp_path / "answers.jsonl"
    result = cli("ask", "--server", served.url, *example_images, "-q", "what is it?", "-q", "is it red?",
                 "--max-new-tokens", "6", "-o", out)
    assert result.exit_code == 0, result.output
    mine = local("ask", "-m", tiny_opt, "--device", "cpu", *example_images, "-q", "what is it?", "-q", "is it red?",
                 "--max-new-tokens", "6", "-f", "jsonl")
    assert jsonl(out.read_text()) == mine
    # Parquet and --failed-list as locally
    remote_files = (tmp_path / "r.parquet", tmp_path / "r.failed")
    local_files = (tmp_path / "l.parquet", tmp_path / "l.failed")
    for files, server_args in ((remote_files, ["--server", served.url]), (local_files, ["-m", tiny_opt, "--device", "cpu"])):
        result = cli("caption", *server_args, *inputs, *opts, "-o", files[0], "--failed-list", files[1])
        assert result.exit_code == 1, result.output
    import pyarrow.parquet as pq

    assert pq.read_table(remote_files[0]).to_pylist() == pq.read_table(local_files[0]).to_pylist()
    assert remote_files[1].read_bytes() == local_files[1].read_bytes() == (str(bad) + "\n").encode()
    # embed: the vectors (Q-Former features of the captioning checkpoint), exactly
    embed_opts = ["--features", "qformer", "--pool", "mean", "-f", "jsonl"]
    result = cli("embed", "--server", served.url, "-m", tiny_opt, *example_images, *embed_opts)
    assert result.exit_code == 0, result.output
    assert jsonl(result.stdout) == local("embed", "-m", tiny_opt, "--device", "cpu", *example_images, *embed_opts)
    # a request the server refuses (texts for a captioning checkpoint) is a usage error, as locally
    refused = cli("embed", "--server", served.url, "--text", "a cat", "-f", "jsonl")
    assert refused.exit_code == 2 and "retrieval checkpoint" in refused.output and not refused.stdout
    assert cli("embed", "-m", tiny_opt, "--device", "cpu", "--text", "a cat", "-f", "jsonl").exit_code == 2
    # what needs the model here is refused, not ignored (every other option: the tests below)
    refused = cli("caption", "--server", served.url, *example_images, "--compile")
    assert refused.exit_code == 2 and "--compile" in refused.output


def _both(served, tiny_opt, *args, code: int = 0, url: str | None = None):
    """Run ``args`` with the server, then locally (each after its own ``{side}`` in the args)."""
    results = []
    for side, model in (("remote", ["--server", url or served.url]), ("local", ["-m", tiny_opt, "--device", "cpu"])):
        argv = [str(a).replace("{side}", side) for a in args]
        result = cli(argv[0], *model, *argv[1:])
        assert result.exit_code == code, (side, result.output)
        results.append(result)
    return results


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_every_output_option_works_with_server_as_locally(served, tiny_opt, example_images, tmp_path, monkeypatch):
    """--server is the same run with the model elsewhere: sidecars, --metadata, --resume,
    -o DIR, --shard + merge, tar shards with --carry, HTML, --dry-run give what a local run
    gives, byte for byte where the files are the same."""
    import shutil
    import tarfile

    monkeypatch.setenv("BLIP2_API_KEY", KEY)
    opts = ["--num-beams", "2", "--max-new-tokens", "7"]
    for side in ("remote", "local"):
        folder = tmp_path / side / "photos"
        folder.mkdir(parents=True)
        for p in example_images:
            shutil.copy(p, folder / p.name)
    # sidecars and the datasets metadata file beside the images
    _both(served, tiny_opt, "caption", tmp_path / "{side}" / "photos", *opts, "--sidecar", "--existing", "overwrite", "--metadata", "-q")
    for p in example_images:
        remote = (tmp_path / "remote" / "photos" / p.name).with_suffix(".txt").read_bytes()
        assert remote and remote == (tmp_path / "local" / "photos" / p.name).with_suffix(".txt").read_bytes()
    assert ((tmp_path / "remote" / "photos" / "metadata.jsonl").read_bytes()
            == (tmp_path / "local" / "photos" / "metadata.jsonl").read_bytes())
    # --resume from a file cut after two records: the same bytes as a whole local run
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in example_images * 2))
    whole = tmp_path / "whole.jsonl"
    assert cli("caption", "-m", tiny_opt, "--device", "cpu", "--files-from", listing, *opts, "-o", whole).exit_code == 0
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(whole.read_bytes().splitlines(keepends=True)[:2]))
    result = cli("caption", "--server", served.url, "--files-from", listing, *opts, "-o", cut, "--resume")
    assert result.exit_code == 0, result.output
    assert "2 already done" in result.output
    assert cut.read_bytes() == whole.read_bytes()
    # -o DIR/ (part files, merged), and two --shard runs then blip2 merge
    _both(served, tiny_opt, "caption", "--files-from", listing, *opts, "-o", str(tmp_path / "{side}" / "dir") + "/", "-q")
    for side in ("remote", "local"):
        for i in (0, 1):
            args = ["--files-from", listing, *opts, "-o", tmp_path / side / "sharded", "--shard", f"{i}/2", "-q"]
            model = ["--server", served.url] if side == "remote" else ["-m", tiny_opt, "--device", "cpu"]
            assert cli("caption", *model, *args).exit_code == 0
        assert cli("merge", tmp_path / side / "sharded").exit_code == 0

    def finals(folder: Path) -> dict:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    # one shard by the server, the other here: they merge into the same file
    for i, model in ((0, ["--server", served.url]), (1, ["-m", tiny_opt, "--device", "cpu"])):
        args = ["--files-from", listing, *opts, "-o", tmp_path / "mixed", "--shard", f"{i}/2", "-q"]
        assert cli("caption", *model, *args).exit_code == 0
    assert cli("merge", tmp_path / "mixed").exit_code == 0
    for name in ("dir", "sharded", "mixed"):
        remote = finals(tmp_path / name if name == "mixed" else tmp_path / "remote" / name)
        mine = finals(tmp_path / "local" / ("sharded" if name == "mixed" else name))
        assert remote and remote == mine, name
    # tar shard inputs with --carry: the samples' records, their keys and carried members
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(example_images):
            for ext, data in ((p.suffix.lstrip("."), p.read_bytes()), ("txt", f"alt {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
    remote, mine = _both(served, tiny_opt, "ask", shard, "what is it?", *opts, "--carry", "txt", "-f", "jsonl")
    assert remote.stdout == mine.stdout and jsonl(remote.stdout)[1]["txt"] == "alt 1"
    # a contact sheet: one card and one thumbnail per image
    _both(served, tiny_opt, "caption", *example_images, *opts, "-o", tmp_path / "{side}.html", "-q")
    page, local_page = (tmp_path / "remote.html").read_text(), (tmp_path / "local.html").read_text()
    assert page.count("data:image/jpeg;base64,") == local_page.count("data:image/jpeg;base64,") == len(example_images)
    # --dry-run: the same plan, nothing sent
    remote, mine = _both(served, tiny_opt, "caption", tmp_path / "remote" / "photos", "--sidecar", "--dry-run")
    assert remote.stdout == mine.stdout


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_embed_into_a_vector_store_with_server(served, tiny_opt, example_images, tmp_path, monkeypatch):
    """A vector store filled by a server holds the rows and vectors a local run writes; it
    appends incrementally, and a local run of the same checkpoint finds it up to date."""
    import numpy as np

    from blip2cli.store import VectorStore

    monkeypatch.setenv("BLIP2_API_KEY", KEY)
    opts = ["--features", "qformer", "--pool", "mean"]
    remote, mine = tmp_path / "remote.safetensors", tmp_path / "local.safetensors"
    result = cli("embed", "--server", served.url, *example_images[:2], *opts, "-o", remote)
    assert result.exit_code == 0, result.output
    result = cli("embed", "--server", served.url, *example_images, "-o", remote)  # the store's settings
    assert result.exit_code == 0, result.output
    assert "2 new" in result.output and "2 unchanged" in result.output, result.output
    result = cli("embed", "-m", tiny_opt, "--device", "cpu", *example_images, *opts, "-o", mine)
    assert result.exit_code == 0, result.output
    got, want = VectorStore.open(remote), VectorStore.open(mine)
    assert got.meta == want.meta
    order = {e.path: i for i, e in enumerate(want.entries)}
    assert sorted(e.path for e in got.entries) == sorted(order)
    rows = [order[e.path] for e in got.entries]
    np.testing.assert_array_equal(np.asarray(got.matrix), np.asarray(want.matrix)[rows])
    assert [(e.size, e.sha256) for e in got.entries] == [(want.entries[i].size, want.entries[i].sha256) for i in rows]
    result = cli("embed", "-m", tiny_opt, "--device", "cpu", *example_images, "-o", remote)
    assert result.exit_code == 0 and "4 unchanged" in result.output, result.output



@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_chat_with_server_is_the_local_conversation(served, tiny_opt, example_images, monkeypatch):
    """blip2 chat --server: the same turns, answers, dropped turns (a small --context-tokens),
    too-long errors, /image and /reset as a local chat, and the same exit code."""
    monkeypatch.setenv("BLIP2_API_KEY", KEY)
    questions = ("what is it?\nwhy is it there?\nwhat else is in the picture today?\n"
                 f"/image {example_images[3]}\nwhat color?\nand the sky?\n/reset\nmore?\n")
    runs = []
    for model in (["--server", served.url], ["-m", tiny_opt, "--device", "cpu"]):
        runs.append(cli("chat", example_images[0], *model, "-f", "jsonl", "--max-new-tokens", "6",
                        "--context-tokens", "45", input=questions))
    remote, mine = runs
    assert remote.exit_code == mine.exit_code == 0, remote.output
    assert remote.stdout == mine.stdout and len(jsonl(remote.stdout)) == 6
    assert "dropped the oldest turn" in remote.stderr and remote.stderr == mine.stderr
    too_long = [cli("chat", example_images[0], *model, "-f", "jsonl", "--context-tokens", "12",
                    input="what is in this picture, and why is it there at all?\n")
                for model in (["--server", served.url], ["-m", tiny_opt, "--device", "cpu"])]
    assert too_long[0].exit_code == too_long[1].exit_code == 1
    assert too_long[0].stdout == too_long[1].stdout and jsonl(too_long[0].stdout)[0]["error"]

@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_files_only_under_the_allowed_folder(served):
    ok = served.post("/v1/chat/completions", chat_body(str(served.allowed / "cat.png"), temperature=0, max_tokens=4))
    assert ok.status_code == 200, ok.text
    also = served.post("/v1/chat/completions", chat_body("file://" + str(served.allowed / "cat.png"), temperature=0,
                                                         max_tokens=4))
    assert also.json()["choices"][0]["message"]["content"] == ok.json()["choices"][0]["message"]["content"]
    for name in ("link.png", "../outside/secret.png", "/etc/hostname", "file:///etc/passwd", "nothere.png"):
        got = served.post("/v1/chat/completions", chat_body(name if name.startswith(("/", "file:")) else
                                                            str(served.allowed / name), temperature=0))
        assert 400 <= got.status_code < 500, (name, got.status_code)
        assert "root:" not in got.text


# -- hostile input -------------------------------------------------------------------------------
def _hostile(served, image: Path) -> list:
    """(description, method, path, body or None)."""
    good = data_url(image)
    png_head = base64.b64encode(image.read_bytes()[:200]).decode()
    nested = "[" * 100_000 + "]" * 100_000
    big = b'{"messages": "' + b"x" * (MAX_BODY_MB * 1024 * 1024 + 10) + b'"}'
    return [
        ("not JSON", "POST", "/v1/chat/completions", b"{not json"),
        ("a JSON array", "POST", "/v1/chat/completions", b"[1, 2]"),
        ("empty body", "POST", "/v1/chat/completions", b""),
        ("no messages", "POST", "/v1/chat/completions", {"model": "x"}),
        ("empty messages", "POST", "/v1/chat/completions", {"messages": []}),
        ("messages a string", "POST", "/v1/chat/completions", {"messages": "hello"}),
        ("no user message", "POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}),
        ("no image", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
        ("odd role", "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
        ("odd part", "POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}),
        ("remote URL", "POST", "/v1/chat/completions", chat_body("http://169.254.169.254/latest/meta-data")),
        ("file outside", "POST", "/v1/chat/completions", chat_body("/etc/passwd")),
        ("bad base64", "POST", "/v1/chat/completions", chat_body("data:image/png;base64,@@@not base64@@@")),
        ("not an image", "POST", "/v1/chat/completions",
         chat_body("data:image/png;base64," + base64.b64encode(b"hello world").decode())),
        ("truncated PNG", "POST", "/v1/chat/completions", chat_body("data:image/png;base64," + png_head)),
        ("empty data URL", "POST", "/v1/chat/completions", chat_body("data:image/png;base64,")),
        ("max_tokens 0", "POST", "/v1/chat/completions", chat_body(good, max_tokens=0)),
        ("max_tokens huge", "POST", "/v1/chat/completions", chat_body(good, max_tokens=10**9)),
        ("max_tokens string", "POST", "/v1/chat/completions", chat_body(good, max_tokens="10")),
        ("temperature negative", "POST", "/v1/chat/completions", chat_body(good, temperature=-1)),
        ("temperature string", "POST", "/v1/chat/completions", chat_body(good, temperature="hot")),
        ("top_p 2", "POST", "/v1/chat/completions", chat_body(good, top_p=2)),
        ("n 0", "POST", "/v1/chat/completions", chat_body(good, n=0)),
        ("n 1000", "POST", "/v1/chat/completions", chat_body(good, n=1000)),
        ("stream not a bool", "POST", "/v1/chat/completions", chat_body(good, stream="yes")),
        ("deep nesting", "POST", "/v1/chat/completions", nested.encode()),
        ("body too large", "POST", "/v1/chat/completions", big),
        ("GET on a POST endpoint", "GET", "/v1/chat/completions", None),
        ("no such endpoint", "GET", "/v1/../../etc/passwd", None),
        ("native: unknown option", "POST", "/v1/blip2/caption",
         {"images": [{"name": "a", "data": good.split(",", 1)[1]}], "options": {"evil": 1}}),
        ("native: images not a list", "POST", "/v1/blip2/caption", {"images": "a.png"}),
        ("native: num_beams 0", "POST", "/v1/blip2/caption",
         {"images": [{"name": "a", "data": good.split(",", 1)[1]}], "options": {"num_beams": 0}}),
    ]


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_hostile_requests_get_4xx_and_the_server_stays_correct(served, example_images, local_captions):
    import httpx

    cases = _hostile(served, example_images[0])
    assert len(cases) >= 30
    for what, method, path, body in cases:
        if method == "GET":
            got = httpx.get(served.url + path, headers=served.headers(), timeout=30)
        else:
            got = served.post(path, body)
        assert 400 <= got.status_code < 500, (what, got.status_code, got.text[:300])
        error = got.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], what
    # A chunked body (no Content-Length) over the limit is cut off while it is read.
    def chunks():
        for _ in range(MAX_BODY_MB * 4 + 4):
            yield b" " * (256 * 1024)

    import httpx

    got = httpx.post(served.url + "/v1/chat/completions", content=chunks(), timeout=60,
                     headers={"Content-Type": "application/json", **served.headers()})
    assert got.status_code == 413 and got.json()["error"]["code"] == "body_too_large"
    assert served.proc.poll() is None
    assert served.get("/health", key=None).status_code == 200
    again = served.post("/v1/chat/completions", chat_body(example_images[2], temperature=0, max_tokens=12))
    assert again.json()["choices"][0]["message"]["content"] == local_captions[str(example_images[2])]
    # A bad image among good ones is that image's error record only.
    body = {"images": [{"name": "good", "data": data_url(example_images[2]).split(",", 1)[1]},
                       {"name": "bad", "data": base64.b64encode(b"GIF89a broken").decode()}],
            "options": {"num_beams": 1, "max_new_tokens": 12}}
    records = served.post("/v1/blip2/caption", body).json()["records"]
    assert records[0]["caption"] == local_captions[str(example_images[2])] and records[0]["error"] is None
    assert records[1]["caption"] is None and records[1]["error"]


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_the_key_is_needed_everywhere_but_health(served):
    for path in ("/v1/models", "/metrics", "/v1/blip2/info"):
        assert served.get(path, key=None).status_code == 401
        assert served.get(path, key="wrong-key").status_code == 401
        assert served.get(path).status_code == 200
    assert served.post("/v1/chat/completions", {"messages": []}, key=None).status_code == 401
    assert served.get("/health", key=None).status_code == 200
    assert "401" in served.log.read_text()  # one line per request on stderr


@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_metrics_in_prometheus_format(served):
    text = served.get("/metrics").text
    for name in ("blip2_requests_total{", "blip2_request_errors_total{", "blip2_queue_depth ", "blip2_batch_size_bucket",
                 "blip2_request_latency_seconds_count "):
        assert name in text, name
    assert "# TYPE blip2_batch_size histogram" in text


# -- shutdown: last, it ends the module's server ---------------------------------------------------
@pytest.mark.slow  # the module's one server process (it pays the torch import)
def test_sigterm_answers_the_requests_in_flight_then_exits_0(served, example_images):
    results: list = [None] * 8

    def one(i):
        body = chat_body(example_images[i % 4], temperature=0, max_tokens=200, min_tokens=200)
        results[i] = served.post("/v1/chat/completions", body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while served.metric("blip2_requests_in_flight") < 8:  # all eight accepted
        assert time.monotonic() < deadline, "the requests never reached the model"
        time.sleep(0.02)
    served.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=300)
    assert served.proc.wait(timeout=120) == 0
    for reply in results:
        assert reply is not None and reply.status_code == 200, reply
        content = reply.json()["choices"][0]["message"]["content"]
        assert content and reply.json()["usage"]["completion_tokens"] == 200


# -- units: no server -------------------------------------------------------------------------------
def test_data_urls_and_paths(tmp_path):
    from blip2cli.serve import ApiError, ImageSource, ServeConfig, parse_data_url

    assert parse_data_url("data:image/png;base64," + base64.b64encode(b"abc").decode(), "p") == b"abc"
    for bad in ("data:image/png,abc", "image/png;base64,abc", "data:image/png;base64,a=b="):
        with pytest.raises(ApiError) as exc:
            parse_data_url(bad, "p")
        assert exc.value.status == 400 and exc.value.param == "p"
    closed = ServeConfig()
    for url in ("http://example.com/a.png", "/etc/passwd", "file:///etc/passwd", "a.png"):
        with pytest.raises(ApiError):
            ImageSource(closed, url, "p")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"x")
    (tmp_path / "ok" / "out").symlink_to(tmp_path)
    opened = ServeConfig(allow_files=str(tmp_path / "ok"))
    opened.validate()
    assert ImageSource(opened, "a.png", "p").path == str((tmp_path / "ok" / "a.png").resolve())
    for url in ("../x.png", "out/x.png", "file://evil.example/ok/a.png", str(tmp_path / "x.png")):
        with pytest.raises(ApiError):
            ImageSource(opened, url, "p")


def test_chat_options_map_onto_generation_options():
    from blip2cli.serve import ApiError, chat_generation

    greedy = chat_generation({"temperature": 0, "max_tokens": 7}, task="caption")
    assert (greedy.beams, greedy.sample, greedy.max_new_tokens) == (1, False, 7)
    default = chat_generation({}, task="ask")
    assert (default.beams, default.sample, default.max_new_tokens) == (5, False, 10)  # blip2 ask's defaults
    sampled = chat_generation({"temperature": 0.7, "top_p": 0.5, "seed": 3, "n": 3}, task="caption")
    assert (sampled.sample, sampled.temperature, sampled.top_p, sampled.seed, sampled.num_captions) == (
        True, 0.7, 0.5, 3, 3)
    with pytest.raises(ApiError) as exc:
        chat_generation({"max_tokens": 0}, task="caption")
    assert exc.value.param == "max_tokens"


def test_metrics_text_format():
    from blip2cli.serve import Metrics

    metrics = Metrics()
    metrics.request("POST", "/v1/chat/completions", 200, 0.02)
    metrics.request("POST", "/v1/chat/completions", 400, 0.001)
    metrics.batch(3)
    text = metrics.render(queue_depth=2, ready=True)
    assert 'blip2_requests_total{method="POST",path="/v1/chat/completions",status="400"} 1' in text
    assert 'blip2_request_errors_total{path="/v1/chat/completions",status="400"} 1' in text
    assert 'blip2_batch_size_bucket{le="4"} 1' in text and 'blip2_batch_size_bucket{le="2"} 0' in text
    assert "blip2_queue_depth 2" in text and "blip2_images_total 3" in text


class FakeWork:
    """A Work without a model: records the batches it was given."""

    def __init__(self, key, calls, *, alone=False, fail_over=None):
        self.key, self.calls, self.alone, self.seed, self.fail_over = key, calls, alone, None, fail_over

    def run(self, units):
        if self.fail_over is not None and len(units) > self.fail_over:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        self.calls.append((self.key, list(units)))
        return [f"{self.key}:{u}" for u in units]


def _engine(**kw):
    import threading

    from blip2cli.serve import Engine, ServeConfig

    engine = Engine(ServeConfig(**kw))
    engine.ready.set()
    engine._thread = threading.Thread(target=engine._work, daemon=True)
    return engine


def test_engine_batches_what_arrives_together_by_key():
    calls: list = []
    engine = _engine(max_batch_size=8, batch_wait_ms=200)
    futures = [engine.submit(FakeWork("a" if i % 2 else "b", calls), [i]) for i in range(6)]
    futures.append(engine.submit(FakeWork("s", calls, alone=True), [10, 11]))
    futures.append(engine.submit(FakeWork("s", calls, alone=True), [12]))
    engine._thread.start()
    results = [f.result(timeout=10) for f in futures]
    assert results[:6] == [[f"{'a' if i % 2 else 'b'}:{i}"] for i in range(6)]
    assert results[6:] == [["s:10", "s:11"], ["s:12"]]
    assert sorted(calls) == sorted([("b", [0, 2, 4]), ("a", [1, 3, 5]), ("s", [10, 11]), ("s", [12])])
    assert engine.depth == 0
    engine.stop()


def test_engine_queue_is_bounded():
    from blip2cli.serve import ApiError

    engine = _engine(max_queue=3)  # the model thread never starts: nothing leaves the queue
    engine.submit(FakeWork("a", []), [1, 2])
    engine.submit(FakeWork("a", []), [3])
    with pytest.raises(ApiError) as exc:
        engine.submit(FakeWork("a", []), [4])
    assert exc.value.status == 503 and exc.value.headers["Retry-After"]


def test_engine_halves_the_batch_on_cuda_out_of_memory():
    calls: list = []
    engine = _engine(max_batch_size=8, batch_wait_ms=0)
    future = engine.submit(FakeWork("a", calls, fail_over=2), list(range(7)))
    engine._thread.start()
    assert future.result(timeout=10) == [f"a:{i}" for i in range(7)]
    assert all(len(units) <= 2 for _, units in calls) and [u for _, us in calls for u in us] == list(range(7))
    assert engine.batch_size == 2 and engine.metrics.oom_halvings >= 2
    engine.stop()


def test_serve_warns_without_a_key_off_loopback_and_checks_the_model_before_binding(tmp_path):
    missing = tmp_path / "no-such-model"
    result = cli("serve", "--host", "0.0.0.0", "-m", missing, "--port", "0")
    assert result.exit_code == 2
    assert "without --api-key" in result.output and "no-such-model" in result.output
    quiet = cli("serve", "--host", "0.0.0.0", "--api-key", "k", "-m", missing, "--port", "0")
    assert quiet.exit_code == 2 and "without --api-key" not in quiet.output


@pytest.mark.slow  # a second server process: a retrieval checkpoint (text and ITC features)
def test_embed_texts_and_itc_store_with_a_retrieval_server(tiny_itm, example_images, tmp_path, monkeypatch):
    """embed --text and ITC vectors through a server: the records and the store of a local run."""
    import numpy as np

    from blip2cli.store import VectorStore

    monkeypatch.delenv("BLIP2_API_KEY", raising=False)
    proc, url = start_server(tiny_itm, tmp_path / "itm.err", key=None)
    try:
        texts = ["--text", "a cat", "--text", "two dogs on a sofa"]
        remote, mine = _both(None, tiny_itm, "embed", *texts, "-f", "jsonl", url=url)
        assert remote.stdout == mine.stdout and len(jsonl(remote.stdout)) == 2
        remote, mine = _both(None, tiny_itm, "embed", *example_images, *texts, "-f", "jsonl", url=url)
        assert remote.stdout == mine.stdout and len(jsonl(remote.stdout)) == 2 + len(example_images)
        _both(None, tiny_itm, "embed", *example_images, "-o", tmp_path / "{side}.safetensors", url=url)
        got, want = VectorStore.open(tmp_path / "remote.safetensors"), VectorStore.open(tmp_path / "local.safetensors")
        assert got.meta == want.meta and got.meta.features == "itc" and got.meta.normalized
        assert [e.path for e in got.entries] == [e.path for e in want.entries]
        np.testing.assert_array_equal(np.asarray(got.matrix), np.asarray(want.matrix))
        # blip2 score: ITM and ITC of each text, and a broken image's error records, as locally
        remote, mine = _both(None, tiny_itm, "score", example_images[0], "a cat", "a dog", "-f", "jsonl", url=url)
        assert remote.stdout == mine.stdout and [r["text"] for r in jsonl(remote.stdout)] == ["a cat", "a dog"]
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        remote, mine = _both(None, tiny_itm, "score", broken, "a cat", "-f", "jsonl", url=url, code=1)
        assert remote.stdout == mine.stdout and jsonl(remote.stdout)[0]["error"]
    finally:
        stop_server(proc)
