"""From a folder of .txt files to blocks of token ids.

files -> normalised text -> token ids (cached on disk) -> one stream in seeded file order,
each file followed by EOS -> blocks of ``block_size`` tokens (tail dropped) -> train / val
-> batches, as a pure function of the data position (``BatchSampler``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .fileio import atomic_write, cache_root

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKENIZE_BATCH_CHARS = 4_000_000  # texts per tokenizer call, by size


@dataclass
class Corpus:
    """The tokenized text files of a dataset, in sorted path order."""

    root: Path
    files: list[str]  # paths relative to root (or the file name for a single file)
    chars: int
    ids: list[np.ndarray]  # one uint32 array per file, without EOS
    content_hash: str  # of the files' bytes and names: identifies the dataset
    skipped: list[str]
    cached: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(len(a) for a in self.ids) + len(self.ids)  # + one EOS per file


def find_text_files(path: str | os.PathLike, recursive: bool = False) -> tuple[Path, list[Path]]:
    """The .txt files named by ``path`` (a file or a folder), sorted; raise DataError if none."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist: give a .txt file or a folder of them")
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise DataError(f"dataset path {root} is neither a file nor a folder")
    files: list[Path] = []
    try:
        if recursive:
            # followlinks=False: a symlinked folder is not descended, so a symlink loop cannot hang.
            for dirpath, dirnames, filenames in os.walk(
                root, followlinks=False, onerror=_walk_error
            ):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
        else:
            files = [p for p in root.iterdir() if not p.name.startswith(".")]
        files = [p for p in files if p.is_file()]
    except PermissionError as e:
        raise DataError(
            f"dataset folder {e.filename or root} cannot be read (permission denied)"
        ) from None
    found = sorted(p for p in files if _is_txt(p.name))
    others = _by_extension(p for p in files if not _is_txt(p.name))
    if not found:
        raise DataError(
            f"dataset folder {root} has no .txt files{_no_text_hint(root, others, recursive)}"
        )
    if others:
        log.info(
            "note: skipped %s in %s that %s not .txt (%s): softprompt reads UTF-8 .txt files",
            _count(sum(others.values()), "file"),
            root,
            "is" if sum(others.values()) == 1 else "are",
            ", ".join(f"{n} {ext}" for ext, n in others.items()),
        )
    return root, found


