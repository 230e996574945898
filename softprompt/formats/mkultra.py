"""mkultra soft prompts (corolla-johnson/mkultra), read only: a JSON object
``{"metadata": {...}, "tensor": base64(pickle.dumps(torch_tensor, protocol=4))}``.

The pickle is what makes these files dangerous: unpickling runs whatever callables the file
names. It is read here with an unpickler that resolves only the few callables rebuilding a
tensor needs; anything else (``os.system``, ``builtins.eval``...) is refused before it can
run. The storage bytes inside a pickled tensor are a legacy ``torch.save`` stream, which is
read with ``torch.load(weights_only=True, map_location="cpu")``, so tensors pickled from
``cuda:0`` load on a CPU-only machine.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from .common import (
    MAX_TENSOR_BYTES,
    holds_code,
    loaded,
    printable,
    read_json,
    torch_load,
    torch_load_reason,
)

if TYPE_CHECKING:
    import torch

    from ..soft_prompt import SoftPrompt

NAME = "mkultra"
EXTENSIONS: tuple[str, ...] = (".json",)
WRITABLE = False
FOLDER = False
MAX_FILE_BYTES = MAX_TENSOR_BYTES * 3 // 2  # base64 makes 3 bytes 4; metadata is small
WHAT = 'mkultra soft prompt (JSON with "metadata" and a base64 "tensor")'


class UnsafePickle(Exception):
    """The pickle asked for something other than rebuilding a tensor."""


def _load_storage(blob: bytes):
    """Stands in for ``torch.storage._load_from_bytes``, which calls torch.load without
    weights_only: the legacy torch.save stream of one storage, read the safe way."""
    import torch

    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickle("a storage that is not bytes")
    try:
        storage = torch_load(io.BytesIO(bytes(blob)))
    except Exception as e:
        raise UnsafePickle(
            f"its tensor storage does not load safely: {torch_load_reason(e)}"
        ) from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickle(f"its storage is a {type(storage).__name__}")
    return storage


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # an nn.Parameter pickles as one of these around a tensor; the plain tensor is all we need
    import torch

    if not isinstance(data, torch.Tensor):
        raise UnsafePickle("a parameter without a tensor")
    return data


def _rebuild_tensor_v2(*args: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 (torch is imported when a pickle asks for it)."""
    import torch._utils

    return torch._utils._rebuild_tensor_v2(*args)


def _rebuild_tensor(*args: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor, the older pickles' way."""
    import torch._utils

    return torch._utils._rebuild_tensor(*args)


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class TensorUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED; every other global, and any persistent id, is refused."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(holds_code(f"{module}.{name}")) from None

    def persistent_load(self, pid):
        raise UnsafePickle("it uses persistent ids")


def unpickle_tensor(data: bytes, where: str) -> torch.Tensor:
    """A tensor from ``pickle.dumps(tensor)`` bytes, without running anything else."""
    import torch

    try:
        obj = TensorUnpickler(io.BytesIO(data)).load()
    except UnsafePickle as e:
        raise FormatError(
            f"{where}: refusing the tensor pickle: {e}; only a pickled tensor is allowed"
        ) from None
    except Exception as e:  # truncated or malformed pickles fail in many ways
        raise FormatError(
            f"{where}: the tensor pickle is unreadable ({type(e).__name__}: {printable(e, 150)})"
        ) from None
    if not isinstance(obj, torch.Tensor):
        raise FormatError(f"{where}: the pickle holds a {type(obj).__name__}, not a tensor")
    return obj


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 20)
    except OSError:
        return False
    return head.lstrip()[:1] == b"{" and b'"tensor"' in head and b'"metadata"' in head


def load(path: Path) -> SoftPrompt:
    doc = read_json(path, MAX_FILE_BYTES, f"an {WHAT}")
    if not isinstance(doc, dict) or not isinstance(doc.get("tensor"), str):
        raise FormatError(f'{path} has no base64 "tensor" string: expected an {WHAT}')
    try:
        raw = base64.b64decode(doc["tensor"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(f'{path}: "tensor" is not valid base64 ({e})') from None
    # Rebuilding a pickled tensor only makes a view of its storage (whose bytes are in the
    # file), so the shape it claims is checked by loaded before it is copied out.
    tensor = unpickle_tensor(raw, str(path))
    if tensor.dim() == 3 and tensor.shape[0] == 1:  # mkultra keeps a batch dimension
        tensor = tensor[0]
    metadata = doc.get("metadata")
    meta = (
        {k: v for k, v in metadata.items() if isinstance(k, str)}
        if isinstance(metadata, dict)
        else {}
    )
    meta.setdefault("name", path.stem)
    return loaded(tensor, meta, NAME, str(path))
