"""Small file helpers: atomic writes, the cache folder, safe file names."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

WINDOWS_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside ``path``, flush and fsync it, then rename it over
    ``path``. If anything fails, ``path`` is untouched and the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def cache_root() -> Path:
    env = os.environ.get("SOFTPROMPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "softprompt"


# bytes of a name safe_filename gives: file systems take 255, and an extension and
# atomic_write's temporary ".NAME.xxxxxxxx.tmp" must fit beside it
MAX_NAME_BYTES = 200


def safe_filename(name: str, default: str = "softprompt") -> str:
    """A file name from a free-form name: no path separators, no characters or names Windows
    forbids, no leading dots, at most 100 characters and MAX_NAME_BYTES bytes of UTF-8."""
    s = re.sub(r'[<>:"/\\|?*\x00-\x1f\x7f]', "_", name)
    s = s.strip().strip(".").strip()
    s = re.sub(r"\s+", " ", s)[:100]
    while len(s.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        s = s[:-1]
    s = s.rstrip(" .")
    if not s or s.split(".")[0].upper() in WINDOWS_RESERVED:
        s = (s + "_") if s else default
    return s
