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


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs: another
    process asking for the same lock waits. POSIX ``flock``; where there is none, or the
    lock file cannot be made, the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")  # noqa: SIM115 - held for the block
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def format_bytes(n: float) -> str:
    """A size for people: 512 bytes, 46.1 KB, 1.3 GB."""
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def check_copy_target(folder: str | os.PathLike, name: str, force: bool, option: str) -> Path:
    """Where ``--copy-to FOLDER`` will put a file called ``name``: the folder must exist, and
    a file already there under that name is overwritten only with --force. ValueError (with
    the message to show) otherwise; nothing is written."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"{option} {folder} is not an existing folder: create it, or give KoboldAI's "
            "softprompts folder"
        )
    target = folder / name
    if target.exists() and not force:
        raise ValueError(
            f"{option} {folder}: it already holds a {name}; pass --force to replace it, or "
            "choose another --name"
        )
    return target


def copy_file(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy ``src`` to ``target`` under a temporary name, then rename it into place."""
    with open(src, "rb") as fh, atomic_write(target) as out:
        while chunk := fh.read(1 << 20):
            out.write(chunk)
    return Path(target)
