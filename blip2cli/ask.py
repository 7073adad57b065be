"""The visual question answering core: questions and prompt templates, the
``Asker`` (one image pass per image, batched (image, question) pairs) and the
``ChatSession`` behind ``blip2 chat``. Plain Python over a loaded model; no Typer.

**The shared image pass.** ``Blip2ForConditionalGeneration.generate`` runs the
vision tower, the Q-Former and the language projection on every call, so asking
Q questions of an image the documented way (``processor(images=img,
text=prompt)`` + ``generate`` per pair) pays for the image Q times.
``Asker.image_features`` runs those three steps exactly as ``generate`` does
(transformers 5.24, ``models/blip_2/modeling_blip_2.py``) once per image;
``Asker.generate_ids`` then builds, for a batch of (image, question) pairs,
the rows ``[<image>]*N + tokenizer(prompt)``, embeds them, scatters each
pair's cached query outputs into its image positions and calls
``language_model.generate`` as ``generate`` would.

**Padding.** Questions differ in length, so the rows of a batch are padded:

* decoder-only models (OPT) on the **left**: OPT derives its position ids from
  the cumulative sum of the attention mask, so a left-padded row sees the same
  positions, keys and values as the row alone. Right padding changes the
  shorter rows' output (transformers #22014, #27251). The padded slots hold the
  image token id, not ``<pad>``: ``generate`` also gets ``input_ids`` (the output
  starts with them, and the repetition penalty reads them), and the image token
  is in every row already, so the set of ids a row "has seen" is the same as
  alone;
* encoder-decoder models (T5) on the **right**, with the attention mask, as T5
  tokenizers pad (T5's relative position bias makes either side exact).

For each pair alone the tokens equal transformers' documented per-pair usage
with the same options (OPT and T5, greedy and beam): ``tests/test_ask.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .caption import GenerationOptions, check_new_tokens, eos_ids, prompt_ids, trim_at_eos
from .errors import OptionError
from .images import ImageStage
from .writers import Schema

PLACEHOLDER = "{question}"
# The template BLIP-2 was trained and evaluated with for VQA (LAVIS; the
# transformers model card). A bare question often yields an empty answer or an
# echo (LAVIS #806, transformers #30383).
DEFAULT_TEMPLATE = "Question: {question} Answer:"

# LAVIS Blip2OPT/Blip2T5.predict_answers: beam search with 5 beams, at most 10
# new tokens, at least 1. (LAVIS also passes length_penalty=-1 there; blip2
# keeps transformers' default, 1.0, as caption does.)
ASK_MAX_NEW_TOKENS = 10
ASK_MIN_NEW_TOKENS = 1
ASK_NUM_BEAMS = 5
# Chat answers are sentences more often than VQA's one or two words: LAVIS'
# captioning limit of 30 new tokens, still 5 beams.
CHAT_MAX_NEW_TOKENS = 30

# (image, question) pairs per language-model call: this many times --batch-size.
# A pair's sequence (32 query tokens + a question + 10 new tokens) is a little
# shorter than a caption's (33 + 30), so twice the pairs hold about twice the
# memory that caption needs at the same --batch-size.
PAIRS_PER_IMAGE = 2

# T5 has no position table; Flan-T5 was trained on 512-token inputs (its
# tokenizer's model_max_length). Used when the tokenizer gives no usable limit.
T5_CONTEXT = 512


# -- questions and templates ---------------------------------------------------
def check_template(template: str) -> str:
    if PLACEHOLDER not in template:
        raise OptionError(
            f"template must contain {PLACEHOLDER} (got {template!r})",
            hint="for example template='Question: {question} Short answer:'",
            params=["template"],
        )
    return template


def render_prompt(question: str, template: str | None = DEFAULT_TEMPLATE) -> str:
    """The text sent to the model for one question; ``template=None`` sends it as is (``--raw``).

    ``str.replace``, not ``str.format``: braces in a question or template stay as typed.
    """
    if template is None:
        return question
    return template.replace(PLACEHOLDER, question)


def parse_questions(text: str) -> list[str]:
    """``--questions-file``: one question per line; surrounding blanks stripped, blank lines skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_arguments(args: Sequence[str], has_other_questions: bool) -> tuple[list[str], str | None]:
    """``blip2 ask INPUT... QUESTION``: the last positional argument is the question,
    unless the questions come from -q/--questions-file: then every positional is an input."""
    args = list(args)
    if has_other_questions or not args:
        return args, None
    return args[:-1], args[-1]


