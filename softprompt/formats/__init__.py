"""Soft prompt file formats behind one small registry.

Each format is a module that is a ``Format`` (below): ``NAME``, ``EXTENSIONS``, ``WHAT``,
``WRITABLE``, ``FOLDER``, ``detect(path) -> bool`` and ``load(path) -> SoftPrompt``; a
writable one (a ``WritableFormat``) also has ``save(soft_prompt, path, **options)``.
``load_any`` picks the format from the file's content, not only its extension. To add a
format: a module here with those names, added to ``FORMATS``.

Importing the registry imports no torch: the format modules import it when they read or write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from ..errors import FormatError
from . import kobold, mkultra, mtjsp, native, peft

if TYPE_CHECKING:
    from ..soft_prompt import SoftPrompt


@runtime_checkable
class Format(Protocol):
    """A soft prompt file format (each module of this package is one)."""

    NAME: str  # what `convert --to` and SoftPrompt.meta["format"] call it
    EXTENSIONS: tuple[str, ...]  # file name endings it is written with (none: a folder)
    WHAT: str  # what it is, for messages: "KoboldAI soft prompt zip (...)"
    WRITABLE: bool  # whether it has ``save``
    FOLDER: bool  # whether it is a folder rather than a file

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is in this format (checked from its content, never raising)."""
        ...

    def load(self, path: Path) -> SoftPrompt:
        """The soft prompt at ``path``; FormatError when it cannot be read safely."""
        ...


@runtime_checkable
class WritableFormat(Format, Protocol):
    """A format softprompt also writes; ``save`` takes the format's own options (kobold:
    ``dtype``, peft: ``base_model``) as keywords."""

    save: Callable[..., None]


# Detection order matters: an mtj-softtuner NPZ also holds tensor.npy, so mtjsp goes first.
# (Typed, so that mypy checks each module against Format.)
_MODULES: tuple[Format, ...] = (mtjsp, kobold, native, peft, mkultra)
_WRITERS: tuple[WritableFormat, ...] = (kobold, native, peft)
FORMATS: dict[str, Format] = {m.NAME: m for m in _MODULES}


def writable() -> tuple[str, ...]:
    """The names of the formats softprompt writes, sorted (what `convert --to` offers)."""
    return tuple(sorted(name for name, m in FORMATS.items() if m.WRITABLE))


def extensions() -> tuple[str, ...]:
    """Every file name ending a format is read from, sorted."""
    return tuple(sorted({e for m in FORMATS.values() for e in m.EXTENSIONS}))


def listed(path: Path) -> bool:
    """Whether an entry of a folder of soft prompts is offered as one: a file with a known
    extension, or a folder that a folder format recognises (checked from the name alone for
    files: its content is checked when it is loaded)."""
    if path.is_file():
        return path.suffix.lower() in extensions()
    return path.is_dir() and any(m.FOLDER and m.detect(path) for m in FORMATS.values())


def writer(name: str) -> WritableFormat:
    """The writable format ``name``; FormatError naming the writable ones otherwise."""
    module = FORMATS.get(name)
    if module is None or not module.WRITABLE:
        raise FormatError(f"cannot write format {name!r}: use one of {', '.join(writable())}")
    return cast(WritableFormat, module)


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
            raise FormatError(f"{p} is not a readable {module.WHAT}: is it truncated or damaged?")
    known = ", ".join(extensions())
    raise FormatError(
        f"{p} is not a soft prompt file softprompt can read (expected one of: {known}, or a PEFT adapter folder)"
    )


def load_any(path: str | os.PathLike) -> SoftPrompt:
    p = Path(path)
    return FORMATS[detect(p)].load(p)


def format_for_path(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if not suffix or Path(path).is_dir():
        return next(name for name, m in FORMATS.items() if m.FOLDER and m.WRITABLE)
    for name, module in FORMATS.items():
        if suffix in module.EXTENSIONS and module.WRITABLE:
            return name
    raise FormatError(
        f"cannot tell the format to write from the name {Path(path).name}: use .zip, .safetensors or a folder name (PEFT)"
    )


def save(
    soft_prompt: SoftPrompt, path: str | os.PathLike, format: str | None = None, **options
) -> Path:
    writer(format or format_for_path(path)).save(soft_prompt, Path(path), **options)
    return Path(path)