def _by_extension(paths) -> dict[str, int]:
    """How many files of each extension, most common first ("no extension" for none)."""
    counts: dict[str, int] = {}
    for p in paths:
        ext = p.suffix.lower() or "no extension"
        counts[ext] = counts.get(ext, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _no_text_hint(root: Path, others: dict[str, int], recursive: bool) -> str:
    """What to do about a folder without .txt files: save its documents as text, or look in
    its sub-folders when they hold some."""
    if others:
        kinds = ", ".join(f"{n} {ext}" for ext, n in others.items())
        return f" (it has {kinds}): save them as UTF-8 .txt files"
    if not recursive and any(_has_txt(d) for d in root.iterdir() if d.is_dir()):
        return " (its sub-folders have some: add --recursive)"
    return ": put the text to train on in .txt files there"


def _has_txt(folder: Path) -> bool:
    try:
        return any(_is_txt(f) for _, _, files in os.walk(folder) for f in files)
    except OSError:
        return False


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _is_txt(name: str) -> bool:
    return name.lower().endswith(".txt") and not name.startswith(".")


def _walk_error(err: OSError) -> None:
    raise DataError(f"dataset folder {err.filename} cannot be read: {err.strerror}")


def read_text(path: Path) -> str:
    """A file's text: UTF-8, BOM stripped, CRLF and CR turned into LF. DataError if not text."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"dataset file {path} cannot be read: {e.strerror}") from None
    return decode_text(raw, path)


def decode_text(raw: bytes, path: Path | str) -> str:
    if b"\x00" in raw:
        raise DataError(
            f"dataset file {path} looks binary (it has NUL bytes): give UTF-8 text files, "
            "or pass --skip-bad-files"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"dataset file {path} is not valid UTF-8 (byte {e.start}): re-save it as UTF-8, "
            "or pass --skip-bad-files"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    cached = getattr(tokenizer, "_softprompt_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{token}\n".encode())
    fp = h.hexdigest()
    try:
        tokenizer._softprompt_fingerprint = fp
    except AttributeError:  # pragma: no cover
        pass
    return fp


def tokenize(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, no special tokens added, in batches (fast tokenizers run the
    batch on all cores)."""
    out: list[np.ndarray] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    batch: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        if backend is not None:
            encs = backend.encode_batch(batch, add_special_tokens=False)
            out.extend(np.asarray(e.ids, dtype=np.uint32) for e in encs)
        else:
            for t in batch:
                ids = tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
                out.append(np.asarray(ids, dtype=np.uint32))
        batch, size = [], 0

    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= TOKENIZE_BATCH_CHARS:
            flush()
    flush()
    return out


@dataclass
class TextDataset:
    """The readable, non-empty text files of a dataset, before tokenizing."""

    root: Path
    files: list[str]
    texts: list[str]
    content_hash: str  # of the files' names and text: identifies the dataset
    skipped: list[str]

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


def read_dataset(
    path: str | os.PathLike, recursive: bool = False, skip_bad_files: bool = False
) -> TextDataset:
    """Find and read the dataset's text files; DataError if nothing usable is there."""
    root, paths = find_text_files(path, recursive)
    names, texts, skipped = [], [], []
    h = hashlib.sha256()
    for p in paths:
        rel = p.relative_to(root).as_posix()
        try:
            text = read_text(p)
        except DataError as e:
            if not skip_bad_files:
                raise
            log.warning("warning: skipping %s", str(e).removeprefix("dataset file "))
            skipped.append(rel)
            continue
        if not text.strip():
            log.info("note: skipping empty file %s", rel)
            skipped.append(rel)
            continue
        names.append(rel)
        texts.append(text)
        data = text.encode("utf-8")
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    if not texts:
        raise DataError(
            f"dataset {Path(path)} has no usable text: every .txt file is empty or unreadable"
        )
    return TextDataset(root, names, texts, h.hexdigest(), skipped)


def tokenize_dataset(
    dataset: TextDataset, tokenizer, cache_dir: str | os.PathLike | None = None
) -> Corpus:
    """Token ids of every file, from the on-disk cache when it holds this exact content and
    tokenizer, else tokenized now and cached."""
    key = f"{CACHE_VERSION}\0{dataset.content_hash}\0{tokenizer_fingerprint(tokenizer)}"
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root()
    cache_file = folder / "tokens" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    ids = _read_cache(cache_file, len(dataset.texts))
    cached = ids is not None
    if ids is None:
        ids = tokenize(tokenizer, dataset.texts)
        _write_cache(cache_file, ids)
    return Corpus(
        dataset.root,
        dataset.files,
        dataset.chars,
        ids,
        dataset.content_hash,
        dataset.skipped,
        cached,
    )


def load_corpus(
    path: str | os.PathLike,
    tokenizer,
    recursive: bool = False,
    skip_bad_files: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """read_dataset then tokenize_dataset."""
    return tokenize_dataset(read_dataset(path, recursive, skip_bad_files), tokenizer, cache_dir)


def _read_cache(path: Path, n_files: int) -> list[np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            flat, lengths = z["ids"], z["lengths"]
        if len(lengths) != n_files or int(lengths.sum()) != len(flat):
            return None
        return np.split(flat.astype(np.uint32, copy=False), np.cumsum(lengths)[:-1])
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or damaged: tokenize again


def _write_cache(path: Path, ids: list[np.ndarray]) -> None:
    flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
    lengths = np.array([len(a) for a in ids], dtype=np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            np.savez(fh, ids=flat, lengths=lengths)
    except OSError as e:  # a cache that cannot be written only costs time
        log.warning("note: could not write the token cache %s (%s)", path, e.strerror)


def token_stream(corpus: Corpus, eos_id: int, seed: int) -> np.ndarray:
    """All files in a seeded random order, each followed by EOS: one int64 array."""
    order = np.random.default_rng(seed).permutation(len(corpus.ids))
    eos = np.array([eos_id], dtype=np.int64)
    parts = []
    for i in order:
        parts.append(corpus.ids[i].astype(np.int64))
        parts.append(eos)
    return np.concatenate(parts)


def make_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut the stream into rows of ``block_size`` tokens; the tail that does not fill a row is
    dropped. (n_blocks, block_size) int64."""
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


def split_blocks(
    blocks: np.ndarray, val_fraction: float, val_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """The last blocks of the stream are held out (contiguous text, so nothing of a held-out
    passage leaks into training through a neighbouring block except at one edge)."""
    if val_fraction <= 0:
        return blocks, blocks[:0]
    n_val = min(val_max, max(1, round(len(blocks) * val_fraction)))
    return blocks[:-n_val], blocks[-n_val:]


class BatchSampler:
    """Batches as a pure function of the data position (samples consumed so far): sample s is
    block ``perm_e[s % N]`` of epoch ``e = s // N``, each epoch's permutation seeded. So a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int, device: torch.device):
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks))
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=gen)}
        return self._perms[epoch]

    def batch(self, start: int) -> torch.Tensor:
        n = len(self.blocks)
        idx = [int(self._perm(s // n)[s % n]) for s in range(start, start + self.batch_size)]
        return self.blocks[idx].to(self.device, non_blocking=True)  # (B, T)
