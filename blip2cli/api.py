"""The Python library under the ``blip2`` CLI: ``blip2cli.load(...)`` and the ``*_files`` iterators.

The same core the commands run, called directly::

    import blip2cli

    model = blip2cli.load("Salesforce/blip2-opt-2.7b")
    model.caption("photo.jpg")                       # 'a cat sitting on a sofa'
    model.ask(["a.jpg", "b.jpg"], ["what is it?", "is it indoors?"])
    for record in blip2cli.caption_files(["photos/"], model=model):
        print(record["path"], record["caption"] or record["error"])

* loading is the CLI's loader (``loader.plan`` + ``loader.load``): the same
  checkpoint, device, dtype and quantization rules, the same errors;
* a direct call (``caption``, ``ask``, ``chat``, ``embed_images``, ``score``)
  runs the commands' own tasks (``CaptionTask``, ``AskTask``, ``Asker``,
  ``ChatSession``, ``Embedder``) with the CLI's safe decode; ``caption``, ``ask``
  and ``embed_images`` go through the CLI's pipeline (``pipeline.run``: images
  decoded in its worker threads, batched as the CLI batches), the first image that
  cannot be decoded raising an ``ImageError`` that names it. For the same options
  the tokens are the CLI's, which equal transformers' documented per-image usage;
* the ``*_files`` iterators and ``Model.caption_records`` / ``ask_records`` /
  ``embed_records`` (in-memory images, ``ids``) run the CLI's pipeline (decode
  thread pool, batching, CUDA out-of-memory back-off) and yield the CLI's JSON
  Lines records as dicts, one per item in order, a bad image an error record;
  ``record_schema`` is their pyarrow schema, as ``--format parquet`` writes it;
* a good guest: nothing here changes the host's logging, warnings filters or
  environment; ``quiet()`` opts in to the CLI's quiet.

Errors are ordinary exceptions that name parameters, all ``Blip2Error``s:
``OptionError`` (a ``ValueError``: ``num_beams must be at least 1``),
``ImageError`` (naming the input), ``ModelError``, ``DeviceError``. Nothing here imports typer; torch and
transformers are imported by the first ``load()``.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, Union

from .ask import ASK_MAX_NEW_TOKENS, ASK_MIN_NEW_TOKENS, CHAT_MAX_NEW_TOKENS, DEFAULT_TEMPLATE, PAIRS_PER_IMAGE
from .caption import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_NEW_TOKENS, GenerationOptions, check_integer
from .choices import Preprocess, names
from .defaults import default_batch_size, default_workers
from .embed import FEATURES, POOLS
from .errors import Blip2Error, Interrupted, ModelError, OptionError, UsageError
from .decode import ImageError
from .loader import ALL_ARCHITECTURES, DEFAULT_MODEL, DTYPES, GENERATIVE, QUANTIZE, RETRIEVAL
from .tasks import run_settings

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from .ask import ChatSession
    from .loader import LoadedModel, LoadPlan

#: One image: a ``PIL.Image.Image``, a path, the file's bytes, or an ``HxWx3`` uint8 array.
ImageInput = Union["PILImage.Image", str, "os.PathLike[str]", bytes, bytearray, memoryview, "np.ndarray"]
PREPROCESS = names(Preprocess)

__all__ = ["Chat", "ImageInput", "Model", "ask_files", "caption_files", "load", "quiet", "record_schema"]


# -- load -------------------------------------------------------------------------
def load(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    revision: str | None = None,
    offline: bool = False,
    allow_pickle: bool = False,
) -> "Model":
    """Load a BLIP-2 checkpoint with the CLI's loader.

    Args:
        model: a hub id (``"Salesforce/blip2-opt-2.7b"``, ``"Salesforce/blip2-itm-vit-g"``)
            or a local folder written by ``save_pretrained``.
        device: ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        dtype: ``"auto"`` (float16 on GPUs for OPT, bfloat16 for Flan-T5, float32 on the CPU),
            ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        quantize: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes), or ``"int8"`` (torchao's int8
            weight-only layers); the language model only.
        revision: a branch, tag or commit of a hub checkpoint.
        offline: use the Hugging Face cache only (as ``HF_HUB_OFFLINE=1``).
        allow_pickle: accept ``.bin`` (pickle) weights; safetensors only otherwise.

    Returns:
        A :class:`Model`: ``caption``/``ask``/``chat`` on a captioning checkpoint,
        ``embed_images``/``embed_texts``/``score`` on a retrieval one.

    Raises:
        ModelError: the checkpoint cannot be found, is not BLIP-2, or cannot be loaded.
        DeviceError: the device does not exist on this machine.
        OptionError: an impossible value (a ``ValueError``).

    Example:
        >>> model = blip2cli.load("Salesforce/blip2-opt-2.7b", device="cuda", dtype="float16")
        >>> model.caption("photo.jpg")
        'a cat sitting on a sofa'
    """
    from .loader import LoadOptions
    from .loader import load as load_weights
    from .loader import plan

    quantize = "none" if quantize is None else str(quantize)
    if quantize not in QUANTIZE:
        raise OptionError(f"quantize must be None, '8bit', '4bit' or 'int8' (got {quantize!r})", params=["quantize"])
    if dtype not in DTYPES:
        raise OptionError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})", params=["dtype"])
    options = LoadOptions(model=os.fspath(model), revision=revision, device=device, dtype=dtype,
                          quantize=quantize, offline=offline, allow_pickle=allow_pickle)
    try:
        load_plan = plan(options, architectures=ALL_ARCHITECTURES, task="load")
        if load_plan.checkpoint.architecture in RETRIEVAL and quantize != "none":
            raise OptionError(f"quantize={quantize!r}: a retrieval checkpoint has no language model to quantize",
                              hint="use dtype='float16' or 'bfloat16' on a GPU to save memory", params=["quantize"])
        loaded = load_weights(options, load_plan=load_plan)
    except Blip2Error as exc:
        raise _library_wording(exc) from exc.__cause__
    return Model(loaded, load_plan)


def quiet() -> None:
    """Quiet the libraries under blip2 as the CLI does: an opt-in for library users.

    ``load()`` and every call leave the host's logging (levels, handlers,
    ``propagate``), warnings filters and environment as they were. Call this to get
    the CLI's quiet instead: transformers' and huggingface_hub's info and warnings
    hidden (errors still show), Python warnings once per message, bitsandbytes and
    accelerate log records once per message, download progress bars on a terminal
    only. It changes those process-wide settings (``BLIP2_DEBUG=1`` keeps everything).
    """
    from .loader import quiet_libraries

    quiet_libraries()


def _library_wording(exc: Blip2Error) -> Blip2Error:
    """The loader's errors already name parameters (``allow_pickle=True``); an impossible
    value becomes an ``OptionError``, a ``ValueError`` for library callers."""
    if isinstance(exc, OptionError) or not isinstance(exc, UsageError):
        return exc
    return OptionError(exc.message, exc.hint, params=exc.params)


# -- images -------------------------------------------------------------------------
def _is_single_image(value: Any) -> bool:
    if isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike)):
        return True
    if hasattr(value, "getbands"):  # a PIL image
        return True
    ndim = getattr(value, "ndim", None)
    return ndim is not None and ndim in (2, 3)


def _as_list(images: Any, what: str = "images") -> tuple[bool, list]:
    """(was it one image, the images as a list)."""
    if _is_single_image(images):
        return True, [images]
    if getattr(images, "ndim", None) == 4:  # a stacked [N, H, W, 3] array
        return False, list(images)
    try:
        return False, list(images)
    except TypeError:
        raise TypeError(
            f"{what}: expected an image (a PIL image, a path, bytes or an HxWx3 uint8 array) "
            f"or a list of them, got {type(images).__name__}"
        ) from None


def _label(image: Any, index: int) -> str:
    """How an error names an input: its path, or its position and kind."""
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image {index} (bytes)"
    if hasattr(image, "getbands"):
        return f"image {index} (PIL image)"
    return f"image {index} ({type(image).__name__})"


def _source(image: Any, index: int):
    """What ``decode.open_image`` decodes: a path, bytes or a PIL image (arrays become one)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return os.path.expanduser(path) if isinstance(path, str) else os.fsdecode(path)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if hasattr(image, "getbands"):
        return image
    if hasattr(image, "__array_interface__") and hasattr(image, "dtype"):
        shape, dtype = tuple(getattr(image, "shape", ())), str(image.dtype)
        if dtype != "uint8" or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise ImageError(f"expected an HxWx3 uint8 array, got {dtype} of shape {shape}")
        if 0 in shape[:2]:
            raise ImageError(f"empty image: an array of shape {shape} has no pixels")
        from PIL import Image

        import numpy as np

        array = np.ascontiguousarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return Image.fromarray(array)
    raise TypeError(
        f"{_label(image, index)}: expected a PIL image, a path, bytes or an HxWx3 uint8 array, "
        f"got {type(image).__name__}"
    )


