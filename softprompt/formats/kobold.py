"""KoboldAI soft prompt: a zip holding ``tensor.npy`` (n, d) and ``meta.json``.

Written float32 (or float16 on request), read float32, float16 and the old bfloat16 stored
as 2-byte void (``V2``). Reading checks member names and sizes before touching any data and
never unpickles (``allow_pickle=False``)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import FormatError
from ..fileio import atomic_write
from ..soft_prompt import SoftPrompt

NAME = "kobold"
EXTENSIONS = (".zip",)
MAX_TOKENS = 2047  # KoboldAI rejects n_tokens >= 2048
MAX_TENSOR_BYTES = 512 * 1024 * 1024
MAX_META_BYTES = 1024 * 1024
META_KEYS = ("name", "description", "author", "supported")


def detect(path: Path) -> bool:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return "tensor.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _member(z: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    for info in z.infolist():
        if info.filename.startswith("/") or ".." in info.filename.replace("\\", "/").split("/"):
            raise FormatError(f"{path}: refusing a zip entry with an unsafe path {info.filename!r}")
    try:
        info = z.getinfo(name)
    except KeyError:
        raise FormatError(f"{path} has no {name}: it is not a KoboldAI soft prompt zip") from None
    if info.file_size > limit:
        raise FormatError(f"{path}: {name} is {info.file_size} bytes unpacked, more than the {limit} allowed")
    with z.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path}: {name} unpacks to more than {limit} bytes")
    return data


def read_npy(data: bytes, where: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{where}: tensor.npy is not a readable .npy array ({e})") from None
    if arr.dtype == np.dtype("V2"):  # bfloat16 stored raw: its bits are the top half of a float32
        arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if arr.dtype not in (np.float32, np.float16):
        raise FormatError(f"{where}: tensor.npy has dtype {arr.dtype}; expected float32, float16 or bfloat16")
    return arr


def check_tensor(arr, where: str) -> None:
    if arr.ndim != 2:
        raise FormatError(f"{where}: the tensor has shape {tuple(arr.shape)}; a soft prompt is 2-D (n_tokens, dim)")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise FormatError(f"{where}: the tensor is empty {tuple(arr.shape)}")
    if not np.isfinite(np.asarray(arr, dtype=np.float32)).all():
        raise FormatError(f"{where}: the tensor has NaN or infinite values")


def load(path: Path) -> SoftPrompt:
    try:
        with zipfile.ZipFile(path) as z:
            tensor_bytes = _member(z, "tensor.npy", MAX_TENSOR_BYTES, path)
            meta = {}
            if "meta.json" in z.namelist():
                try:
                    meta = json.loads(_member(z, "meta.json", MAX_META_BYTES, path).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise FormatError(f"{path}: meta.json is not valid UTF-8 JSON ({e})") from None
                if not isinstance(meta, dict):
                    raise FormatError(f"{path}: meta.json is not a JSON object")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as e:
        raise FormatError(f"{path} is not a readable zip file ({e})") from None
    arr = read_npy(tensor_bytes, str(path))
    check_tensor(arr, str(path))
    meta = dict(meta)
    meta["format"] = NAME
    return SoftPrompt(torch.from_numpy(arr.astype(np.float32)), meta)


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
    arr = np.ascontiguousarray(sp.tensor.numpy().astype(np_dtype))
    check_tensor(arr, str(path))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    # Extra keys of the source (e.g. a round-tripped zip) are kept; the four known ones are normalised.
    meta = {k: v for k, v in sp.meta.items() if k not in ("format",) and _jsonable(v)}
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