# -- the image stage, shared by ask and chat -------------------------------------
# -- the asker ---------------------------------------------------------------------
class Asker:
    """Answers questions about batches of images, running each image through the
    vision tower and Q-Former once, however many questions it gets."""

    def __init__(self, loaded, options: GenerationOptions, *, pairs_per_call: int = 16):
        options.validate()
        self.loaded = loaded
        self.options = options
        self.kwargs = options.generate_kwargs()
        self.pairs_per_call = max(1, pairs_per_call)
        self._eos = eos_ids(loaded)
        self._ids: dict[str, list[int]] = {}
        config = loaded.model.config
        self.num_query_tokens = config.num_query_tokens
        self.image_token_id = config.image_token_index
        self.decoder_only = not loaded.is_encoder_decoder

    def prompt_ids(self, prompt: str) -> list[int]:
        """``[<image>]*N + tokenizer(prompt)``, as Blip2Processor builds them (cached)."""
        ids = self._ids.get(prompt)
        if ids is None:
            ids = self._ids[prompt] = prompt_ids(self.loaded, prompt)
        return ids

    def image_features(self, pixel_values):
        """Vision tower -> Q-Former -> language projection, exactly as
        ``Blip2ForConditionalGeneration.generate`` computes them: [B, N, text hidden]."""
        import torch

        model = self.loaded.model
        if hasattr(model, "hf_device_map"):
            model._preprocess_accelerate()  # as generate does, for accelerate device maps
        with torch.inference_mode():
            image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
            image_attention_mask = torch.ones(
                image_embeds.size()[:-1], dtype=torch.long, device=image_embeds.device
            )
            query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
            query_output = model.qformer(
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_attention_mask,
                return_dict=True,
            ).last_hidden_state
            # The Q-Former is kept in float32 under float16; generate downcasts likewise.
            if query_output.dtype != image_embeds.dtype:
                query_output = query_output.to(image_embeds.dtype)
            return model.language_projection(query_output)

    def generate_ids(self, features, pairs: Sequence[tuple[int, str]]) -> list[list[list[int]]]:
        """For each (image index into ``features``, prompt) pair: ``num_captions``
        token-id rows of new tokens, each cut after its first end-of-sequence token.

        Pairs are sorted by prompt length and run ``pairs_per_call`` at a time, so
        a batch holds little padding; results come back in the order given."""
        rows = [self.prompt_ids(prompt) for _, prompt in pairs]
        order = sorted(range(len(pairs)), key=lambda i: len(rows[i]))
        out: list[list[list[int]] | None] = [None] * len(pairs)
        for start in range(0, len(order), self.pairs_per_call):
            chunk = order[start:start + self.pairs_per_call]
            got = self._generate_chunk(features, [pairs[i][0] for i in chunk], [rows[i] for i in chunk])
            for i, answers in zip(chunk, got):
                out[i] = answers
        return out  # type: ignore[return-value]

    def _generate_chunk(self, features, images: list[int], rows: list[list[int]]) -> list[list[list[int]]]:
        import torch

        loaded, model = self.loaded, self.loaded.model
        embed = model.get_input_embeddings()
        device = embed.weight.device
        n, width = len(rows), max(len(r) for r in rows)
        n_query = self.num_query_tokens
        if self.decoder_only:
            filler = self.image_token_id  # see the module docstring
        else:
            filler = loaded.tokenizer.pad_token_id or 0
        input_ids = torch.full((n, width), filler, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        image_slots = torch.zeros((n, width), dtype=torch.bool)
        for r, row in enumerate(rows):
            start = width - len(row) if self.decoder_only else 0  # left / right padding
            input_ids[r, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, start:start + len(row)] = 1
            # The image slots are the row's first N tokens, by position rather than
            # by id: an "<image>" typed in a question stays text.
            image_slots[r, start:start + n_query] = True
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        image_slots = image_slots.to(device)
        index = torch.tensor(images, dtype=torch.long, device=features.device)
        with torch.inference_mode():
            inputs_embeds = embed(input_ids)
            source = features.index_select(0, index).to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_slots.unsqueeze(-1), source)
            inputs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
            if self.decoder_only:
                inputs["input_ids"] = input_ids  # as generate passes them: the output starts with them
            out = model.language_model.generate(**inputs, **self.kwargs)
        if self.decoder_only:
            out = out[:, width:]
        flat = [trim_at_eos(row, self._eos) for row in out.tolist()]
        k = self.options.num_captions
        return [flat[i * k:(i + 1) * k] for i in range(n)]

    def decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        texts = self.loaded.tokenizer.batch_decode(list(rows), skip_special_tokens=True)
        return [t.strip() for t in texts]

    def answer(self, features, prompts: Sequence[str]) -> list[list[list[str]]]:
        """Every prompt asked of every image in ``features``: ``[image][prompt]`` -> answers
        (``num_captions`` of them, best first)."""
        n_images = features.shape[0]
        pairs = [(b, p) for b in range(n_images) for p in prompts]
        ids = self.generate_ids(features, pairs)
        texts = [self.decode(rows) for rows in ids]
        q = len(prompts)
        return [texts[b * q:(b + 1) * q] for b in range(n_images)]


