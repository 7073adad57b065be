"""The one model loader every subcommand uses.

``load(LoadOptions(...), task=...)`` resolves, in this order and before any
weights are read:

1. the checkpoint: a local folder, a short name of the catalogue (``opt-2.7b``,
   ``itm``: ``blip2cli.models``; a folder of that name wins) or a hub id
   (``--revision``; the Hugging Face cache is used, ``HF_HUB_OFFLINE``/``--offline``
   forbid the network, and an unreachable hub is detected with one request, not
   after half a minute of retries), read from its ``config.json``: is it BLIP-2,
   which architecture, which text model;
2. the weights format: safetensors only unless ``--allow-pickle``;
3. the device (``auto``: cuda, then mps, then cpu) and whether it exists;
4. the dtype (``auto``: float16 on GPUs for OPT, bfloat16 for Flan-T5, float32
   on the CPU; float16 is refused for T5, which overflows in it);
5. quantization (``8bit``/``4bit`` through bitsandbytes, ``int8`` weight-only through
   torchao), with the modules that stay unquantized.

Only then ``from_pretrained`` runs. ``trust_remote_code`` is never passed: the
concrete transformers classes are used, no code from the checkpoint runs. The
weights must fit the architecture exactly: a missing, unexpected or mis-sized
tensor is a ``ModelError``, never a silently random layer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import Dtype, Quantize, names
from .errors import DeviceError, ModelError, UsageError

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
DEVICES_HELP = "auto|cpu|cuda|cuda:N|mps"
DTYPES = names(Dtype)  # ("auto", "float32", "float16", "bfloat16")
QUANTIZE = names(Quantize)  # ("none", "8bit", "4bit", "int8")

# Which modules stay in the compute dtype when quantizing. Only the language
# model's linear layers are quantized: they hold three quarters of the weights
# (2.7 B of 3.7 B for opt-2.7b) and tolerate int8/nf4 well. The ViT-g vision
# tower, the Q-Former (which transformers already keeps in fp32 under fp16) and
# the projection feed every token the model sees, so they are kept as they are,
# and so is the output head, as transformers does by default. Passing
# llm_int8_skip_modules replaces transformers' default list, so every module to
# keep is named here.
UNQUANTIZED_MODULES = ["vision_model", "qformer", "query_tokens", "language_projection", "lm_head"]
# --quantize int8 (torchao's int8 weight-only Linear layers) keeps the same modules in the
# compute dtype, by measurement (benchmarks/results/cpu_account.md): int8 in the vision tower
# and the Q-Former changed more of the tiny checkpoints' captions and bought no speed there.
INT8_EXTRA = "pip install 'blip2-cli[int8]'"
TORCHAO_MIN = (0, 15)  # transformers 5's TorchAoConfig needs it

# Architectures each task can use.
GENERATIVE = ("Blip2ForConditionalGeneration",)
RETRIEVAL = ("Blip2ForImageTextRetrieval",)
ALL_ARCHITECTURES = GENERATIVE + RETRIEVAL + ("Blip2Model",)


@dataclass
class LoadOptions:
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    offline: bool = False
    allow_pickle: bool = False


@dataclass
class Checkpoint:
    """What ``config.json`` says, read before any weights."""

    source: str  # local folder or hub id, as passed to from_pretrained
    local_dir: Path | None  # the folder holding config.json (cache snapshot for hub ids)
    config: dict
    architecture: str
    text_model_type: str | None  # "opt", "t5", ... (None for retrieval models)
    offline: bool = False  # the hub was unreachable: the cached copy is used, no more requests

    @property
    def is_t5(self) -> bool:
        return self.text_model_type in ("t5", "mt5", "umt5")


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    tokenizer: Any
    checkpoint: Checkpoint
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    quantize: str
    options: LoadOptions
    image_spec: Any = None  # imagespec.ImageSpec
    extra: dict = field(default_factory=dict)
    identity: str | None = None  # the plan's checkpoint_identity(): which weights were loaded

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config.text_config, "is_encoder_decoder", False))

    def describe(self) -> dict:
        """Settings that make a record reproducible."""
        return {
            "model": self.options.model,
            "revision": self.options.revision,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantize": self.quantize,
        }


def offline_requested(flag: bool) -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag or env in ("1", "true", "yes", "on")


def _looks_local(model: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a folder."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or "\\" in model
        or os.path.exists(model)
    )


def resolve_checkpoint(opts: LoadOptions) -> Checkpoint:
    from .models import resolve as resolve_name

    model = os.path.expanduser(resolve_name(opts.model))
    offline = offline_requested(opts.offline)
    hub_unreachable = False
    if os.path.isdir(model):
        local = Path(model)
        config_path = local / "config.json"
        if not config_path.is_file():
            raise ModelError(
                f"{opts.model!r} is a folder but not a BLIP-2 checkpoint: it has no config.json",
                hint="point model at the folder that save_pretrained wrote (config.json, "
                "model.safetensors, processor and tokenizer files)",
                params=["model"],
            )
        source = str(local)
    elif _looks_local(model):
        raise ModelError(
            f"model folder {opts.model!r} does not exist",
            hint=f"pass an existing folder or a hub id such as {DEFAULT_MODEL}",
        )
    else:
        config_path, hub_unreachable = _hub_config(model, opts.revision, offline)
        local = config_path.parent
        source = model
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_path}: {exc}") from exc
    model_type = config.get("model_type")
    if model_type != "blip-2":
        raise ModelError(
            f"{opts.model!r} is not a BLIP-2 checkpoint (its config.json says "
            f"model_type={model_type!r})",
            hint=f"use a BLIP-2 checkpoint such as {DEFAULT_MODEL} or Salesforce/blip2-flan-t5-xl",
        )
    architectures = config.get("architectures") or ["Blip2ForConditionalGeneration"]
    architecture = architectures[0]
    if architecture not in ALL_ARCHITECTURES:
        raise ModelError(f"{opts.model!r}: unsupported BLIP-2 architecture {architecture!r}")
    text_type = (config.get("text_config") or {}).get("model_type")
    if architecture in RETRIEVAL:
        text_type = None
    elif text_type is None:
        text_type = "opt"  # transformers' default text config for BLIP-2
    ckpt = Checkpoint(source, local, config, architecture, text_type, offline=hub_unreachable)
    if ckpt.local_dir is not None and os.path.isdir(model):
        _check_weights_format(ckpt.local_dir, opts.allow_pickle)
    return ckpt


def hub_download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""  # in the shell commands quoted
    return (
        f"download it once where the hub can be reached: `blip2 models download {repo_id}{rev}` "
        f"(or `hf download {repo_id}{rev}`), then run with offline=True; or pass a local folder as model. "
        "To try blip2 without any download: `blip2 tiny-checkpoint /tmp/tiny` writes a tiny random "
        "checkpoint (meaningless captions) to use as model=/tmp/tiny"
    )


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 5.0) -> bool:
    """One request to the hub's endpoint, no retries: can it be reached at all?

    huggingface_hub retries a failed connection five times with a back-off
    (about 24 s of warnings) before it falls back to the cache; this answers
    the question once, through the same HTTP client (proxies, certificates),
    and the answer is kept for the process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    if endpoint not in _REACHABLE:
        try:
            get_session().request("HEAD", endpoint, timeout=timeout)
            _REACHABLE[endpoint] = True
        except Exception:  # noqa: BLE001 - any failure to get an answer: not reachable
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def _hub_config(repo_id: str, revision: str | None, offline: bool) -> tuple[Path, bool]:
    """The cached or downloaded config.json of a hub id; True when the hub was unreachable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _quiet_requested:  # the CLI's choice (quiet_on_load); a library call changes nothing
        quiet_libraries(hub_only=True)
    download_hint = hub_download_hint(repo_id, revision)
    unreachable = False
    if not offline:
        try:
            hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=True)
            cached = True
        except HFValidationError as exc:
            raise ModelError(
                f"{repo_id!r} is neither an existing folder nor a valid hub id",
                hint="a hub id looks like owner/name; a folder must exist; `blip2 models` lists the short names",
            ) from exc
        except (LocalEntryNotFoundError, OSError, ValueError):
            cached = False
        if not hub_reachable():
            from huggingface_hub import constants

            if not cached:
                raise ModelError(
                    f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) and {repo_id!r} "
                    "is not in the local cache",
                    hint=download_hint, params=["offline", "model"],
                )
            from .console import message

            message(f"the Hugging Face hub cannot be reached: using the cached copy of {repo_id}")
            offline = unreachable = True
    try:
        return Path(
            hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=offline)
        ), unreachable
    except LocalEntryNotFoundError as exc:
        why = "offline mode is on" if offline else "the hub cannot be reached"
        raise ModelError(
            f"{repo_id!r} is not in the Hugging Face cache and {why}", hint=download_hint,
            params=["offline", "model"],
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"no model {repo_id!r} on the Hugging Face hub (or it is private)",
            hint=f"check the id; BLIP-2 captioning checkpoints include {DEFAULT_MODEL} "
            "(`blip2 models` lists the short names)",
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelError(f"model {repo_id!r} has no revision {revision!r}") from exc
    except EntryNotFoundError as exc:
        raise ModelError(f"{repo_id!r} has no config.json: not a transformers checkpoint") from exc
    except HFValidationError as exc:
        raise ModelError(
            f"{repo_id!r} is neither an existing folder nor a valid hub id",
            hint="a hub id looks like owner/name; a folder must exist; `blip2 models` lists the short names",
        ) from exc
    except OSError as exc:  # network errors and the like
        raise ModelError(f"cannot fetch {repo_id!r}: {console_line(exc)}", hint=download_hint,
                         params=["offline", "model"]) from exc


def console_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _check_weights_format(folder: Path, allow_pickle: bool) -> None:
    has_safetensors = any(folder.glob("*.safetensors")) or (
        folder / "model.safetensors.index.json"
    ).is_file()
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt"))
    if has_safetensors:
        return
    if has_pickle and not allow_pickle:
        raise ModelError(
            f"{folder} holds only pickle weights (.bin), which can run arbitrary code when loaded",
            hint="convert them to safetensors, or pass allow_pickle=True if you trust this checkpoint",
            params=["allow_pickle"],
        )
    if not has_pickle:
        raise ModelError(
            f"{folder} has a config.json but no weights (no model.safetensors)",
            hint="the download may be incomplete; fetch the checkpoint again",
        )


def resolve_device(name: str):
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"unknown device {name!r}", hint=f"use one of {DEVICES_HELP}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA support (CPU-only wheel)"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise DeviceError(
                f"device={name!r} asked for a GPU, but {build}",
                hint="use device='cpu' (or 'auto'), or install a CUDA build of torch",
                params=["device"],
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"device={name!r}: there is no such GPU (this machine has {count})",
                hint=f"use cuda:0 to cuda:{count - 1}",
                params=["device"],
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(
                "device='mps' asked for Apple's Metal backend, which is not available here",
                hint="use device='cpu' (or 'auto')",
                params=["device"],
            )
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}", hint=f"use one of {DEVICES_HELP}")
    return device


def resolve_dtype(name: str, device, ckpt: Checkpoint):
    import torch

    name = (name or "auto").strip().lower()
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if ckpt.is_t5:
            # Flan-T5 overflows in float16; bfloat16 keeps its range.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return torch.float16
    if name == "float16" and ckpt.is_t5:
        raise UsageError(
            "dtype='float16' is refused for Flan-T5 checkpoints: T5's activations overflow the "
            "float16 range and the model produces NaNs or garbage",
            hint="use dtype='bfloat16' (or 'auto', which picks it) or 'float32'",
            params=["dtype"],
        )
    return getattr(torch, name)


def quantization_config(kind: str, dtype, device):
    """The quantization config for ``--quantize`` (None for ``none``): bitsandbytes'
    ``BitsAndBytesConfig`` for 8bit/4bit, torchao's int8 weight-only ``TorchAoConfig`` for int8."""
    if kind not in QUANTIZE:
        raise UsageError(f"unknown quantize {kind!r}", hint=f"use one of {', '.join(QUANTIZE)}", params=["quantize"])
    if kind == "none":
        return None
    if kind == "int8":
        return _int8_config(device)
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"quantize={kind!r} needs the bitsandbytes package, which is not installed",
            hint="pip install 'blip2-cli[quantize]' (or pip install bitsandbytes)",
            params=["quantize"],
        )
    if device.type == "mps":
        raise UsageError(
            f"quantize={kind!r} is not available on Apple's Metal backend (mps)",
            hint="drop quantize, or use device='cpu'",
            params=["quantize", "device"],
        )
    # (importing the config does not import bitsandbytes: load does, see import_model_libraries)
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=UNQUANTIZED_MODULES,
    )