def _is_image_kind(image: Any) -> bool:
    """What ``_source`` takes: a path, bytes, a PIL image or an array."""
    return (isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "getbands")
            or (hasattr(image, "__array_interface__") and hasattr(image, "dtype")))


def _named(image: Any, index: int, reason: object) -> ImageError:
    """An ImageError whose message starts with the input (``input`` and ``index`` set too)."""
    label = _label(image, index)
    error = ImageError(f"{label}: {reason}")
    error.input = label  # type: ignore[attr-defined]
    error.index = index  # type: ignore[attr-defined]
    return error


def _prepare(stage, image: Any, index: int):
    try:
        return stage.prepare(_source(image, index))
    except ImageError as exc:
        raise _named(image, index, exc) from None


# -- defaults (the CLI's, in options.py) ----------------------------------------------
def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r})", params=[name])
    return value


def _check_batch_size(batch_size: int | None) -> None:
    check_integer("batch_size", batch_size, optional=True)
    if batch_size is not None and batch_size < 1:
        raise OptionError("batch_size must be at least 1", params=["batch_size"])


def _check_template(template: str | None) -> str | None:
    if template is not None and not isinstance(template, str):
        raise OptionError(f"template must be a string or None (got {template!r})", params=["template"])
    if template is not None and "{question}" not in template:
        raise OptionError(f"template must contain {{question}} (got {template!r})",
                          hint='for example template="Question: {question} Short answer:"', params=["template"])
    return template


def _questions(questions: str | Sequence[str]) -> tuple[bool, list[str]]:
    single = isinstance(questions, str)
    if not single and (isinstance(questions, (bytes, bytearray)) or not isinstance(questions, Iterable)):
        raise OptionError(f"questions must be a string or a list of strings (got {questions!r})",
                          params=["questions"])
    listed: list = [questions] if single else list(questions)
    if not listed:
        raise OptionError("questions is empty: ask at least one question", params=["questions"])
    for q in listed:
        if not isinstance(q, str) or not q.strip():
            raise OptionError(f"each question must be a non-empty string (got {q!r})", params=["questions"])
    return single, [q.strip() for q in listed]


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


