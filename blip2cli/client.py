"""The client of ``blip2 serve``: items in, the server's records out, in input order.

``blip2 caption|ask|embed --server URL`` are the usual run (``job.Job``: the output
plan, locks, resume, part files, sidecars, every format) with a :class:`Remote` as its
model: the pipeline's stage (:class:`RemoteStage`) reads each image's bytes in the
decode workers and sends a batch to the server's native endpoints
(``/v1/blip2/caption``, ``ask``, ``embed``) as a few concurrent requests of a chunk
each, so the server batches them together; the records come back as a local run
makes them, and the settings the server ran with are checked against the run's. An
input that cannot be read here is its error record, made here as a local run makes it.

Standard library only (``urllib``): no torch, no numpy, no HTTP package to import,
so a client run starts in a fraction of a second.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from .errors import EXIT_ITEMS_FAILED, EXIT_USAGE, Blip2Error

DEFAULT_CHUNK = 8  # images per request
DEFAULT_CONCURRENCY = 4  # requests in flight
TIMEOUT_S = 600.0
BUSY_RETRIES = 60  # 503 + Retry-After: wait and send again, this many times at most


class ServerError(Blip2Error):
    """The server is unreachable, failed, or answered something else than records (exit 1)."""

    exit_code = EXIT_ITEMS_FAILED
    reason: str | None = None  # the server's own message, when it sent one
    code: str | None = None  # its error code (``context_length_exceeded``, ...)


class ServerRefused(ServerError):
    """The server refused the request (a 4xx: the key, an option, a checkpoint without
    what was asked): a usage error, exit 2, as the same run refused locally."""

    exit_code = EXIT_USAGE


class Client:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = TIMEOUT_S):
        url = url.strip()
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._info: dict | None = None

    # -- HTTP -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(BUSY_RETRIES + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                retry = exc.headers.get("Retry-After") if exc.headers else None
                if exc.code == 503 and retry is not None and attempt < BUSY_RETRIES:
                    exc.read()
                    time.sleep(min(max(float(retry), 0.1), 10.0) if _number(retry) else 1.0)
                    continue
                kind = ServerRefused if 400 <= exc.code < 500 and exc.code != 429 else ServerError
                message, code = _error_of(exc)
                error = kind(f"the server at {self.url} answered {exc.code}: {message}", hint=_hint(exc.code))
                error.reason, error.code = message, code
                raise error from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ServerError(f"cannot reach the server at {self.url} ({reason})",
                                  hint="start one with `blip2 serve`, or check server (BLIP2_SERVER)",
                                  params=["server"]) from None
            except ValueError:
                raise ServerError(f"the server at {self.url} did not answer JSON: is it blip2 serve?") from None
        raise ServerError(f"the server at {self.url} stayed busy")  # pragma: no cover

    def info(self) -> dict:
        if self._info is None:
            self._info = self.request("GET", "/v1/blip2/info")
        return self._info


class Remote:
    """A ``blip2 serve`` as the model of a local run (``job.Job.server``): the settings its
    records carry, the batch size that suits it, and the pipeline stage that sends it images.

    The run is the usual one (the output plan and locks, ``--resume``, ``-o DIR``,
    ``--shard``, sidecars, ``--metadata``, ``--failed-list``, ``--carry``, every format):
    only the model is elsewhere."""

    def __init__(self, url: str, *, api_key: str | None = None, chunk: int = DEFAULT_CHUNK,
                 concurrency: int = DEFAULT_CONCURRENCY):
        self.client = Client(url, api_key=api_key)
        self.chunk = max(1, chunk)
        self.concurrency = max(1, concurrency)

    @property
    def url(self) -> str:
        return self.client.url

    def settings(self) -> dict:
        """The model's settings every record of this server carries (model, revision,
        dtype, quantization, checkpoint...)."""
        return dict(self.client.info().get("settings") or {})

    @property
    def batch_size(self) -> int:
        """Images per pipeline batch: a few requests of ``chunk`` images sent together, so
        the server batches them across requests."""
        return self.chunk_size() * self.concurrency

    def chunk_size(self) -> int:
        """Images per request: ``chunk``, at most the server's batch and queue."""
        info = self.client.info()
        return max(1, min(self.chunk, int(info.get("max_batch_size") or self.chunk),
                          int(info.get("max_queue") or self.chunk)))

    def stage(self, command: str, options: dict, *, questions: list[str] | None = None,
              thumbnails=None, identity: bool = False) -> RemoteStage:
        return RemoteStage(self, command, options, questions=questions, thumbnails=thumbnails, identity=identity)


