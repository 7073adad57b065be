"""The client of ``blip2 serve``: items in, the server's records out, in input order.

``blip2 caption|ask|embed --server URL`` read their inputs as usual, then hand them
here: each image's bytes go to the server's native endpoints (``/v1/blip2/caption``,
``ask``, ``embed``) a chunk at a time, a few chunks in flight so the server batches
them together, and the records come back exactly as a local run makes them (the
server adds the model's settings). An input that cannot be read here goes to the
server as its error, so its record carries the same settings as the rest.

Standard library only (``urllib``): no torch, no numpy, no HTTP package to import,
so a client run starts in a fraction of a second.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import EXIT_ITEMS_FAILED, Blip2Error

DEFAULT_CHUNK = 8  # images per request
DEFAULT_CONCURRENCY = 4  # requests in flight
TIMEOUT_S = 600.0
BUSY_RETRIES = 60  # 503 + Retry-After: wait and send again, this many times at most


class ServerError(Blip2Error):
    """The server is unreachable, refused the request, or answered something else than records."""

    exit_code = EXIT_ITEMS_FAILED


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
                raise ServerError(f"the server at {self.url} answered {exc.code}: {_message(exc)}",
                                  hint=_hint(exc.code)) from None
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

    # -- records ------------------------------------------------------------------------
    def records(self, command: str, items: Iterable, options: dict, *, questions=None, chunk: int = DEFAULT_CHUNK,
                concurrency: int = DEFAULT_CONCURRENCY) -> Iterator[list[dict]]:
        """The records of each item (a list: ask makes one per question), in input order."""
        info = self.info()
        limit = int(info.get("max_body_bytes") or 32 * 1024 * 1024)
        chunk = max(1, min(chunk, int(info.get("max_batch_size") or chunk), int(info.get("max_queue") or chunk)))
        budget = int(limit * 0.7)  # base64 and JSON around the bytes
        per_item = len(questions) if command == "ask" else 1
        body_base: dict = {"options": options}
        if command == "ask":
            body_base["questions"] = list(questions)

        def send(entries: list[dict]) -> list[list[dict]]:
            got = self.request("POST", f"/v1/blip2/{command}", {**body_base, "images": entries})
            records = got.get("records") if isinstance(got, dict) else None
            if not isinstance(records, list) or len(records) != len(entries) * per_item:
                raise ServerError(f"the server at {self.url} answered {len(records or [])} records for "
                                  f"{len(entries)} images")
            return [records[i * per_item:(i + 1) * per_item] for i in range(len(entries))]

        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="blip2-client") as pool:
            try:
                for entries in _chunks(items, chunk, budget):
                    pending.append(pool.submit(send, entries))
                    while len(pending) > concurrency * 2:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()


def _chunks(items: Iterable, size: int, budget: int) -> Iterator[list[dict]]:
    """``[{"name", "data"} | {"name", "error"}]`` lists of at most ``size`` images and about ``budget`` bytes."""
    out: list[dict] = []
    used = 0
    for item in items:
        entry = _entry(item, budget)
        cost = len(entry.get("data", "")) + len(item.name) + 64
        if out and (len(out) >= size or used + cost > budget):
            yield out
            out, used = [], 0
        out.append(entry)
        used += cost
    if out:
        yield out


def _entry(item, budget: int) -> dict:
    from .decode import (  # decode.py: standard library at import
        ImageError,
        read_image_file,
    )

    if item.error is not None:
        return {"name": item.name, "error": item.error}
    try:
        if isinstance(item.source, (bytes, bytearray)):
            data = bytes(item.source)
        else:
            data, _ = read_image_file(item.source)
    except ImageError as exc:
        return {"name": item.name, "error": str(exc)}
    except OSError as exc:
        return {"name": item.name, "error": f"cannot read this file: {exc.strerror or exc}"}
    encoded = base64.b64encode(data).decode("ascii")
    if len(encoded) > budget:
        return {"name": item.name, "error": f"the file ({len(data)} bytes) is larger than the server accepts "
                f"in one request (its max_body_mb)"}
    return {"name": item.name, "data": encoded}


def _number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body["error"]["message"])
    except Exception:  # noqa: BLE001 - whatever the server sent
        return exc.reason or "no message"


def _hint(code: int) -> str | None:
    if code == 401:
        return "set BLIP2_API_KEY to the server's key"
    if code == 404:
        return "is the URL that of blip2 serve (http://HOST:PORT)?"
    return None


__all__ = ["DEFAULT_CHUNK", "DEFAULT_CONCURRENCY", "Client", "ServerError"]
