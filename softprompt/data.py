"""From a folder of .txt files (and .jsonl examples) to rows of token ids.

files -> normalised text -> token ids (cached on disk) -> one stream in seeded file order,
each file followed by EOS -> blocks of ``block_size`` tokens (tail dropped) -> train / val
-> batches, as a pure function of the data position (``BatchSampler``).

Example files (``softprompt.examples``: prompt/completion pairs, chats) take another road:
each example is tokenized with a label mask (its completion, its assistant turns) and is a
row of its own, ``[soft prompt][BOS][example]``, padded per batch (``Rows``); validation
holds out whole examples. ``{"text"}`` examples join the text stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .examples import (
    CHAT,
    PAIR_SHAPES,
    TEXT,
    ChatTemplateError,
    ExampleFile,
    is_example_file,
    parse_examples,
    segments,
)
from .fileio import atomic_write, cache_root

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKENIZE_BATCH_CHARS = 4_000_000  # texts per tokenizer call, by size


@dataclass
class Corpus:
    """The tokenized text files of a dataset, in sorted path order, and its examples."""

    root: Path
    files: list[str]  # paths relative to root (or the file name for a single file)
    chars: int
    ids: list[np.ndarray]  # one uint32 array per text (file or {"text"} example), without EOS
    content_hash: str  # of the files' bytes and names: identifies the dataset
    skipped: list[str]
    cached: bool = False
    examples: list[ExampleFile] = field(default_factory=list)  # the example files
    example_ids: list[np.ndarray] = field(default_factory=list)  # pairs and chats, uint32
    example_labels: list[np.ndarray] = field(default_factory=list)  # bool: which are labels

    @property
    def n_tokens(self) -> int:
        text = sum(len(a) for a in self.ids) + len(self.ids)  # + one EOS per text
        return text + sum(len(a) for a in self.example_ids)


def find_text_files(path: str | os.PathLike, recursive: bool = False) -> tuple[Path, list[Path]]:
    """The .txt and example (.jsonl, .json) files named by ``path`` (a file or a folder),
    sorted; raise DataError if none."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"dataset path {root} does not exist: give a .txt or .jsonl file or a folder of them"
        )
    if root.is_file():
        if root.suffix.lower() in TABLES:
            raise DataError(
                f"dataset file {root} is a {root.suffix} table, which softprompt does not read: "
                "save its examples as .jsonl, one JSON object a line (e.g. with the datasets "
                "library's to_json)"
            )
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
            f"dataset folder {root} has no .txt files or .jsonl examples"
            f"{_no_text_hint(root, others, recursive)}"
        )
    if others:
        log.info(
            "note: skipped %s in %s that %s not .txt or .jsonl (%s): softprompt reads UTF-8 "
            ".txt files and .jsonl examples",
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
        if any(ext in TABLES for ext in others):
            return (
                f" (it has {kinds}): save examples as .jsonl, one JSON object a line (e.g. "
                "with the datasets library's to_json), and texts as UTF-8 .txt files"
            )
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
    return (name.lower().endswith(".txt") or is_example_file(name)) and not name.startswith(".")


TABLES = (".csv", ".tsv", ".parquet", ".arrow")  # example tables softprompt does not read


def _walk_error(err: OSError) -> None:
    raise DataError(f"dataset folder {err.filename} cannot be read: {err.strerror}")


def read_text(path: Path, what: str = "dataset file") -> str:
    """A file's text: UTF-8, BOM stripped, CRLF and CR turned into LF. DataError if not text;
    its message calls the file ``what``."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{what} {path} cannot be read: {e.strerror}") from None
    return decode_text(raw, path, what)


def decode_text(raw: bytes, path: Path | str, what: str = "dataset file") -> str:
    skip = ", or pass --skip-bad-files" if what == "dataset file" else ""
    if b"\x00" in raw:
        raise DataError(
            f"{what} {path} looks binary (it has NUL bytes): give a UTF-8 text file{skip}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} {path} is not valid UTF-8 (byte {e.start}): re-save it as UTF-8{skip}"
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
    """The readable, non-empty files of a dataset, before tokenizing."""

    root: Path
    files: list[str]  # every file read: .txt files and example files
    texts: list[str]  # the plain texts: one per .txt file, one per {"text"} example
    content_hash: str  # of the files' names and text: identifies the dataset
    skipped: list[str]
    examples: list[ExampleFile] = field(default_factory=list)  # the example files, checked

    @property
    def chars(self) -> int:
        pairs = sum(f.chars for f in self.examples if f.shape != TEXT)
        return sum(len(t) for t in self.texts) + pairs

    @property
    def has_examples(self) -> bool:
        """Whether any file holds pairs or chats (not only texts)."""
        return any(f.shape != TEXT for f in self.examples)


def read_dataset(
    path: str | os.PathLike, recursive: bool = False, skip_bad_files: bool = False
) -> TextDataset:
    """Find and read the dataset's text and example files (every example checked); DataError
    naming the file (and line) if one is bad, unless ``skip_bad_files`` leaves it out, or if
    nothing usable is there."""
    root, paths = find_text_files(path, recursive)
    dataset = TextDataset(root, [], [], "", [])
    h = hashlib.sha256()
    for p in paths:
        rel = p.relative_to(root).as_posix()
        try:
            text = read_text(p)
            empty = not text.strip()
            examples = None
            if is_example_file(p.name) and not empty:
                examples = parse_examples(text, str(p))
                examples.name = rel  # errors name the path, the summary the file
        except DataError as e:
            if not skip_bad_files:
                raise
            log.warning("warning: skipping %s", str(e).removeprefix("dataset file "))
            dataset.skipped.append(rel)
            continue
        if empty:
            log.info("note: skipping empty file %s", rel)
            dataset.skipped.append(rel)
            continue
        dataset.files.append(rel)
        if examples is None:
            dataset.texts.append(text)
        else:
            dataset.examples.append(examples)
            if examples.shape == TEXT:
                dataset.texts.extend(examples.items)
        data = text.encode("utf-8")
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    if not dataset.files:
        raise DataError(
            f"dataset {Path(path)} has no usable text: every file is empty or unreadable"
        )
    dataset.content_hash = h.hexdigest()
    return dataset


def tokenize_dataset(
    dataset: TextDataset,
    tokenizer,
    cache_dir: str | os.PathLike | None = None,
    *,
    eos_id: int | None = None,
    bos_ids: Sequence[int] = (),
) -> Corpus:
    """Token ids of every text and example, from the on-disk cache when it holds this exact
    content and tokenizer, else tokenized now and cached. ``eos_id`` (default: the
    tokenizer's) ends each pair's completion; ``bos_ids`` (``LoadedModel.bos_ids``) are taken
    off the front of an example that starts with them (a chat template that writes the BOS
    token): the layout puts them there already."""
    key = f"{CACHE_VERSION}\0{dataset.content_hash}\0{tokenizer_fingerprint(tokenizer)}"
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    if dataset.has_examples:  # what shapes the examples' tokens besides the vocabulary
        template = getattr(tokenizer, "chat_template", None)
        key += f"\0examples\0{template!r}\0{eos_id}\0{list(bos_ids)}"
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root()
    cache_file = folder / "tokens" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    files = [f for f in dataset.examples if f.shape != TEXT]
    n_examples = sum(len(f.items) for f in files)
    found = _read_cache(cache_file, len(dataset.texts), n_examples)
    cached = found is not None
    if found is None:
        ids = tokenize(tokenizer, dataset.texts)
        ex_ids, ex_labels = tokenize_examples(files, tokenizer, int(eos_id), bos_ids)
        _write_cache(cache_file, ids, ex_ids, ex_labels)
    else:
        ids, ex_ids, ex_labels = found
    return Corpus(
        dataset.root,
        dataset.files,
        dataset.chars,
        ids,
        dataset.content_hash,
        dataset.skipped,
        cached,
        dataset.examples,
        ex_ids,
        ex_labels,
    )


def tokenize_examples(
    files: list[ExampleFile], tokenizer, eos_id: int, bos_ids: Sequence[int] = ()
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids (uint32) and label masks (bool) of the pairs and chats of ``files``. Each
    piece of an example (``examples.segments``) is tokenized on its own, as a prompt is when
    it is generated from, and all pieces in one batch; a pair's completion is followed by
    EOS, a label too (so the model learns to stop). DataError naming the file for chats and
    a model without a chat template."""
    texts: list[str] = []
    marks: list[bool] = []
    bounds = [0]  # example k is pieces bounds[k]:bounds[k + 1]
    ends: list[bool] = []  # whether EOS follows the example
    for f in files:
        if f.shape == CHAT and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f'dataset file {f.name} holds chats ({{"messages"}}) but the model\'s '
                f"tokenizer ({getattr(tokenizer, 'name_or_path', '') or 'this model'}) has no "
                "chat template to render them: give prompt/completion pairs, or use a chat model"
            )
        for item, line in zip(f.items, f.lines, strict=True):
            try:
                pieces = segments(item, f.shape, tokenizer)
            except ChatTemplateError as e:
                raise DataError(f"dataset file {f.name} {f.unit} {line}: {e}") from None
            texts += [t for t, _ in pieces]
            marks += [m for _, m in pieces]
            bounds.append(len(texts))
            ends.append(f.shape in PAIR_SHAPES)
    pieces_ids = tokenize(tokenizer, texts)
    out_ids, out_labels = [], []
    eos, lead = np.array([eos_id], np.uint32), np.asarray(bos_ids, np.uint32)
    for k, end in enumerate(ends):
        parts, flags = pieces_ids[bounds[k] : bounds[k + 1]], marks[bounds[k] : bounds[k + 1]]
        if end:
            parts, flags = [*parts, eos], [*flags, True]
        ids = np.concatenate(parts)
        mask = np.repeat(np.array(flags, bool), [len(a) for a in parts])
        if len(lead) and np.array_equal(ids[: len(lead)], lead):
            ids, mask = ids[len(lead) :], mask[len(lead) :]
        out_ids.append(ids)
        out_labels.append(mask)
    return out_ids, out_labels


def load_corpus(
    path: str | os.PathLike,
    tokenizer,
    recursive: bool = False,
    skip_bad_files: bool = False,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> Corpus:
    """read_dataset then tokenize_dataset (``options``: its eos_id, bos_ids)."""
    dataset = read_dataset(path, recursive, skip_bad_files)
    return tokenize_dataset(dataset, tokenizer, cache_dir, **options)


Cached = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def _read_cache(path: Path, n_texts: int, n_examples: int) -> Cached | None:
    """The texts' ids, the examples' ids and label masks, when the cache file holds them."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = _split(z["ids"], z["lengths"], n_texts)
            if not n_examples:
                return ids, [], []
            ex_ids = _split(z["ex_ids"], z["ex_lengths"], n_examples)
            labels = _split(z["ex_labels"].astype(bool), z["ex_lengths"], n_examples)
        return ids, ex_ids, labels
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or damaged: tokenize again


def _split(flat: np.ndarray, lengths: np.ndarray, n: int) -> list[np.ndarray]:
    if len(lengths) != n or int(lengths.sum()) != len(flat):
        raise ValueError("the cache does not match the dataset")
    if not n:
        return []
    if flat.dtype != bool:
        flat = flat.astype(np.uint32, copy=False)
    return np.split(flat, np.cumsum(lengths)[:-1])


def _write_cache(
    path: Path,
    ids: list[np.ndarray],
    ex_ids: list[np.ndarray] | None = None,
    ex_labels: list[np.ndarray] | None = None,
) -> None:
    arrays = _flat("", ids)
    if ex_ids:
        arrays |= _flat("ex_", ex_ids)
        arrays["ex_labels"] = np.concatenate(ex_labels or [])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
    except OSError as e:  # a cache that cannot be written only costs time
        log.warning("note: could not write the token cache %s (%s)", path, e.strerror)


def _flat(prefix: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return {f"{prefix}ids": flat, f"{prefix}lengths": lengths}


def token_stream(corpus: Corpus, eos_id: int, seed: int) -> np.ndarray:
    """All files in a seeded random order, each followed by EOS: one int64 array."""
    if not corpus.ids:
        return np.zeros(0, np.int64)
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


PAD_MULTIPLE = 16  # a batch of examples is padded to a multiple of this: fewer shapes


@dataclass
class Rows:
    """The sequences a run trains or validates on, each laid out as ``[soft][BOS][row]``:
    text blocks of T tokens (every token a label) and examples (at most T tokens, with a
    label mask). A batch of examples is padded after its rows' ends to its longest row
    (rounded up to PAD_MULTIPLE): right padding under causal attention changes nothing before
    it, and padding carries no label. Row i < len(blocks) is block i, the rest examples."""

    blocks: np.ndarray  # (n_blocks, T) int64
    ids: list[np.ndarray] = field(default_factory=list)  # each example's token ids
    labels: list[np.ndarray] = field(default_factory=list)  # bool, as long as its ids
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.blocks) + len(self.ids)

    @property
    def width(self) -> int:
        """Tokens in the widest batch: T with text blocks, else the longest example's
        padded length."""
        if len(self.blocks) or not self.ids:
            return self.blocks.shape[1]
        longest = max(len(a) for a in self.ids)
        return min(self.blocks.shape[1], -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)

    @property
    def mean_tokens(self) -> float:
        """Tokens in a row on average, padding not counted (T for text blocks)."""
        if not len(self):
            return 0.0
        total = self.blocks.size + sum(len(a) for a in self.ids)
        return total / len(self)

    @property
    def label_count(self) -> int:
        return self.blocks.size + sum(int(m.sum()) for m in self.labels)

    def __getitem__(self, key: slice) -> Rows:
        if not self.ids:
            return Rows(self.blocks[key], pad_id=self.pad_id)
        return self.select(range(len(self))[key])

    def select(self, rows: Sequence[int]) -> Rows:
        """These rows (blocks first, then examples, each in the order given)."""
        nb = len(self.blocks)
        blocks = self.blocks[[i for i in rows if i < nb]]
        ex = [i - nb for i in rows if i >= nb]
        return Rows(blocks, [self.ids[i] for i in ex], [self.labels[i] for i in ex], self.pad_id)

    def take(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """These rows as a batch: token ids (B, L) int64, and which are labels (B, L) bool,
        None when every token is one (text blocks only, L = T)."""
        if not self.ids:
            return self.blocks[rows], None
        nb, T = len(self.blocks), self.blocks.shape[1]
        longest = max(T if i < nb else len(self.ids[i - nb]) for i in rows)
        width = min(T, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), bool)
        for r, i in enumerate(rows):
            if i < nb:
                ids[r], mask[r] = self.blocks[i], True
            else:
                n = len(self.ids[i - nb])
                ids[r, :n], mask[r, :n] = self.ids[i - nb], self.labels[i - nb]
        return ids, mask

    def passage(self, n: int, seed: int) -> np.ndarray:
        """``n`` token ids to start a soft prompt from (``--init passage``): the first tokens
        of a text block picked by ``seed``, or with examples only, of the labelled tokens of
        one (what the soft prompt leads into), picked among those with ``n`` of them (else
        the longest), repeated when shorter than ``n``."""
        rng = np.random.default_rng(seed)
        if len(self.blocks):
            tokens = self.blocks[rng.integers(len(self.blocks))]
        else:
            starts = [
                ids[int(mask.argmax()) if mask.any() else 0 :]
                for ids, mask in zip(self.ids, self.labels, strict=True)
            ]
            if not starts:
                raise ValueError("no rows to take a passage from")
            long_enough = [i for i, a in enumerate(starts) if len(a) >= n]
            pick = (
                long_enough[rng.integers(len(long_enough))]
                if long_enough
                else max(range(len(starts)), key=lambda i: len(starts[i]))
            )
            tokens = starts[pick]
        return np.resize(tokens, n).astype(np.int64)  # np.resize repeats a short one

    def probe(self) -> np.ndarray:
        """An (N, width) array as wide as the widest batch, for trying a batch size's
        memory: the blocks themselves when there are only blocks."""
        if not self.ids:
            return self.blocks
        return np.broadcast_to(np.int64(self.pad_id), (len(self), self.width))


@dataclass
class Split:
    """A dataset's training and validation rows, and the counts its summary states."""

    train: Rows
    val: Rows
    n_stream: int  # text tokens in the stream
    n_blocks: int  # text blocks
    n_examples: int  # pairs and chats
    too_long: int  # of them, longer than a block: left out


def split_rows(
    corpus: Corpus,
    eos_id: int,
    block_size: int,
    seed: int,
    val_fraction: float,
    val_max: int,
    loss_on: str = "completion",
) -> Split:
    """Text blocks (``token_stream`` cut by ``make_blocks``, the last held out as by
    ``split_blocks``) and examples, held out by example: the last of a seeded order, as
    many as blocks would be (at most ``val_max``), before examples longer than
    ``block_size`` are left out of either side, so the held-out set does not depend on the
    block size. ``loss_on="all"`` makes every token of a training example a label;
    validation always scores the completions."""
    stream = token_stream(corpus, eos_id, seed)
    blocks = make_blocks(stream, block_size)
    train_blocks, val_blocks = split_blocks(blocks, val_fraction, val_max)
    n = len(corpus.example_ids)
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = min(val_max, max(1, round(n * val_fraction))) if val_fraction > 0 and n else 0
    fits = [int(i) for i in order if len(corpus.example_ids[i]) <= block_size]
    held = set(order[n - n_val :].tolist())

    def rows(blocks: np.ndarray, chosen: list[int], all_labels: bool) -> Rows:
        ids = [corpus.example_ids[i] for i in chosen]
        labels = [corpus.example_labels[i] for i in chosen]
        if all_labels:
            labels = [np.ones(len(a), bool) for a in ids]
        return Rows(blocks, ids, labels, eos_id)

    return Split(
        train=rows(train_blocks, [i for i in fits if i not in held], loss_on == "all"),
        val=rows(val_blocks, [i for i in fits if i in held], False),
        n_stream=len(stream),
        n_blocks=len(blocks),
        n_examples=n,
        too_long=n - len(fits),
    )


class BatchSampler:
    """Batches as a pure function of the data position (samples consumed so far): sample s is
    row ``perm_e[s % N]`` of epoch ``e = s // N``, each epoch's permutation seeded. So a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, rows: np.ndarray | Rows, batch_size: int, seed: int, device: torch.device):
        self.rows = rows if isinstance(rows, Rows) else Rows(np.ascontiguousarray(rows))
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.rows), generator=gen)}
        return self._perms[epoch]

    def batch_with_mask(self, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token ids (B, L) of the batch at data position ``start``, and its label mask
        (B, L) bool (None when every token is a label: text blocks only)."""
        n = len(self.rows)
        idx = [int(self._perm(s // n)[s % n]) for s in range(start, start + self.batch_size)]
        ids, mask = self.rows.take(idx)
        batch = torch.from_numpy(ids).to(self.device, non_blocking=True)
        if mask is None:
            return batch, None
        return batch, torch.from_numpy(mask).to(self.device, non_blocking=True)

    def batch(self, start: int) -> torch.Tensor:
        """The token ids (B, L) of the batch at data position ``start``."""
        return self.batch_with_mask(start)[0]