# -- records -----------------------------------------------------------------------
def answer_record(name: str, question: str, answers: Sequence[str] | None, error: str | None) -> dict:
    """The JSON Lines record of one (image, question) pair (schema in the README)."""
    answers = list(answers or [])
    return {
        "path": name,
        "question": question,
        "answer": answers[0] if answers else None,
        "answers": answers,
        "error": error,
    }


def generation_settings(options: GenerationOptions) -> dict:
    """The generation settings an ask record carries, named as ask's options are:
    ``num_answers`` (--num-answers) where GenerationOptions says ``num_captions``.
    (Files written before used ``num_captions``; --resume reads them as the same.)"""
    return {("num_answers" if k == "num_captions" else k): v for k, v in options.describe().items()}


def answer_schema(num_answers: int) -> Schema:
    extra = [f"answer_{i}" for i in range(2, num_answers + 1)]

    def answers(record: dict) -> list:
        got = record.get("answers") or []
        return [got[i] if i < len(got) else "" for i in range(num_answers)]

    return Schema(
        columns=["path", "question", "answer", *extra, "error"],
        row=lambda r: [r["path"], r["question"], *answers(r), r.get("error") or ""],
        text=lambda r: [r["path"], r["question"], *answers(r)],
    )


class AskTask:
    """The pipeline task of ``blip2 ask``: one image stage, every question asked of
    every image, several records per image (one per question, in question order)."""

    def __init__(self, asker: Asker, stage: ImageStage, questions: Sequence[str], template: str | None):
        self.asker = asker
        self.stage = stage
        self.questions = list(questions)
        self.prompts = [render_prompt(q, template) for q in self.questions]
        if self.prompts:  # the longest prompt and max_new_tokens must fit the context
            longest = max(len(asker.prompt_ids(p)) for p in self.prompts)
            check_new_tokens(asker.loaded, longest, asker.options.max_new_tokens)

    def prepare(self, item):
        return self.stage.prepare(item.source, key=item.name)

    def run_batch(self, prepared):
        features = self.asker.image_features(self.stage.pixels(prepared))
        return self.asker.answer(features, self.prompts)

    def record(self, item, result, error) -> list[dict]:
        if error is not None or result is None:
            return [answer_record(item.name, q, None, error) for q in self.questions]
        return [answer_record(item.name, q, answers, None) for q, answers in zip(self.questions, result)]


