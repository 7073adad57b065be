"""Tiny, randomly initialised BLIP-2 checkpoints for offline tests.

``build_tiny_checkpoint(out_dir, kind)`` writes a checkpoint folder with the same
file layout as the real hub checkpoints (``config.json``, ``generation_config.json``,
``model.safetensors``, ``processor_config.json``, ``tokenizer.json``,
``tokenizer_config.json``), loadable with the plain transformers API::

    from transformers import Blip2Processor, Blip2ForConditionalGeneration
    processor = Blip2Processor.from_pretrained(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path)
    inputs = processor(images=image, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=10)
    print(processor.batch_decode(ids, skip_special_tokens=True))

Kinds (``KINDS``):

* ``"opt"``: ``Blip2ForConditionalGeneration`` with an OPT decoder and a byte-level
  BPE tokenizer (like ``Salesforce/blip2-opt-2.7b``);
* ``"t5"``: ``Blip2ForConditionalGeneration`` with a T5 encoder-decoder and a
  Unigram (SentencePiece-style) tokenizer (like ``Salesforce/blip2-flan-t5-xl``);
* ``"itm"``: ``Blip2ForImageTextRetrieval`` with a WordPiece (BERT) tokenizer for
  the Q-Former text input (like ``Salesforce/blip2-itm-vit-g``).

The models are tiny (hidden size 32, 64 in the language model, two layers per
tower, about 1.3 MB) but keep the real preprocessing: 224-px input, CLIP mean/std,
bicubic resize. Weights are
re-initialised at a large scale with a seeded generator, so the output depends on
the image (with the default 0.02 initialisation a model this small gives the same
tokens for every input), and the same seed gives byte-identical weights. The
builder checks this on the saved folder (``verify_tiny_checkpoint``) and raises if
two clearly different images give the same tokens (or embeddings, for ``"itm"``).

The vocabularies are small and readable: printable ASCII characters and a few
hundred whole English words, so that generated ids decode to distinct strings.
Characters outside printable ASCII (plus space, newline and tab) are not in the
vocabularies and are dropped or mapped to the unknown token.

Command line::

    python -m blip2cli.testing OUT_DIR [--kind opt|t5|itm] [--seed N]

Nothing heavy is imported at module level: torch and transformers are imported
inside the functions.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "build_tiny_checkpoint",
    "verify_tiny_checkpoint",
    "TinyCheckpointError",
    "main",
]

KINDS = ("opt", "t5", "itm")

# Sizes shared by all kinds. Input 224 px with 32-px patches: 7x7 = 49 patches, so
# the real 224-px preprocessing is exercised at a fraction of the cost.
IMAGE_SIZE = 224
PATCH_SIZE = 32
VISION_HIDDEN = 32
QFORMER_HIDDEN = 32
NUM_LAYERS = 2
NUM_HEADS = 4
FFN = 64
# The language model is a little wider: bitsandbytes' 4-bit CPU kernels need
# in_features divisible by the 64-wide quantization block and out_features by 32,
# so 64/128 keeps the quantized load path (quantization_config=BitsAndBytesConfig)
# testable on a CPU. Vision and Q-Former are not quantized.
TEXT_HIDDEN = 64
TEXT_FFN = 128
PROJECTION_DIM = 16  # image_text_hidden_size for "itm" (256 in the real checkpoint)

# The same values as the real BLIP-2 preprocessor_config (OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "<image>"

# Whole words for the vocabularies (caption and VQA flavoured). Every word is one
# token in all three tokenizers (after a space for OPT and T5).
WORDS = """
a an the this that these those there here it its is are was were be been being am
and or but not no yes of in on at to from with by for as into onto over under
above below near next behind front top bottom left right up down out off inside
outside between around through across along against without about after before
while during some many much few more most all both each every other another one
two three four five six seven eight nine ten several group couple pair lot lots
photo picture image view close shot painting drawing illustration cartoon poster
sign text logo man woman men women person people boy girl child children kid kids
baby player crowd team family cat cats kitten dog dogs puppy bird birds horse
horses cow cows sheep elephant elephants bear zebra giraffe animal animals fish
car cars truck bus train plane airplane boat bike bicycle motorcycle rocket ship
space astronaut suit helmet flag moon sky cloud clouds sun star stars light
street road city building buildings house room kitchen bathroom bedroom table
chair couch sofa bed desk window door wall floor ground grass tree trees field
park beach water ocean sea river lake mountain mountains snow rain hill forest
garden flower flowers plant food pizza cake sandwich coffee cup mug tea plate
bowl glass bottle drink milk cream foam latte spoon fork knife saucer wooden
metal white black red blue green yellow orange brown gray grey pink purple
colorful dark bright big small large little tall long short old new young
happy sitting standing lying laying walking running playing eating holding
looking wearing riding flying floating launching parked sleeping smiling
carrying watching waiting filled full empty open closed sunny cloudy night day
morning evening hand hands face head eyes ear hair shirt hat dress jacket shoes
ball game phone computer laptop screen book books box bag toy teddy clock umbrella
what where who why how which when can could would should do does did has have had
made look like very really just only also too then than so he she they we you i
him her them his their our my your me us question answer caption describe
""".split()


class TinyCheckpointError(RuntimeError):
    """A tiny checkpoint failed its self-check (e.g. it is blind to the image)."""


# ---------------------------------------------------------------------------
# Tokenizers (built in memory; saved as tokenizer.json by save_pretrained)
# ---------------------------------------------------------------------------


def _unique_words() -> list[str]:
    seen: set[str] = set()
    out = []
    for w in WORDS:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _opt_tokenizer():
    """Byte-level BPE like OPT's GPT-2 tokenizer, with a readable vocabulary.

    Ids 0-3 are ``<s> <pad> </s> <unk>`` as in OPT. Then printable ASCII, then the
    byte-level forms of space (``Ġ``), newline (``Ċ``, the real generation eos) and
    tab (``ĉ``), then every prefix of every ``Ġword`` with a merge for each, so
    words in a prompt encode to one token each. No byte >= 128 is in the
    vocabulary: random ids never decode to U+FFFD.
    """
    from transformers import GPT2Tokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab: dict[str, int] = {}
    for tok in specials:
        vocab[tok] = len(vocab)
    for code in range(33, 127):  # printable ASCII map to themselves in byte-level BPE
        vocab[chr(code)] = len(vocab)
    for byte in (32, 10, 9):  # space, newline, tab -> Ġ, Ċ, ĉ
        vocab[chr(256 + byte)] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _unique_words():
        prefix = "\u0120"
        for ch in word:
            new = prefix + ch
            if new not in vocab:
                vocab[new] = len(vocab)
                merges.append((prefix, ch))
            prefix = new
    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,  # OPT prepends </s> to every prompt
        add_prefix_space=False,
    )
    return tok


def _t5_tokenizer():
    """Unigram tokenizer like T5's: ``<pad>``=0, ``</s>``=1, ``<unk>``=2.

    Then ``▁``, printable ASCII characters (without the ``▁`` prefix) and
    ``▁word`` pieces scored above characters, so words encode to one piece.
    No sentinel (``<extra_id_N>``) tokens.
    """
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    seen = {p for p, _ in vocab}
    for code in range(33, 127):
        vocab.append((chr(code), -8.0))
        seen.add(chr(code))
    for word in _unique_words():
        piece = "\u2581" + word
        if piece not in seen:
            vocab.append((piece, -3.0))
            seen.add(piece)
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _bert_tokenizer():
    """WordPiece tokenizer like BERT's (lower-cased), for the Q-Former text input."""
    from transformers import BertTokenizer

    vocab: dict[str, int] = {}
    for tok in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]:
        vocab[tok] = len(vocab)
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab["##" + ch] = len(vocab)
    for word in _unique_words():
        if word not in vocab:
            vocab[word] = len(vocab)
    # The real blip2-itm-vit-g tokenizer is bert-base-uncased plus a "[DEC]" bos token.
    vocab["[DEC]"] = len(vocab)
    return BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")


