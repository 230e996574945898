"""Checks every format shares: the largest soft prompt a file may claim, tensor sanity, safe
zip and JSON reading, the metadata keys a loader adds that describe the file rather than the
prompt (never written back), and ``loaded``, the tail every loader ends with.

Nothing here (nor in the format modules) imports torch until a file is read or written, so
the registry (``softprompt.formats.FORMATS``) costs no torch import."""

from __future__ import annotations

import json
import logging
import lzma
import re
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FormatError

if TYPE_CHECKING:
    import torch

    from ..soft_prompt import SoftPrompt

log = logging.getLogger("softprompt")

# Keys a loader puts in SoftPrompt.meta about the file it read; a writer drops them.
LOAD_KEYS = ("format", "file_dtype")
MAX_ZIP_ENTRIES = 10_000
KOBOLD_MAX_TOKENS = 2047  # KoboldAI rejects n_tokens >= 2048
# The largest soft prompt a loader accepts. Real ones are tens to hundreds of tokens (KoboldAI
# stops at 2047) as wide as a model's embeddings (16,384 for the largest open models); a file
# claiming more is refused from the shape it claims, before anything that size is allocated,
# so a small file cannot make softprompt fill memory.
MAX_LOAD_TOKENS = 10_000
MAX_LOAD_WIDTH = 65_536
MAX_LOAD_NUMBERS = 1 << 26  # 67,108,864 (256 MiB as float32), e.g. 2,047 tokens x 32,768
# What the data of the largest soft prompt may take in a file, or unpack to from a zip:
# float32, and a .npy header of up to 64 KiB.
MAX_TENSOR_BYTES = MAX_LOAD_NUMBERS * 4 + (1 << 16)
# What reading a damaged zip member raises besides BadZipFile (which covers a bad CRC):
# corrupt deflate or LZMA streams fail inside the decompressor.
ZIP_DATA_ERRORS = (zlib.error, lzma.LZMAError)
# What np.load raises on damaged .npy bytes: numpy parses the header dict with tokenize and
# ast.literal_eval, which fail in all these ways.
NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError)


def printable(text: object, limit: int | None = 200) -> str:
    """Text taken from a file, made safe to show on one line of a terminal: control and other
    invisible characters (newlines, carriage returns, terminal escapes, direction overrides)
    are shown escaped, and it is cut at ``limit`` characters (None: never)."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if limit is None or len(s) <= limit else s[: limit - 3] + "..."


def parse_json(data: bytes | str, where: str, expected: str) -> object:
    """The JSON document ``data`` (bytes are UTF-8), one FormatError for anything else,
    nesting too deep for Python's parser included (a RecursionError, not a JSON error)."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(
            f"{where} is not valid UTF-8 JSON ({printable(e)}): expected {expected}"
        ) from None
    except RecursionError:
        raise FormatError(
            f"{where} nests JSON too deeply to be read: expected {expected}"
        ) from None


def read_json(path: Path, limit: int, expected: str) -> object:
    """The JSON document in the file ``path``, refused when it holds more than ``limit`` bytes
    (by its size before reading, and again while reading); ``expected`` names what it should
    be, for the messages ("a PEFT adapter config")."""
    size, data = path.stat().st_size, b""
    if size <= limit:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
        size = len(data)
    if size > limit:
        raise FormatError(f"{path} is {size} bytes, more than the {limit} allowed for {expected}")
    return parse_json(data, str(path), expected)


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


def holds_code(name: str) -> str:
    """Why a pickle naming ``name`` (a function or class it would call) is refused."""
    return f"it holds code ({printable(name, 80)}), which softprompt never runs"


# How torch's weights_only unpickler names the function or class it refused: "GLOBAL
# posix.system whose module posix is blocked", "GLOBAL exec was not an allowed global"
# (torch >= 2.4), "Unsupported class posix.system" (older).
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)|Unsupported class (\S+)")


def torch_load_reason(e: BaseException) -> str:
    """Why ``torch_load`` failed, in one printable line: ``holds_code`` when the pickle names
    code, else the unpickler's own reason. Never torch's advice to retry with
    weights_only=False, which would run whatever the file holds."""
    text = str(e)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return holds_code(refused[1] or refused[2])
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines()]
    reason = next(
        (s for s in lines if s and "weights_only" not in s and not s.startswith("Check the doc")),
        type(e).__name__,
    )
    return f"torch.load with weights_only=True: {printable(reason)}"


def check_shape(shape, where: str) -> None:
    """Refuse a tensor that is not 2-D (n_tokens, dim), is empty, or is larger than any soft
    prompt, from the shape alone: call it before the data is read or materialised."""
    dims = tuple(int(n) for n in shape)
    if len(dims) != 2:
        raise FormatError(
            f"{where}: the tensor has shape {printable(dims, 80)}; a soft prompt is 2-D (n_tokens, dim)"
        )
    n, d = dims
    if n < 1 or d < 1:
        raise FormatError(f"{where}: the tensor is empty {dims}")
    if n > MAX_LOAD_TOKENS or d > MAX_LOAD_WIDTH or n * d > MAX_LOAD_NUMBERS:
        raise FormatError(
            f"{where}: the tensor claims {n} x {d}; softprompt reads soft prompts of at most "
            f"{MAX_LOAD_TOKENS:,} tokens, {MAX_LOAD_WIDTH:,} wide and {MAX_LOAD_NUMBERS:,} "
            "numbers in all"
        )


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


