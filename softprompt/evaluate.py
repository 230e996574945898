"""Held-out loss and perplexity of a dataset with a soft prompt, without any prompt, and with
the soft prompt's init text as an ordinary (hard) prompt.

Every sequence is laid out as training lays it out, ``[prefix][BOS][block]``, the BOS token
only where the model's tokenizer puts one first (``LoadedModel.bos_ids``): the soft prompt
row is ``[soft][BOS][block]``, "no prompt" is ``[BOS][block]`` and the hard-prompt row
``[BOS][init text][block]``. Every variant scores the same tokens, each predicted from
everything before it: all T tokens of each block when the model has a BOS token (then the
soft prompt row equals the training run's validation loss), else tokens 1..T-1 (the first
token of a block has no prediction without a prefix, so it is left out everywhere).

Examples (pairs and chats in .jsonl files) are scored as training validates them: each is a
row of its own, ``[prefix][BOS][example]``, and only its completion (its assistant turns)
is scored.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .data import Rows, Split, read_dataset, split_blocks, split_rows, tokenize_dataset
from .distil import (
    Teacher,
    distil_loss,
    kl_fraction,
    read_written_prompt,
    sampling_options,
    teacher_blocks,
    written_prompt_ids,
)
from .errors import ConfigError, DataError
from .loss import loss_sums
from .loss import perplexity as _perplexity
from .model import LoadedModel
from .soft_prompt import SoftPrompt

DEFAULT_SEED = 1729  # the training default: the same file order, hence the same blocks
DEFAULT_MAX_BLOCKS = 64


@dataclass
class Variant:
    """One way of prefixing the blocks, and its score."""

    key: str  # soft_prompt, none, init_text; distilled: written, written_cut
    label: str
    prefix_tokens: int
    loss: float
    kl: float | None = None  # nats per token to the model with the written prompt in front
    perplexity: float = field(init=False)

    def __post_init__(self) -> None:
        self.perplexity = _perplexity(self.loss)  # type: ignore[assignment]


@dataclass
class EvalResult:
    variants: list[Variant]
    tokens_scored: int  # per variant
    n_blocks: int
    block_size: int
    dataset: str = ""
    bos: bool = False  # the model's tokenizer puts a BOS token first: every token is scored
    examples: int = 0  # of the blocks, examples: only their completions are scored

    def __getitem__(self, key: str) -> Variant:
        for v in self.variants:
            if v.key == key:
                return v
        raise KeyError(key)

    def to_dict(self) -> dict:
        base = self["none"].loss if any(v.key == "none" for v in self.variants) else None
        variants: dict[str, dict] = {}
        out = {
            "dataset": self.dataset,
            "blocks": self.n_blocks,
            "block_size": self.block_size,
            "tokens_scored": self.tokens_scored,
            "bos": self.bos,
            "examples": self.examples,
            "variants": variants,
        }
        for v in self.variants:
            d = asdict(v)
            d.pop("key")
            d["delta_vs_none"] = None if base is None else v.loss - base
            variants[v.key] = d
        return out

    @property
    def gap_closed(self) -> float | None:
        """Distilled: the fraction of the KL gap between no prompt and the written prompt
        that the soft prompt closes."""
        kl = {v.key: v.kl for v in self.variants if v.kl is not None}
        if not {"soft_prompt", "none", "written"} <= set(kl):
            return None
        return kl_fraction(kl["none"], kl["soft_prompt"], kl["written"])

    def table(self) -> str:
        """A plain-text table, one row per variant."""
        base = self["none"].loss if any(v.key == "none" for v in self.variants) else None
        width = max(len(v.label) for v in self.variants)
        has_kl = any(v.kl is not None for v in self.variants)
        kl_head = f"  {'KL to the written prompt':>24}" if has_kl else ""
        lines = [f"{'':{width}}  {'loss':>7}  {'perplexity':>10}  {'vs none':>8}{kl_head}"]
        for v in self.variants:
            delta = "" if base is None or v.key == "none" else f"{v.loss - base:+.4f}"
            kl = f"  {v.kl:24.4f}" if v.kl is not None else ""
            lines.append(f"{v.label:{width}}  {v.loss:7.4f}  {v.perplexity:10.2f}  {delta:>8}{kl}")
        if (gap := self.gap_closed) is not None:
            lines.append(
                f"the soft prompt closes {gap:.0%} of the KL gap between no prompt and the "
                "written prompt"
            )
        first, bos = (1, ", after the BOS token") if self.bos else (2, "")
        if self.examples:
            n, texts = self.examples, self.n_blocks - self.examples
            lines.append(
                f"{self.tokens_scored:,} tokens scored per row: the completions of {n} "
                f"example{'s' if n != 1 else ''}"
                + (f" and every token of {texts} text blocks" if texts else "")
                + f" (rows of at most {self.block_size} tokens{bos})"
            )
            return "\n".join(lines)
        lines.append(
            f"{self.tokens_scored:,} tokens scored per row: tokens {first}..{self.block_size} of "
            f"{self.n_blocks} block{'s' if self.n_blocks != 1 else ''} of {self.block_size}{bos}"
        )
        return "\n".join(lines)


def init_text_ids(lm: LoadedModel, soft_prompt: SoftPrompt) -> list[int] | None:
    """The tokens the soft prompt was initialised from, when it was made from text: the init
    text's tokens, at most as many as the soft prompt has."""
    text = soft_prompt.meta.get("init_text")
    if soft_prompt.meta.get("init") != "text" or not isinstance(text, str) or not text:
        return None
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: soft_prompt.n_tokens]
    return ids or None


