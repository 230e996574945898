"""Training checkpoints of the soft prompt tuners, ``.mtjsp`` (read only).

Two variants share the extension:
- mtj-softtuner (TPU): ``np.savez_compressed`` with ``tensor`` (n, d) float32 (bfloat16 as
  ``V2`` before Oct 2021), ``step`` and a few float scalars, plus ``opt_state``, a pickled
  object array. Only the named numeric entries are read, each as plain ``.npy`` bytes
  without pickle; ``opt_state`` is never opened, so its code never runs.
- KoboldAI's PyTorch tuner: a ``torch.save`` dict (``tensor``, ``opt_state``, ``step``,
  ``loss``, ``grad_norm``), read only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FormatError
from .common import (
    MAX_TENSOR_BYTES,
    NPY_ERRORS,
    ZIP_DATA_ERRORS,
    check_zip,
    loaded,
    printable,
    read_member,
    torch_load,
    torch_load_reason,
)
from .kobold import read_tensor

if TYPE_CHECKING:
    from ..soft_prompt import SoftPrompt

NAME = "mtjsp"
EXTENSIONS: tuple[str, ...] = (".mtjsp",)
WRITABLE = False
FOLDER = False
# opt_state (Adam's two moments) is twice the tensor; in an NPZ it is never read, only
# counted, but torch.load reads all of a torch.save file.
MAX_TOTAL_BYTES = 4 * MAX_TENSOR_BYTES
MAX_SCALAR_BYTES = 4096
SCALARS = ("step", "loss", "last_loss", "grad_norm", "grad_norm_micro")
WHAT = "soft prompt checkpoint (.mtjsp: an NPZ with tensor.npy, or a torch.save dict)"


def _is_npz(names: list[str]) -> bool:
    return "tensor.npy" in names and ("step.npy" in names or "opt_state.npy" in names)


def _is_torch_zip(names: list[str]) -> bool:
    return any(n.endswith("/data.pkl") for n in names)


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            # a torch.save zip is claimed only under the .mtjsp name: it could hold anything
            return _is_npz(names) or (_is_torch_zip(names) and path.suffix.lower() in EXTENSIONS)
        with path.open("rb") as fh:  # torch.save's legacy (non-zip) format starts as a pickle
            return path.suffix.lower() in EXTENSIONS and fh.read(1) == b"\x80"
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False


def load(path: Path) -> SoftPrompt:
    try:
        with zipfile.ZipFile(path) as z:
            check_zip(z, path, MAX_TOTAL_BYTES)
            names = z.namelist()
            if _is_npz(names):
                return _load_npz(z, path)
            if not _is_torch_zip(names):
                raise FormatError(
                    f"{path} is a zip without tensor.npy or data.pkl: expected a {WHAT}"
                )
    except zipfile.BadZipFile:
        pass  # maybe torch.save's legacy format
    except (zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, *ZIP_DATA_ERRORS) as e:
        raise FormatError(f"{path} is not a readable {WHAT} ({printable(e)})") from None
    return _load_torch(path)


def _load_npz(z: zipfile.ZipFile, path: Path) -> SoftPrompt:
    arr, file_dtype = read_tensor(z, "tensor.npy", path, WHAT)
    meta = {"name": path.stem, "variant": "mtj-softtuner npz"}
    sp = loaded(arr, meta, NAME, str(path), file_dtype)  # the tensor is checked first
    for key in SCALARS:
        if f"{key}.npy" not in z.namelist():
            continue
        data = read_member(z, f"{key}.npy", MAX_SCALAR_BYTES, path, WHAT)
        try:
            value = np.load(io.BytesIO(data), allow_pickle=False)
        except NPY_ERRORS as e:
            raise FormatError(
                f"{path}: {key} is not a readable .npy number ({printable(e)})"
            ) from None
        if value.size != 1 or value.dtype.kind not in "iuf":
            raise FormatError(
                f"{path}: {key} should be one number, got {value.dtype} {value.shape}"
            )
        sp.meta[key] = int(value) if key == "step" else float(value)
    return sp


def _load_torch(path: Path) -> SoftPrompt:
    import torch

    if path.stat().st_size > MAX_TOTAL_BYTES:
        raise FormatError(
            f"{path} is larger than the {MAX_TOTAL_BYTES} bytes allowed for a soft prompt checkpoint"
        )
    try:
        obj = torch_load(path)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise FormatError(
            f"{path} is not a {WHAT} that loads safely: {torch_load_reason(e)}"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("tensor"), torch.Tensor):
        raise FormatError(f"{path} holds no 'tensor' entry: expected a {WHAT}")
    tensor = obj["tensor"]
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]  # a view: nothing is copied before loaded's checks
    meta: dict = {"name": path.stem, "variant": "torch.save dict"}
    for key in SCALARS:
        value = obj.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            meta[key] = int(value) if key == "step" else float(value)
    return loaded(tensor, meta, NAME, str(path))
