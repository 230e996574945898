"""softprompt's own format: a ``.safetensors`` file with one float32 tensor ``soft_prompt``
(n, d) and the metadata as JSON (plus a few flat string fields other tools can show)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FormatError
from ..fileio import atomic_write
from .common import check_shape, check_tensor, loaded, parse_json, printable, stored_meta

if TYPE_CHECKING:
    from ..soft_prompt import SoftPrompt

NAME = "safetensors"
EXTENSIONS: tuple[str, ...] = (".safetensors",)
WRITABLE = True
FOLDER = False
TENSOR_KEY = "soft_prompt"
FLAT_KEYS = ("name", "description", "author", "model", "init", "steps", "val_loss")
WHAT = "softprompt .safetensors file (one soft_prompt tensor)"


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    # 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def load(path: Path) -> SoftPrompt:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = (
                TENSOR_KEY
                if TENSOR_KEY in keys
                else ("prompt_embeddings" if "prompt_embeddings" in keys else None)
            )
            if key is None:
                raise FormatError(
                    f"{path} holds no soft prompt tensor (expected {TENSOR_KEY!r}); it has {keys[:5]}"
                )
            check_shape(f.get_slice(key).get_shape(), str(path))  # before reading the data
            tensor = f.get_tensor(key)
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(
            f"{path} is not a readable .safetensors file ({printable((str(e).strip() or type(e).__name__).splitlines()[0])})"
        ) from None
    meta: dict = {}
    if "meta" in raw_meta:
        doc = parse_json(raw_meta["meta"], f'{path}: "meta" in its header', "the metadata as JSON")
        meta = doc if isinstance(doc, dict) else {}
    for k in FLAT_KEYS:
        if k in raw_meta and k not in meta:
            meta[k] = raw_meta[k]
    return loaded(tensor, meta, NAME, str(path), warn_length=False)


def save(sp: SoftPrompt, path: Path) -> None:
    import torch
    from safetensors.torch import save

    check_tensor(sp.tensor.numpy().astype(np.float32), str(path))
    meta = stored_meta(sp.meta)
    header = {"format": "pt", "meta": json.dumps(meta, ensure_ascii=False, default=str)}
    for k in FLAT_KEYS:
        if meta.get(k) is not None:
            header[k] = str(meta[k])
    data = save({TENSOR_KEY: sp.tensor.to(torch.float32).contiguous()}, metadata=header)
    with atomic_write(path) as fh:
        fh.write(data)
