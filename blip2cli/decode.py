"""Safe image decode: a path or bytes -> an upright, fully loaded RGB ``PIL.Image``,
or :class:`ImageError` with a reason a user understands (empty file, truncated
JPEG, "not an image file (looks like HTML)", image too large, permission denied).

* ``read_image_file``: the bytes of a regular file, never blocking on a FIFO or a
  device, up to a size limit;
* ``open_image``: sniff the format, check the decode budget (``MAX_DECODE_BYTES``,
  from the header, after a JPEG's draft) before any pixel is decoded, apply EXIF
  orientation, convert every mode (16-bit, palette, alpha on white) to RGB.

Pillow is imported on first use (``pil``), with its plugins registered once.
"""

from __future__ import annotations

import math
import os
import stat
import threading

from .errors import EXIT_ITEMS_FAILED, Blip2Error

__all__ = ["ImageError", "MAX_DECODE_BYTES", "open_image", "read_image_file"]

# Pillow's ExifTags.Base.Orientation
_EXIF_ORIENTATION = 0x0112
# open_image(draft_size=...) decodes a JPEG at a reduced DCT scale only while both
# decoded dims stay >= DRAFT_MARGIN x draft_size.  Measured against a full decode
# (bicubic to 224, normalised units): margin 1 drafts a 640x480 JPEG to 320x240 with
# mean/max abs diff 0.015/0.47; margin 1.5 leaves it alone, drafts 1920x1080 to
# 960x540 (0.003/0.07) and 4032x3024 to 504x378 (0.005/0.11, 4.5x faster).
DRAFT_MARGIN = 1.5
# Orientations whose transposition swaps width and height.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# The most memory one image may take while it is decoded: its pixels as Pillow
# stores them plus the copies made on the way to RGB (estimated from the header,
# after a JPEG's draft, before any pixel is decoded; see _decode_bytes). A 100-
# megapixel RGB photo (400 MB) passes; a 13000x13000 1-bit PNG (845 MB) does not.
# Decode memory is then at most this much per image in flight (one per decode
# worker, --workers). None: no limit (Pillow's decompression-bomb guard stays).
MAX_DECODE_BYTES: int | None = 500_000_000
# Formats whose decoded size the draft (reduced DCT scale) may still shrink.
_DRAFTABLE = ("JPEG", "MPO")


class ImageError(Blip2Error):
    """A per-image failure with a message a user understands.

    The message is a reason only (``"empty file (0 bytes)"``, ``"truncated JPEG
    file (the data ends early)"``, ``"not an image file (looks like HTML)"``, ...);
    the caller adds the file name. A ``Blip2Error`` (``except blip2cli.Blip2Error``
    catches every error of ours); in a run it becomes an error record, and one that
    reaches the CLI's top exits 1, as a failed item does.
    """

    exit_code = EXIT_ITEMS_FAILED


_init_lock = threading.Lock()
_initialised = False


def pil():
    """Import Pillow once and register all plugins (thread-safe). Pillow's
    decompression-bomb *warning* is left to the host's warnings filters (the CLI
    hides it: ``loader.quiet_on_load``); the error threshold, 2x MAX_IMAGE_PIXELS,
    stays, and the decode budget refuses such images from their header anyway."""
    global _initialised
    from PIL import Image

    if not _initialised:
        with _init_lock:
            if not _initialised:
                Image.init()
                _initialised = True
    return Image


def _bomb_message(exc: BaseException) -> str:
    from PIL import Image

    size = None
    tb = exc.__traceback__
    while tb is not None:  # the innermost frame is Image._decompression_bomb_check(size)
        if tb.tb_frame.f_code.co_name == "_decompression_bomb_check":
            size = tb.tb_frame.f_locals.get("size")
        tb = tb.tb_next
    limit = Image.MAX_IMAGE_PIXELS
    limit_txt = f"{2 * limit} pixels" if limit else "Pillow's pixel limit"
    if isinstance(size, tuple) and len(size) == 2:
        w, h = size
        return (
            f"image too large: {w}x{h} pixels exceeds the decompression-bomb limit of "
            f"{limit_txt}"
        )
    return f"image too large: exceeds the decompression-bomb limit of {limit_txt} ({exc})"