class RemoteStage:
    """The pipeline stage (``pipeline.Stage``) of a run whose model is a server.

    ``prepare`` (a decode worker) reads the image's bytes (and makes the contact sheet's
    thumbnail when one is wanted); ``run_batch`` sends a batch as a few concurrent
    requests of ``chunk`` images and returns each image's records; ``record`` gives them
    back without the settings (``expect``), which the runner adds as for a local model,
    after checking that the server's are the same.

    ``identity=True`` (embed into a vector store): the rows a local ``EmbedTask`` makes,
    each file read once, hashed and sent, its vector an array again."""

    def __init__(self, remote: Remote, command: str, options: dict, *, questions: list[str] | None = None,
                 thumbnails=None, identity: bool = False):
        self.remote, self.command = remote, command
        self.options, self.questions = options, questions
        self.thumbnails = thumbnails
        self.identity = identity
        self.per_item = len(questions) if command == "ask" and questions else 1
        self.settings: dict = {}  # what every record must carry (the runner's)
        self._batches: Any = None  # workers.DecodePool: batches sent ahead (submit_batch)
        self._requests: Any = None  # workers.DecodePool: a batch's concurrent requests

    in_flight = 2  # batches out while the pipeline writes an earlier one (pipeline.py)

    def submit_batch(self, prepared: list):
        """``run_batch`` on a daemon thread of its own: a Future of its results (the
        pipeline sends the next batches while it writes this one's records)."""
        if self._batches is None:
            from .workers import DecodePool

            self._batches = DecodePool(self.in_flight + 1, name="blip2-batch")
        return self._batches.submit(self.run_batch, prepared)

    def expect(self, settings: dict) -> None:
        self.settings = dict(settings)

    def describe(self) -> dict:
        """What the server's vectors are for these options: ``{"features", "pool", "dims", "normalized"}``."""
        got = self.remote.client.request("POST", "/v1/blip2/embed", {"options": self.options, "describe": True})
        if not isinstance(got, dict) or not isinstance(got.get("dims"), list):
            raise ServerError(f"the server at {self.remote.url} cannot describe its vectors: is it an older blip2 serve?")
        return got

    def text_records(self, texts: list[str]) -> list[dict]:
        """``blip2 embed --text``'s records (``{"text", "dims", "vector"}``), embedded by the server."""
        if not texts:
            return []
        got = self.remote.client.request("POST", "/v1/blip2/embed", {"options": self.options, "texts": list(texts)})
        records = got.get("records") if isinstance(got, dict) else None
        if not isinstance(records, list) or len(records) != len(texts):
            raise ServerError(f"the server at {self.remote.url} answered {len(records or [])} records for "
                              f"{len(texts)} texts")
        return records

    def prepare(self, item):
        from .decode import ImageError, read_image_file

        if item.error is not None:
            raise ImageError(item.error)
        ident = None
        if isinstance(item.source, (bytes, bytearray)):
            if self.identity:
                raise ImageError("raw image bytes on stdin cannot go into a vector store (its rows are "
                                 "files); pass paths, or use -f jsonl")
            data = bytes(item.source)
        else:
            data, st = read_image_file(item.source)  # ImageError: the item's error record
            if self.identity:
                import hashlib

                ident = (st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
        if self.thumbnails is not None:
            self.thumbnails.put(item.name, _thumbnail(data, self.thumbnails.size))
        encoded = base64.b64encode(data).decode("ascii")
        budget = self._budget()
        if len(encoded) > budget:
            from .decode import ImageError

            raise ImageError(f"the file ({len(data)} bytes) is larger than the server accepts in one request "
                             "(its max_body_mb)")
        entry = {"name": item.name, "data": encoded}
        return (entry, ident) if self.identity else entry

    def _budget(self) -> int:
        limit = int(self.remote.client.info().get("max_body_bytes") or 32 * 1024 * 1024)
        return int(limit * 0.7)  # base64 and JSON around the bytes

    def run_batch(self, prepared: list) -> list:
        if self.identity:
            records = self._send_all([entry for entry, _ in prepared])
            return [(got, ident) for got, (_, ident) in zip(records, prepared)]
        return self._send_all(prepared)

    def _send_all(self, entries: list[dict]) -> list[list[dict]]:
        chunks = list(_chunks_of(entries, self.remote.chunk_size(), self._budget()))
        if len(chunks) == 1:
            return self._send(chunks[0])
        if self._requests is None:  # daemon threads: a request in flight never holds an interrupted run
            from .workers import DecodePool

            self._requests = DecodePool(self.remote.concurrency * (self.in_flight + 1), name="blip2-request")
        out: list[list[dict]] = []
        for future in [self._requests.submit(self._send, chunk) for chunk in chunks]:
            out += future.result()
        return out

    def close(self) -> None:
        """The run is over: idle request threads end (one still waiting on the server is a
        daemon thread, left to the process's end)."""
        for pool in (self._batches, self._requests):
            if pool is not None:
                pool.shutdown()
        self._batches = self._requests = None

    def _send(self, entries: list[dict]) -> list[list[dict]]:
        body: dict = {"options": self.options, "images": entries}
        if self.command == "ask":
            body["questions"] = list(self.questions or [])
        client = self.remote.client
        got = client.request("POST", f"/v1/blip2/{self.command}", body)
        records = got.get("records") if isinstance(got, dict) else None
        if not isinstance(records, list) or len(records) != len(entries) * self.per_item:
            raise ServerError(f"the server at {client.url} answered {len(records or [])} records for "
                              f"{len(entries)} images")
        return [records[i * self.per_item:(i + 1) * self.per_item] for i in range(len(entries))]

    def record(self, item, result, error):
        if self.identity:
            return self._row(item, result, error)
        if result is None:
            made = error_records(self.command, item.name, error or "no result", self.questions)
        else:
            made = [self._own(item, r) for r in result]
        return made if self.command == "ask" else made[0]

    def _row(self, item, result, error) -> dict:
        """A vector store's row, as ``embed.EmbedTask(identity=True)`` makes it."""
        vector, ident = None, None
        if result is not None:
            (got,), ident = result
            got = self._own(item, got)
            error = got.get("error")
            if error is None:
                import numpy as np

                vector = np.asarray(got["vector"], dtype=np.float32).reshape(got["dims"])
        return {"path": item.name, "source": item.source, "vector": vector, "ident": ident, "error": error}

    def _own(self, item, record: dict) -> dict:
        """The server's record as a local one: this run's name for the image, the settings
        left to the runner once they are checked."""
        if not isinstance(record, dict):
            raise ServerError(f"the server at {self.remote.url} answered a record that is no object")
        for key, value in self.settings.items():
            if key in record and record[key] != value:
                raise ServerError(f"the server at {self.remote.url} ran with {key}={record[key]!r}, "
                                  f"not {value!r} as this run asked",
                                  hint="a newer or older blip2 serve? run the same version on both sides")
        own = {k: v for k, v in record.items() if k not in self.settings}
        own["path"] = item.name
        return own


class RemoteChat:
    """``blip2 chat``'s session (what ``ask.ChatSession`` is locally) on a server: each turn
    one chat completion carrying the earlier turns, the image and blip2's own fields
    (``template``, ``context_tokens``, ``preprocess``); the server fits the history as the
    local session does and says how many of the oldest turns it dropped."""

    def __init__(self, remote: Remote, request: dict, *, template: str | None = None,
                 context_tokens: int | None = None, preprocess: str = "fast"):
        self.remote = remote
        self.request = {**request, "template": template, "context_tokens": context_tokens, "preprocess": preprocess}
        self.history: list[tuple[str, str]] = []
        self.transcript: list = []
        self.image: str | None = None
        self.limit: int | str = "its"  # the prompt tokens a turn may use, as the server last said
        self._url: str | None = None

    def set_image(self, source, name: str | None = None) -> None:
        """Switch to an image (a path or bytes), a fresh context; ``ImageError`` for an
        unreadable one (the current one is kept)."""
        from .decode import open_image, read_image_file

        data = bytes(source) if isinstance(source, (bytes, bytearray)) else read_image_file(source)[0]
        open_image(data, draft_size=(224, 224))  # decodes here first: a bad image is said at once
        kind = next((k for magic, k in _KINDS if data.startswith(magic)), "application/octet-stream")
        self._url = f"data:{kind};base64," + base64.b64encode(data).decode("ascii")
        self.image = name if name is not None else str(source)
        self.history = []

    def reset(self) -> None:
        self.history = []

    def ask(self, question: str):
        from .ask import Turn

        if self._url is None:
            raise RuntimeError("set_image() first")
        number = len(self.transcript) + 1
        messages: list[dict] = []
        for q, a in self.history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": [{"type": "text", "text": question},
                                                     {"type": "image_url", "image_url": {"url": self._url}}]})
        body = {k: v for k, v in {**self.request, "messages": messages}.items() if v is not None}
        try:
            got = self.remote.client.request("POST", "/v1/chat/completions", body)
        except ServerRefused as exc:
            if exc.code != "context_length_exceeded" or exc.reason is None:
                raise
            turn = Turn(number, self.image or "", question, None, error=exc.reason)
            self.transcript.append(turn)
            return turn
        try:
            answer = str(got["choices"][0]["message"]["content"])
            extra = got.get("blip2") or {}
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"the server at {self.remote.url} answered no chat completion") from None
        dropped = int(extra.get("dropped_turns") or 0)
        self.limit = extra.get("context_tokens", self.limit)
        if dropped:
            self.history = self.history[dropped:]  # they will not fit again either
        self.history.append((question, answer))
        turn = Turn(number, self.image or "", question, answer, dropped=dropped)
        self.transcript.append(turn)
        return turn


