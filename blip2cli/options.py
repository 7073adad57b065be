"""Options shared by every subcommand, declared once as ``Annotated`` aliases.

Importing this module must stay cheap (typer only): ``blip2 --help`` and shell
completion build every command's options without touching torch.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .choices import Dtype, Format, Preprocess, Quantize  # declared once, in the core
from .defaults import default_batch_size, default_workers  # noqa: F401 - the commands read o.default_batch_size
from . import caption as _caption_defaults
from .loader import DEFAULT_MODEL
from .sidecar import Existing as ExistingOpt

# The sections of every command's --help (each option names one; cli.Command
# prints them in this order, a command's own sections right after Inputs).
INPUT = "Inputs"
LOADER = "Model"
GENERATION = "Generation"
OUTPUT = "Output"
PERFORMANCE = "Performance"


def choices(enum: type[Enum]) -> str:
    """The metavar of a choice option: ``[a|b|c]``, as click writes choices."""
    return "[" + "|".join(member.value for member in enum) + "]"


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps") if d.startswith(incomplete)]


# -- the shared loader ---------------------------------------------------------
Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", metavar="NAME", envvar="BLIP2_MODEL", show_envvar=True, rich_help_panel=LOADER,
        help="Short name (opt-2.7b, flan-t5-xl, ...: see blip2 models), hub id or local folder of a BLIP-2 checkpoint.",
    ),
]
Revision = Annotated[
    Optional[str],
    typer.Option("--revision", metavar="REV", rich_help_panel=LOADER, help="Branch, tag or commit of a hub model."),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", metavar="DEVICE", rich_help_panel=LOADER, autocompletion=_complete_device,
        help="auto|cpu|cuda|cuda:N|mps. auto: cuda, then mps, then cpu.",
    ),
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(
        "--dtype", metavar=choices(Dtype), rich_help_panel=LOADER, case_sensitive=False,
        help="auto: float16 on GPUs for OPT, bfloat16 for Flan-T5, float32 on the CPU.",
    ),
]
QuantizeOpt = Annotated[
    Quantize,
    typer.Option(
        "--quantize", metavar=choices(Quantize), rich_help_panel=LOADER, case_sensitive=False,
        help="Load the language model in 8 or 4 bits (bitsandbytes), or int8 weight-only (torchao).",
    ),
]
Offline = Annotated[
    bool,
    typer.Option(
        "--offline", rich_help_panel=LOADER,
        help="Never touch the network; use the Hugging Face cache only (as HF_HUB_OFFLINE=1).",
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", rich_help_panel=LOADER,
        help="Allow pickle (.bin) weights, which can run code: only for checkpoints you trust.",
    ),
]

# The model of embed/search/score: its own default (Salesforce/blip2-itm-vit-g,
# given in each command) and its own variable, so BLIP2_MODEL set for caption
# does not swap the retrieval model for a captioning one.
RetrievalModel = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", metavar="NAME", envvar="BLIP2_RETRIEVAL_MODEL", show_envvar=True, rich_help_panel=LOADER,
        show_default=False,
        help="Short name (itm: see blip2 models), hub id or local folder of a BLIP-2 checkpoint: a retrieval one for ITC/ITM, "
        "or a captioning one with --features vision|qformer. Default: Salesforce/blip2-itm-vit-g, "
        "or the model of the vector store the command updates or searches.",
    ),
]

# -- inputs --------------------------------------------------------------------
Inputs = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="IMAGES",
        help="Image files, directories, quoted globs ('photos/**/*.jpg'), or - for stdin "
        "(a list of paths, or raw image bytes).",
        show_default=False,
    ),
]
Recursive = Annotated[
    bool,
    typer.Option("--recursive/--no-recursive", rich_help_panel=INPUT, help="Walk directories recursively."),
]
Ext = Annotated[
    Optional[list[str]],
    typer.Option(
        "--ext", metavar="EXT", rich_help_panel=INPUT, show_default=False,
        help="Image extensions to pick up in directories and globs (repeatable or comma-separated). "
        "Default: jpg,jpeg,png,webp,bmp,gif,tif,tiff.",
    ),
]
Null = Annotated[
    bool,
    typer.Option("-0", "--null", rich_help_panel=INPUT, help="Paths on stdin / --files-from (and in --failed-list) are NUL-separated (find -print0)."),
]
Carry = Annotated[
    Optional[list[str]],
    typer.Option(
        "--carry", metavar="EXT", rich_help_panel=INPUT, show_default=False,
        help="Tar shard inputs: copy these members of each sample into its record, e.g. txt,json "
        "(the old alt-text beside the new caption; json parsed). Parquet inputs: these columns, e.g. "
        "caption,url (a name that is a record field lands under source_NAME: source_caption).",
    ),
]
ImageColumn = Annotated[
    Optional[str],
    typer.Option(
        "--image-column", metavar="NAME", rich_help_panel=INPUT, show_default=False,
        help="Parquet inputs: the column holding each row's image bytes (default: the first of "
        "jpg, png, webp, image).",
    ),
]
FilesFrom = Annotated[
    Optional[list[str]],
    typer.Option("--files-from", metavar="FILE", rich_help_panel=INPUT, show_default=False, help="Read input paths from FILE (- for stdin)."),
]

# -- output --------------------------------------------------------------------
FormatOpt = Annotated[
    Optional[Format],
    typer.Option(
        "--format", "-f", metavar=choices(Format), rich_help_panel=OUTPUT, case_sensitive=False, show_default=False,
        help="text | jsonl | csv | html (a contact sheet) | parquet. Default: from the -o extension "
        "(.txt, .jsonl, .csv, .html, .parquet), else text.",
    ),
]
class OutputPath(type(Path())):  # type: ignore[misc]  # the concrete class, PosixPath or WindowsPath
    """A Path that remembers a trailing slash (``-o out/`` means a directory)."""

    wants_directory = False


def output_path(value: str) -> Path:
    path = OutputPath(value)
    path.wants_directory = value.endswith(("/", os.sep))
    return path


Output = Annotated[
    Optional[Path],
    typer.Option(
        "--output", "-o", metavar="PATH", rich_help_panel=OUTPUT, show_default=False, parser=output_path,
        help="Write records to FILE instead of stdout (a directory, -o out/, for part files of --shard "
        "and multi-process runs).",
    ),
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", rich_help_panel=OUTPUT, help="No progress bar and no summary line; errors still show."),
]
HtmlLinks = Annotated[
    bool,
    typer.Option(
        "--html-links", rich_help_panel=OUTPUT,
        help="--format html: link each image relative to the page instead of embedding a thumbnail "
        "(a small page for very large sets; the images must stay where they are).",
    ),
]

ServerOpt = Annotated[
    Optional[str],
    typer.Option(
        "--server", metavar="URL", envvar="BLIP2_SERVER", show_envvar=True, rich_help_panel=LOADER, show_default=False,
        help="Send the images to a running `blip2 serve` at URL (its model) and write its records here "
        "(the key from BLIP2_API_KEY).",
    ),
]

# -- performance ---------------------------------------------------------------
BatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size", "-b", metavar="N", min=1, rich_help_panel=PERFORMANCE, show_default=False,
        help="Images per model call. Default: 16 on the CPU and mps, 32 on CUDA.",
    ),
]
Workers = Annotated[
    Optional[int],
    typer.Option(
        "--workers", "-j", metavar="N", min=1, rich_help_panel=PERFORMANCE, show_default=False,
        help="Threads decoding images ahead of the model. Default: the CPU count, at most 8.",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", rich_help_panel=PERFORMANCE,
        help="Static KV cache for decoding (on CUDA transformers also compiles the decoding step; the "
        "first batch pays for it). Same tokens.",
    ),
]
PreprocessOpt = Annotated[
    Preprocess,
    typer.Option(
        "--preprocess", metavar=choices(Preprocess), rich_help_panel=PERFORMANCE, case_sensitive=False,
        help="fast: our own decode+resize path; reference: the checkpoint's transformers "
        "image processor, bit for bit.",
    ),
]


# -- sidecars, resume and faults (shared by caption and ask) ------------------
SIDECARS = "Sidecar files"
FAULTS = "Resume, shards and failures"


Sidecar = Annotated[
    bool,
    typer.Option("--sidecar", rich_help_panel=SIDECARS, help="Write each result to a text file beside its image (photo.jpg -> photo.txt)."),
]
SidecarExt = Annotated[
    str,
    typer.Option("--sidecar-ext", metavar="EXT", rich_help_panel=SIDECARS, help="Extension of sidecar files, e.g. .caption."),
]
OutputDir = Annotated[
    Optional[Path],
    typer.Option(
        "--output-dir", metavar="DIR", rich_help_panel=SIDECARS, show_default=False, file_okay=False,
        help="Write sidecars under DIR, mirroring the input tree, instead of beside the images (implies --sidecar).",
    ),
]
Existing = Annotated[
    ExistingOpt,
    typer.Option(
        "--existing", metavar=choices(ExistingOpt), rich_help_panel=SIDECARS, case_sensitive=False,
        help="What to do with a sidecar that already exists. skip: leave it, and the image is not processed.",
    ),
]
Prefix = Annotated[
    str, typer.Option("--prefix", metavar="TEXT", rich_help_panel=SIDECARS, help="Text put before each sidecar caption (trigger words), verbatim."),
]
Suffix = Annotated[
    str, typer.Option("--suffix", metavar="TEXT", rich_help_panel=SIDECARS, help="Text put after each sidecar caption, verbatim."),
]
Separator = Annotated[
    str, typer.Option("--separator", metavar="TEXT", rich_help_panel=SIDECARS, help="Joins old and new text for --existing append|prepend."),
]
DryRun = Annotated[
    bool,
    typer.Option("--dry-run", rich_help_panel=SIDECARS, help="List what would be done (and which sidecars written) without loading the model."),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", rich_help_panel=FAULTS,
        help="Skip inputs the -o JSON Lines file already holds (same settings); redo a torn last line and failed inputs.",
    ),
]
ShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--shard", rich_help_panel=FAULTS, show_default=False, metavar="I/N",
        help="Do slice I of N (0-based) of the sorted inputs into the -o directory; join with blip2 merge.",
    ),
]
FailedListOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--failed-list", metavar="FILE", rich_help_panel=FAULTS, show_default=False,
        help="Write the paths of the images that failed to FILE, one per line (NUL-separated with -0), "
        "e.g. for xargs mv.",
    ),
]
Metadata = Annotated[
    bool,
    typer.Option(
        "--metadata", rich_help_panel=OUTPUT,
        help="Also write DIR/metadata.jsonl for the one folder DIR captioned (file_name, caption): the "
        "Hugging Face imagefolder layout. Failed images are left out.",
    ),
]
MetadataFormat = Annotated[
    str,
    typer.Option(
        "--metadata-format", metavar="[jsonl|csv|parquet]", rich_help_panel=OUTPUT,
        help="The --metadata file: metadata.jsonl, metadata.csv or metadata.parquet.",
    ),
]
FailFast = Annotated[
    bool, typer.Option("--fail-fast", rich_help_panel=FAULTS, help="Stop at the first image that fails (exit 1)."),
]


# -o extensions and the format each writes (a name without one, /dev/stdout: text).
EXTENSIONS = {".txt": "text", ".tsv": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
              ".html": "html", ".htm": "html", ".parquet": "parquet", ".pq": "parquet"}


def infer_format(fmt: Optional[Enum], output: Optional[Path], *, formats: tuple = ()) -> str:
    """The format of a run: ``--format``, else the -o extension, else text (jsonl where
    ``formats``, those the command writes, has no text). An extension blip2 does not
    write (``-o x.json``) is refused, naming those it does; Parquet needs a file and pyarrow."""
    from .errors import UsageError

    name = fmt.value if fmt is not None else None
    to_file = output is not None and str(output) not in ("-", "")
    if name is None and output is not None and to_file and not getattr(output, "wants_directory", False) and not output.is_dir():
        suffix = output.suffix.lower()
        if suffix and suffix not in EXTENSIONS:
            from .guard import refuse_image_output

            refuse_image_output(output)  # an existing image: say that first
            known = ", ".join(e for e in EXTENSIONS if EXTENSIONS[e] in (formats or EXTENSIONS.values()))
            raise UsageError(
                f"-o {output}: blip2 does not write {suffix} files (it writes {known})",
                hint="name the file with one of those extensions, or say the format with --format"
                + (" (JSON Lines is .jsonl)" if suffix == ".json" else ""),
            )
        name = EXTENSIONS.get(suffix)
    name = name or ("text" if not formats or "text" in formats else formats[0])
    if formats and name not in formats:
        raise UsageError(f"-o {output}: this command does not write {name}",
                         hint="choose one of: " + ", ".join(formats))
    if name == "parquet":
        if not to_file:
            raise UsageError("Parquet output needs a file, not standard output", hint="name one: -o results.parquet")
        from .parquet import require_pyarrow

        require_pyarrow()
    return name


# -- option bundles: shared option lists, declared once --------------------------
class Bundle:
    """Options that several commands share, declared once. A command takes the whole
    bundle as one parameter whose default is the bundle (``loading: Bundle = LOADING``);
    :func:`expands` shows Typer the bundle's options in its place and hands the command
    their values as one namespace (``load.model``, ``load.device``, ...)."""

    def __init__(self, **options):
        # name -> (Annotated type, default)
        self.options = options

    if TYPE_CHECKING:  # a command reads its options as attributes of the namespace pack() makes
        def __getattr__(self, name: str) -> Any: ...

    def without(self, *names: str) -> "Bundle":
        """The same options less ``names`` (a command that takes them its own way)."""
        return Bundle(**{k: v for k, v in self.options.items() if k not in names})

    def but(self, **options) -> "Bundle":
        """The same options with some declared otherwise (another default or help)."""
        return Bundle(**{**self.options, **options})

    def parameters(self):
        import inspect

        return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                for name, (annotation, default) in self.options.items()]

    def pack(self, values: dict):
        from types import SimpleNamespace

        return SimpleNamespace(**{name: values.pop(name) for name in self.options})


def expands(func):
    """Replace each parameter whose default is a :class:`Bundle` by the bundle's options
    (in Typer's eyes), and pack their values back into that one parameter when called."""
    import functools
    import inspect

    signature = inspect.signature(func, eval_str=True)  # the Annotated types Typer reads
    bundles = {p.name: p.default for p in signature.parameters.values() if isinstance(p.default, Bundle)}
    params = []
    for p in signature.parameters.values():
        if p.name in bundles:
            params.extend(bundles[p.name].parameters())
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                          if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else p)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        for name, bundle in bundles.items():
            kwargs[name] = bundle.pack(kwargs)
        return func(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# -- generation (caption, ask, chat) ---------------------------------------------
MaxNewTokens = Annotated[int, typer.Option(metavar="N", min=1, rich_help_panel=GENERATION)]
MinNewTokens = Annotated[int, typer.Option(metavar="N", min=0, rich_help_panel=GENERATION)]
NumBeams = Annotated[
    Optional[int],
    typer.Option(metavar="N", min=1, rich_help_panel=GENERATION, show_default=False,
                 help="Beam width; 1 is greedy. Default: 5, or 1 with --sample (N > 1 with --sample: beam-sample)."),
]
Sample = Annotated[bool, typer.Option("--sample", rich_help_panel=GENERATION, help="Nucleus sampling instead of beam search.")]
Temperature = Annotated[float, typer.Option(metavar="FLOAT", rich_help_panel=GENERATION, help="Sampling temperature.")]
TopP = Annotated[float, typer.Option(metavar="FLOAT", rich_help_panel=GENERATION, help="Nucleus sampling p.")]
Seed = Annotated[Optional[int], typer.Option(metavar="N", rich_help_panel=GENERATION, help="Random seed for --sample.")]
RepetitionPenalty = Annotated[float, typer.Option(metavar="FLOAT", rich_help_panel=GENERATION)]


LOADING = Bundle(
    model=(Model, DEFAULT_MODEL), revision=(Revision, None), device=(DeviceOpt, "auto"),
    dtype=(DtypeOpt, Dtype.auto), quantize=(QuantizeOpt, Quantize.none), offline=(Offline, False),
    allow_pickle=(AllowPickle, False),
)
RETRIEVAL_LOADING = LOADING.but(model=(RetrievalModel, None))
# The decoding options of caption (ask and chat take them with their own token defaults).
DECODING = Bundle(
    max_new_tokens=(MaxNewTokens, _caption_defaults.DEFAULT_MAX_NEW_TOKENS),
    min_new_tokens=(MinNewTokens, _caption_defaults.DEFAULT_MIN_NEW_TOKENS),
    num_beams=(NumBeams, None), sample=(Sample, False), temperature=(Temperature, 1.0), top_p=(TopP, 0.9),
    seed=(Seed, None), repetition_penalty=(RepetitionPenalty, 1.0),
)
# Sidecar files (caption, ask): commands.common.sidecar_policy(**vars(bundle)).
SIDECAR_FILES = Bundle(
    sidecar=(Sidecar, False), sidecar_ext=(SidecarExt, ".txt"), output_dir=(OutputDir, None),
    existing=(Existing, ExistingOpt.skip), prefix=(Prefix, ""), suffix=(Suffix, ""), separator=(Separator, ", "),
)
# How a job runs (caption, ask): the compute it uses, and resuming, sharding, failures.
COMPUTE = Bundle(batch_size=(BatchSize, None), workers=(Workers, None), preprocess=(PreprocessOpt, Preprocess.fast),
                 compile_=(Compile, False))
RUNNING = Bundle(dry_run=(DryRun, False), resume=(Resume, False), fail_fast=(FailFast, False), shard=(ShardOpt, None),
                 failed_list=(FailedListOpt, None))
SOURCES = Bundle(recursive=(Recursive, True), ext=(Ext, None), null=(Null, False), files_from=(FilesFrom, None))


__all__ = [name for name in dir() if not name.startswith("_")] + ["DEFAULT_MODEL"]