# -- the model ----------------------------------------------------------------------
class Model:
    """A loaded BLIP-2 checkpoint (from :func:`load`).

    Attributes:
        loaded: the CLI's ``loader.LoadedModel`` (``.model``, ``.processor``, ``.device``, ``.dtype``).
        architecture: ``"Blip2ForConditionalGeneration"`` (caption, ask, chat) or
            ``"Blip2ForImageTextRetrieval"`` (embed_images, embed_texts, score).
    """

    def __init__(self, loaded: "LoadedModel", load_plan: "LoadPlan"):
        self.loaded = loaded
        self.plan = load_plan
        self.architecture: str = loaded.checkpoint.architecture
        self._embedders: dict[tuple[str, str], Any] = {}

    def __repr__(self) -> str:
        return (f"<blip2cli.Model {self.loaded.options.model!r} {self.architecture} "
                f"on {self.loaded.device} ({str(self.loaded.dtype).replace('torch.', '')})>")

    @property
    def device(self):
        """The ``torch.device`` the model runs on."""
        return self.loaded.device

    def settings(self) -> dict:
        """What the CLI records beside each result about the model (model, revision, dtype, quantize)."""
        return self.plan.settings()

    # -- helpers -------------------------------------------------------------------
    def _require(self, architectures: tuple[str, ...], what: str, hint: str) -> None:
        if self.architecture not in architectures:
            raise ModelError(
                f"{what} needs another checkpoint: {self.loaded.options.model!r} is a {self.architecture}",
                hint=hint,
            )

    def _generative(self, what: str) -> None:
        self._require(GENERATIVE, what, f"load a captioning checkpoint such as {DEFAULT_MODEL}")

    def _batch_size(self, batch_size: int | None) -> int:
        _check_batch_size(batch_size)
        return batch_size or default_batch_size(self.loaded.device.type)

    def _stage(self, preprocess: str):
        from .images import ImageStage

        return ImageStage(self.loaded, _check_choice("preprocess", preprocess, PREPROCESS))

    # -- caption ---------------------------------------------------------------------
    def caption(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        prompt: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
        num_beams: int | None = None,
        num_captions: int = 1,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        preprocess: str = "fast",
        batch_size: int | None = None,
    ) -> str | list[str] | list[list[str]]:
        """Caption one image or many, with the CLI's options and defaults (LAVIS: 5 beams, 30 tokens).

        Args:
            images: one image (PIL image, path, bytes, ``HxWx3`` uint8 array) or a list of them.
            prompt: text the caption continues, e.g. ``"a photo of"``.
            max_new_tokens, min_new_tokens: bounds on the caption's length in tokens.
            num_beams: beam width; ``None``: 5, or 1 with ``sample=True`` (more with
                ``sample=True`` is beam-sample).
            num_captions: captions per image (the best beams, or samples).
            sample: nucleus sampling with ``temperature`` and ``top_p`` instead of beam search.
            seed: seeds torch before generating, so sampling is reproducible (same images,
                same ``batch_size``).
            repetition_penalty: 1.0 is none.
            preprocess: ``"fast"`` (the CLI's default) or ``"reference"`` (the checkpoint's
                own transformers image processor).
            batch_size: images per ``generate`` call (default 16 on the CPU, 32 on a GPU).

        Returns:
            For one image a caption (``str``), for a list one per image (``list[str]``);
            with ``num_captions > 1`` a list of captions in place of each caption.

        Raises:
            ImageError: an image cannot be decoded (the message names it).
            OptionError: an impossible option (``num_beams must be at least 1``).

        Example:
            >>> model.caption(["cat.jpg", "dog.jpg"], num_beams=1, max_new_tokens=20)
            ['a cat on a sofa', 'a dog in the grass']
        """
        make_task, _, size = _caption_job(
            self, prompt=prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
            num_captions=num_captions, sample=sample, temperature=temperature, top_p=top_p, seed=seed,
            repetition_penalty=repetition_penalty, preprocess=preprocess, batch_size=batch_size)
        single, listed = _as_list(images)
        captions = _run_direct(listed, make_task, size=size, seed=seed)
        out: list[Any] = [c if num_captions > 1 else c[0] for c in captions]
        return out[0] if single else out

    # -- ask ---------------------------------------------------------------------------
    def ask(
        self,
        images: ImageInput | Iterable[ImageInput],
        questions: str | Sequence[str],
        *,
        template: str | None = DEFAULT_TEMPLATE,
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        min_new_tokens: int = ASK_MIN_NEW_TOKENS,
        num_beams: int | None = None,
        num_answers: int = 1,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        preprocess: str = "fast",
        batch_size: int | None = None,
    ) -> Any:
        """Ask every question of every image, as ``blip2 ask`` does (each image encoded once).

        Args:
            images: one image or a list of them (see :meth:`caption`).
            questions: one question (``str``) or a list of them.
            template: the prompt around each question; must contain ``{question}``.
                ``None`` sends the question as is (the CLI's ``--raw``).
            max_new_tokens, min_new_tokens, num_beams, sample, temperature, top_p, seed,
                repetition_penalty, preprocess, batch_size: as for :meth:`caption`
                (defaults: LAVIS' VQA ones, 5 beams and at most 10 new tokens).
            num_answers: answers per question (the best beams, or samples).

        Returns:
            ``answers[image][question]``, each dimension dropped when a single image or
            a single question (``str``) was given: ``ask(img, "q")`` is a ``str``,
            ``ask(imgs, ["q1", "q2"])`` a ``list`` (per image) of ``list`` (per question).
            With ``num_answers > 1`` each answer is a list of answers.

        Raises:
            ImageError, OptionError: as for :meth:`caption`.

        Example:
            >>> model.ask("kitchen.jpg", "how many cups are there?")
            'two'
        """
        make_task, _, size = _ask_job(
            self, questions, template=template, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            num_beams=num_beams, num_answers=num_answers, sample=sample, temperature=temperature, top_p=top_p,
            seed=seed, repetition_penalty=repetition_penalty, preprocess=preprocess, batch_size=batch_size)
        one_question = isinstance(questions, str)
        single, listed = _as_list(images)
        answers = _run_direct(listed, make_task, size=size, seed=seed)
        shaped: list[Any] = [[a if num_answers > 1 else a[0] for a in per_image] for per_image in answers]
        if one_question:
            shaped = [per_image[0] for per_image in shaped]
        return shaped[0] if single else shaped

    # -- chat --------------------------------------------------------------------------
    def chat(
        self,
        image: ImageInput,
        *,
        template: str = DEFAULT_TEMPLATE,
        context_tokens: int | None = None,
        max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
        min_new_tokens: int = ASK_MIN_NEW_TOKENS,
        num_beams: int | None = None,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        preprocess: str = "fast",
    ) -> "Chat":
        """A conversation about an image, as ``blip2 chat``: each question carries the earlier turns.

        Args:
            image: the image to talk about (see :meth:`caption`); switch with :meth:`Chat.set_image`.
            template: the prompt of one turn; must contain ``{question}``.
            context_tokens: at most this many prompt tokens per turn (the oldest turns are
                dropped beyond); ``None``: what the model holds.
            max_new_tokens, min_new_tokens, num_beams, sample, temperature, top_p, seed,
                repetition_penalty, preprocess: as for :meth:`caption` (defaults: 5 beams,
                at most 30 new tokens). ``seed`` seeds torch once, here.

        Returns:
            A :class:`Chat`.

        Example:
            >>> chat = model.chat("photo.jpg", num_beams=1)
            >>> chat.ask("what is it?")
            'a cat'
            >>> chat.ask("what color is it?")
            'orange'
        """
        from .ask import Asker, ChatSession

        self._generative("chat")
        gen = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                                sample=sample, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        gen.validate()
        if template is None:
            raise OptionError("template must contain {question} (got None)", params=["template"])
        _check_template(template)
        check_integer("context_tokens", context_tokens, optional=True)
        if context_tokens is not None and context_tokens < 1:
            raise OptionError("context_tokens must be at least 1", params=["context_tokens"])
        session = ChatSession(Asker(self.loaded, gen), self._stage(preprocess), template=template,
                              limit=context_tokens or 0)
        chat = Chat(session)
        chat.set_image(image)
        _seed(seed)
        return chat

    # -- features ------------------------------------------------------------------------
    def _embedder(self, features: str, pool: str):
        from .embed import Embedder, no_text_side_hint

        _check_choice("features", features, FEATURES)
        _check_choice("pool", pool, POOLS)
        if features == "itc" and self.architecture not in RETRIEVAL:
            raise ModelError(
                f"features='itc' needs a retrieval checkpoint; {self.loaded.options.model!r} is a "
                f"{self.architecture}, which has no image-text projection",
                hint=f"{no_text_side_hint()}, or use features='vision' or 'qformer'",
            )
        key = (features, pool)
        if key not in self._embedders:
            self._embedders[key] = Embedder(self.loaded, features, pool)
        return self._embedders[key]

    def _retrieval(self, what: str) -> None:
        from .embed import DEFAULT_RETRIEVAL_MODEL

        self._require(RETRIEVAL, what, f"load a retrieval checkpoint such as {DEFAULT_RETRIEVAL_MODEL}")

    def embed_images(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        pool: str = "none",
        features: str = "auto",
        preprocess: str = "fast",
        batch_size: int | None = None,
    ) -> "np.ndarray":
        """BLIP-2's image vectors, as ``blip2 embed``.

        Args:
            images: one image or a list of them (see :meth:`caption`).
            pool: ``"none"``: every query embedding (``[32, 256]`` per image for ITC);
                ``"mean"``: their mean (re-normalised for ITC).
            features: ``"auto"`` (``"itc"`` on a retrieval checkpoint, ``"qformer"`` on a
                captioning one), ``"itc"``, ``"vision"`` or ``"qformer"``.
            preprocess, batch_size: as for :meth:`caption`.

        Returns:
            A float32 numpy array: ``[N, 32, 256]`` for a list (``[N, 256]`` with
            ``pool="mean"``), without the ``N`` axis for a single image.

        Example:
            >>> retr = blip2cli.load("Salesforce/blip2-itm-vit-g")
            >>> retr.embed_images(["a.jpg", "b.jpg"], pool="mean").shape
            (2, 256)
        """
        import numpy as np

        make_task, _, size = _embed_job(self, features=features, pool=pool, preprocess=preprocess,
                                        batch_size=batch_size)
        single, listed = _as_list(images)
        vectors = [vector for vector, _ in _run_direct(listed, make_task, size=size, seed=None)]
        dims = self._embedder(features, pool).dims
        out = np.stack(vectors) if vectors else np.empty((0, *dims), dtype=np.float32)
        out = out.astype(np.float32, copy=False)
        return out[0] if single else out

    def embed_texts(self, texts: str | Sequence[str]) -> "np.ndarray":
        """BLIP-2's text vectors in the image-text (ITC) space (retrieval checkpoints).

        Args:
            texts: one text or a list of them.

        Returns:
            A float32 numpy array, ``[N, 256]`` (``[256]`` for a single text), L2-normalised.

        Example:
            >>> retr.embed_texts(["a cat", "a dog"]).shape
            (2, 256)
        """
        self._retrieval("embed_texts")
        single = isinstance(texts, str)
        listed = [texts] if single else list(texts)  # type: ignore[list-item]
        out = self._embedder("itc", "none").text_vectors(listed).numpy().astype("float32", copy=False)
        return out[0] if single else out

    def score(self, image: ImageInput, texts: str | Sequence[str], *, preprocess: str = "fast") -> Any:
        """Image-text matching (ITM) probabilities, as ``blip2 score`` (retrieval checkpoints).

        Args:
            image: one image (see :meth:`caption`).
            texts: one text or a list of them.
            preprocess: as for :meth:`caption`.

        Returns:
            ``list[float]``: the probability that each text matches the image (``float``
            for a single text).

        Example:
            >>> retr.score("cat.jpg", ["a cat", "a dog"])
            [0.97, 0.02]
        """
        self._retrieval("score")
        single = isinstance(texts, str)
        listed = [texts] if single else list(texts)  # type: ignore[list-item]
        if not _is_single_image(image):
            raise TypeError("score takes one image; call it once per image")
        embedder = self._embedder("itc", "none")
        stage = self._stage(preprocess)
        vision = embedder.encode_images(stage.pixels([_prepare(stage, image, 0)]))
        probabilities = embedder.itm_probabilities(vision.last_hidden_state, listed).tolist()
        return probabilities[0] if single else probabilities


    # -- per-item records: the CLI's records for in-memory data -----------------------------------
    def caption_records(
        self,
        images: ImageInput | Iterable[ImageInput],
        ids: Iterable[Any] | None = None,
        *,
        prompt: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
        num_beams: int | None = None,
        num_captions: int = 1,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        preprocess: str = "fast",
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[dict]:
        """One ``blip2 caption -f jsonl`` record per image, in order; a bad image is an error record.

        Args:
            images: images of any kind :meth:`caption` takes (paths, bytes, PIL images,
                ``HxWx3`` uint8 arrays), mixed freely.
            ids: one value per image (a row key, a URL, ...), put first in its record as ``id``.
            prompt, ..., batch_size: as for :meth:`caption`.
            workers: decode threads (the CLI's ``--workers`` default).

        Yields:
            ``{"id"?, "path", "caption", "captions", "error", "model", "revision", "dtype",
            "quantize", "preprocess", "generation"}`` per image: ``path`` is the path for a
            path and ``None`` otherwise; an image that cannot be decoded gives
            ``error`` (a reason) and ``caption=None``, and the rest go on. Images are decoded
            in the CLI's worker threads and batched as the CLI batches; captions equal
            :meth:`caption`'s.

        Raises (before the first record):
            OptionError: an impossible option, or ``ids`` of another length than ``images``.

        Example:
            >>> for r in model.caption_records([b"...jpeg bytes...", pil_image], ids=["k1", "k2"]):
            ...     print(r["id"], r["caption"] or r["error"])
        """
        make_task, settings, size = _caption_job(
            self, prompt=prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
            num_captions=num_captions, sample=sample, temperature=temperature, top_p=top_p, seed=seed,
            repetition_penalty=repetition_penalty, preprocess=preprocess, batch_size=batch_size)
        return _run_memory(self, images, ids, make_task, settings, size=size, workers=workers, seed=seed)

    def ask_records(
        self,
        images: ImageInput | Iterable[ImageInput],
        questions: str | Sequence[str],
        ids: Iterable[Any] | None = None,
        *,
        template: str | None = DEFAULT_TEMPLATE,
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        min_new_tokens: int = ASK_MIN_NEW_TOKENS,
        num_beams: int | None = None,
        num_answers: int = 1,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        preprocess: str = "fast",
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[dict]:
        """``blip2 ask -f jsonl`` records: one per (image, question), image-major, in order.

        Args:
            images, ids, workers: as for :meth:`caption_records` (each of an image's
                records carries its ``id``).
            questions: one question or a list; every question is asked of every image.
            template, ..., batch_size: as for :meth:`ask`.

        Yields:
            ``{"id"?, "path", "question", "answer", "answers", "error", ...settings}``;
            an image that cannot be decoded gives an error record per question.
        """
        make_task, settings, size = _ask_job(
            self, questions, template=template, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            num_beams=num_beams, num_answers=num_answers, sample=sample, temperature=temperature, top_p=top_p,
            seed=seed, repetition_penalty=repetition_penalty, preprocess=preprocess, batch_size=batch_size)
        return _run_memory(self, images, ids, make_task, settings, size=size, workers=workers, seed=seed)

    def embed_records(
        self,
        images: ImageInput | Iterable[ImageInput],
        ids: Iterable[Any] | None = None,
        *,
        pool: str = "none",
        features: str = "auto",
        preprocess: str = "fast",
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[dict]:
        """``blip2 embed -f jsonl`` records: one per image, in order.

        Args:
            images, ids, workers: as for :meth:`caption_records`.
            pool, features, preprocess, batch_size: as for :meth:`embed_images`.

        Yields:
            ``{"id"?, "path", "dims", "vector", "error", ...settings, "features", "pool"}``:
            ``vector`` the float32 values flat (row-major, a list of floats), ``dims`` their
            shape (``[32, 256]`` or ``[256]`` for ITC); ``None`` both with ``error`` set for
            an image that cannot be decoded.
        """
        make_task, settings, size = _embed_job(self, features=features, pool=pool, preprocess=preprocess,
                                               batch_size=batch_size)
        return _run_memory(self, images, ids, make_task, settings, size=size, workers=workers, seed=None)

    def record_schema(self, task: str, *, id_type: Any = None, features: str = "auto", pool: str = "none"):
        """The ``pyarrow.Schema`` of this model's ``*_records`` for ``task`` (``"caption"``,
        ``"ask"``, ``"embed"``): :func:`record_schema` with the vector length of ``embed``
        (``features``, ``pool``) filled in."""
        size = None
        if task == "embed":
            import math

            size = math.prod(self._embedder(features, pool).dims)
        return record_schema(task, id_type=id_type, vector_size=size)


class Chat:
    """A conversation about one image at a time (from :meth:`Model.chat`).

    Example:
        >>> chat = model.chat("photo.jpg")
        >>> chat.ask("what is it?"); chat.ask("why?")
        >>> chat.reset()                 # forget the turns, same image
        >>> chat.set_image("other.jpg")  # another image, a fresh context
    """

    def __init__(self, session: "ChatSession"):
        self.session = session

    def set_image(self, image: ImageInput) -> None:
        """Talk about another image from now on (one image pass, a fresh context).

        Raises:
            ImageError: the image cannot be decoded (the current one is kept).
        """
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else _label(image, 0)
        try:
            self.session.set_image(_source(image, 0), str(name))
        except ImageError as exc:
            raise _named(image, 0, exc) from None

    def ask(self, question: str) -> str:
        """The answer to ``question``, given the earlier turns (the oldest dropped when they no longer fit).

        Raises:
            ValueError: the question alone is longer than the model's context.
        """
        if not isinstance(question, str) or not question.strip():
            raise OptionError(f"question must be a non-empty string (got {question!r})", params=["question"])
        turn = self.session.ask(question.strip())
        if turn.error is not None:
            raise OptionError(turn.error, params=["question"])
        return turn.answer or ""

    def reset(self) -> None:
        """Forget the conversation so far (same image)."""
        self.session.reset()

    @property
    def history(self) -> list[tuple[str, str]]:
        """The (question, answer) turns the next question carries."""
        return list(self.session.history)

    @property
    def transcript(self) -> list[dict]:
        """Every turn so far as the CLI's chat records (``turn``, ``image``, ``question``, ``answer``, ``error``)."""
        return [turn.record() for turn in self.session.transcript]


# -- the Arrow schema of the records ----------------------------------------------------------------
RECORD_TASKS = ("caption", "ask", "embed")


def record_schema(task: str, *, id_type: Any = None, vector_size: int | None = None):
    """The ``pyarrow.Schema`` of a task's records, the one ``--format parquet`` writes for them.

    For engines that want a schema before the first record (Ray Data, Spark, Daft,
    ``pyarrow.dataset``): the columns of ``blip2 caption|ask|embed --format parquet``
    (results, ``path_bytes`` for a path that is not valid UTF-8, ``error``, then the
    settings: ``model``, ``revision``, ``checkpoint``, ``dtype``, ``quantize``, ``preprocess`` and the
    task's own: ``generation`` as a JSON string, ``template``, ``features``, ``pool``).

    Args:
        task: ``"caption"``, ``"ask"`` or ``"embed"``.
        id_type: the type of the ``id`` column that ``*_records(..., ids=...)`` puts
            first: ``str``, ``int``, ``float`` or a ``pyarrow.DataType``; ``None``: no ``id``.
        vector_size: ``embed``: values per vector (``32 * 256`` for ITC without pooling,
            256 with ``pool="mean"``), a ``fixed_size_list<float32>``; ``None``: a plain
            ``list<float32>``. :meth:`Model.record_schema` knows it.

    Example:
        >>> blip2cli.record_schema("caption").names[:5]
        ['path', 'path_bytes', 'caption', 'captions', 'error']
    """
    from .parquet import arrow_schema, require_pyarrow

    require_pyarrow()
    import pyarrow as pa

    if task not in RECORD_TASKS:
        raise OptionError(f"task must be one of {', '.join(map(repr, RECORD_TASKS))} (got {task!r})", params=["task"])
    check_integer("vector_size", vector_size, optional=True)
    from .tasks import LOADER_SETTINGS

    settings: dict = {**{name: "x" for name in LOADER_SETTINGS}, "preprocess": "fast"}  # as LoadPlan.settings()
    if task == "caption":
        from .caption import caption_record

        record = {**caption_record("a.jpg", ["a"], None), **settings, "generation": {"num_beams": 5}}
    elif task == "ask":
        from .ask import answer_record

        record = {**answer_record("a.jpg", "q", ["a"], None), **settings, "template": "{question}",
                  "generation": {"num_beams": 5}}
    else:
        vector = [0.0] * vector_size if vector_size else None
        record = {"path": "a.jpg", "dims": [vector_size] if vector else None, "vector": vector, "error": None,
                  **settings, "features": "itc", "pool": "none"}
    id_field = None
    if id_type is not None:
        types = {str: pa.string(), int: pa.int64(), float: pa.float64()}
        id_field = types.get(id_type, id_type)
        if not isinstance(id_field, pa.DataType):
            raise OptionError(f"id_type must be str, int, float or a pyarrow type (got {id_type!r})",
                              params=["id_type"])
        record = {"id": None, **record}
    schema = arrow_schema([record])
    if id_field is not None:
        schema = schema.set(schema.get_field_index("id"), pa.field("id", id_field))
    return schema


# -- the *_files iterators: the CLI's pipeline ------------------------------------------
class _Stopped(Exception):
    """The consumer of a ``*_files`` iterator went away."""


def _pipeline_records(items: Iterable, task, *, settings: dict, batch_size: int, workers: int,
                      seed: int | None) -> Iterator[dict]:
    """Run ``pipeline.run`` in a thread and yield its records in order, as they are written.

    The pipeline's writer hands each record over a small queue; when the caller
    stops iterating (``break``, an exception, Ctrl-C), the writer raises and the
    pipeline ends after the batch in hand.
    """
    from .pipeline import run

    records: queue.Queue = queue.Queue(maxsize=max(4, batch_size * 2))
    stop = threading.Event()
    end = object()

    def put(value) -> None:
        while not stop.is_set():
            try:
                records.put(value, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    class QueueWriter:
        def write(self, record: dict) -> None:
            record.update(settings)
            put(record)

        def close(self) -> None:
            pass

    failure: list[BaseException] = []

    def work() -> None:
        try:
            run(items, task, QueueWriter(), batch_size=batch_size, workers=workers)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)
        try:
            put(end)
        except _Stopped:
            pass

    thread = threading.Thread(target=work, name="blip2-files", daemon=True)
    _seed(seed)  # as the CLI seeds: once, before the first batch
    thread.start()
    interrupted = False
    try:
        while True:
            value = records.get()
            if value is end:
                break
            yield value
        if failure:
            raise failure[0]
    except (KeyboardInterrupt, Interrupted):
        interrupted = True  # don't wait for a pipeline that may be stuck in a read
        raise
    finally:
        stop.set()
        if not interrupted:
            thread.join()


class _InMemory:
    """A pipeline task over the items of a ``*_records`` call: in the decode worker
    thread each item's image (a path, bytes, a PIL image, an array) becomes what the
    decode takes; each record gets the item's ``id`` first when ids were given."""

    def __init__(self, task, with_ids: bool, *, raw: bool = False):
        self.task = task
        self.with_ids = with_ids
        self.raw = raw  # one {"result", "error"} per item (the direct calls), not the task's records

    def prepare(self, item):
        from dataclasses import replace

        try:
            source = _source(item.source, 0)
        except TypeError:
            raise ImageError(f"expected a PIL image, a path, bytes or an HxWx3 uint8 array, "
                             f"got {type(item.source).__name__}") from None
        return self.task.prepare(replace(item, source=source))

    def run_batch(self, prepared):
        return self.task.run_batch(prepared)

    def record(self, item, result, error):
        if self.raw:
            return {"result": result, "error": error}
        made = self.task.record(item, result, error)
        records = made if isinstance(made, list) else [made]
        if self.with_ids:
            records = [{"id": item.fields["id"], **record} for record in records]
        return records


def _plain_id(value: Any) -> Any:
    """A numpy scalar id (a Ray or pandas batch's column) as the Python value it holds."""
    if not isinstance(value, (str, bytes)) and type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _memory_items(images: Any, ids: Iterable | None) -> list:
    """One ``sources.Item`` per image, in order: ``name`` is the path for a path
    (``None`` otherwise), ``source`` the image as given, ``fields["id"]`` its id."""
    from .sources import Item

    _, listed = _as_list(images)
    if ids is not None:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise OptionError(f"ids must be a list with one id per image (got {type(ids).__name__})", params=["ids"])
        ids = [_plain_id(i) for i in ids]
        if len(ids) != len(listed):
            raise OptionError(f"ids has {len(ids)} values for {len(listed)} images: give one id per image",
                              params=["ids", "images"])
    items = []
    for index, image in enumerate(listed):
        name = None
        if isinstance(image, (str, os.PathLike)):
            name = os.fspath(image)
            name = name if isinstance(name, str) else os.fsdecode(name)
        items.append(Item(name=name, source=image, fields={"id": ids[index] if ids is not None else None}))  # type: ignore[arg-type]
    return items


def _run_direct(listed: list, make_task: Callable[[], Any], *, size: int, seed: int | None) -> list:
    """The task's result per image, in order, through the pipeline (decoded in its worker
    threads, batched as the CLI batches); the first image that cannot be decoded raises
    an ImageError naming it (the pipeline stops after the batch in hand)."""
    import contextlib

    for index, image in enumerate(listed):
        if not _is_image_kind(image):
            raise TypeError(f"{_label(image, index)}: expected a PIL image, a path, bytes or an HxWx3 uint8 "
                            f"array, got {type(image).__name__}")
    task = _InMemory(make_task(), False, raw=True)
    records = _pipeline_records(_memory_items(listed, None), task, settings={}, batch_size=size,
                                workers=default_workers(), seed=seed)
    results = []
    with contextlib.closing(records):  # type: ignore[type-var]  # a generator: it has close()
        for index, record in enumerate(records):
            if record["error"] is not None:
                raise _named(listed[index], index, record["error"])
            results.append(record["result"])
    return results


def _run_memory(model: "Model", images, ids, make_task: Callable[[], Any], settings: dict, *, size: int,
                workers: int | None, seed: int | None) -> Iterator[dict]:
    check_integer("workers", workers, optional=True)
    if workers is not None and workers < 1:
        raise OptionError("workers must be at least 1", params=["workers"])
    items = _memory_items(images, ids)
    task = _InMemory(make_task(), ids is not None)
    return _pipeline_records(items, task, settings={**model.settings(), **settings}, batch_size=size,
                             workers=workers or default_workers(), seed=seed)


# -- what each task needs: its options checked, the task, the settings its records carry ----------
def _caption_job(model: "Model", *, prompt, max_new_tokens, min_new_tokens, num_beams, num_captions, sample,
                 temperature, top_p, seed, repetition_penalty, preprocess, batch_size) -> tuple:
    """(make_task, settings, batch size) of a caption run, as ``blip2 caption`` builds them."""
    from .caption import CaptionTask, Captioner

    model._generative("caption")
    gen = GenerationOptions(prompt=prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                            num_beams=num_beams, num_captions=num_captions, sample=sample, temperature=temperature,
                            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    gen.validate()
    _check_choice("preprocess", preprocess, PREPROCESS)
    size = model._batch_size(batch_size)

    def make_task():
        return CaptionTask(model.loaded, Captioner(model.loaded, gen), preprocess)

    return make_task, run_settings("caption", preprocess=preprocess, gen=gen), size


def _ask_job(model: "Model", questions, *, template, max_new_tokens, min_new_tokens, num_beams, num_answers,
             sample, temperature, top_p, seed, repetition_penalty, preprocess, batch_size) -> tuple:
    """(make_task, settings, batch size) of an ask run, as ``blip2 ask`` builds them."""
    from .ask import AskTask, Asker
    from .images import ImageStage

    model._generative("ask")
    gen = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                            num_captions=num_answers, sample=sample, temperature=temperature, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    gen.validate(count_name="num_answers")
    template = _check_template(template)
    _, listed_questions = _questions(questions)
    _check_choice("preprocess", preprocess, PREPROCESS)
    size = model._batch_size(batch_size)

    def make_task():
        return AskTask(Asker(model.loaded, gen, pairs_per_call=size * PAIRS_PER_IMAGE),
                       ImageStage(model.loaded, preprocess), listed_questions, template)

    return make_task, run_settings("ask", preprocess=preprocess, gen=gen, template=template), size


def _embed_job(model: "Model", *, features, pool, preprocess, batch_size) -> tuple:
    """(make_task, settings, batch size) of an embed run, as ``blip2 embed -f jsonl`` builds them."""
    from .embed import EmbedTask

    embedder = model._embedder(features, pool)
    _check_choice("preprocess", preprocess, PREPROCESS)
    size = model._batch_size(batch_size)

    def make_task():
        return EmbedTask(model.loaded, embedder, preprocess)

    return make_task, run_settings("embed", preprocess=preprocess, features=features, pool=pool), size


def _items(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], recursive: bool,
           extensions: Iterable[str] | None) -> Iterator:
    from .sources import InputResolver

    listed = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not listed:
        raise OptionError("inputs is empty: name image files, folders or globs", params=["inputs"])
    return InputResolver(recursive=recursive, extensions=extensions).resolve([os.fspath(i) for i in listed])


def _run_files(model: Model, inputs, make_task: Callable[[], Any], extra_settings: dict, *, recursive: bool,
               extensions, batch_size: int | None, workers: int | None, seed: int | None) -> Iterator[dict]:
    size = model._batch_size(batch_size)
    check_integer("workers", workers, optional=True)
    if workers is not None and workers < 1:
        raise OptionError("workers must be at least 1", params=["workers"])
    items = _items(inputs, recursive, extensions)
    task = make_task()
    settings = {**model.settings(), **extra_settings}
    return _pipeline_records(items, task, settings=settings, batch_size=size, workers=workers or default_workers(),
                             seed=seed)


def caption_files(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    model: Model,
    recursive: bool = True,
    extensions: Iterable[str] | None = None,
    prompt: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
    num_beams: int | None = None,
    num_captions: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    preprocess: str = "fast",
    batch_size: int | None = None,
    workers: int | None = None,
) -> Iterator[dict]:
    """Caption files, folders and globs through the CLI's pipeline: ``blip2 caption -f jsonl`` as dicts.

    Args:
        inputs: paths, folders (searched recursively unless ``recursive=False``) and
            quoted globs, as the CLI takes them (``"-"`` reads stdin).
        model: a captioning :class:`Model` from :func:`load`.
        extensions: only files with these extensions (e.g. ``["jpg", "png"]``).
        prompt, max_new_tokens, ..., preprocess: as for :meth:`Model.caption`.
        batch_size, workers: images per model call, decode threads (the CLI's defaults).

    Yields:
        One record per input in input order, as ``blip2 caption -f jsonl`` writes it
        (``path``, ``caption``, ``captions``, ``error`` and the settings). A file that
        cannot be read gives a record with ``error`` set; the rest go on.

    Example:
        >>> for record in blip2cli.caption_files(["photos/"], model=model, num_beams=1):
        ...     print(record["path"], record["caption"] or record["error"])
    """
    make_task, settings, size = _caption_job(
        model, prompt=prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
        num_captions=num_captions, sample=sample, temperature=temperature, top_p=top_p, seed=seed,
        repetition_penalty=repetition_penalty, preprocess=preprocess, batch_size=batch_size)
    return _run_files(model, inputs, make_task, settings, recursive=recursive, extensions=extensions,
                      batch_size=size, workers=workers, seed=seed)


def ask_files(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    questions: str | Sequence[str],
    *,
    model: Model,
    recursive: bool = True,
    extensions: Iterable[str] | None = None,
    template: str | None = DEFAULT_TEMPLATE,
    max_new_tokens: int = ASK_MAX_NEW_TOKENS,
    min_new_tokens: int = ASK_MIN_NEW_TOKENS,
    num_beams: int | None = None,
    num_answers: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    preprocess: str = "fast",
    batch_size: int | None = None,
    workers: int | None = None,
) -> Iterator[dict]:
    """Ask questions of files through the CLI's pipeline: ``blip2 ask -f jsonl`` as dicts.

    Args:
        inputs: as for :func:`caption_files`.
        questions: one question or a list; every question is asked of every image.
        model: a captioning :class:`Model` from :func:`load`.
        template, max_new_tokens, ..., preprocess: as for :meth:`Model.ask`.

    Yields:
        One record per (image, question), image-major in input order (``path``,
        ``question``, ``answer``, ``answers``, ``error`` and the settings).

    Example:
        >>> for r in blip2cli.ask_files("photos/", ["is it blurry?"], model=model):
        ...     print(r["path"], r["answer"])
    """
    make_task, settings, size = _ask_job(
        model, questions, template=template, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        num_beams=num_beams, num_answers=num_answers, sample=sample, temperature=temperature, top_p=top_p,
        seed=seed, repetition_penalty=repetition_penalty, preprocess=preprocess, batch_size=batch_size)
    return _run_files(model, inputs, make_task, settings, recursive=recursive, extensions=extensions,
                      batch_size=size, workers=workers, seed=seed)