_KINDS = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))


def chat_request(gen) -> dict:
    """A chat completion's generation fields from ``caption.GenerationOptions``, so that the
    server's ``chat_generation`` makes the same options back (greedy and beams exactly)."""
    request: dict = {"model": "blip2", "max_tokens": gen.max_new_tokens, "min_tokens": gen.min_new_tokens,
                     "num_beams": gen.num_beams, "n": gen.num_captions, "seed": gen.seed,
                     "repetition_penalty": gen.repetition_penalty}
    if gen.sample:
        request.update(temperature=gen.temperature, top_p=gen.top_p)
    return request


def error_records(command: str, name: str, error: str, questions: list[str] | None = None) -> list[dict]:
    """The records of an image that never reached the model, as the local tasks make them."""
    if command == "caption":
        from .caption import caption_record

        return [caption_record(name, None, error)]
    if command == "ask":
        from .ask import answer_record

        return [answer_record(name, q, None, error) for q in questions or []]
    from .embed import image_record

    return [image_record(name, None, error)]


def _thumbnail(data: bytes, size: int):
    """The contact sheet's thumbnail of an image's bytes (Pillow only), None if it cannot be made."""

    from .decode import open_image
    from .images import make_thumbnail

    try:
        return make_thumbnail(open_image(data, draft_size=(size, size)), size)
    except Exception:  # noqa: BLE001 - the server says what is wrong with the image
        return None


def _chunks_of(entries: list[dict], size: int, budget: int) -> Iterator[list[dict]]:
    out: list[dict] = []
    used = 0
    for entry in entries:
        cost = len(entry.get("data", "")) + len(entry["name"]) + 64
        if out and (len(out) >= size or used + cost > budget):
            yield out
            out, used = [], 0
        out.append(entry)
        used += cost
    if out:
        yield out


def _number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def _error_of(exc: urllib.error.HTTPError) -> tuple[str, str | None]:
    """(the message, the error code) of an OpenAI-style error body."""
    try:
        error = json.loads(exc.read())["error"]
        return str(error["message"]), (str(error["code"]) if error.get("code") else None)
    except Exception:  # noqa: BLE001 - whatever the server sent
        return exc.reason or "no message", None


def _hint(code: int) -> str | None:
    if code == 401:
        return "set BLIP2_API_KEY to the server's key"
    if code == 404:
        return "is the URL that of blip2 serve (http://HOST:PORT)?"
    return None


__all__ = ["DEFAULT_CHUNK", "DEFAULT_CONCURRENCY", "Client", "Remote", "RemoteChat", "RemoteStage", "ServerError", "ServerRefused", "chat_request", "error_records"]