def _sniff(head: bytes) -> str:
    """A reason for data that Pillow could not identify."""
    h = head.lstrip(b"\xef\xbb\xbf")  # UTF-8 BOM
    stripped = h.lstrip()
    low = stripped[:512].lower()
    if h.startswith(b"%PDF"):
        return "not an image file (looks like a PDF document)"
    if h[4:8] == b"ftyp":
        brand = h[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "unsupported image format (HEIC/HEIF; Pillow cannot read it without a plugin)"
        if brand in (b"avif", b"avis"):
            return "unsupported or corrupt AVIF image"
        return "not an image file (looks like a video/MP4 container)"
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<meta", b"<script")) or (
        low.startswith(b"<") and b"<html" in low
    ):
        return "not an image file (looks like HTML)"
    if low.startswith(b"<svg") or (low.startswith(b"<?xml") and b"<svg" in head.lower()):
        return "unsupported image format (SVG vector graphics)"
    if low.startswith(b"<?xml"):
        return "not an image file (looks like XML)"
    if h.startswith(b"PK\x03\x04"):
        return "not an image file (looks like a ZIP archive)"
    if h.startswith(b"\x1f\x8b"):
        return "not an image file (looks like gzip-compressed data)"
    if h.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")):
        return "corrupt image file (unreadable header)"
    if h.startswith((b"ID3", b"OggS", b"fLaC")) or (h.startswith(b"RIFF") and h[8:12] == b"WAVE"):
        return "not an image file (looks like audio)"
    if b"\x00" not in h[:4096]:
        text: str | None
        try:
            text = h[:4096].decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            # a multi-byte character cut at the end of the sample is still text
            text = h[: e.start].decode("utf-8") if e.start > len(h[:4096]) - 4 else None
        if text is not None:
            printable = sum(c.isprintable() or c in "\r\n\t\f" for c in text)
            if text and printable >= 0.95 * len(text):
                if stripped[:1] in (b"{", b"["):
                    return "not an image file (looks like JSON/text)"
                return "not an image file (looks like text)"
    return "not an image file (unrecognised format)"


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.1f} MB"


def _decode_bytes(im) -> int:
    """About the most memory decoding ``im`` (opened, not loaded) and making it RGB takes.

    Pillow keeps 1, L and P images in one byte per pixel, I;16 in two and every
    other mode in four (RGB included). On top of that: nothing for plain RGB, the
    RGB copy (4) for other modes, and for alpha (RGBA copy, white background,
    composite, RGB) or 16/32-bit and float greyscale (numpy scaling) 16; plus
    one more stored copy when EXIF says the image is rotated."""
    w, h = im.size
    mode = im.mode
    if mode in ("1", "L", "P"):
        stored = 1
    elif mode.startswith("I;16"):
        stored = 2
    else:
        stored = 4
    has_alpha = any(b in ("A", "a") for b in im.getbands()) or im.info.get("transparency") is not None
    if mode == "RGB" and not has_alpha:
        extra = 0
    elif has_alpha or mode.startswith("I") or mode == "F":
        extra = 16
    else:
        extra = 4
    # (A PNG's getexif() decodes the image to look for EXIF after the pixels: not here.)
    if not (im.format == "PNG" and "exif" not in im.info) and orientation(im) != 1:
        extra += stored  # exif_transpose makes the turned copy before it drops the first
    return w * h * (stored + extra)


def check_decode_budget(im) -> None:
    """Refuse an image whose decode would take more than ``MAX_DECODE_BYTES``, from its header."""
    limit = MAX_DECODE_BYTES
    if limit is None:
        return
    need = _decode_bytes(im)
    if need > limit:
        w, h = im.size
        raise ImageError(
            f"image too large to decode: {w}x{h} pixels (mode {im.mode}) would take about "
            f"{megabytes(need)} of memory; the limit is {megabytes(limit)} per image"
        )


def decode_error(exc: BaseException, fmt: str | None) -> ImageError:
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(_bomb_message(exc))
    name = fmt or "image"
    if isinstance(exc, MemoryError):
        return ImageError("image too large to decode (out of memory)")
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, EOFError) or "truncated" in low or "premature end" in low:
        return ImageError(f"truncated {name} file (the data ends early)")
    if "cannot load this image" in low:
        return ImageError(f"corrupt {name} file (no image data)")
    if "broken data stream" in low:
        return ImageError(f"corrupt {name} file (broken data stream)")
    if "decompressing data" in low or "crc" in low:
        return ImageError(f"corrupt {name} file ({msg})")
    detail = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return ImageError(f"corrupt or unsupported {name} image ({detail})")


def orientation(im) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in (1, 2, 3, 4, 5, 6, 7, 8) else 1
    except Exception:  # malformed EXIF: treat as upright rather than failing the image
        return 1