def _image_processor():
    """BLIP image processor as in the real BLIP-2 checkpoints (224 px)."""
    # In v5 BlipImageProcessor is the torchvision-backed class (falling back to
    # BlipImageProcessorPil, with a warning, when torchvision is missing). Both save
    # the same processor_config.json ("image_processor_type": "BlipImageProcessor",
    # like the real checkpoints), and loading picks whichever backend is installed,
    # so build with the PIL class and never import torchvision.
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # PIL bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )


def _processor(kind: str, num_query_tokens: int):
    from transformers import Blip2Processor

    tokenizer = {"opt": _opt_tokenizer, "t5": _t5_tokenizer, "itm": _bert_tokenizer}[kind]()
    # The processor adds the <image> special token itself (as the last id) and,
    # given num_query_tokens, prepends <image> x N to prompts. Without
    # num_query_tokens a prompted image is silently ignored.
    return Blip2Processor(_image_processor(), tokenizer, num_query_tokens=num_query_tokens)


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def _config(kind: str, processor, num_query_tokens: int):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_size = len(tok)  # includes <image>; equal, so every id decodes

    vision = Blip2VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    qformer_kwargs: dict[str, Any] = dict(
        hidden_size=QFORMER_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=FFN,
        cross_attention_frequency=2,  # as in the real checkpoints: layers 0, 2, ...
        encoder_hidden_size=VISION_HIDDEN,
        max_position_embeddings=512,
    )
    extra: dict[str, Any] = {}
    if kind == "itm":
        qformer_kwargs.update(vocab_size=vocab_size, use_qformer_text_input=True, pad_token_id=tok.pad_token_id)
        text_config = None
        extra["image_text_hidden_size"] = PROJECTION_DIM
    else:
        text_config = _text_config(kind, tok, vocab_size)

    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=Blip2QFormerConfig(**qformer_kwargs).to_dict(),
        text_config=text_config.to_dict() if text_config is not None else None,
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
        **extra,
    )


