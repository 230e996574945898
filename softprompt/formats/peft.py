"""Hugging Face PEFT prompt-tuning adapter: a folder with ``adapter_config.json``
(``peft_type`` PROMPT_TUNING) and ``adapter_model.safetensors`` holding one float32 tensor
``prompt_embeddings`` (num_virtual_tokens, token_dim).

``peft.PeftModel.from_pretrained(base_model, folder)`` loads what ``save`` writes and puts the
vectors in front of the token embeddings exactly as softprompt does. The soft prompt's own
metadata travels in the safetensors header (``softprompt_meta``), which PEFT ignores.
PEFT itself is not needed to read or write the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError
from .common import (
    MAX_TENSOR_BYTES,
    check_shape,
    check_tensor,
    loaded,
    parse_json,
    printable,
    read_json,
    soft_prompt_tensor,
    stored_meta,
    torch_load,
    torch_load_reason,
)

if TYPE_CHECKING:
    import torch

    from ..soft_prompt import SoftPrompt

NAME = "peft"
EXTENSIONS: tuple[str, ...] = ()  # a folder, written when the output name has no extension
WRITABLE = True
FOLDER = True
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
TENSOR_KEY = "prompt_embeddings"
MAX_CONFIG_BYTES = 1024 * 1024
# What may already be in a folder we replace: an older adapter, nothing of the user's.
REPLACEABLE = {CONFIG, WEIGHTS, LEGACY_WEIGHTS, "README.md"}
WHAT = "PEFT prompt-tuning adapter folder (adapter_config.json + adapter_model.safetensors)"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def _read_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG
    cfg = read_json(cfg_path, MAX_CONFIG_BYTES, f"a {WHAT}")
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path} is not a JSON object: expected a {WHAT}")
    kind = cfg.get("peft_type")
    if kind != "PROMPT_TUNING":
        raise FormatError(
            f"{folder} is a PEFT {printable(kind or 'unknown', 60)} adapter; softprompt reads PROMPT_TUNING adapters only"
        )
    return cfg


def load(path: Path) -> SoftPrompt:
    folder = Path(path)
    cfg = _read_config(folder)
    if (folder / WEIGHTS).is_file():
        tensor, header = _read_safetensors(folder / WEIGHTS)
    elif (folder / LEGACY_WEIGHTS).is_file():
        tensor, header = _read_bin(folder / LEGACY_WEIGHTS), {}
    else:
        raise FormatError(f"{folder} has no {WEIGHTS}: expected a {WHAT}")
    tensor, file_dtype = soft_prompt_tensor(tensor, str(folder))
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise FormatError(
            f"{folder}: the adapter has {printable(subs, 40)} transformer submodules (an encoder-decoder prompt); "
            "softprompt uses decoder-only prompts"
        )
    n, d = tensor.shape
    if cfg.get("num_virtual_tokens") not in (None, n) or cfg.get("token_dim") not in (None, d):
        raise FormatError(
            f"{folder}: {CONFIG} says {printable(cfg.get('num_virtual_tokens'), 40)} x "
            f"{printable(cfg.get('token_dim'), 40)} but "
            f"{TENSOR_KEY} is {n} x {d}"
        )
    meta: dict = {}
    if "softprompt_meta" in header:
        stored = parse_json(
            header["softprompt_meta"],
            f"{folder}: softprompt_meta in {WEIGHTS}",
            "the soft prompt's metadata as JSON",
        )
        if isinstance(stored, dict):
            meta = stored
    meta.setdefault("name", folder.name)
    base = cfg.get("base_model_name_or_path")
    if base and not meta.get("supported"):
        meta["supported"] = [str(base)]
    return loaded(tensor, meta, NAME, str(folder), file_dtype)


def _read_safetensors(path: Path) -> tuple[torch.Tensor, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if TENSOR_KEY not in f.keys():
                raise FormatError(
                    f"{path} holds no {TENSOR_KEY!r} tensor: expected a PEFT prompt-tuning adapter"
                )
            check_shape(f.get_slice(TENSOR_KEY).get_shape(), str(path))  # before reading it
            return f.get_tensor(TENSOR_KEY), dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(
            f"{path} is not a readable .safetensors file ({printable((str(e).strip() or type(e).__name__).splitlines()[0])})"
        ) from None


def _read_bin(path: Path) -> torch.Tensor:
    """The tensor of a ``torch.save`` file: still a view of what torch.load read, so that
    ``soft_prompt_tensor`` checks its shape before copying it out."""
    import torch

    if path.stat().st_size > MAX_TENSOR_BYTES:
        raise FormatError(
            f"{path} is larger than the {MAX_TENSOR_BYTES} bytes allowed for a prompt adapter"
        )
    try:
        state = torch_load(path)
    except Exception as e:
        raise FormatError(f"{path} does not load safely: {torch_load_reason(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get(TENSOR_KEY), torch.Tensor):
        raise FormatError(
            f"{path} holds no {TENSOR_KEY!r} tensor: expected a PEFT prompt-tuning adapter"
        )
    return state[TENSOR_KEY]


def adapter_config(sp: SoftPrompt, base_model: str | None = None) -> dict:
    """The adapter_config.json PEFT needs to rebuild a prompt-tuning adapter (RANDOM init:
    TEXT would make PEFT want the init text and a tokenizer at load time)."""
    if base_model is None:
        # a hub id helps AutoPeftModel find the base model; a local path or .gguf would not
        model = str(sp.meta.get("model") or "")
        supported = sp.meta.get("supported")
        if (
            model
            and not model.endswith(".gguf")
            and not Path(model).is_absolute()
            and not Path(model).exists()
        ):
            base_model = model
        elif isinstance(supported, list) and supported:
            base_model = supported[0]
    return {
        "auto_mapping": None,
        "base_model_name_or_path": str(base_model) if base_model else None,
        "inference_mode": True,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": sp.n_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": sp.dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def save(sp: SoftPrompt, path: Path, base_model: str | None = None) -> None:
    """Write the adapter folder: built in a temporary folder beside ``path``, then renamed
    into place, so ``path`` is either the old adapter or the complete new one."""
    import torch
    from safetensors.torch import save as st_save

    path = Path(path)
    check_tensor(sp.tensor.numpy(), str(path))
    if path.exists() and not path.is_dir():
        raise FormatError(f"{path} is a file; a PEFT adapter is a folder: give a folder name")
    if path.is_dir():
        extra = sorted(p.name for p in path.iterdir() if p.name not in REPLACEABLE)
        if extra:
            raise FormatError(
                f"{path} is a folder with other files ({', '.join(extra[:3])}); "
                "write the PEFT adapter to a new or empty folder"
            )
    header = {
        "format": "pt",
        "softprompt_meta": json.dumps(stored_meta(sp.meta), ensure_ascii=False, default=str),
    }
    weights = st_save({TENSOR_KEY: sp.tensor.to(torch.float32).contiguous()}, metadata=header)
    config = json.dumps(adapter_config(sp, base_model), indent=2) + "\n"

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        for name, data in ((WEIGHTS, weights), (CONFIG, config.encode("utf-8"))):
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if path.is_dir():
            old = path.parent / f".{path.name}.{os.getpid()}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous adapter back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