def _scale_to_uint8(arr, *, integer_16bit: bool):
    """Map a single-channel high-bit-depth array to uint8 (0..255) without clipping."""
    import numpy as np

    if integer_16bit:
        # exact rounding of v * 255 / 65535 == v / 257
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating):
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.rint(a).astype(np.uint8)
    else:
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_on_white(im):
    Image = pil()
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im):
    """Any Pillow mode -> RGB, like transformers' convert_to_rgb (alpha composited
    on white), except that 16/32-bit and float greyscale is scaled, not clipped."""
    mode = im.mode
    if mode == "RGB" and im.info.get("transparency") is None:
        return im
    if mode.startswith("I") or mode == "F":
        import numpy as np

        Image = pil()
        arr = np.asarray(im)
        grey = _scale_to_uint8(arr, integer_16bit=mode.startswith("I;16"))
        out = Image.fromarray(np.ascontiguousarray(grey), mode="L")
        transparency = im.info.get("transparency")
        if isinstance(transparency, int) and not isinstance(transparency, bool):
            alpha = Image.fromarray(np.where(arr == transparency, 0, 255).astype(np.uint8), mode="L")
            la = Image.merge("LA", (out, alpha))
            return _composite_on_white(la)
        return out.convert("RGB")
    has_alpha = any(b in ("A", "a") for b in im.getbands()) or im.info.get("transparency") is not None
    if has_alpha:
        return _composite_on_white(im)
    return im.convert("RGB")


def open_header(fp):
    """``PIL.Image.open(fp)``: the header read, no pixel decoded; every failure an
    :class:`ImageError` (a file Pillow does not know says what it looks like).

    Pillow's own ``Image.open`` warns (``DecompressionBombWarning``) above
    ``MAX_IMAGE_PIXELS``; hiding that would take a global warnings filter, and the
    library changes none of its host's. So the plugins are tried here as
    ``Image.open`` tries them (every plugin registered, in Pillow's order), and only
    the decompression-bomb *error* (over 2x ``MAX_IMAGE_PIXELS``) is kept; the decode
    budget (``check_decode_budget``) bounds the memory anyway."""
    import struct

    Image = pil()
    try:
        fp.seek(0)
        prefix = fp.read(16)
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            try:
                result = not accept or accept(prefix)
                if not result or isinstance(result, str):
                    continue
                fp.seek(0)
                im = factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # not this format (as Image.open goes on to the next plugin)
            _bomb_check(im.size)
            return im
    except ImageError:
        raise
    except Exception as e:
        raise decode_error(e, None) from None
    try:
        fp.seek(0)
        head = fp.read(4096)
    except Exception:
        head = b""
    raise ImageError(_sniff(head))


def _bomb_check(size) -> None:
    """Pillow's decompression-bomb error (over 2x ``MAX_IMAGE_PIXELS``), as an ImageError."""
    Image = pil()
    limit = Image.MAX_IMAGE_PIXELS
    w, h = size
    if limit and max(1, w) * max(1, h) > 2 * limit:
        raise ImageError(f"image too large: {w}x{h} pixels exceeds the decompression-bomb limit of "
                         f"{2 * limit} pixels")


def _open_and_load(fp, draft_size):
    """Image.open + optional draft + load + EXIF transpose + RGB -> an RGB image."""
    from PIL import ImageOps

    fmt = None
    im = open_header(fp)
    try:
        fmt = im.format
        draft_info = None
        if draft_size is not None and fmt in ("JPEG", "MPO"):
            dw, dh = int(draft_size[0]), int(draft_size[1])
            if orientation(im) in _SWAPPING_ORIENTATIONS:
                dw, dh = dh, dw  # the draft applies to the stored (pre-rotation) pixels
            # Ask for DRAFT_MARGIN x the target: the final resize then still
            # downsamples by >= 1.5x, which keeps the result close to a full decode.
            rw, rh = math.ceil(dw * DRAFT_MARGIN), math.ceil(dh * DRAFT_MARGIN)
            w, h = im.size
            if dw > 0 and dh > 0 and w >= 2 * rw and h >= 2 * rh:
                original = im.size
                im.draft("RGB", (rw, rh))
                if im.size != original:
                    draft_info = {"original_size": original, "decoded_size": im.size}
        check_decode_budget(im)  # from the header (after the draft): no pixel decoded yet
        im.load()
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:
            pass  # malformed EXIF/XMP: keep the stored orientation rather than fail
        out = _to_rgb(im)
    except ImageError:
        raise
    except Exception as e:
        raise decode_error(e, fmt) from None
    if draft_info is not None:
        out.info["blip2_draft"] = draft_info
    return out