def _text_config(kind: str, tok, vocab_size: int):
    """The language model's config of a tiny ``opt`` or ``t5`` checkpoint."""
    if kind == "opt":
        from transformers import OPTConfig

        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            word_embed_proj_dim=TEXT_HIDDEN,
            ffn_dim=TEXT_FFN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=512,
            do_layer_norm_before=True,
            activation_function="relu",
            dropout=0.1,
            attention_dropout=0.0,
            bos_token_id=tok.bos_token_id,  # 2, "</s>" as in OPT
            # The real conversion sets the text config's eos to "\n" (50118), not
            # "</s>": Blip2ForConditionalGeneration.generate runs the language
            # model's own generate, whose generation config comes from this
            # text config, not from generation_config.json.
            eos_token_id=tok.convert_tokens_to_ids("\u010a"),
            pad_token_id=tok.pad_token_id,  # 1
            tie_word_embeddings=True,
        )
    if kind == "t5":
        from transformers import T5Config

        return T5Config(  # type: ignore[call-arg]  # T5Config takes **kwargs
            vocab_size=vocab_size,
            d_model=TEXT_HIDDEN,
            d_kv=TEXT_HIDDEN // NUM_HEADS,
            d_ff=TEXT_FFN,
            num_layers=NUM_LAYERS,
            num_decoder_layers=NUM_LAYERS,
            num_heads=NUM_HEADS,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",  # Flan-T5
            tie_word_embeddings=False,  # Flan-T5
            dropout_rate=0.1,
            pad_token_id=tok.pad_token_id,  # 0
            eos_token_id=tok.eos_token_id,  # 1
            decoder_start_token_id=tok.pad_token_id,  # 0
            bos_token_id=1,  # missing from v5 T5 configs; prompt-less generate needs it
        )
    raise ValueError(kind)  # pragma: no cover - checked by the caller


