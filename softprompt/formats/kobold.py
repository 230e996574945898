"""KoboldAI soft prompt: a zip holding ``tensor.npy`` (n, d) and ``meta.json``.

Written float32 (or float16 on request), read float32, float16 and the old bfloat16 stored
as 2-byte void (``V2``). Reading checks member names and sizes before touching any data and
never unpickles (``allow_pickle=False``)."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FormatError
from ..fileio import atomic_write
from .common import (
    KOBOLD_MAX_TOKENS,
    MAX_TENSOR_BYTES,
    NPY_ERRORS,
    ZIP_DATA_ERRORS,
    check_shape,
    check_tensor,
    check_zip,
    loaded,
    member_info,
    parse_json,
    printable,
    read_member,
    stored_meta,
)

if TYPE_CHECKING:
    from ..soft_prompt import SoftPrompt

NAME = "kobold"
EXTENSIONS: tuple[str, ...] = (".zip",)
WRITABLE = True
FOLDER = False
MAX_TOKENS = KOBOLD_MAX_TOKENS
MAX_META_BYTES = 1024 * 1024
MAX_OTHER_BYTES = (
    16 * 1024 * 1024
)  # entries a reader ignores (never read) still count toward a zip bomb
WHAT = "KoboldAI soft prompt zip (tensor.npy and meta.json)"


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    try:  # is_zipfile itself raises BadZipFile on some damaged end records
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return "tensor.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False


def _member(z: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    return read_member(z, name, limit, path, "KoboldAI soft prompt zip")


def load_npy(fh, size: int, where: str, what: str = "tensor.npy") -> tuple[np.ndarray, str]:
    """The soft prompt array of the .npy stream ``fh`` of ``size`` bytes, and the dtype it was
    stored in. The header's shape and dtype are checked before the data is read, so nothing
    larger than a soft prompt is allocated; object arrays (pickles) are never loaded."""
    try:
        version = np.lib.format.read_magic(fh)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = reader(fh)
        need = math.prod(int(n) for n in shape) * dtype.itemsize  # exact: no int64 wrap-around
        if need > size - fh.tell():
            raise ValueError(
                f"its header promises {need} bytes of data but {size - fh.tell()} follow"
            )
        if dtype not in (np.float32, np.float16, np.dtype("V2")):
            raise FormatError(
                f"{where}: {what} has dtype {printable(dtype, 40)}; expected float32, float16 or bfloat16"
            )
        check_shape(shape, where)
        fh.seek(0)
        arr = np.lib.format.read_array(fh, allow_pickle=False)
        if fh.read(1):  # and reading to the end checks a zip entry's CRC
            raise ValueError("more data follows the array than its header describes")
    except NPY_ERRORS as e:
        raise FormatError(
            f"{where}: {what} is not a readable .npy array ({printable(e)})"
        ) from None
    if arr.dtype == np.dtype("V2"):  # bfloat16 stored raw: its bits are the top half of a float32
        return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32), "bfloat16"
    return arr, str(arr.dtype)


def read_tensor(z: zipfile.ZipFile, name: str, path: Path, what: str) -> tuple[np.ndarray, str]:
    """``load_npy`` of the zip entry ``name``, read as a stream: what it unpacks to is bounded
    by the soft prompt its header claims, whatever the zip's directory says."""
    info = member_info(z, name, MAX_TENSOR_BYTES, path, what)
    with z.open(info) as fh:
        return load_npy(fh, info.file_size, str(path), name)


def load(path: Path) -> SoftPrompt:
    try:
        with zipfile.ZipFile(path) as z:
            check_zip(z, path, MAX_TENSOR_BYTES + MAX_META_BYTES + MAX_OTHER_BYTES)
            arr, file_dtype = read_tensor(z, "tensor.npy", path, "KoboldAI soft prompt zip")
            meta: dict = {}
            if "meta.json" in z.namelist():
                doc = parse_json(
                    _member(z, "meta.json", MAX_META_BYTES, path),
                    f"{path}: meta.json",
                    "a JSON object with the name, description, author and supported models",
                )
                if not isinstance(doc, dict):
                    raise FormatError(f"{path}: meta.json is not a JSON object")
                meta = doc
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        NotImplementedError,
        *ZIP_DATA_ERRORS,
    ) as e:
        raise FormatError(f"{path} is not a readable zip file ({printable(e)})") from None
    return loaded(arr, meta, NAME, str(path), file_dtype)


def meta_json(sp: SoftPrompt) -> dict:
    supported = sp.meta.get("supported") or []
    if isinstance(supported, str):
        supported = [supported]
    author = sp.meta.get("author") or ""
    return {
        "name": str(sp.meta.get("name") or "softprompt"),
        "description": str(sp.meta.get("description") or ""),
        "author": author if isinstance(author, (str, list)) else str(author),
        "supported": [str(s) for s in supported],
    }


def save(sp: SoftPrompt, path: Path, dtype: str = "float32") -> None:
    if sp.n_tokens > MAX_TOKENS:
        raise FormatError(
            f"{path}: KoboldAI loads soft prompts of at most {MAX_TOKENS} tokens; this one has {sp.n_tokens}"
        )
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise FormatError(f"KoboldAI zips hold float32 or float16, not {dtype}")
    if np_dtype is np.float16 and float(sp.tensor.abs().max()) > float(np.finfo(np.float16).max):
        raise FormatError(
            f"{path}: values up to {float(sp.tensor.abs().max()):.3g} are infinite in float16; save float32"
        )
    arr = np.ascontiguousarray(sp.tensor.numpy().astype(np_dtype))
    check_tensor(arr, str(path))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    # Extra keys of the source (e.g. a round-tripped zip) are kept; the four known ones are normalised.
    meta = {k: v for k, v in stored_meta(sp.meta).items() if _jsonable(v)}
    meta.update(meta_json(sp))
    with atomic_write(path) as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tensor.npy", buf.getvalue())
        z.writestr("meta.json", json.dumps(meta, ensure_ascii=False, indent=2))


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