def compare_blocks(
    lm: LoadedModel,
    soft_prompt: SoftPrompt | None,
    blocks: np.ndarray | Rows,
    batch_size: int = 4,
) -> tuple[list[Variant], int]:
    """Score ``blocks`` (N, T), or ``Rows`` (blocks and examples: their completions), with
    each variant; returns the variants and tokens scored."""
    if not isinstance(blocks, Rows):
        if blocks.ndim != 2:
            raise DataError("evaluation needs at least one block of at least 2 tokens")
        blocks = Rows(blocks)
    if blocks.width < 2 or not len(blocks):
        raise DataError("evaluation needs at least one block of at least 2 tokens")
    none = torch.zeros(0, lm.embed_dim)
    bos = lm.bos_ids
    # (key, label, soft prompt vectors, token ids between them and the block)
    rows: list[tuple[str, str, torch.Tensor, list[int]]] = []
    if soft_prompt is not None:
        soft_prompt.check_fits(lm.model)
        label = f"soft prompt ({soft_prompt.n_tokens} tokens)"
        rows.append(("soft_prompt", label, soft_prompt.tensor, bos))
    rows.append(("none", "no prompt", none, bos))
    ids = init_text_ids(lm, soft_prompt) if soft_prompt is not None else None
    if ids:
        rows.append(("init_text", f"init text as a prompt ({len(ids)} tokens)", none, bos + ids))
    return _score_rows(lm, rows, blocks, batch_size)


def _check_fits(lm: LoadedModel, label: str, n_prefix: int, block_size: int) -> None:
    if n_prefix + block_size > lm.context_length:
        raise ConfigError(
            f"--block-size {block_size} plus the {label} exceeds the model's context of "
            f"{lm.context_length}: use --block-size {lm.context_length - n_prefix} or less"
        )


def _score_rows(lm: LoadedModel, rows, blocks: Rows, batch_size: int):
    first = 0 if lm.bos_ids else 1
    variants, count = [], 0
    for key, label, prefix, lead in rows:
        _check_fits(lm, label, prefix.shape[0] + len(lead), blocks.width)
        lead_ids = torch.tensor(lead, dtype=torch.long) if lead else None
        total, count = loss_sums(
            lm.model,
            prefix.to(lm.device),
            blocks,
            batch_size,
            lm.device,
            lead=lead_ids,
            first=first,
        )
        prefix_tokens = prefix.shape[0] + len(lead) - len(lm.bos_ids)
        variants.append(Variant(key, label, prefix_tokens, total / count))
    return variants, count