def _int8_config(device):
    """torchao's int8 weight-only Linear layers (per-row scales), through transformers' TorchAoConfig."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ModelError(
            "quantize='int8' needs the torchao package, which is not installed",
            hint=f"{INT8_EXTRA} (or pip install torchao)",
            params=["quantize"],
        )
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torchao")
    except PackageNotFoundError:
        found = "0"
    numbers = tuple(int(n) for n in re.findall(r"\d+", found)[:2])
    if numbers < TORCHAO_MIN:
        raise ModelError(
            f"quantize='int8' needs torchao >= {'.'.join(map(str, TORCHAO_MIN))}, found {found}",
            hint=f"{INT8_EXTRA} (or pip install -U torchao)",
            params=["quantize"],
        )
    if device.type == "mps":
        raise UsageError(
            "quantize='int8' is not available on Apple's Metal backend (mps)",
            hint="drop quantize, or use device='cpu'",
            params=["quantize", "device"],
        )
    with quiet_import():
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(UNQUANTIZED_MODULES))


def quantize_int8_in_place(model) -> None:
    """``--quantize int8`` for a model built in memory (``bench --from-config``, the
    benchmarks): the same torchao config and the same modules kept as ``load`` gives
    through ``TorchAoConfig``."""
    import torch

    with quiet_import():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

    keep = set(UNQUANTIZED_MODULES)

    def quantized(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not keep.intersection(fqn.split("."))

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=quantized)


# What a quantization library says on import that is not for our users, by logger: torchao
# tries its CUDA-only extensions on a CPU build ("Failed to load …_C_mxfp8…so"), torch warns
# about torchao's enum registration, and bitsandbytes reports that it did not fetch a kernel
# from the hub (it does not: see ``no_hub_kernels``). Only these records, only during the
# import: the host's logging is left as it was.
_IMPORT_CHATTER = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass",),
    "bitsandbytes.backends.cpu.ops": ("kernels-community", "gemm_4bit_forward"),
}


class _DropChatter:
    def __init__(self, starts: tuple[str, ...]):
        self.starts = starts

    def filter(self, record) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(s in text for s in self.starts)


class quiet_import:
    """A context manager: the import-time chatter of torchao and bitsandbytes is dropped
    (``_IMPORT_CHATTER``: those loggers, those messages); the filters are removed on exit."""

    def __enter__(self):
        import logging

        self._filters = []
        for name, starts in _IMPORT_CHATTER.items():
            flt = _DropChatter(starts)
            logging.getLogger(name).addFilter(flt)
            self._filters.append((name, flt))
        return self

    def __exit__(self, *exc):
        import logging

        for name, flt in self._filters:
            logging.getLogger(name).removeFilter(flt)
        return False


class no_hub_kernels:
    """Nothing remote is loaded: while bitsandbytes is imported, the ``kernels`` package
    (which downloads compiled kernels from the Hugging Face hub and runs them) cannot be
    imported. bitsandbytes 0.50 asks it for ``kernels-community/quantization-bitsandbytes``
    on CPUs with AVX-512-BF16, then falls back to its own kernels; with ``kernels`` hidden
    it falls back at once, without the hub request. ``sys.modules`` is restored on exit."""

    _MISSING = object()

    def __enter__(self):
        import sys

        self._saved = sys.modules.get("kernels", self._MISSING)
        sys.modules["kernels"] = None  # type: ignore[assignment]  # import kernels -> ImportError
        return self

    def __exit__(self, *exc):
        import sys

        if self._saved is self._MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = self._saved
        return False


def import_model_libraries(kind: str = "none") -> None:
    """Import transformers' model code and the quantization library of ``kind`` quietly, and
    bitsandbytes without hub kernels (``no_hub_kernels``), before anything else does: a module
    imported once stays imported, so later imports are free and silent. transformers' model
    code imports torchao whenever it is installed, whatever the quantization."""
    with quiet_import():
        import transformers.modeling_utils  # noqa: F401  (imports torchao when installed)

        if kind == "int8":
            import torchao  # noqa: F401
        elif kind in ("8bit", "4bit"):
            with no_hub_kernels():
                import bitsandbytes  # noqa: F401


def _model_class(architecture: str):
    import transformers

    return getattr(transformers, architecture)


@dataclass
class LoadPlan:
    """Everything decided before any weights are read."""

    options: LoadOptions
    checkpoint: Checkpoint
    device: Any
    dtype: Any
    qconfig: Any
    identity: str | None = None  # checkpoint_identity(): which weights, not only which name

    def settings(self) -> dict:
        """What makes a record reproducible, as recorded beside each result."""
        return {
            "model": self.options.model,
            "revision": self.options.revision,
            "checkpoint": self.identity,
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantize": self.options.quantize,
        }


_HUB_COMMIT = re.compile(r"[0-9a-f]{40}")
_SAMPLE = 256  # bytes read from each tensor's data (its start and its middle)
_WHOLE_FILE_SAMPLES = 65536  # pickle weights: bytes read at the start, middle and end


def checkpoint_identity(ckpt: Checkpoint) -> str | None:
    """Which weights a checkpoint holds, cheaply: a checkpoint replaced at the same path (a
    folder re-saved, a hub model updated) gets another identity, a copied folder the same.

    A hub model is its commit (the cache's snapshot folder is named by it). A local folder
    is a sha256 of its config.json and, per weight file (by name): its size, its
    safetensors header (every tensor's name, dtype, shape and offsets) and 2 x 256 bytes of
    each tensor's data (at its start and middle); a fine-tuned tensor differs there.
    Pickle weights: 3 x 64 KiB of each file. A few MB read for a 15 GB checkpoint, never
    the whole file, and no modification times (a copy keeps its identity)."""
    import hashlib

    folder = ckpt.local_dir
    if folder is None:
        return None
    if folder.resolve() != Path(ckpt.source).expanduser().resolve() and _HUB_COMMIT.fullmatch(folder.name):
        return f"commit:{folder.name}"
    digest = hashlib.sha256()
    try:
        digest.update((folder / "config.json").read_bytes())
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")
                         or p.name.endswith(".index.json"))
        for path in weights:
            digest.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                if path.suffix == ".safetensors":
                    _fingerprint_safetensors(f, digest)
                elif path.name.endswith(".json"):
                    digest.update(f.read())
                else:
                    size = path.stat().st_size
                    for at in sorted({0, max(0, size // 2 - _WHOLE_FILE_SAMPLES // 2),
                                      max(0, size - _WHOLE_FILE_SAMPLES)}):
                        f.seek(at)
                        digest.update(f.read(_WHOLE_FILE_SAMPLES))
    except OSError as exc:
        raise ModelError(f"cannot read the checkpoint {str(folder)!r}: {console_line(exc)}") from exc
    return f"sha256:{digest.hexdigest()[:32]}"


def _fingerprint_safetensors(f, digest) -> None:
    import struct

    head = f.read(8)
    if len(head) < 8:
        digest.update(head)
        return
    (length,) = struct.unpack("<Q", head)
    header = f.read(min(length, 100_000_000))
    digest.update(header)
    try:
        entries = json.loads(header)
    except ValueError:
        return
    base = 8 + length
    for name in sorted(k for k in entries if k != "__metadata__"):
        offsets = entries[name].get("data_offsets") if isinstance(entries[name], dict) else None
        if not offsets or len(offsets) != 2:
            continue
        start, end = int(offsets[0]), int(offsets[1])
        for at in sorted({start, max(start, (start + end) // 2 - _SAMPLE // 2)}):
            f.seek(base + at)
            digest.update(f.read(min(_SAMPLE, max(0, end - at))))


def plan(opts: LoadOptions, *, architectures: tuple[str, ...] = GENERATIVE, task: str = "caption") -> LoadPlan:
    """Resolve checkpoint, device, dtype and quantization: cheap, with clear errors.

    A short name (``opt-2.7b``) is replaced by its hub id in the plan's options, so
    records, ``--resume`` and ``merge`` see one name for one model."""
    from dataclasses import replace

    from .models import resolve as resolve_name

    opts = replace(opts, model=resolve_name(opts.model))
    ckpt = resolve_checkpoint(opts)
    if ckpt.architecture not in architectures:
        if architectures == GENERATIVE:
            raise ModelError(
                f"{opts.model!r} is a {ckpt.architecture} checkpoint, which cannot {task}",
                hint=f"use a captioning checkpoint such as {DEFAULT_MODEL}",
            )
        raise ModelError(f"{opts.model!r} ({ckpt.architecture}) cannot be used for {task}")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, ckpt)
    qconfig = quantization_config(opts.quantize, dtype, device)
    return LoadPlan(opts, ckpt, device, dtype, qconfig, checkpoint_identity(ckpt))


def load(
    opts: LoadOptions,
    *,
    architectures: tuple[str, ...] = GENERATIVE,
    task: str = "caption",
    load_plan: LoadPlan | None = None,
) -> LoadedModel:
    """Resolve everything (cheap, clear errors first), then read the weights."""
    if load_plan is None:
        load_plan = plan(opts, architectures=architectures, task=task)
    opts = load_plan.options  # the model's short name resolved
    ckpt, device, dtype, qconfig = load_plan.checkpoint, load_plan.device, load_plan.dtype, load_plan.qconfig

    if _quiet_requested:  # the CLI's choice (quiet_on_load); a library call changes nothing
        quiet_libraries()
    import_model_libraries(opts.quantize)
    from transformers import AutoProcessor

    from .console import status

    dtype_name = str(dtype).replace("torch.", "")
    quant = f", {opts.quantize}" if opts.quantize != "none" else ""
    status(f"loading {opts.model} ({dtype_name}{quant}, {device})…")
    offline = offline_requested(opts.offline) or ckpt.offline
    common: dict[str, Any] = {"revision": opts.revision, "local_files_only": offline}
    kwargs: dict[str, Any] = dict(common, dtype=dtype)
    # use_safetensors=True refuses pickle files outright; None lets transformers
    # prefer safetensors and fall back to .bin only when the user opted in.
    kwargs["use_safetensors"] = None if opts.allow_pickle else True
    # The loading report (missing / unexpected / mis-sized tensors) is checked
    # below: a mis-sized tensor becomes our ModelError naming it, instead of
    # transformers' RuntimeError pointing at a report our users never see.
    kwargs["output_loading_info"] = True
    # Nothing remote runs: transformers 5 replaces layers with compiled kernels fetched from
    # the hub (the `kernels` package) by default when that package is installed.
    kwargs["use_kernels"] = False
    kwargs["ignore_mismatched_sizes"] = True
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(device) if device.type != "cuda" else (device.index or 0)}
    cls = _model_class(ckpt.architecture)
    try:
        model, info = cls.from_pretrained(ckpt.source, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        text = str(exc)
        if "safetensors" in text.lower() and not opts.allow_pickle:
            raise ModelError(
                f"{opts.model!r} has no safetensors weights",
                hint="pass allow_pickle=True if you trust this checkpoint's pickle (.bin) files",
                params=["allow_pickle"],
            ) from exc
        raise ModelError(f"cannot load {opts.model!r}: {text.splitlines()[0] if text else exc}") from exc
    check_loading_info(opts.model, info)
    if qconfig is not None:
        # bitsandbytes' loaders do not report mis-sized tensors: compare the
        # checkpoint's headers with the unquantized architecture ourselves.
        check_weight_shapes(opts.model, cls, model.config, ckpt.local_dir)
    if qconfig is None:
        model.to(device)
    model.eval()
    try:
        processor = AutoProcessor.from_pretrained(ckpt.source, **common)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the processor/tokenizer of {opts.model!r}: {exc}") from exc
    tokenizer = getattr(processor, "tokenizer", processor)

    from .imagespec import ImageSpec

    image_processor = getattr(processor, "image_processor", None)
    spec = ImageSpec.from_dict(image_processor.to_dict()) if image_processor is not None else ImageSpec()
    loaded = LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        checkpoint=ckpt,
        device=device,
        dtype=dtype,
        quantize=opts.quantize,
        options=opts,
        image_spec=spec,
        identity=load_plan.identity,
    )
    if ckpt.architecture in GENERATIVE:
        _check_image_tokens(loaded)
    return loaded


# Names a checkpoint may hold that the architecture does not: buffers older
# transformers saved and current ones recompute (transformers drops the common
# cases itself; these are kept as a second line).
_TOLERATED_UNEXPECTED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq|num_batches_tracked)$")
ALLOW_PARTIAL_ENV = "BLIP2_ALLOW_PARTIAL_WEIGHTS"


def _count(items, noun: str = "weight") -> str:
    n = len(items)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > limit else shown


def _mismatch(item) -> str:
    """transformers reports (name, checkpoint shape, model shape)."""
    if isinstance(item, (tuple, list)) and len(item) == 3:
        name, got, want = item
        return f"{name} (checkpoint {tuple(got)}, model {tuple(want)})"
    return str(item)


def check_loading_info(model_name: str, info: dict) -> None:
    """Missing, unexpected or mis-sized weights are a load error, never random layers.

    ``info`` is what ``from_pretrained(output_loading_info=True)`` returns; transformers
    has already left out tied weights (lm_head, T5's shared embeddings) and the
    buffers it recomputes. BLIP2_ALLOW_PARTIAL_WEIGHTS=1 turns the error into a
    warning, for someone who knows why a checkpoint differs."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not _TOLERATED_UNEXPECTED.search(k))
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    errors = [m for m in info.get("error_msgs") or () if m]
    problems = []
    if missing:
        problems.append(f"{_count(missing)} missing from the checkpoint (they would be random): "
                        f"{_names(missing)}")
    if unexpected:
        problems.append(f"{_count(unexpected, 'unexpected weight')} the architecture has no place for: "
                        f"{_names(unexpected)}")
    if mismatched:
        shown = [_mismatch(m) for m in mismatched]
        problems.append(f"{_count(mismatched)} of the wrong size: {_names(shown, 2)}")
    if errors:
        problems.append(f"errors while loading: {_names(map(str, errors), 2)}")
    _report_weight_problems(model_name, problems)


def _report_weight_problems(model_name: str, problems: list[str]) -> None:
    if not problems:
        return
    text = f"the weights of {model_name!r} do not match its config.json: " + "; ".join(problems)
    if os.environ.get(ALLOW_PARTIAL_ENV, "").strip() in ("1", "true", "yes"):
        from .console import message

        message(f"warning: {text} (loaded anyway: {ALLOW_PARTIAL_ENV} is set)")
        return
    raise ModelError(
        text,
        hint="the checkpoint is incomplete or belongs to another architecture: download it again "
        "(or re-save it with save_pretrained); set "
        f"{ALLOW_PARTIAL_ENV}=1 only if you know why it differs",
    )


def check_weight_shapes(model_name: str, cls, config, folder: Path | None) -> None:
    """Each tensor in the checkpoint's safetensors headers has the shape the architecture expects.

    Only names present in both are compared (names are checked by the loading
    report); the architecture is built on the meta device, so nothing is allocated."""
    if folder is None:
        return
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return
    import torch
    from safetensors import safe_open

    with torch.device("meta"):
        reference = cls(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    wrong = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                want = expected.get(key)
                if want is None:
                    continue
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    wrong.append(f"{key} (checkpoint {got}, model {want})")
    if wrong:
        _report_weight_problems(model_name, [f"{_count(wrong)} of the wrong size: {_names(wrong, 2)}"])


def _check_image_tokens(loaded: LoadedModel) -> None:
    """Guard against the silent failure modes of BLIP-2 checkpoints (see BLIP2-NOTES)."""
    config = loaded.model.config
    image_id = getattr(config, "image_token_index", None)
    if image_id is None:
        image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        raise ModelError(
            f"{loaded.options.model!r}: config.image_token_index is not set; generation would fail",
            hint="re-save the checkpoint with a current transformers (Blip2Processor adds <image>)",
        )
    tok_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    if tok_id != image_id:
        raise ModelError(
            f"{loaded.options.model!r}: the tokenizer's <image> id ({tok_id}) differs from "
            f"config.image_token_index ({image_id})",
        )
    if getattr(loaded.processor, "num_query_tokens", None) is None:
        # Without it the processor silently drops the image tokens (and the image).
        loaded.processor.num_query_tokens = config.num_query_tokens


_ONCE_LOGGERS = ("bitsandbytes", "accelerate")
# torchao (imported by transformers when installed) says which optional CUDA kernels it could
# not load, and torch's pytree warns about torchao's enums, on every start.
_ERRORS_ONLY_LOGGERS = ("torchao", "torch.utils._pytree")


class _OnceFilter:
    """Lets each (logger, message template) through once: bitsandbytes logs
    "MatMul8bitLt: inputs will be cast…" on every matmul (33,121 lines in one bench)."""

    def __init__(self):
        self.seen: set = set()

    def filter(self, record) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _stderr_handler():
    import logging
    import sys

    class StderrHandler(logging.StreamHandler):
        """Writes to the sys.stderr of the moment (a test runner may swap it)."""

        def __init__(self):
            logging.Handler.__init__(self, logging.WARNING)

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):  # StreamHandler.setStream; the property always follows sys.stderr
            pass

    handler = StderrHandler()
    handler.set_name("blip2-once")
    handler.addFilter(_OnceFilter())
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler


# Set by quiet_on_load() (the CLI, at its entry): the loader then quiets the libraries
# as it imports them. A library user's process is left as it was unless it asks
# (blip2cli.quiet()): the library is a guest.
_quiet_requested = False


def quiet_on_load() -> None:
    """The CLI's choice, made at its entry: Python's warnings and the bitsandbytes /
    accelerate loggers quieted now (cheap: nothing is imported), transformers and
    huggingface_hub when the loader imports them (:func:`quiet_libraries`)."""
    global _quiet_requested
    _quiet_requested = True
    _quiet_python()


def _quiet_python() -> None:
    """Python warnings once per message (Pillow's decompression-bomb warning never:
    the decode refuses such images itself), bitsandbytes/accelerate records once."""
    import logging
    import warnings

    if os.environ.get("BLIP2_DEBUG"):
        return
    # Filters are added on every call (idempotent): a warnings.catch_warnings()
    # block around us (a test runner, a notebook cell) restores the old list.
    warnings.filterwarnings("once", append=True)
    warnings.filterwarnings("ignore", message="Image size .* could be decompression bomb DOS attack")
    for name in _ONCE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(h.get_name() == "blip2-once" for h in logger.handlers):
            logger.addHandler(_stderr_handler())
            logger.propagate = False
    for name in _ERRORS_ONLY_LOGGERS:  # import-time notes of optional kernels, not for our users
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries(*, hub_only: bool = False) -> None:
    """Library chatter is not for our users: each library warning is shown once.

    The CLI's choice (:func:`quiet_on_load`), and ``blip2cli.quiet()`` for a library
    user who wants the same; ``blip2cli.load()`` alone never calls it.
    transformers' and huggingface_hub's info and warnings are hidden (errors show;
    huggingface_hub's connection retries are among them), Python warnings are shown
    once per message, and bitsandbytes/accelerate log records once per message.
    Download progress bars appear on a terminal only. BLIP2_DEBUG=1 shows everything.
    ``hub_only``: huggingface_hub alone, without importing transformers (seconds)."""
    import warnings

    if os.environ.get("BLIP2_DEBUG"):
        return
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    if hub_only:
        _download_bars()
        return
    _quiet_python()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' own bars ("Loading weights"); also the hub's:
    warnings.filterwarnings("ignore", module="transformers")
    _download_bars()  # so the hub's download bars are set again after it


def _download_bars() -> None:
    """huggingface_hub's download progress bars: on a terminal only (never in logs)."""
    import sys

    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if tty and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        enable_progress_bars()
    elif not tty:
        disable_progress_bars()
