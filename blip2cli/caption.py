"""The captioning core: generation options, the batched captioner, its records.

Plain Python over a loaded model; no Typer here. For each image alone the
tokens equal what transformers' documented usage gives
(``processor(images=img, text=prompt)`` + ``model.generate``) with the same
options: the prompt ids are built exactly as ``Blip2Processor`` builds them,
every row of a batch has the same prompt (so no padding is ever needed), and
decoder-only output is sliced after the prompt.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .errors import OptionError
from .writers import Schema

# Defaults follow LAVIS' Blip2OPT/Blip2T5.generate: beam search with 5 beams,
# at most 30 tokens, at least 1, no repetition penalty, nucleus p=0.9 when sampling.
DEFAULT_MAX_NEW_TOKENS = 30
DEFAULT_MIN_NEW_TOKENS = 1
DEFAULT_NUM_BEAMS = 5
# Sampling without an explicit beam width draws one sequence per sample
# (multinomial sampling, as LAVIS' nucleus-sampling demo does); an explicit
# num_beams > 1 with sample=True is transformers' beam-sample.
DEFAULT_SAMPLE_BEAMS = 1


@dataclass
class GenerationOptions:
    """How ``generate`` decodes, with LAVIS' defaults.

    ``num_beams=None`` means the default for the decoding asked for: 5 beams for
    beam search, 1 with ``sample=True`` (plain multinomial sampling with
    ``temperature`` and ``top_p``). Messages name the parameters (``num_beams``);
    the CLI words them with its flags (``--num-beams``).
    """

    prompt: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS
    num_beams: int | None = None
    num_captions: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    # --compile: a static KV cache (on CUDA transformers then compiles the decoding
    # step). The tokens stay the same, so it is not part of describe() / --resume.
    static_cache: bool = False

    @property
    def beams(self) -> int:
        """The beam width generate gets: ``num_beams``, or the default for the decoding."""
        if self.num_beams is not None:
            return self.num_beams
        return DEFAULT_SAMPLE_BEAMS if self.sample else DEFAULT_NUM_BEAMS

    def validate(self, count_name: str = "num_captions") -> None:
        """Raise OptionError (a ValueError) for impossible options, naming the
        parameters; ``count_name`` is what the how-many parameter is called
        (``num_answers`` for ask)."""
        noun = count_name.removeprefix("num_")
        self.check_types(count_name)
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens must be at least 1", params=["max_new_tokens"])
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise OptionError(
                f"min_new_tokens ({self.min_new_tokens}) must be between 0 and "
                f"max_new_tokens ({self.max_new_tokens})",
                params=["min_new_tokens", "max_new_tokens"],
            )
        if self.num_beams is not None and self.num_beams < 1:
            raise OptionError("num_beams must be at least 1", params=["num_beams"])
        if self.num_captions < 1:
            raise OptionError(f"{count_name} must be at least 1", params=[count_name])
        if not self.sample and self.num_captions > self.beams:
            raise OptionError(
                f"{count_name} {self.num_captions} needs at least as many beams "
                f"(num_beams {self.beams})",
                hint=f"add num_beams={self.num_captions}, or sample=True for varied {noun}",
                params=[count_name, "num_beams", "sample"],
            )
        if self.sample and self.temperature <= 0:
            raise OptionError("temperature must be greater than 0", params=["temperature"])
        if self.sample and not 0 < self.top_p <= 1:
            raise OptionError("top_p must be in (0, 1]", params=["top_p"])
        if self.repetition_penalty <= 0:
            raise OptionError("repetition_penalty must be greater than 0", params=["repetition_penalty"])

    def check_types(self, count_name: str = "num_captions") -> None:
        """Raise OptionError naming the parameter for a value of the wrong type
        (``num_beams="5"``, ``num_beams=2.5``, ``prompt=5``, ``seed="x"``)."""
        for name, value, optional in (("max_new_tokens", self.max_new_tokens, False),
                                      ("min_new_tokens", self.min_new_tokens, False),
                                      ("num_beams", self.num_beams, True),
                                      (count_name, self.num_captions, False),
                                      ("seed", self.seed, True)):
            check_integer(name, value, optional=optional)
        for name, number in (("temperature", self.temperature), ("top_p", self.top_p),
                             ("repetition_penalty", self.repetition_penalty)):
            if isinstance(number, bool) or not isinstance(number, numbers.Real):
                raise OptionError(f"{name} must be a number (got {number!r})", params=[name])
        if not isinstance(self.sample, bool):
            raise OptionError(f"sample must be True or False (got {self.sample!r})", params=["sample"])
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise OptionError(f"prompt must be a string or None (got {self.prompt!r})", params=["prompt"])

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": self.beams,
            "num_return_sequences": self.num_captions,
            "do_sample": self.sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            # The checkpoint's generation_config may carry sampling settings;
            # greedy/beam must not inherit them.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        return kwargs

    def describe(self) -> dict[str, Any]:
        """The settings recorded beside each result (the effective beam width included)."""
        values = dict(asdict(self), num_beams=self.beams)
        return {k: v for k, v in values.items() if v is not None and k != "static_cache"}


def check_integer(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise OptionError naming ``name`` unless ``value`` is an integer (``None`` too if ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        wanted = "an integer or None" if optional else "an integer"
        raise OptionError(f"{name} must be {wanted} (got {value!r})", params=[name])


def check_new_tokens(loaded, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise OptionError (naming ``max_new_tokens``) when the prompt (image tokens
    included) and ``max_new_tokens`` do not fit the language model's positions
    (OPT's ``max_position_embeddings``; T5's relative positions have no such bound)."""
    if loaded.is_encoder_decoder:
        return
    limit = getattr(loaded.model.config.text_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    room = limit - prompt_tokens
    if max_new_tokens > room:
        raise OptionError(
            f"max_new_tokens {max_new_tokens} is beyond the model's context: it holds {limit} tokens "
            f"and the prompt takes {prompt_tokens} (the image's included), so at most {max(room, 0)} new tokens",
            hint=f"use max_new_tokens={max(room, 1)} or less",
            params=["max_new_tokens"],
        )


def prompt_ids(loaded, prompt: str | None) -> list[int]:
    """Token ids of ``[<image>]*N + prompt``, exactly as Blip2Processor/generate build them."""
    config = loaded.model.config
    image_id = config.image_token_index
    image_tokens = [image_id] * config.num_query_tokens
    if prompt is None:
        # What Blip2ForConditionalGeneration.generate builds when given no input_ids.
        return image_tokens + [config.text_config.bos_token_id]
    text_ids = loaded.tokenizer(prompt)["input_ids"]
    return image_tokens + list(text_ids)


class Captioner:
    """Captions batches of pixel tensors; the model half of the pipeline."""

    def __init__(self, loaded, options: GenerationOptions):
        options.validate()
        self.loaded = loaded
        self.options = options
        self.kwargs = options.generate_kwargs()
        self._ids = prompt_ids(loaded, options.prompt)
        check_new_tokens(loaded, len(self._ids), options.max_new_tokens)
        self._eos = eos_ids(loaded)

    def generate_ids(self, pixel_values) -> list[list[int]]:
        """New token ids, ``num_captions`` rows per image, prompt removed, each cut
        after its first end-of-sequence token (batch padding dropped)."""
        import torch

        loaded = self.loaded
        batch = pixel_values.shape[0]
        input_ids = torch.tensor([self._ids], dtype=torch.long, device=loaded.device).repeat(batch, 1)
        attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            out = loaded.model.generate(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                **self.kwargs,
            )
        if not loaded.is_encoder_decoder:
            out = out[:, input_ids.shape[1]:]  # decoder-only output starts with the prompt
        return [trim_at_eos(row, self._eos) for row in out.tolist()]

    def caption(self, pixel_values) -> list[list[str]]:
        rows = self.generate_ids(pixel_values)
        texts = self.loaded.tokenizer.batch_decode(rows, skip_special_tokens=True)
        n = self.options.num_captions
        return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(texts) // n)]


class CaptionTask:
    """The pipeline task of ``blip2 caption`` (and ``blip2cli.caption_files``): joins
    the image stage and the captioner."""

    def __init__(self, loaded, captioner: Captioner, preprocess: str, thumbnails=None):
        from .images import ImageStage

        self.stage = ImageStage(loaded, preprocess, thumbnails)
        self.captioner = captioner

    def prepare(self, item):
        return self.stage.prepare(item.source, key=item.name)

    def run_batch(self, prepared):
        return self.captioner.caption(self.stage.pixels(prepared))

    def record(self, item, result, error):
        return caption_record(item.name, result, error)


def trim_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def eos_ids(loaded) -> set[int]:
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.model.config.text_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def caption_record(name: str, captions: Sequence[str] | None, error: str | None) -> dict:
    """The JSON Lines record of one image (schema in the README)."""
    captions = list(captions or [])
    return {
        "path": name,
        "caption": captions[0] if captions else None,
        "captions": captions,
        "error": error,
    }


def caption_schema(num_captions: int) -> Schema:
    extra = [f"caption_{i}" for i in range(2, num_captions + 1)]

    def caps(record: dict) -> list:
        captions = record.get("captions") or []
        return [captions[i] if i < len(captions) else "" for i in range(num_captions)]

    return Schema(
        columns=["path", "caption", *extra, "error"],
        row=lambda r: [r["path"], *caps(r), r.get("error") or ""],
        text=lambda r: [r["path"], *caps(r)],
    )
