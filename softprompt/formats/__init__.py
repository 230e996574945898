"""Soft prompt file formats behind one small registry.

Each format module defines ``NAME``, ``EXTENSIONS``, ``detect(path) -> bool``,
``load(path) -> SoftPrompt`` and, when writable, ``save(soft_prompt, path, **options)``.
``load_any`` picks the format from the file's content, not only its extension.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError
from . import kobold, mkultra, mtjsp, native, peft

# Detection order matters: an mtj-softtuner NPZ also holds tensor.npy, so mtjsp goes first.
FORMATS = {m.NAME: m for m in (mtjsp, kobold, native, peft, mkultra)}


def detect(path: str | os.PathLike) -> str:
    """The name of the format of ``path``; FormatError if none matches."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"soft prompt file {p} does not exist")
    for name, module in FORMATS.items():
        if module.detect(p):
            return name
    for module in FORMATS.values():
        if p.suffix.lower() in module.EXTENSIONS and p.is_file():
            what = getattr(module, "WHAT", f"{module.NAME} soft prompt")
            raise FormatError(f"{p} is not a readable {what}: is it truncated or damaged?")
    known = ", ".join(sorted({e for m in FORMATS.values() for e in m.EXTENSIONS}))
    raise FormatError(
        f"{p} is not a soft prompt file softprompt can read (expected one of: {known}, or a PEFT adapter folder)"
    )


def load_any(path: str | os.PathLike):
    p = Path(path)
    return FORMATS[detect(p)].load(p)


def format_for_path(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if not suffix or Path(path).is_dir():
        return peft.NAME  # the one format that is a folder
    for name, module in FORMATS.items():
        if suffix in module.EXTENSIONS and hasattr(module, "save"):
            return name
    raise FormatError(
        f"cannot tell the format to write from the name {Path(path).name}: use .zip, .safetensors or a folder name (PEFT)"
    )


def save(soft_prompt, path: str | os.PathLike, format: str | None = None, **options) -> Path:
    name = format or format_for_path(path)
    module = FORMATS.get(name)
    if module is None or not hasattr(module, "save"):
        writable = ", ".join(n for n, m in FORMATS.items() if hasattr(m, "save"))
        raise FormatError(f"cannot write format {name!r}: use one of {writable}")
    module.save(soft_prompt, Path(path), **options)
    return Path(path)
