"""``blip2 serve``: one loaded model behind HTTP, batching across requests.

A face over the same core the CLI runs (``api.Model``: the loader, ``ImageStage``,
``Captioner``, ``Asker``, ``Embedder``): requests become images and options, the
core's results become the CLI's records (native endpoints) or OpenAI chat
completions.

* **The engine.** Handlers decode their images in the decode threads
  (``pipeline.DecodePool``), then hand the decoded images to :class:`Engine`: a
  bounded queue and one model thread. The model thread takes what arrived within
  ``batch_wait_ms`` (up to ``max_batch_size`` images), groups it by what can share
  a ``generate`` call (the same task and options: :func:`group_key`) and runs each
  group as one batch, so each image gets the tokens it would get alone (the
  caption path never pads; ask pads as ``Asker`` does, exactly). Sampling requests
  run alone (their seed is theirs). A full queue is a 503 with ``Retry-After``; a
  CUDA out-of-memory halves the batch and retries the same images, as the
  pipeline does.
* **The HTTP side** (Starlette on uvicorn, imported only when :func:`make_app` builds the app):
  every error is an OpenAI-style JSON body (``{"error": {"message", "type",
  "param", "code"}}``) with a 4xx status; a body over ``max_body_bytes`` is refused
  while it is read; with an API key every endpoint but ``/health`` needs
  ``Authorization: Bearer KEY`` (compared with ``hmac.compare_digest``); one line
  per request goes to stderr.
* **Images in requests**: ``data:`` URLs (base64) always; ``http(s)`` URLs only with
  ``allow_urls``; local files (``file:`` URLs or paths) only with ``allow_files``, and
  never outside that folder (symlinks resolved first). Nothing read from the
  server's disk is ever returned, only what the model makes of it.

Nothing here is imported by ``blip2 --help``; torch, transformers, starlette and
uvicorn are imported by the functions that need them.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import Blip2Error, OptionError
from .tasks import run_settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_MS = 10.0
DEFAULT_MAX_QUEUE = 256  # images waiting for the model, at most
DEFAULT_MAX_BODY_MB = 32.0
MAX_NEW_TOKENS_LIMIT = 512  # max_tokens above this is refused (400)
MAX_N = 16  # choices per request
URL_TIMEOUT_S = 20.0
RETRY_AFTER_S = 1
LOOPBACK = ("127.0.0.1", "::1", "localhost")

# OpenAI's request names for the core's parameters (errors name what the client sent).
OPENAI_PARAMS = {"max_new_tokens": "max_tokens", "num_captions": "n", "sample": "temperature"}


@dataclass
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    allow_urls: bool = False
    allow_files: str | None = None  # a folder, resolved
    workers: int = 4  # decode threads
    quiet: bool = False
    model_name: str = ""  # the id /v1/models shows

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise OptionError("max_batch_size must be at least 1", params=["max_batch_size"])
        if self.batch_wait_ms < 0:
            raise OptionError("batch_wait_ms must be 0 or more", params=["batch_wait_ms"])
        if self.max_queue < 1:
            raise OptionError("max_queue must be at least 1", params=["max_queue"])
        if not self.max_body_mb > 0:
            raise OptionError("max_body_mb must be greater than 0", params=["max_body_mb"])
        if not 0 <= self.port <= 65535:
            raise OptionError(f"port must be between 0 and 65535 (got {self.port})", params=["port"])
        if self.allow_files is not None:
            if not os.path.isdir(self.allow_files):
                raise OptionError(f"allow_files {self.allow_files!r} is not a folder", params=["allow_files"])
            self.allow_files = os.path.realpath(self.allow_files)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


# -- errors -----------------------------------------------------------------------
class ApiError(Exception):
    """An error answered to the client as OpenAI does: status + ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def busy(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


def option_error(exc: Blip2Error, names: dict | None = None) -> ApiError:
    names = names or {}
    param = exc.params[0] if exc.params else None
    message = exc.message
    for core, public in names.items():
        message = message.replace(core, public)
    return bad_request(message + (f" ({exc.hint})" if exc.hint else ""), names.get(param, param))


# -- metrics ------------------------------------------------------------------------
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {_num(self.sum)}", f"{name}_count{braces} {self.count}"]
        return out


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format 0.0.4), thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.oom_halvings = 0
        self.in_flight = 0  # HTTP requests being answered

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (method, path, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 400:
                self.errors[(path, status)] = self.errors.get((path, status), 0) + 1
            self.latency.observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes.observe(size)
            self.images += size

    def render(self, queue_depth: int, ready: bool) -> str:
        with self.lock:
            lines = ["# HELP blip2_requests_total HTTP requests answered.", "# TYPE blip2_requests_total counter"]
            for (method, path, status), n in sorted(self.requests.items()):
                lines.append(f'blip2_requests_total{{method="{method}",path="{_label(path)}",status="{status}"}} {n}')
            lines += ["# HELP blip2_request_errors_total Requests answered with a 4xx or 5xx status.",
                      "# TYPE blip2_request_errors_total counter"]
            for (path, status), n in sorted(self.errors.items()):
                lines.append(f'blip2_request_errors_total{{path="{_label(path)}",status="{status}"}} {n}')
            lines += ["# HELP blip2_request_latency_seconds Time from request to response.",
                      "# TYPE blip2_request_latency_seconds histogram", *self.latency.lines("blip2_request_latency_seconds"),
                      "# HELP blip2_batch_size Images per model call.", "# TYPE blip2_batch_size histogram",
                      *self.batch_sizes.lines("blip2_batch_size"),
                      "# HELP blip2_images_total Images run through the model.", "# TYPE blip2_images_total counter",
                      f"blip2_images_total {self.images}",
                      "# HELP blip2_oom_halvings_total Batches halved after a CUDA out-of-memory error.",
                      "# TYPE blip2_oom_halvings_total counter", f"blip2_oom_halvings_total {self.oom_halvings}",
                      "# HELP blip2_requests_in_flight Other requests being answered.",
                      "# TYPE blip2_requests_in_flight gauge", f"blip2_requests_in_flight {max(0, self.in_flight - 1)}",
                      "# HELP blip2_queue_depth Images queued for or in the model.", "# TYPE blip2_queue_depth gauge",
                      f"blip2_queue_depth {queue_depth}",
                      "# HELP blip2_ready 1 once the model is loaded.", "# TYPE blip2_ready gauge",
                      f"blip2_ready {int(ready)}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- work: what one group of requests runs -------------------------------------------
class Work:
    """What a queued request asks of the model. Requests whose ``key`` is equal share
    a batch: ``run(units)`` gets their units (one per image) and returns one result each."""

    key: Any = None
    alone = False  # sampling: never batched with another request (its seed is its own)
    seed: int | None = None

    def run(self, units: list) -> list:
        raise NotImplementedError


class CaptionWork(Work):
    """units: decoded images; results: (token rows, texts) per image."""

    def __init__(self, engine: Engine, gen, preprocess: str):
        self.engine, self.gen, self.preprocess = engine, gen, preprocess
        self.key = ("caption", preprocess, _freeze(gen.describe()))
        self.alone, self.seed = gen.sample, gen.seed

    def run(self, units: list) -> list:
        from .caption import Captioner

        captioner = self.engine.cached(("captioner", self.key), lambda: Captioner(self.engine.loaded, self.gen))
        rows = captioner.generate_ids(self.engine.stage(self.preprocess).pixels(units))
        texts = [t.strip() for t in self.engine.loaded.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        n = self.gen.num_captions
        return [(rows[i * n:(i + 1) * n], texts[i * n:(i + 1) * n]) for i in range(len(units))]


class AskWork(Work):
    """units: (decoded image, [prompt, ...]); results: per prompt (token rows, texts)."""

    def __init__(self, engine: Engine, gen, preprocess: str, template: str | None):
        self.engine, self.gen, self.preprocess, self.template = engine, gen, preprocess, template
        self.key = ("ask", preprocess, template, _freeze(gen.describe()))
        self.alone, self.seed = gen.sample, gen.seed

    def run(self, units: list) -> list:
        from .ask import PAIRS_PER_IMAGE, Asker

        engine = self.engine
        asker = engine.cached(("asker", self.key), lambda: Asker(
            engine.loaded, self.gen, pairs_per_call=engine.config.max_batch_size * PAIRS_PER_IMAGE))
        features = asker.image_features(engine.stage(self.preprocess).pixels([image for image, _ in units]))
        pairs = [(i, prompt) for i, (_, prompts) in enumerate(units) for prompt in prompts]
        ids = asker.generate_ids(features, pairs)
        out, at = [], 0
        for _, prompts in units:
            mine = ids[at:at + len(prompts)]
            at += len(prompts)
            out.append([(rows, asker.decode(rows)) for rows in mine])
        return out


class EmbedWork(Work):
    """units: decoded images; results: float32 vectors."""

    def __init__(self, engine: Engine, features: str, pool: str, preprocess: str):
        self.engine, self.features, self.pool, self.preprocess = engine, features, pool, preprocess
        self.key = ("embed", features, pool, preprocess)

    def embedder(self):
        return self.engine.model._embedder(self.features, self.pool)

    def run(self, units: list) -> list:
        vectors = self.embedder().image_vectors(self.engine.stage(self.preprocess).pixels(units)).numpy()
        return [vectors[i].astype("float32", copy=False) for i in range(len(units))]


class TextWork(Work):
    """units: lists of texts (one per request, embedded in one call as a local run does);
    results: their ``[T, D]`` float32 vectors."""

    alone = True

    def __init__(self, engine: Engine, features: str, pool: str):
        self.engine, self.features, self.pool = engine, features, pool
        self.key = ("embed-text", features, pool)

    def run(self, units: list) -> list:
        embedder = self.engine.model._embedder(self.features, self.pool)
        return [embedder.text_vectors(texts).numpy() for texts in units]


class ScoreWork(Work):
    """units: (decoded image, texts); results: (itm, itc) lists."""

    def __init__(self, engine: Engine, preprocess: str):
        self.engine, self.preprocess = engine, preprocess
        self.key = ("score", preprocess)

    def run(self, units: list) -> list:
        from .embed import itc_similarity

        embedder = self.engine.model._embedder("itc", "none")
        out = []
        for image, texts in units:
            vision = embedder.encode_images(self.engine.stage(self.preprocess).pixels([image]))
            vectors = embedder.image_vectors(vision=vision)[0]
            itc = itc_similarity(vectors, embedder.text_vectors(texts)).tolist()
            itm = embedder.itm_probabilities(vision.last_hidden_state, texts).tolist()
            out.append((itm, itc))
        return out


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


# -- the engine ---------------------------------------------------------------------
@dataclass
class Job:
    work: Work
    units: list
    future: Future = field(default_factory=Future)
    results: list = field(default_factory=list)


class Engine:
    """A bounded queue and the one thread that runs the model (see the module docstring)."""

    _STOP = object()

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.model: Any = None  # api.Model, once loaded
        self.loaded: Any = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._depth = 0  # units queued or running
        self._lock = threading.Lock()
        self._cache: dict = {}
        self._stages: dict = {}
        self._thread: threading.Thread | None = None
        self.decode_pool: Any = None  # pipeline.DecodePool, once started
        self.batch_size = config.max_batch_size  # lowered after a CUDA out-of-memory error

    # -- life ------------------------------------------------------------------------
    def start(self, load: Callable[[], Any]) -> None:
        """Load the model (``load()`` returns an ``api.Model``) and start the model thread, in the background."""
        from .pipeline import DecodePool

        self.decode_pool = DecodePool(self.config.workers, name="blip2-serve-decode")

        def boot() -> None:
            try:
                self.model = load()
                self.loaded = self.model.loaded
            except BaseException as exc:  # noqa: BLE001 - reported by whoever waits on the server
                self.failed = exc
                return
            self._thread = threading.Thread(target=self._work, name="blip2-serve-model", daemon=True)
            self._thread.start()
            self.ready.set()

        threading.Thread(target=boot, name="blip2-serve-load", daemon=True).start()

    def stop(self) -> None:
        """Finish what is queued, then end the model thread."""
        self._queue.put(self._STOP)
        if self._thread is not None:
            self._thread.join()
        if self.decode_pool is not None:
            self.decode_pool.shutdown()

    @property
    def depth(self) -> int:
        return self._depth

    # -- helpers the works use (model thread only) ------------------------------------
    def cached(self, key, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def stage(self, preprocess: str):
        stage = self._stages.get(preprocess)
        if stage is None:
            from .images import ImageStage

            stage = self._stages[preprocess] = ImageStage(self.loaded, preprocess)
        return stage

    def decode(self, data: bytes, preprocess: str) -> Future:
        """Decode and resize ``data`` in a decode thread (``images.ImageError`` if it cannot be)."""
        return self.decode_pool.submit(self.stage(preprocess).prepare, data)

    # -- the queue -----------------------------------------------------------------------
    def submit(self, work: Work, units: list) -> Future:
        if not self.ready.is_set():
            raise busy("the model is still loading")
        n = max(1, len(units))
        with self._lock:
            if self._depth + n > self.config.max_queue:
                raise busy(f"the server is busy ({self._depth} images queued); try again shortly")
            self._depth += n
        job = Job(work, list(units))
        self._queue.put(job)
        return job.future

    def _work(self) -> None:
        wait = self.config.batch_wait_ms / 1000.0
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is self._STOP:
                return
            jobs = [first]
            size = len(first.units)
            deadline = time.monotonic() + wait
            while size < self.batch_size:
                left = deadline - time.monotonic()
                try:
                    got = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if got is self._STOP:
                    stopping = True  # finish what was taken, then end
                    break
                jobs.append(got)
                size += len(got.units)
            self._run_jobs(jobs)
        # Accepted before the stop: answer them too.
        while True:
            try:
                got = self._queue.get_nowait()
            except queue.Empty:
                return
            if got is not self._STOP:
                self._run_jobs([got])

    def _run_jobs(self, jobs: list[Job]) -> None:
        groups: dict[Any, list[Job]] = {}
        for job in jobs:
            key = (id(job), job.work.key) if job.work.alone else job.work.key
            groups.setdefault(key, []).append(job)
        for group in groups.values():
            try:
                self._run_group(group)
            except BaseException as exc:  # noqa: BLE001 - the requests' error, not the server's end
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._lock:
                    self._depth -= sum(max(1, len(job.units)) for job in group)

    def _run_group(self, group: list[Job]) -> None:
        work = group[0].work
        units = [(job, unit) for job in group for unit in job.units]
        if work.seed is not None:
            import torch

            torch.manual_seed(work.seed)
        results: list = []
        for start in range(0, len(units), self.batch_size):
            chunk = [unit for _, unit in units[start:start + self.batch_size]]
            results += self._run_model(work, chunk)
        at = 0
        for job in group:
            job.future.set_result(results[at:at + len(job.units)])
            at += len(job.units)

    def _run_model(self, work: Work, chunk: list) -> list:
        """On CUDA out-of-memory: halve, retry the same images, keep the size that worked (as the pipeline)."""
        from .pipeline import free_cuda_cache, is_out_of_memory

        try:
            out = work.run(chunk)
            self.metrics.batch(len(chunk))
            return out
        except Exception as exc:
            if not is_out_of_memory(exc) or len(chunk) == 1:
                raise
        free_cuda_cache()
        half = (len(chunk) + 1) // 2
        self.batch_size = min(self.batch_size, half)
        with self.metrics.lock:
            self.metrics.oom_halvings += 1
        return self._run_model(work, chunk[:half]) + self._run_model(work, chunk[half:])


# -- request parsing -------------------------------------------------------------------
def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None, param: str | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer (got {json.dumps(value)[:40]})", param or name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        where = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"{name} must be {where} (got {value})", param or name)
    return value


def _float(body: dict, name: str, default, lo: float | None = None, hi: float | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number (got {json.dumps(value)[:40]})", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request(f"{name} must be between {lo} and {hi} (got {value})", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", name)
    return value


def _str(body: dict, name: str, default, *, allow_none: bool = True):
    value = body.get(name, default)
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string", name)
    return value


def _choice(body: dict, name: str, default: str, choices: Sequence[str]) -> str:
    value = _str(body, name, default, allow_none=False)
    if value not in choices:
        raise bad_request(f"{name} must be one of {', '.join(choices)} (got {value[:40]!r})", name)
    return value


def generation_options(body: dict, *, task: str, prefix: str = ""):
    """GenerationOptions from a native request's ``options`` (the CLI's names and defaults)."""
    from .ask import ASK_MAX_NEW_TOKENS, ASK_MIN_NEW_TOKENS
    from .caption import (
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_MIN_NEW_TOKENS,
        GenerationOptions,
    )

    count = "num_answers" if task == "ask" else "num_captions"
    max_default, min_default = ((ASK_MAX_NEW_TOKENS, ASK_MIN_NEW_TOKENS) if task == "ask"
                                else (DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_NEW_TOKENS))
    gen = GenerationOptions(
        prompt=_str(body, "prompt", None) if task == "caption" else None,
        max_new_tokens=_int(body, "max_new_tokens", max_default, 1, MAX_NEW_TOKENS_LIMIT),
        min_new_tokens=_int(body, "min_new_tokens", min_default, 0, MAX_NEW_TOKENS_LIMIT),
        num_beams=_int(body, "num_beams", None, 1, 64),
        num_captions=_int(body, count, 1, 1, MAX_N),
        sample=_bool(body, "sample", False),
        temperature=_float(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_float(body, "top_p", 0.9, 0.0, 1.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 100.0),
        seed=_int(body, "seed", None, 0, 2**63 - 1),
    )
    try:
        gen.validate(count_name=count)
    except OptionError as exc:
        raise option_error(exc) from None
    return gen


def parse_data_url(url: str, param: str) -> bytes:
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:"):
        raise bad_request("a data URL must look like data:image/png;base64,...", param, "invalid_image_url")
    if not head.endswith(";base64"):
        raise bad_request("a data URL must be base64 (data:image/...;base64,...)", param, "invalid_image_url")
    return _decode_base64(payload, param, "the data URL")


def parse_base64(value: Any, param: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request("data must be a base64 string", param, "invalid_base64")
    if value.startswith("data:"):
        return parse_data_url(value, param)
    return _decode_base64(value, param, "data")


def _decode_base64(payload: str, param: str, what: str) -> bytes:
    """The bytes of a base64 payload; 400 when it is not base64 or holds nothing."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{what} is not valid base64", param, "invalid_base64") from None
    if not data:
        raise bad_request(f"{what} holds no bytes", param, "invalid_image")
    return data


class ImageSource:
    """Where a request's image comes from: bytes (a data URL), a URL or a file the
    operator allowed. ``read()`` runs in a decode thread (it may fetch or read)."""

    def __init__(self, config: ServeConfig, url: Any, param: str):
        if not isinstance(url, str) or not url:
            raise bad_request("an image URL must be a non-empty string", param, "invalid_image_url")
        self.config, self.param = config, param
        self.data: bytes | None = None
        self.url: str | None = None
        self.path: str | None = None
        lower = url[:8].lower()
        if lower.startswith("data:"):
            self.data = parse_data_url(url, param)
        elif lower.startswith(("http://", "https://")):
            if not config.allow_urls:
                raise bad_request("remote image URLs are refused by this server (send a data: URL; the "
                                  "operator can allow them with --allow-urls)", param, "url_not_allowed")
            self.url = url
        else:
            if config.allow_files is None:
                raise bad_request("local files are refused by this server (send a data: URL; the operator "
                                  "can allow a folder with --allow-files DIR)", param, "file_not_allowed")
            self.path = self._allowed_path(url)

    @classmethod
    def of_bytes(cls, config: ServeConfig, data: bytes, param: str) -> ImageSource:
        source = cls.__new__(cls)
        source.config, source.param, source.data, source.url, source.path = config, param, data, None, None
        return source

    def _allowed_path(self, url: str) -> str:
        from urllib.parse import unquote, urlsplit

        if url.lower().startswith("file:"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise bad_request("a file: URL must name a local file", self.param, "file_not_allowed")
            url = unquote(parts.path)
        root = self.config.allow_files or ""
        candidate = url if os.path.isabs(url) else os.path.join(root, url)
        real = os.path.realpath(candidate)  # symlinks resolved before the check
        if os.path.commonpath([real, root]) != root:
            raise bad_request("that file is outside the folder this server may read", self.param, "file_not_allowed")
        return real

    def read(self) -> bytes:
        from .images import ImageError

        if self.data is not None:
            return self.data
        limit = self.config.max_body_bytes
        if self.path is not None:
            from .decode import read_image_file

            data, _ = read_image_file(self.path, max_bytes=limit)
            return data
        import urllib.request

        assert self.url is not None
        try:
            with urllib.request.urlopen(self.url, timeout=URL_TIMEOUT_S) as response:
                data = response.read(limit + 1)
        except OSError as exc:
            raise ImageError(f"cannot fetch the image URL: {exc}") from None
        if len(data) > limit:
            raise ImageError(f"the image at the URL is larger than {limit} bytes")
        return data


# -- the OpenAI chat completion -----------------------------------------------------------
def _message_text(content, param: str) -> str:
    """The text of an assistant message (a string or text parts)."""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return " ".join(t.strip() for t in texts if isinstance(t, str) and t.strip())
    if content is None:
        return ""
    raise bad_request(f"{param} must be a string or a list of parts", param)


def parse_chat(body: dict, config: ServeConfig) -> tuple[ImageSource, str | None, list[tuple[str, str]]]:
    """(the image, the question or None, the earlier turns) from ``messages``: the last
    user message's text is the question; each earlier user text answered by an assistant
    message is a turn (``[(question, answer), ...]``, as ``blip2 chat`` carries them); the
    image is the last one of the user messages. System messages are not used."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    image: ImageSource | None = None
    question: str | None = None
    last_user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        if role == "user":
            last_user = i
    if last_user is None:
        raise bad_request("messages holds no user message", "messages")
    history: list[tuple[str, str]] = []
    pending: str | None = None  # a user text waiting for its answer
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            answer = _message_text(message.get("content"), f"messages[{i}].content")
            if pending and i < last_user:
                history.append((pending, answer))
            pending = None
            continue
        if role != "user":
            continue
        content = message.get("content")
        texts = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict):
                    raise bad_request(f"{param} must be an object", param)
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad_request(f"{param}.text must be a string", f"{param}.text")
                    texts.append(part["text"])
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    image = ImageSource(config, url, f"{param}.image_url")
                else:
                    raise bad_request(f"{param}.type must be text or image_url (got {str(kind)[:40]!r})",
                                      f"{param}.type")
        else:
            raise bad_request(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        text = " ".join(t.strip() for t in texts if t.strip())
        pending = text or None
        if i == last_user:
            question = text or None
    if image is None:
        raise bad_request("no image: add an image_url part (a data: URL) to the user message", "messages",
                          "missing_image")
    return image, question, history


def fit_chat_prompt(loaded, history: list[tuple[str, str]], question: str, max_new_tokens: int, *,
                    template: str | None = None, context_tokens: int | None = None) -> tuple[str, int, int]:
    """``blip2 chat``'s prompt for ``question`` after ``history``: ``(prompt, turns dropped,
    the limit)``, the oldest turns dropped until it fits the model's context (or
    ``context_tokens``), as ``ask.ChatSession.fit`` does; 400 if the question alone does not."""
    from .ask import DEFAULT_TEMPLATE, chat_prompt, context_limit, render_prompt

    template = template or DEFAULT_TEMPLATE
    model_limit = context_limit(loaded, max_new_tokens)
    limit = min(context_tokens, model_limit) if context_tokens else model_limit
    if limit < 1:
        raise bad_request(f"no room for a prompt: the model's context holds {model_limit} prompt tokens once the "
                          "image and max_tokens are counted", "max_tokens", "context_length_exceeded")
    for dropped in range(len(history) + 1):
        prompt = chat_prompt(history[dropped:], question, template)
        if len(loaded.tokenizer(prompt)["input_ids"]) <= limit:
            return prompt, dropped, limit
    n = len(loaded.tokenizer(render_prompt(question, template))["input_ids"])
    raise bad_request(f"the question is too long for the model's context ({n} tokens, at most {limit})",
                      "messages", "context_length_exceeded")


def chat_extensions(body: dict) -> tuple[str | None, int | None, str]:
    """blip2's own chat fields, as ``blip2 chat`` sends them: ``template`` (a turn's prompt,
    with ``{question}``), ``context_tokens`` (at most that many prompt tokens) and
    ``preprocess``; OpenAI clients send none of them."""
    template = _str(body, "template", None)
    if template is not None and "{question}" not in template:
        raise bad_request("template must contain {question}", "template")
    return template, _int(body, "context_tokens", None, 1, 10_000_000), _preprocess(body)


def chat_generation(body: dict, *, task: str):
    """GenerationOptions for a chat completion: OpenAI's names mapped onto the CLI's options.

    ``max_tokens`` (or ``max_completion_tokens``) = max new tokens; ``temperature`` absent:
    blip2's default decoding (beam search, as ``blip2 caption``); ``0``: greedy;
    above 0: nucleus sampling with ``top_p``; ``n`` = captions (answers); ``seed``.
    ``num_beams``, ``min_tokens``, ``repetition_penalty`` and ``prompt`` (caption) may be
    sent as extra fields."""
    from .ask import ASK_MAX_NEW_TOKENS, ASK_MIN_NEW_TOKENS
    from .caption import (
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_MIN_NEW_TOKENS,
        GenerationOptions,
    )

    max_default, min_default = ((ASK_MAX_NEW_TOKENS, ASK_MIN_NEW_TOKENS) if task == "ask"
                                else (DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_NEW_TOKENS))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _int(body, name, max_default, 1, MAX_NEW_TOKENS_LIMIT)
    min_new = min(_int(body, "min_tokens", min_default, 0, MAX_NEW_TOKENS_LIMIT), max_new)
    temperature = _float(body, "temperature", None, 0.0, 2.0)
    top_p = _float(body, "top_p", None, 0.0, 1.0)
    n = _int(body, "n", 1, 1, MAX_N)
    beams = _int(body, "num_beams", None, 1, 64)
    sample = temperature is not None and temperature > 0
    if temperature == 0 and beams is None:
        beams = 1  # greedy
    if top_p is not None and sample and top_p <= 0:
        raise bad_request("top_p must be greater than 0", "top_p")
    gen = GenerationOptions(
        prompt=_str(body, "prompt", None) if task == "caption" else None,
        max_new_tokens=max_new, min_new_tokens=min_new, num_beams=beams, num_captions=n, sample=sample,
        temperature=temperature if sample else 1.0, top_p=top_p if (sample and top_p is not None) else 0.9,
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 100.0),
        seed=_int(body, "seed", None, 0, 2**63 - 1),
    )
    try:
        gen.validate()
    except OptionError as exc:
        raise option_error(exc, OPENAI_PARAMS) from None
    return gen


_ids = itertools.count(1)


def completion_body(model_name: str, prompt_tokens: int, rows: list[list[int]], texts: list[str],
                    max_new_tokens: int, eos: set) -> dict:
    choices = []
    for i, (row, text) in enumerate(zip(rows, texts)):
        stopped = bool(row) and row[-1] in eos
        finish = "length" if (len(row) >= max_new_tokens and not stopped) else "stop"
        choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": finish})
    completion = sum(len(r) for r in rows)
    return {
        "id": f"chatcmpl-{os.getpid():x}{next(_ids):08x}{int(time.time() * 1000) & 0xFFFFFF:06x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
    }


# -- the ASGI app --------------------------------------------------------------------------
class Server:
    """The app's state: config, engine, metrics, and the handlers' shared steps."""

    def __init__(self, config: ServeConfig, engine: Engine):
        self.config = config
        self.engine = engine
        self.metrics = engine.metrics
        self.settings: dict = {}  # the loader's settings every record carries

    # -- steps -------------------------------------------------------------------------------
    def require_ready(self) -> None:
        if not self.engine.ready.is_set():
            raise busy("the model is still loading")

    def require(self, architectures: tuple, what: str) -> None:
        if self.engine.model.architecture not in architectures:
            raise ApiError(400, f"{what} needs another checkpoint: this server runs a "
                           f"{self.engine.model.architecture}", param="model", code="model_not_supported")

    async def decode(self, source: ImageSource, preprocess: str):
        """The decoded image, or an ImageError (``images.ImageError``) raised here."""
        import asyncio

        engine = self.engine

        def read_and_prepare():
            return engine.stage(preprocess).prepare(source.read())

        return await asyncio.wrap_future(engine.decode_pool.submit(read_and_prepare))

    async def run(self, work: Work, units: list) -> list:
        import asyncio

        if not units:
            return []
        future = self.engine.submit(work, units)
        return await asyncio.wrap_future(future)

    async def decode_all(self, sources: list, preprocess: str) -> list:
        """[(decoded, None) | (None, error message)] per source, decoded in parallel."""
        import asyncio

        from .images import ImageError

        async def one(src):
            if isinstance(src, ApiError):
                return None, src.message
            try:
                return await self.decode(src, preprocess), None
            except ImageError as exc:
                return None, str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad image is that image's error
                return None, f"cannot read this image ({type(exc).__name__}: {exc})"

        return list(await asyncio.gather(*(one(s) for s in sources)))


def native_images(server: Server, body: dict) -> tuple[list[str], list]:
    """(names, sources) of a native request's ``images``: ``[{"name", "data"}|{"name", "url"}]``.
    An entry whose bytes are unusable becomes that image's error (its record says why)."""
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise bad_request("images must be a non-empty list of {name, data} objects", "images")
    if len(images) > server.config.max_queue:
        raise bad_request(f"at most {server.config.max_queue} images per request", "images")
    names: list[str] = []
    sources: list[Any] = []
    for i, entry in enumerate(images):
        param = f"images[{i}]"
        if not isinstance(entry, dict):
            raise bad_request(f"{param} must be an object", param)
        name = entry.get("name", f"image-{i}")
        if not isinstance(name, str):
            raise bad_request(f"{param}.name must be a string", f"{param}.name")
        names.append(name)
        src: Any
        try:
            if isinstance(entry.get("error"), str):  # a client could not read it: its record says why
                src = ApiError(400, entry["error"][:2000])
                sources.append(src)
                continue
            if "data" in entry:
                src = ImageSource.of_bytes(server.config, parse_base64(entry["data"], f"{param}.data"), param)
            elif "url" in entry:
                src = ImageSource(server.config, entry["url"], f"{param}.url")
            else:
                raise bad_request(f"{param} needs data (base64) or url", param)
        except ApiError as exc:
            if exc.code in ("url_not_allowed", "file_not_allowed") or exc.param == param:
                raise
            src = exc  # bad base64: that image's error record
        sources.append(src)
    return names, sources


def _options(body: dict, allowed: Sequence[str]) -> dict:
    options = body.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad_request("options must be an object", "options")
    for key in options:
        if key not in allowed:
            raise bad_request(f"unknown option {str(key)[:40]!r} (known: {', '.join(allowed)})", f"options.{key}")
    return options


GEN_OPTIONS = ("max_new_tokens", "min_new_tokens", "num_beams", "sample", "temperature", "top_p", "seed",
               "repetition_penalty", "preprocess")
CAPTION_OPTIONS = (*GEN_OPTIONS, "prompt", "num_captions")
ASK_OPTIONS = (*GEN_OPTIONS, "num_answers", "template")
EMBED_OPTIONS = ("features", "pool", "preprocess")


def _preprocess(options: dict) -> str:
    from .choices import Preprocess, names

    return _choice(options, "preprocess", "fast", names(Preprocess))


async def caption_endpoint(server: Server, body: dict) -> dict:
    from .caption import caption_record
    from .loader import GENERATIVE

    server.require_ready()
    server.require(GENERATIVE, "caption")
    options = _options(body, CAPTION_OPTIONS)
    gen = generation_options(options, task="caption")
    preprocess = _preprocess(options)
    names, sources = native_images(server, body)
    decoded = await server.decode_all(sources, preprocess)
    good = [d for d, err in decoded if err is None]
    results = iter(await server.run(CaptionWork(server.engine, gen, preprocess), good))
    settings = {**server.settings, **run_settings("caption", preprocess=preprocess, gen=gen)}
    records = []
    for name, (_, err) in zip(names, decoded):
        record = caption_record(name, None, err) if err is not None else caption_record(name, next(results)[1], None)
        record.update(settings)
        records.append(record)
    return {"records": records}


async def ask_endpoint(server: Server, body: dict) -> dict:
    from .ask import DEFAULT_TEMPLATE, answer_record, render_prompt
    from .loader import GENERATIVE

    server.require_ready()
    server.require(GENERATIVE, "ask")
    options = _options(body, ASK_OPTIONS)
    questions = body.get("questions")
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise bad_request("questions must be a non-empty list of non-empty strings", "questions")
    questions = [q.strip() for q in questions]
    template = options.get("template", DEFAULT_TEMPLATE)
    if template is not None and (not isinstance(template, str) or "{question}" not in template):
        raise bad_request("template must be a string containing {question}, or null (the question as is)",
                          "options.template")
    gen = generation_options(options, task="ask")
    preprocess = _preprocess(options)
    names, sources = native_images(server, body)
    decoded = await server.decode_all(sources, preprocess)
    prompts = [render_prompt(q, template) for q in questions]
    good = [(d, prompts) for d, err in decoded if err is None]
    results = iter(await server.run(AskWork(server.engine, gen, preprocess, template), good))
    settings = {**server.settings, **run_settings("ask", preprocess=preprocess, gen=gen, template=template)}
    records = []
    for name, (_, err) in zip(names, decoded):
        answers = [None] * len(questions) if err is not None else [texts for _, texts in next(results)]
        for question, texts in zip(questions, answers):
            record = answer_record(name, question, texts, err)
            record.update(settings)
            records.append(record)
    return {"records": records}


async def embed_endpoint(server: Server, body: dict) -> dict:
    from .embed import FEATURES, POOLS, image_record

    server.require_ready()
    options = _options(body, EMBED_OPTIONS)
    features = _choice(options, "features", "auto", FEATURES)
    pool = _choice(options, "pool", "none", POOLS)
    preprocess = _preprocess(options)
    work = EmbedWork(server.engine, features, pool, preprocess)
    try:
        work.embedder()  # cheap: checks the features against the checkpoint
    except Blip2Error as exc:
        raise ApiError(400, exc.message, param="options.features", code="model_not_supported") from None
    if _bool(body, "describe", False):  # what the vectors will be, no image (a client's vector store)
        embedder = work.embedder()
        return {"features": embedder.features, "pool": pool, "dims": list(embedder.dims),
                "normalized": bool(embedder.normalized)}
    if "texts" in body:  # text vectors (blip2 embed --text): the records a local run writes first
        return await _embed_texts(server, body, features, pool, work)
    names, sources = native_images(server, body)
    decoded = await server.decode_all(sources, preprocess)
    good = [d for d, err in decoded if err is None]
    results = iter(await server.run(work, good))
    settings = {**server.settings, **run_settings("embed", preprocess=preprocess, features=features, pool=pool)}
    records = []
    for name, (_, err) in zip(names, decoded):
        record = image_record(name, None, err) if err is not None else image_record(name, next(results), None)
        record.update(settings)
        records.append(record)
    return {"records": records}


async def _embed_texts(server: Server, body: dict, features: str, pool: str, work: EmbedWork) -> dict:
    from .embed import text_record

    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad_request("texts must be a non-empty list of non-empty strings", "texts")
    if "images" in body:
        raise bad_request("send texts and images in separate requests", "texts")
    try:
        work.embedder().require_text()
    except Blip2Error as exc:
        raise ApiError(400, exc.message, param="options.features", code="model_not_supported") from None
    (vectors,) = await server.run(TextWork(server.engine, features, pool), [texts])
    return {"records": [text_record(t, v) for t, v in zip(texts, vectors)]}


async def score_endpoint(server: Server, body: dict) -> dict:
    from .loader import RETRIEVAL

    server.require_ready()
    server.require(RETRIEVAL, "score")
    options = _options(body, ("preprocess",))
    preprocess = _preprocess(options)
    texts = body.get("texts")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request("texts must be a non-empty list of strings", "texts")
    names, sources = native_images(server, body)
    decoded = await server.decode_all(sources, preprocess)
    good = [(d, texts) for d, err in decoded if err is None]
    results = iter(await server.run(ScoreWork(server.engine, preprocess), good))
    records = []
    for name, (_, err) in zip(names, decoded):
        if err is not None:
            records += [{"path": name, "text": t, "itm": None, "itc": None, "error": err} for t in texts]
            continue
        itm, itc = next(results)
        records += [{"path": name, "text": t, "itm": m, "itc": c, "error": None} for t, m, c in zip(texts, itm, itc)]
    return {"records": records}


async def chat_endpoint(server: Server, body: dict) -> dict | Streamed:
    from .ask import DEFAULT_TEMPLATE
    from .caption import eos_ids, prompt_ids
    from .images import ImageError
    from .loader import GENERATIVE

    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad_request("stream_options needs stream: true and an object", "stream_options")
    server.require_ready()
    server.require(GENERATIVE, "chat completions")
    source, question, history = parse_chat(body, server.config)
    task = "ask" if question is not None else "caption"
    gen = chat_generation(body, task=task)
    template, context_tokens, preprocess = chat_extensions(body)
    try:
        image = await server.decode(source, preprocess)
    except ImageError as exc:
        raise bad_request(f"the image cannot be read: {exc}", source.param, "invalid_image") from None
    except Exception as exc:  # noqa: BLE001 - the image's error
        raise bad_request(f"the image cannot be read ({type(exc).__name__})", source.param, "invalid_image") from None
    loaded = server.engine.loaded
    dropped = limit = None
    if question is not None:
        prompt, dropped, limit = fit_chat_prompt(loaded, history, question, gen.max_new_tokens, template=template,
                                                 context_tokens=context_tokens)
        (result,) = await server.run(AskWork(server.engine, gen, preprocess, template or DEFAULT_TEMPLATE),
                                     [(image, [prompt])])
        rows, texts = result[0]
    else:
        prompt = gen.prompt
        (result,) = await server.run(CaptionWork(server.engine, gen, preprocess), [image])
        rows, texts = result
    prompt_tokens = len(prompt_ids(loaded, prompt))
    completion = completion_body(server.config.model_name, prompt_tokens, rows, texts, gen.max_new_tokens,
                                 eos_ids(loaded))
    if dropped is not None:  # blip2's own field: what blip2 chat shows (OpenAI clients ignore it)
        completion["blip2"] = {"dropped_turns": dropped, "context_tokens": limit}
    if stream:
        return Streamed(stream_events(completion, include_usage=bool((options or {}).get("include_usage"))))
    return completion


class Streamed:
    """A completion to send as server-sent events (``stream: true``): each choice whole
    in one chunk (the model's answer is ready at once), as OpenAI's chunks are shaped."""

    def __init__(self, events: list[str]):
        self.events = events


def stream_events(completion: dict, *, include_usage: bool) -> list[str]:
    base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"]}
    events = []
    for choice in completion["choices"]:
        events.append({**base, "choices": [{"index": choice["index"], "logprobs": None, "finish_reason": None,
                                            "delta": {"role": "assistant", "content": ""}}]})
        events.append({**base, "choices": [{"index": choice["index"], "logprobs": None, "finish_reason": None,
                                            "delta": {"content": choice["message"]["content"]}}]})
        events.append({**base, "choices": [{"index": choice["index"], "logprobs": None, "delta": {},
                                            "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        events.append({**base, "choices": [], "usage": completion["usage"]})
    return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


# -- the HTTP side: route handlers (each finds the Server as request.app.state.server) --


def _error_response(exc: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit ({limit} bytes, "
                    "its max_body_mb)", code="body_too_large")


async def _read_json(request, limit: int) -> dict:
    """The request's JSON object body; refused (413) as soon as it is larger than ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise bad_request("the Content-Length header is not a number") from None
        if declared > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise bad_request("the request has no body: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _endpoint(handler):
    """A POST route around ``handler(server, body)``: JSON in, JSON (or events) out, errors as JSON."""
    async def call(request):
        from starlette.responses import JSONResponse, StreamingResponse

        server = request.app.state.server
        try:
            body = await _read_json(request, server.config.max_body_bytes)
            answer = await handler(server, body)
            if isinstance(answer, Streamed):
                return StreamingResponse(iter(answer.events), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse(answer)
        except ApiError as exc:
            return _error_response(exc)
        except Blip2Error as exc:
            return _error_response(option_error(exc))
    return call


async def _health(request):
    from starlette.responses import JSONResponse

    engine = request.app.state.server.engine
    if engine.failed is not None:
        return JSONResponse({"status": "failed"}, status_code=503)
    if not engine.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse({"status": "ok"})


async def _models(request):
    from starlette.responses import JSONResponse

    name = request.app.state.server.config.model_name
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "blip2"}]})


async def _info(request):
    from starlette.responses import JSONResponse

    server = request.app.state.server
    config, model = server.config, server.engine.model
    return JSONResponse({
        "model": config.model_name, "ready": server.engine.ready.is_set(),
        "architecture": model.architecture if model is not None else None,
        "settings": server.settings, "max_body_bytes": config.max_body_bytes,
        "max_batch_size": config.max_batch_size, "max_queue": config.max_queue,
    })


async def _metrics(request):
    from starlette.responses import PlainTextResponse

    server = request.app.state.server
    return PlainTextResponse(server.metrics.render(server.engine.depth, server.engine.ready.is_set()),
                             media_type="text/plain; version=0.0.4")


async def _http_error(request, exc):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no such endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _error_response(ApiError(exc.status_code, message, code=kind))


async def _server_error(request, exc: Exception):
    return _error_response(ApiError(500, f"internal error ({type(exc).__name__})", type="server_error"))


def _lifespan(on_startup: Callable[[], None] | None, on_shutdown: Callable[[], None] | None):
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_startup is not None:
            on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                on_shutdown()
    return lifespan


def _routes():
    from starlette.routing import Route

    return [
        Route("/health", _health, methods=["GET"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(chat_endpoint), methods=["POST"]),
        Route("/v1/blip2/info", _info, methods=["GET"]),
        Route("/v1/blip2/caption", _endpoint(caption_endpoint), methods=["POST"]),
        Route("/v1/blip2/ask", _endpoint(ask_endpoint), methods=["POST"]),
        Route("/v1/blip2/embed", _endpoint(embed_endpoint), methods=["POST"]),
        Route("/v1/blip2/score", _endpoint(score_endpoint), methods=["POST"]),
    ]


class _Gate:
    """The ASGI app served: key, the in-flight bound, timing, metrics and the request's log
    line, around every HTTP request to the Starlette ``app``."""

    def __init__(self, app, server: Server, paths: set[str]):
        self.app, self.server, self.paths = app, server, paths
        self.key = server.config.api_key.encode() if server.config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope.get("path", "")
        metrics = self.server.metrics
        with metrics.lock:
            metrics.in_flight += 1
            crowded = metrics.in_flight > self.server.config.max_queue and path not in ("/health", "/metrics")
        try:
            await self.admit(scope, receive, send_status, path, crowded)
        finally:
            with metrics.lock:
                metrics.in_flight -= 1
            self.log(scope, path, status[0], time.perf_counter() - started)

    async def admit(self, scope, receive, send, path: str, crowded: bool) -> None:
        import hmac

        if crowded:  # each request in flight may hold a body and decoded images: a bound on memory
            await _error_response(busy("the server is busy (too many requests in flight); try again shortly"))(
                scope, receive, send)
        elif self.key is not None and path != "/health" and not _authorized(scope, self.key, hmac):
            response = _error_response(ApiError(
                401, "a valid API key is needed: send Authorization: Bearer KEY",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def log(self, scope, path: str, status: int, took: float) -> None:
        known = path if path in self.paths else "other"
        self.server.metrics.request(scope.get("method", ""), known, status, took)
        if not self.server.config.quiet:
            client = scope.get("client") or ("-", 0)
            sys.stderr.write(f'{client[0]} "{scope.get("method")} {_printable(path)}" {status} '
                             f"{took * 1000:.1f} ms\n")
            sys.stderr.flush()


def make_app(server: Server, *, on_startup: Callable[[], None] | None = None,
             on_shutdown: Callable[[], None] | None = None):
    """The ASGI app around ``server`` (routes, JSON errors, key, limits, log, metrics)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    routes = _routes()
    handlers: dict[Any, Any] = {HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, lifespan=_lifespan(on_startup, on_shutdown), exception_handlers=handlers)
    app.state.server = server
    return _Gate(app, server, {r.path for r in routes})


def _authorized(scope, key: bytes, hmac) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
    return False


def _printable(path: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in path)[:200]


# -- running it ---------------------------------------------------------------------------
def bound_address(server) -> tuple[str, int] | None:
    """(host, port) a started uvicorn server listens on (the port chosen for ``port=0``)."""
    for listener in getattr(server, "servers", None) or []:
        for sock in getattr(listener, "sockets", None) or []:
            name = sock.getsockname()
            return name[0], name[1]
    return None


def serve(config: ServeConfig, load: Callable[[], Any], *,
          on_ready: Callable[[tuple[str, int]], None] | None = None, sock=None) -> None:
    """Bind (or listen on ``sock``, from :func:`bind`), load the model in the background,
    serve until SIGTERM/SIGINT, finish every accepted request, then return. Raises the load's error if the model could not be loaded."""
    import contextlib
    import signal

    import uvicorn

    config.validate()
    engine = Engine(config)
    server = Server(config, engine)
    runner: list = []

    def load_model():
        model = load()
        server.settings = model.settings()
        return model

    def on_startup() -> None:
        engine.start(load_model)

        def watch_load() -> None:
            while not (engine.ready.wait(0.1) and runner[0].started):
                if engine.failed is not None:
                    runner[0].should_exit = True
                    return
            if on_ready is not None:
                on_ready(bound_address(runner[0]) or (config.host, config.port))

        threading.Thread(target=watch_load, name="blip2-serve-watch", daemon=True).start()

    app = make_app(server, on_startup=on_startup, on_shutdown=engine.stop)

    class Uvicorn(uvicorn.Server):
        """uvicorn re-raises the signal it caught once it has shut down (the process then
        dies of it); here a SIGTERM/SIGINT is a clean end: every accepted request is
        answered, and the command exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, access_log=False, log_level="warning",
                               lifespan="on", timeout_keep_alive=5, server_header=False)
    uv = Uvicorn(uv_config)
    runner.append(uv)
    sock = sock or bind(config.host, config.port)  # before the model loads: a port in use is said at once
    try:
        uv.run(sockets=[sock])
    finally:
        sock.close()
    if engine.failed is not None:
        raise engine.failed


def bind(host: str, port: int):
    """A listening socket on (host, port), or a UsageError naming ``port`` / ``host``."""
    import socket

    from .errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UsageError(f"host {host!r} is not an address of this machine ({exc.strerror or exc})",
                         params=["host"]) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                         hint="choose another port (or stop what holds it)", params=["port"]) from None
    sock.set_inheritable(True)
    return sock


__all__ = ["ApiError", "Engine", "Metrics", "ServeConfig", "Server", "is_loopback", "make_app", "serve"]