# -- chat ------------------------------------------------------------------------
def chat_prompt(history: Sequence[tuple[str, str]], question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The BLIP-2 chat demo's prompt: earlier turns, then the new question.

    ``Question: q1 Answer: a1. Question: q2 Answer:`` with the default template.
    """
    parts = [f"{render_prompt(q, template)} {a}." for q, a in history]
    parts.append(render_prompt(question, template))
    return " ".join(parts)


def context_limit(loaded, max_new_tokens: int) -> int:
    """The most prompt tokens (bos and text, not the image tokens) a chat turn may use."""
    config = loaded.model.config
    n_query = config.num_query_tokens
    if loaded.is_encoder_decoder:
        # The answer goes to the decoder: only the encoder input is bounded.
        limit = getattr(loaded.tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit <= 0 or limit > 100_000:
            limit = T5_CONTEXT
        return limit - n_query
    positions = getattr(config.text_config, "max_position_embeddings", None) or 2048
    return positions - n_query - max_new_tokens


@dataclass
class Turn:
    number: int
    image: str
    question: str
    answer: str | None
    error: str | None = None
    dropped: int = 0  # oldest turns dropped from the context to make this one fit

    def record(self) -> dict:
        return {
            "turn": self.number,
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "error": self.error,
        }


@dataclass
class ChatSession:
    """A conversation about one image at a time. The image pass is computed once per
    image and reused every turn; each turn's prompt carries the earlier turns, the
    oldest dropped when they no longer fit the model's context."""

    asker: Asker
    stage: ImageStage
    template: str = DEFAULT_TEMPLATE
    limit: int = 0  # prompt tokens; 0: the model's own (context_limit)
    history: list[tuple[str, str]] = field(default_factory=list)
    transcript: list[Turn] = field(default_factory=list)
    image: str | None = None
    _features: Any = None

    def __post_init__(self):
        model_limit = context_limit(self.asker.loaded, self.asker.options.max_new_tokens)
        self.limit = min(self.limit, model_limit) if self.limit > 0 else model_limit
        if self.limit < 1:
            raise OptionError(
                f"no room for a prompt: the model's context holds {model_limit} prompt tokens "
                f"once the image and max_new_tokens are counted",
                hint="lower max_new_tokens",
                params=["max_new_tokens"],
            )

    def set_image(self, source, name: str | None = None) -> None:
        """Switch to an image (a path or bytes): one image pass, a fresh context.
        Raises decode.ImageError for an unreadable image (the current one is kept)."""
        prepared = self.stage.prepare(source)
        self._features = self.asker.image_features(self.stage.pixels([prepared]))
        self.image = name if name is not None else str(source)
        self.history = []

    def reset(self) -> None:
        self.history = []

    def count_tokens(self, prompt: str) -> int:
        return len(self.asker.loaded.tokenizer(prompt)["input_ids"])

    def fit(self, question: str) -> tuple[str, int] | None:
        """The prompt for ``question`` and how many of the oldest turns it leaves
        out to fit ``limit`` tokens; None when the question alone is too long."""
        for dropped in range(len(self.history) + 1):
            prompt = chat_prompt(self.history[dropped:], question, self.template)
            if self.count_tokens(prompt) <= self.limit:
                return prompt, dropped
        return None

    def ask(self, question: str) -> Turn:
        if self._features is None:
            raise RuntimeError("set_image() first")
        number = len(self.transcript) + 1
        fitted = self.fit(question)
        if fitted is None:
            n = self.count_tokens(render_prompt(question, self.template))
            turn = Turn(number, self.image or "", question, None,
                        error=f"the question is too long for the model's context ({n} tokens, at most {self.limit})")
            self.transcript.append(turn)
            return turn
        prompt, dropped = fitted
        if dropped:
            self.history = self.history[dropped:]  # they will not fit again either
        ids = self.asker.generate_ids(self._features, [(0, prompt)])[0]
        answer = self.asker.decode(ids[:1])[0]
        self.history.append((question, answer))
        turn = Turn(number, self.image or "", question, answer, dropped=dropped)
        self.transcript.append(turn)
        return turn


def transcript_lines(turns: Iterable[Turn]) -> Iterable[str]:
    import json

    for turn in turns:
        yield json.dumps(turn.record(), ensure_ascii=False) + "\n"


__all__ = [
    "ASK_MAX_NEW_TOKENS",
    "ASK_MIN_NEW_TOKENS",
    "ASK_NUM_BEAMS",
    "CHAT_MAX_NEW_TOKENS",
    "DEFAULT_TEMPLATE",
    "PAIRS_PER_IMAGE",
    "Asker",
    "AskTask",
    "ChatSession",
    "Turn",
    "answer_record",
    "answer_schema",
    "chat_prompt",
    "check_template",
    "context_limit",
    "parse_questions",
    "render_prompt",
    "split_arguments",
]
