"""The dataset field's check: what ``softprompt train`` would make of a dataset path, said in
one line before any run exists, with softprompt.data's own functions (``find_text_files``,
``read_dataset``), so the page and train never disagree about a dataset.

A dataset up to ``READ_LIMIT`` bytes is read through as train reads it (a file that is not
UTF-8 text is found here); a larger one is only listed. The notes train would log (files
skipped, and why) become part of the line instead of going to the server's console.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError
from ..fileio import format_bytes

READ_LIMIT = 64 << 20  # bytes of text read through by a check; more is only listed


class _Notes(logging.Filter):
    """Takes softprompt.data's log records from the threads running a check (kept as notes
    for the answer, whatever the logging level), and lets every other record through as
    the level set before would have."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: dict[int, list[str]] = {}
        self.floor = logging.NOTSET

    def filter(self, record: logging.LogRecord) -> bool:
        notes = self.taken.get(threading.get_ident())
        if notes is None:
            return record.levelno >= self.floor
        notes.append(record.getMessage().removeprefix("note: ").removeprefix("warning: "))
        return False


_NOTES = _Notes()
_lock = threading.Lock()


def _take_notes() -> None:
    """Install the filter on softprompt.data's logger, once; its notes are INFO records."""
    logger = logging.getLogger("softprompt.data")
    with _lock:
        if _NOTES not in logger.filters:
            _NOTES.floor = logger.getEffectiveLevel()
            logger.setLevel(min(_NOTES.floor, logging.INFO))
            logger.addFilter(_NOTES)


def check_dataset(path: str, recursive: bool = False, skip_bad_files: bool = False) -> dict:
    """``{"ok", "message", "files", "bytes"}`` for a dataset path (absolute, or relative to
    the server's folder, as the run is started with): ok False with train's one-line error
    when train would stop on it."""
    from ..data import find_text_files, read_dataset

    _take_notes()
    notes: list[str] = []
    _NOTES.taken[threading.get_ident()] = notes
    try:
        root, files = find_text_files(path, recursive)
        size = sum(_size(f) for f in files)
        if size <= READ_LIMIT:
            found = read_dataset(path, recursive, skip_bad_files)
            files = [root / name for name in found.files]
            size = sum(_size(f) for f in files)
        else:
            notes.append(f"over {format_bytes(READ_LIMIT)}: listed, not read through")
    except (SoftPromptError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: ~nouser
        message = str(e) if isinstance(e, SoftPromptError) else f"dataset path {path!r}: {e}"
        return _answer(False, message, 0, 0, notes)
    finally:
        _NOTES.taken.pop(threading.get_ident(), None)
    what = f"{len(files)} file{'' if len(files) == 1 else 's'}, {format_bytes(size)} of text"
    return _answer(True, what, len(files), size, notes)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _answer(ok: bool, message: str, files: int, size: int, notes: list[str]) -> dict[str, Any]:
    line = "; ".join([message, *notes]) if ok else message
    return {"ok": ok, "message": " ".join(line.split()), "files": files, "bytes": size}
