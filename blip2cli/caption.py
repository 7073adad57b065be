"""The captioning core: generation options, the batched captioner, its records.

Plain Python over a loaded model; no Typer here. For each image alone the
tokens equal what transformers' documented usage gives
(``processor(images=img, text=prompt)`` + ``model.generate``) with the same
options: the prompt ids are built exactly as ``Blip2Processor`` builds them,
every row of a batch has the same prompt (so no padding is ever needed), and
decoder-only output is sliced after the prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .errors import UsageError
from .writers import Schema

# Defaults follow LAVIS' Blip2OPT/Blip2T5.generate: beam search with 5 beams,
# at most 30 tokens, at least 1, no repetition penalty, nucleus p=0.9 when sampling.
DEFAULT_MAX_NEW_TOKENS = 30
DEFAULT_MIN_NEW_TOKENS = 1
DEFAULT_NUM_BEAMS = 5


@dataclass
class GenerationOptions:
    prompt: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS
    num_beams: int = DEFAULT_NUM_BEAMS
    num_captions: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    # --compile: a static KV cache (on CUDA transformers then compiles the decoding
    # step). The tokens stay the same, so it is not part of describe() / --resume.
    static_cache: bool = False

    def validate(self, count_flag: str = "--num-captions") -> None:
        """Raise UsageError for impossible options; ``count_flag`` names the
        how-many option in messages (``--num-answers`` for ask)."""
        noun = count_flag.removeprefix("--num-")
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise UsageError(
                f"--min-new-tokens ({self.min_new_tokens}) must be between 0 and "
                f"--max-new-tokens ({self.max_new_tokens})"
            )
        if self.num_beams < 1:
            raise UsageError("--num-beams must be at least 1")
        if self.num_captions < 1:
            raise UsageError(f"{count_flag} must be at least 1")
        if not self.sample and self.num_captions > self.num_beams:
            raise UsageError(
                f"{count_flag} {self.num_captions} needs at least as many beams "
                f"(--num-beams {self.num_beams})",
                hint=f"add --num-beams {self.num_captions}, or --sample for varied {noun}",
            )
        if self.sample and self.temperature <= 0:
            raise UsageError("--temperature must be greater than 0")
        if self.sample and not 0 < self.top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise UsageError("--repetition-penalty must be greater than 0")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": self.num_beams,
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
        return {k: v for k, v in asdict(self).items() if v is not None and k != "static_cache"}


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
        self._eos = _eos_ids(loaded)

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


def trim_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def _eos_ids(loaded) -> set[int]:
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