def written_prompt_of(soft_prompt: SoftPrompt | None, given: str | None = None) -> str | None:
    """The written prompt a soft prompt was distilled from: ``given`` (text or a file),
    else what its metadata records; None for a soft prompt trained on data alone."""
    if given:
        return read_written_prompt(given)
    distil = soft_prompt.meta.get("distil") if soft_prompt is not None else None
    text = distil.get("teacher_prompt") if isinstance(distil, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def distil_blocks(
    lm: LoadedModel,
    soft_prompt: SoftPrompt | None,
    written: str,
    blocks: np.ndarray,
    batch_size: int = 4,
) -> tuple[list[Variant], int]:
    """Score ``blocks`` (N, T) with the soft prompt, the written prompt, the written prompt
    cut to the soft prompt's length (the fair baseline: as much context) and no prompt:
    the cross-entropy and the KL to the model with the whole written prompt in front, the
    teacher, whose predictions are computed once per block (its cache) for every row."""
    if blocks.ndim != 2 or blocks.shape[1] < 2 or not len(blocks):
        raise DataError("evaluation needs at least one block of at least 2 tokens")
    prefix = written_prompt_ids(lm, written)
    bos, ids = lm.bos_ids, prefix[len(lm.bos_ids) :]
    teacher = Teacher(lm.model, prefix, lm.device)
    none = torch.zeros(0, lm.embed_dim)
    rows: list[tuple[str, str, torch.Tensor, list[int]]] = []
    n = 0
    if soft_prompt is not None:
        soft_prompt.check_fits(lm.model)
        n = soft_prompt.n_tokens
        rows.append(("soft_prompt", f"soft prompt ({n} tokens)", soft_prompt.tensor, bos))
    rows.append(("written", f"written prompt ({len(ids)} tokens)", none, prefix))
    if 0 < n < len(ids):
        rows.append(("written_cut", f"written prompt cut to {n} tokens", none, bos + ids[:n]))
    rows.append(("none", "no prompt", none, bos))
    first = 0 if bos else 1
    t = torch.from_numpy(np.ascontiguousarray(blocks))
    variants, count = [], 0
    for key, label, soft, lead in rows:
        _check_fits(lm, label, soft.shape[0] + len(lead), blocks.shape[1])
        lead_ids = torch.tensor(lead, dtype=torch.long, device=lm.device) if lead else None
        sums, count = np.zeros(2), 0
        for i in range(0, len(t), batch_size):
            batch = t[i : i + batch_size].to(lm.device)
            with torch.no_grad():
                states = teacher.states(batch, keep=True)
                r = distil_loss(lm.model, soft.to(lm.device), batch, states, 1.0, lead_ids)
            keep = len(r.kl) // len(batch)
            skip = first - (batch.shape[1] - keep)
            for j, part in enumerate((r.ce, r.kl)):
                sums[j] += part.view(len(batch), keep)[:, skip:].double().sum().item()
            count += len(batch) * (batch.shape[1] - first)
        loss, kl = sums / count
        variants.append(Variant(key, label, soft.shape[0] + len(lead) - len(bos), loss, kl))
    return variants, count


def check_options(
    block_size: int | None, max_blocks: int, val_fraction: float, batch_size: int
) -> None:
    """Raise one ConfigError naming every bad option."""
    problems = []
    if block_size is not None and block_size < 2:
        problems.append("--block-size must be at least 2")
    if max_blocks < 1:
        problems.append("--max-blocks must be at least 1")
    if not 0 <= val_fraction < 1:
        problems.append("--val-fraction must be in [0, 1), e.g. 0.05 (0: the whole dataset)")
    if batch_size < 1:
        problems.append("--batch-size must be at least 1")
    if problems:
        raise ConfigError("; ".join(problems))


def evaluate(
    lm: LoadedModel,
    soft_prompt: SoftPrompt | None,
    dataset: str | os.PathLike | None,
    *,
    block_size: int | None = None,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    val_fraction: float = 0.0,
    seed: int = DEFAULT_SEED,
    batch_size: int = 4,
    recursive: bool = False,
    cache_dir: str | os.PathLike | None = None,
    teacher_prompt: str | None = None,
) -> EvalResult:
    """Loss and perplexity of the text files in ``dataset`` with and without the soft prompt.

    The files are read, tokenized and cut into blocks as training does (the same ``seed``
    gives the same file order). With ``val_fraction`` > 0 only the blocks a training run with
    that fraction (and ``max_blocks`` as its --val-max-blocks) held out are scored; with 0, the
    last ``max_blocks`` blocks of the dataset.

    A soft prompt distilled from a written prompt (or any, given ``teacher_prompt``) is
    scored against it (``distil_blocks``: rows for the written prompt, cut and whole, and a
    KL column); with no ``dataset``, on the held-out part of the text its training sampled
    from the written prompt (sampled again, or read from the cache).
    """
    check_options(block_size, max_blocks, val_fraction, batch_size)
    written = written_prompt_of(soft_prompt, teacher_prompt)
    if dataset is None:
        return _evaluate_sampled(lm, soft_prompt, written, batch_size, cache_dir)
    rows, size = _dataset_rows(
        lm, soft_prompt, written, dataset, block_size, max_blocks, val_fraction, seed,
        recursive, cache_dir,
    )  # fmt: skip
    if written is not None:
        if rows.ids:
            raise ConfigError(
                f"dataset {dataset} holds examples: a distilled soft prompt is scored against "
                "its written prompt on text (.txt files) only"
            )
        variants, count = distil_blocks(lm, soft_prompt, written, rows.blocks, batch_size)
    else:
        variants, count = compare_blocks(lm, soft_prompt, rows, batch_size)
    return EvalResult(
        variants, count, len(rows), size, str(dataset), bool(lm.bos_ids), len(rows.ids)
    )


def _dataset_rows(
    lm, soft_prompt, written, dataset, block_size, max_blocks, val_fraction, seed, recursive,
    cache_dir,
) -> tuple[Rows, int]:  # fmt: skip
    """The rows of ``dataset`` to score, and the block size."""
    from .plan import default_block_size

    texts = read_dataset(dataset, recursive)
    n_prefix = soft_prompt.n_tokens if soft_prompt is not None else 0
    if soft_prompt is not None:
        n_prefix = max(n_prefix, len(init_text_ids(lm, soft_prompt) or []))
    if written is not None:
        n_prefix = max(n_prefix, len(written_prompt_ids(lm, written)) - len(lm.bos_ids))
    size = block_size or default_block_size(
        lm.context_length, n_prefix + len(lm.bos_ids), lm.device.type
    )
    corpus = tokenize_dataset(
        texts, lm.tokenizer, cache_dir, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids
    )
    split = split_rows(corpus, lm.eos_token_id, size, seed, val_fraction, max_blocks)
    return _scored_rows(split, str(dataset), size, val_fraction, max_blocks), size


def _scored_rows(
    split: Split, dataset: str, size: int, val_fraction: float, max_blocks: int
) -> Rows:
    """The rows ``evaluate`` scores: those held out at ``val_fraction``, or the last
    ``max_blocks`` of the dataset; DataError when there are none."""
    if split.n_examples and not len(split.train) + len(split.val):
        raise DataError(
            f"dataset {dataset}: none of its {split.n_examples} examples fits in --block-size "
            f"{size}: raise --block-size"
        )
    if not split.n_examples and not split.n_blocks:
        raise DataError(
            f"dataset {dataset} has {split.n_stream} tokens, fewer than one block of {size}: "
            f"add text or lower --block-size (e.g. --block-size {max(2, split.n_stream // 2)})"
        )
    if val_fraction == 0:
        return split.train[-max_blocks:]
    if not len(split.val) or not len(split.train):
        raise DataError(
            f"dataset {dataset} has {len(split.train) + len(split.val)} row(s) of at most "
            f"{size} tokens: nothing is held out at --val-fraction"
        )
    return split.val


def _evaluate_sampled(
    lm: LoadedModel,
    soft_prompt: SoftPrompt | None,
    written: str | None,
    batch_size: int,
    cache_dir: str | os.PathLike | None,
) -> EvalResult:
    """A soft prompt distilled on text sampled from its written prompt, scored on the part
    of that text its training held out (the same samples: from the cache, or made again)."""
    distil = soft_prompt.meta.get("distil") if soft_prompt is not None else None
    sampled = distil.get("samples") if isinstance(distil, dict) else None
    if written is None or not isinstance(sampled, dict):
        raise ConfigError(
            "eval needs --dataset: this soft prompt was not distilled on text sampled from "
            "a written prompt"
        )
    try:
        n, size = int(sampled["n"]), int(sampled["block_size"])
        opts = sampling_options(
            float(sampled["temperature"]), float(sampled["top_p"]), int(sampled["seed"])
        )
        fraction, most = float(sampled["val_fraction"]), int(sampled["val_max_blocks"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "eval needs --dataset: this soft prompt's record of its sampled text is incomplete"
        ) from None
    teacher = Teacher(lm.model, written_prompt_ids(lm, written), lm.device)
    blocks, _, _ = teacher_blocks(lm, teacher, n, size, opts, cache_dir)
    held_out = split_blocks(blocks, fraction, most)[1] if fraction > 0 else blocks[-most:]
    variants, count = distil_blocks(lm, soft_prompt, written, held_out, batch_size)
    what = f"{len(held_out)} held-out continuations of the written prompt, sampled from the model"
    return EvalResult(variants, count, len(held_out), size, what, bool(lm.bos_ids))