def open_image(source, *, draft_size: tuple[int, int] | None = None):
    """Decode ``source`` (a path, or the file's bytes) into an upright, fully
    loaded RGB ``PIL.Image.Image``.

    * EXIF orientation applied; the first frame of animations;
    * every mode to RGB: alpha / transparency composited on white, palette,
      16-bit greyscale scaled to 8 bit, CMYK, 1-bit, float;
    * Pillow's decompression-bomb limit kept (its warning silenced);
    * an image whose decode would take more than ``MAX_DECODE_BYTES`` is refused
      from its header (after the draft), before any pixel is decoded;
    * only regular files are opened (a named pipe or device is refused from ``stat``);
    * ``draft_size=(w, h)`` (the size the caller will resize to): a JPEG much
      larger than that is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) -- the
      strongest reduction that keeps both dims >= ``DRAFT_MARGIN`` (1.5) x the draft size, in
      display orientation (EXIF rotation accounted for); ``image.info["blip2_draft"]``
      then records ``{"original_size", "decoded_size"}`` (sizes of the stored,
      unrotated pixels).

    Every failure raises :class:`ImageError`.
    """
    import io

    pil()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("empty data (0 bytes)")
        return _open_and_load(io.BytesIO(data), draft_size)

    if hasattr(source, "mode") and hasattr(source, "getbands") and hasattr(source, "size"):
        # already a PIL image: just normalise it (never modified in place)
        if 0 in tuple(source.size):
            raise ImageError(f"empty image: {source.size[0]}x{source.size[1]} pixels")
        try:
            source.load()
            im = source
            if orientation(source) != 1:
                from PIL import ImageOps

                im = ImageOps.exif_transpose(source)
            return _to_rgb(im)
        except ImageError:
            raise
        except Exception as e:
            raise decode_error(e, getattr(source, "format", None)) from None

    f, _ = open_regular(source)
    with f:
        try:
            return _open_and_load(f, draft_size)
        except ImageError:
            raise
        except OSError as e:  # an I/O error while reading (EIO, ...)
            raise ImageError(f"cannot read file ({e.strerror or e})") from None


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(st: os.stat_result) -> ImageError | None:
    """The reason a file that is no regular file is never opened (None for a regular file).

    Opening a named pipe blocks until something writes to it, a device can be endless
    (``/dev/zero``): only regular files are read; a stream goes to stdin (``-``)."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return ImageError("is a directory")
    for test, kind in _NOT_REGULAR:
        if test(st.st_mode):
            return ImageError(f"not a regular file ({kind}), not opened: only regular files are read "
                              "(send a stream on stdin, as -)")
    return ImageError("not a regular file")


def open_regular(source):
    """``(binary file, its fstat)`` of an image path, or :class:`ImageError`.

    Only regular files are opened: a named pipe, socket or device is refused from
    ``stat`` without an ``open``. The open itself is non-blocking and the opened
    descriptor is checked again (``fstat``), so a file swapped for a pipe between
    the two cannot hang a decode worker."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise ImageError(f"broken symbolic link (points to {target!r}, which does not exist)") from None
        raise ImageError("no such file") from None
    except NotADirectoryError:
        raise ImageError("no such file (a parent in the path is not a directory)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot access file ({e.strerror or e})") from None

    refused = _not_regular(st)
    if refused is not None:
        raise refused
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")

    try:
        f = open(path, "rb", opener=_open_nonblocking)
    except PermissionError:
        raise ImageError("permission denied") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})") from None
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        refused = _not_regular(st)
        if refused is not None:
            raise refused
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: no read waits for a writer
        return f, st
    except OSError as e:
        f.close()
        raise ImageError(f"cannot read file ({e.strerror or e})") from None
    except BaseException:
        f.close()
        raise


def _open_nonblocking(path, flags):
    """``open``'s opener: O_NONBLOCK (a pipe swapped in after the stat cannot block
    the open), no controlling terminal."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))


def read_image_file(source, *, max_bytes: int | None = None) -> tuple[bytes, os.stat_result]:
    """``(the bytes of an image file, its stat)``, for a caller that keeps the bytes
    (a vector store hashes exactly what it decodes).

    Refused (:class:`ImageError`) before the rest of the file is read: anything
    but a regular file (never opened), a file that Pillow does not recognise from
    its first bytes (the reason says what it looks like), a header over the
    decompression-bomb limit or, for formats decoded at full size, over
    ``MAX_DECODE_BYTES``, and a file larger than ``max_bytes`` (default
    ``MAX_DECODE_BYTES``). The decode of the bytes checks the rest."""
    pil()
    limit = MAX_DECODE_BYTES if max_bytes is None else max_bytes
    f, st = open_regular(source)
    with f:
        try:
            im = open_header(f)
            if im.format not in _DRAFTABLE:  # a JPEG's decoded size is settled by the draft
                check_decode_budget(im)
            if limit is not None and st.st_size > limit:
                raise ImageError(
                    f"file too large to read as one image ({megabytes(st.st_size)}; "
                    f"the limit is {megabytes(limit)})"
                )
            f.seek(0)
            # read() allocates what it is asked for first: ask for the file's size (+1 to see growth)
            data = f.read((st.st_size if limit is None else min(st.st_size, limit)) + 1)
        except OSError as e:
            raise ImageError(f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    if limit is not None and len(data) > limit:  # grew while read
        raise ImageError(f"file too large to read as one image (the limit is {megabytes(limit)})")
    return data, st