def _generation_config(kind: str, processor):
    from transformers import GenerationConfig

    tok = processor.tokenizer
    if kind == "opt":
        # Mirrors Salesforce/blip2-opt-2.7b: bos 2, pad 1, eos = "\n" (50118 there).
        return GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.convert_tokens_to_ids("\u010a"),
            pad_token_id=tok.pad_token_id,
        )
    if kind == "t5":
        # Mirrors Salesforce/blip2-flan-t5-xl: decoder start 0, eos 1, pad 0.
        return GenerationConfig(
            decoder_start_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return None


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


# Weight scale: std = _GAIN / sqrt(fan_in) for every matrix. With 1.5 the tied
# input/output embeddings of OPT and T5 dominate the residual stream and the model
# mostly repeats its last token whatever the image. With 3.0 the output follows the
# input: over seeds 0-19, with and without a prompt, six different images gave six
# different 10-token outputs in 40/40 runs for OPT and 37/40 for T5 (the others
# 4-5 distinct), and the builder's own check passed for seeds 0-29 of every kind.
# Larger gains help T5 a little but make the model more chaotic, so bf16/fp16
# greedy tokens drift further from fp32 ones (already ~70-80 % agreement per
# position at 3.0): compare low-precision runs against the same dtype.
_GAIN = 3.0


def _reinit_weights(model, seed: int, gain: float = _GAIN) -> None:
    """Re-initialise every parameter at a scale that keeps the input visible.

    Matrices (Linear, Conv2d): normal, std ``gain/sqrt(fan_in)`` (T5 attention
    queries also divided by sqrt(d_kv), as T5 has no attention scaling). Embeddings,
    query tokens, class and position embeddings: normal, std 1. Biases: normal,
    std 0.02. Layer norms: weight 1, bias 0. Padding rows of embeddings: 0.
    Parameters are drawn in ``named_parameters`` order from one seeded CPU
    generator, so a seed gives identical tensors.
    """
    import torch
    from torch import nn

    gen = torch.Generator(device="cpu").manual_seed(seed)
    owner: dict[int, tuple[nn.Module, str]] = {}
    t5_query_scale: dict[int, float] = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, pname))
        if type(module).__name__ == "T5Attention":
            t5_query_scale[id(module.q)] = 1.0 / math.sqrt(module.key_value_proj_dim)

    def normal_(p, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)

    with torch.no_grad():
        for p in model.parameters():  # tied parameters are listed once
            module, pname = owner[id(p)]
            is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(
                ("LayerNorm", "RMSNorm")
            )
            if is_norm:
                p.fill_(1.0 if pname == "weight" else 0.0)
            elif pname == "bias" or p.dim() == 1:
                normal_(p, 0.02)
            elif isinstance(module, nn.Embedding):
                normal_(p, 1.0)
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = math.prod(p.shape[1:])
                normal_(p, gain / math.sqrt(fan_in) * t5_query_scale.get(id(module), 1.0))
            else:  # query_tokens, class_embedding, position_embedding
                normal_(p, 1.0)
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


# ---------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------


