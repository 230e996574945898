"""Checks every format shares: tensor sanity, safe zip reading, and the metadata keys a
loader adds that describe the file rather than the prompt (never written back)."""

from __future__ import annotations

import logging
import lzma
import re
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import FormatError

log = logging.getLogger("softprompt")

# Keys a loader puts in SoftPrompt.meta about the file it read; a writer drops them.
LOAD_KEYS = ("format", "file_dtype")
MAX_ZIP_ENTRIES = 10_000
KOBOLD_MAX_TOKENS = 2047  # KoboldAI rejects n_tokens >= 2048
# What reading a damaged zip member raises besides BadZipFile (which covers a bad CRC):
# corrupt deflate or LZMA streams fail inside the decompressor.
ZIP_DATA_ERRORS = (zlib.error, lzma.LZMAError)
# What np.load raises on damaged .npy bytes: numpy parses the header dict with tokenize and
# ast.literal_eval, which fail in all these ways.
NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError)


def printable(text: object, limit: int = 200) -> str:
    """Text taken from a file, made safe for a one-line message: control characters (newlines,
    carriage returns, terminal escapes) are shown escaped, and it is cut at ``limit``."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def stored_meta(meta: dict) -> dict:
    """The metadata worth writing: everything but what the loader recorded about its file."""
    return {k: v for k, v in meta.items() if k not in LOAD_KEYS}


def torch_load(source):
    """``torch.load(source, map_location="cpu", weights_only=True)`` with torch's warnings
    (a damaged file can make it warn about the pickle protocol) kept off the terminal: the
    caller turns a failure into one line with ``torch_load_reason``."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location="cpu", weights_only=True)


def torch_load_reason(e: BaseException) -> str:
    """Why torch.load failed, in one printable line. For a refused pickle that is the
    unpickler's own reason, not torch's advice to retry with weights_only=False (which would
    run whatever the file holds)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation of torch.load", 1)[0]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return printable(first or type(e).__name__, 200)


def check_tensor(arr, where: str) -> None:
    """A soft prompt is a non-empty 2-D (n_tokens, dim) array of finite numbers."""
    if arr.ndim != 2:
        raise FormatError(
            f"{where}: the tensor has shape {tuple(arr.shape)}; a soft prompt is 2-D (n_tokens, dim)"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise FormatError(f"{where}: the tensor is empty {tuple(arr.shape)}")
    if not np.isfinite(np.asarray(arr, dtype=np.float32)).all():
        raise FormatError(f"{where}: the tensor has NaN or infinite values")


def warn_kobold_length(n_tokens: int, where: str) -> None:
    if n_tokens > KOBOLD_MAX_TOKENS:
        log.warning(
            "warning: %s has %d soft tokens; KoboldAI accepts at most %d (softprompt can still use it)",
            where,
            n_tokens,
            KOBOLD_MAX_TOKENS,
        )


def _unsafe_name(name: str) -> bool:
    n = name.replace("\\", "/")
    return n.startswith("/") or bool(re.match(r"^[A-Za-z]:", n)) or ".." in n.split("/")


def check_zip(z: zipfile.ZipFile, path: Path, max_total: int) -> None:
    """Refuse a zip with an absolute or `..` entry name, too many entries, or more than
    ``max_total`` bytes unpacked in all (as its directory says; reads are bounded again)."""
    infos = z.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise FormatError(f"{path}: the zip has {len(infos)} entries; a soft prompt has a few")
    total = 0
    for info in infos:
        if _unsafe_name(info.filename):
            raise FormatError(f"{path}: refusing a zip entry with an unsafe path {info.filename!r}")
        total += info.file_size
    if total > max_total:
        raise FormatError(
            f"{path}: the zip unpacks to {total} bytes, more than the {max_total} allowed"
        )


def read_member(
    z: zipfile.ZipFile, name: str, limit: int, path: Path, what: str = "soft prompt zip"
) -> bytes:
    """The bytes of one expected entry, refusing more than ``limit`` bytes unpacked before
    and while reading (a zip's directory can lie about sizes)."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise FormatError(f"{path} has no {name}: it is not a {what}") from None
    if info.file_size > limit:
        raise FormatError(
            f"{path}: {name} is {info.file_size} bytes unpacked, more than the {limit} allowed"
        )
    with z.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path}: {name} unpacks to more than {limit} bytes")
    return data