def soft_prompt_tensor(tensor: torch.Tensor, where: str) -> tuple[torch.Tensor, str]:
    """A tensor read from a file as a soft prompt's float32 (n, d) tensor, and the dtype the
    file stored. What torch.load or an unpickler returns may be a view that claims far more
    than its storage holds (one value expanded to (n, d) with stride 0): the shape is checked
    on that view, and only then is it copied out at full size. torch.load also rebuilds
    sparse tensors and data-less ``meta`` ones, which are no soft prompt."""
    import torch

    if tensor.layout != torch.strided or tensor.device.type != "cpu":
        raise FormatError(
            f"{where}: the tensor has layout {tensor.layout} on device {tensor.device}; "
            "a soft prompt is a dense tensor with its numbers in the file"
        )
    if not tensor.is_floating_point():
        raise FormatError(f"{where}: the tensor has dtype {tensor.dtype}; expected floats")
    check_shape(tensor.shape, where)
    file_dtype = str(tensor.dtype).removeprefix("torch.")
    tensor = tensor.detach().to(torch.float32).contiguous()
    check_tensor(tensor.numpy(), where)
    return tensor, file_dtype


def loaded(
    data: np.ndarray | torch.Tensor,
    meta: dict[str, Any],
    fmt: str,
    where: str,
    file_dtype: str | None = None,
    *,
    warn_length: bool = True,
) -> SoftPrompt:
    """The SoftPrompt a loader returns: ``data`` as read from the file, checked (2-D, not
    empty, within the limits, finite) and made float32; the KoboldAI length warning; and
    ``meta`` with the format's name and the file's dtype (see LOAD_KEYS).

    ``data`` is a numpy array (``file_dtype`` then says what the file stored), a torch tensor
    as read (``soft_prompt_tensor`` checks it and finds its dtype), or a tensor a loader has
    already put through ``soft_prompt_tensor``, given with the ``file_dtype`` that returned."""
    import torch

    from ..soft_prompt import SoftPrompt

    if isinstance(data, np.ndarray):
        if file_dtype is None:
            raise TypeError("loaded: give the file_dtype of a numpy array")
        check_tensor(data, where)
        tensor = torch.from_numpy(data.astype(np.float32, copy=False))
    elif file_dtype is None:
        tensor, file_dtype = soft_prompt_tensor(data, where)
    else:
        tensor = data
    if warn_length:
        warn_kobold_length(tensor.shape[0], where)
    meta = dict(meta)
    meta["format"] = fmt
    meta["file_dtype"] = file_dtype
    return SoftPrompt(tensor, meta)


def warn_kobold_length(n_tokens: int, where: str) -> None:
    if n_tokens > KOBOLD_MAX_TOKENS:
        log.warning(
            "warning: %s has %d soft tokens; KoboldAI accepts at most %d (softprompt can still use it)",
            printable(where, None),
            n_tokens,
            KOBOLD_MAX_TOKENS,
        )


def _unsafe_name(name: str) -> bool:
    n = name.replace("\\", "/")
    return n.startswith("/") or bool(re.match(r"^[A-Za-z]:", n)) or ".." in n.split("/")


def check_zip(z: zipfile.ZipFile, path: Path, max_total: int) -> None:
    """Refuse a zip with an absolute or `..` entry name, a name used twice (which of them a
    reader gets is up to the reader), an encrypted entry, too many entries, or more than
    ``max_total`` bytes unpacked in all (as its directory says; reads are bounded again)."""
    infos = z.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise FormatError(f"{path}: the zip has {len(infos)} entries; a soft prompt has a few")
    total, seen = 0, set()
    for info in infos:
        if _unsafe_name(info.filename):
            raise FormatError(f"{path}: refusing a zip entry with an unsafe path {info.filename!r}")
        if info.filename in seen:
            raise FormatError(
                f"{path}: the zip holds {info.filename!r} twice; a soft prompt zip names each entry once"
            )
        seen.add(info.filename)
        if info.flag_bits & 0x1:  # zipfile would ask for a password (a RuntimeError)
            raise FormatError(f"{path}: the zip entry {info.filename!r} is encrypted")
        total += info.file_size
    if total > max_total:
        raise FormatError(
            f"{path}: the zip unpacks to {total} bytes, more than the {max_total} allowed"
        )


def member_info(
    z: zipfile.ZipFile, name: str, limit: int, path: Path, what: str = "soft prompt zip"
) -> zipfile.ZipInfo:
    """The directory entry of one expected entry, refusing more than ``limit`` bytes unpacked."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise FormatError(f"{path} has no {name}: it is not a {what}") from None
    if info.file_size > limit:
        raise FormatError(
            f"{path}: {name} is {info.file_size} bytes unpacked, more than the {limit} allowed"
        )
    return info


def read_member(
    z: zipfile.ZipFile, name: str, limit: int, path: Path, what: str = "soft prompt zip"
) -> bytes:
    """The bytes of one expected entry, refusing more than ``limit`` bytes unpacked before
    and while reading (a zip's directory can lie about sizes)."""
    info = member_info(z, name, limit, path, what)
    with z.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path}: {name} unpacks to more than {limit} bytes")
    return data