def _probe_images():
    """Two clearly different RGB images (no files needed)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    warm = np.stack([200 + 55 * x / 320, 120 + 60 * y / 240, 40 + 0 * x], axis=-1)
    checker = ((x // 40 + y // 40) % 2).astype(float)
    cool = np.stack([20 + 30 * checker, 60 + 150 * checker, 230 - 100 * checker], axis=-1)
    return [
        Image.fromarray(warm.clip(0, 255).astype("uint8"), "RGB"),
        Image.fromarray(cool.clip(0, 255).astype("uint8"), "RGB"),
    ]


def verify_tiny_checkpoint(path: str | Path, images=None) -> None:
    """Load a tiny checkpoint from disk with the plain transformers API and check it.

    Generative kinds: two clearly different images must give different tokens and
    different decoded text, both without a prompt and with a ``Question: ...
    Answer:`` prompt. ``itm``: their image embeddings must differ, and their ITM
    logits too. Raises ``TinyCheckpointError`` otherwise.
    """
    import torch
    from transformers import Blip2Config, Blip2Processor

    path = Path(path)
    images = list(images) if images is not None else _probe_images()
    if len(images) < 2:
        raise ValueError("verify_tiny_checkpoint needs at least two images")
    images = images[:2]
    config: Any = Blip2Config.from_pretrained(path)
    processor = Blip2Processor.from_pretrained(path)
    tok = processor.tokenizer
    problems: list[str] = []
    if processor.num_query_tokens != config.num_query_tokens:
        problems.append(
            f"processor.num_query_tokens={processor.num_query_tokens} != config {config.num_query_tokens}"
        )
    if config.image_token_index != tok.convert_tokens_to_ids(IMAGE_TOKEN):
        problems.append(f"image_token_index={config.image_token_index} is not the <image> id")
    if problems:  # the model checks below would fail in confusing ways
        raise TinyCheckpointError(f"tiny checkpoint {path} failed its self-check: " + "; ".join(problems))

    with torch.no_grad():
        if "Blip2ForImageTextRetrieval" not in (config.architectures or []):
            from transformers import Blip2ForConditionalGeneration

            model = Blip2ForConditionalGeneration.from_pretrained(path, use_safetensors=True).eval()
            if len(tok) > config.text_config.vocab_size:
                problems.append(f"len(tokenizer)={len(tok)} > vocab_size={config.text_config.vocab_size}")
            for prompt in (None, "Question: what is in the picture? Answer:"):
                outs, texts = [], []
                for image in images:
                    inputs = processor(images=image, text=prompt, return_tensors="pt")
                    ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
                    if not config.is_encoder_decoder and "input_ids" in inputs:
                        ids = ids[:, inputs["input_ids"].shape[1] :]
                    outs.append(ids[0].tolist())
                    texts.append(tok.decode(ids[0], skip_special_tokens=True))
                what = "no prompt" if prompt is None else f"prompt {prompt!r}"
                if outs[0] == outs[1]:
                    problems.append(f"two different images gave the same tokens ({what}): {outs[0]}")
                elif texts[0] == texts[1]:
                    problems.append(f"two different token sequences decoded to the same text ({what}): {texts[0]!r}")
        else:
            from transformers import Blip2ForImageTextRetrieval

            model = Blip2ForImageTextRetrieval.from_pretrained(path, use_safetensors=True).eval()
            inputs = processor(images=images, text=["a photo of a cat"] * 2, return_tensors="pt")
            itc = model(**inputs, use_image_text_matching_head=False)
            if torch.allclose(itc.image_embeds[0], itc.image_embeds[1], atol=1e-4):
                problems.append("two different images gave the same image embeddings")
            itm = model(**inputs, use_image_text_matching_head=True)
            if torch.allclose(itm.logits_per_image[0], itm.logits_per_image[1], atol=1e-4):
                problems.append("two different images gave the same ITM logits")
    if problems:
        raise TinyCheckpointError(f"tiny checkpoint {path} failed its self-check: " + "; ".join(problems))


# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_progress_bars():
    """Hide transformers' "Writing model shards"/"Loading weights" bars, then restore."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_checkpoint(
    out_dir: str | Path,
    kind: str = "opt",
    *,
    seed: int = 0,
    num_query_tokens: int = 8,
    verify: bool = True,
) -> Path:
    """Build a tiny random BLIP-2 checkpoint of ``kind`` and save it to ``out_dir``.

    ``kind`` is one of ``KINDS``: ``"opt"`` and ``"t5"`` give a
    ``Blip2ForConditionalGeneration`` checkpoint, ``"itm"`` a
    ``Blip2ForImageTextRetrieval`` one. The same ``seed`` gives identical weights.
    With ``verify`` (the default) the saved folder is loaded back and checked to
    react to its input (``verify_tiny_checkpoint``); ``TinyCheckpointError`` is
    raised if it does not. Returns the folder path.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not isinstance(num_query_tokens, int) or num_query_tokens < 1:
        raise ValueError(f"num_query_tokens must be a positive int, not {num_query_tokens!r}")

    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    processor = _processor(kind, num_query_tokens)
    config = _config(kind, processor, num_query_tokens)
    model_cls = Blip2ForImageTextRetrieval if kind == "itm" else Blip2ForConditionalGeneration
    # The class-level default init is thrown away by _reinit_weights; seed it anyway
    # so nothing depends on the global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    _reinit_weights(model, seed)
    model.eval()
    gen_config = _generation_config(kind, processor)
    if gen_config is not None:
        model.generation_config = gen_config

    with _quiet_progress_bars():
        model.save_pretrained(out)  # v5 always writes model.safetensors
        processor.save_pretrained(out)
        if verify:
            verify_tiny_checkpoint(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2cli.testing",
        description="Write a tiny random BLIP-2 checkpoint (for offline tests) to OUT_DIR.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    parser.add_argument("--kind", choices=KINDS, default="opt", help="model kind (default: opt)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument(
        "--num-query-tokens", type=int, default=8, help="Q-Former query tokens (default: 8)"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the self-check after saving")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_checkpoint(
            args.out_dir,
            args.kind,
            seed=args.seed,
            num_query_tokens=args.num_query_tokens,
            verify=not args.no_verify,
        )
    except TinyCheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
