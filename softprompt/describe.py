"""What a soft prompt file holds: its format, metadata, shape and norms and, given a model,
whether it fits and which vocabulary tokens each soft token is closest to (cosine), which
hints at what the prompt "means". Used by `softprompt inspect`; returns data, never prints."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, cast

import torch

from .formats import FORMATS, load_any
from .formats.common import KOBOLD_MAX_TOKENS, printable, stored_meta
from .soft_prompt import SoftPrompt


def describe(path: str | os.PathLike, lm=None, top_k: int = 5) -> dict[str, Any]:
    """A JSON-friendly description of the soft prompt at ``path``. ``lm`` is a LoadedModel
    (softprompt.model.load_model) or None."""
    sp = load_any(path)
    return describe_prompt(sp, lm, top_k, file=str(Path(path)))


def describe_prompt(
    sp: SoftPrompt, lm=None, top_k: int = 5, file: str | None = None
) -> dict[str, Any]:
    norms = sp.tensor.norm(dim=1)  # (n,)
    fmt = sp.meta.get("format")
    info: dict[str, Any] = {
        "file": file,
        "format": fmt,
        "format_description": FORMATS[fmt].WHAT if fmt in FORMATS else None,
        "name": sp.name,
        "meta": stored_meta(sp.meta),
        "n_tokens": sp.n_tokens,
        "dim": sp.dim,
        "dtype": sp.meta.get("file_dtype", "float32"),
        "norms": [round(float(x), 4) for x in norms],
        "norm_mean": round(float(norms.mean()), 4),
        "warnings": [],
    }
    if sp.n_tokens > KOBOLD_MAX_TOKENS:
        info["warnings"].append(
            f"{sp.n_tokens} soft tokens: KoboldAI accepts at most {KOBOLD_MAX_TOKENS}"
        )
    if lm is None:
        return info
    emb = lm.model.get_input_embeddings()
    fits = sp.dim == emb.embedding_dim
    info["model"] = {
        "name": lm.name,
        "source": str(lm.source),
        "embed_dim": emb.embedding_dim,
        "fits": fits,
    }
    if not fits:
        info["warnings"].append(
            f"width {sp.dim} does not match the model's input embeddings ({emb.embedding_dim} wide): "
            "it was made for another model"
        )
        return info
    n_vocab = min(emb.num_embeddings, len(lm.tokenizer))
    table = _output_space_table(emb, n_vocab)  # (V, d)
    info["model"]["vocab_norm_mean"] = round(float(table.norm(dim=1).mean()), 4)
    info["nearest"] = nearest_tokens(sp.tensor, table, lm.tokenizer, top_k)
    return info


@torch.no_grad()
def _output_space_table(emb: torch.nn.Module, n_vocab: int, chunk: int = 8192) -> torch.Tensor:
    """Every vocabulary vector as the embedding module outputs it (so a scale applied inside
    the module, e.g. Gemma's sqrt(d), is included), float32 on the CPU: (V, d)."""
    device = cast(torch.Tensor, emb.weight).device
    parts = [
        emb(torch.arange(i, min(i + chunk, n_vocab), device=device)).float().cpu()
        for i in range(0, n_vocab, chunk)
    ]
    return torch.cat(parts)


@torch.no_grad()
def nearest_tokens(
    soft: torch.Tensor, table: torch.Tensor, tokenizer, top_k: int = 5
) -> list[list[dict]]:
    """For each soft vector (n, d), the ``top_k`` vocabulary rows of ``table`` (V, d) with
    the highest cosine similarity: [[{"id", "token", "cosine"}, ...], ...]."""
    a = torch.nn.functional.normalize(soft.float(), dim=1)
    b = torch.nn.functional.normalize(table.float(), dim=1)
    sims = a @ b.T  # (n, V)
    k = min(top_k, sims.shape[1])
    values, ids = sims.topk(k, dim=1)
    out = []
    for row_v, row_i in zip(values.tolist(), ids.tolist(), strict=True):
        out.append(
            [
                {
                    "id": i,
                    "token": tokenizer.decode([i]),
                    "cosine": round(v, 4) if math.isfinite(v) else None,
                }
                for v, i in zip(row_v, row_i, strict=True)
            ]
        )
    return out


def format_text(info: dict[str, Any]) -> str:
    """The description as lines for a terminal. Text from the file (its name and metadata,
    which someone else wrote) is shown with control characters escaped, so it cannot move the
    cursor, retitle or clear the window, or overwrite a line."""
    lines = []
    if info.get("file"):
        lines.append(f"file:    {printable(info['file'], None)}")
    fmt = info["format"] or "?"
    if info.get("format_description"):
        fmt += f": {info['format_description']}"
    lines.append(f"format:  {printable(fmt, None)}")
    lines.append(f"name:    {printable(info['name'], None)}")
    meta = {k: v for k, v in info["meta"].items() if k != "name" and v not in ("", None, [])}
    for k, v in meta.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        lines.append(f"  {printable(k, None)}: {printable(v, None)}")
    lines.append(
        f"shape:   {info['n_tokens']} tokens x {info['dim']} ({info['dtype']} in the file)"
    )
    norms = info["norms"]
    lines.append(
        f"norms:   min {min(norms):.3f}  mean {info['norm_mean']:.3f}  max {max(norms):.3f}"
    )
    model = info.get("model")
    if model:
        fits = "yes" if model["fits"] else "NO"
        lines.append(
            f"model:   {printable(model['name'], None)} (input embeddings {model['embed_dim']} wide): fits {fits}"
        )
        if "vocab_norm_mean" in model:
            lines.append(f"         mean vocabulary embedding norm {model['vocab_norm_mean']:.3f}")
    for w in info["warnings"]:
        lines.append(f"warning: {w}")
    nearest = info.get("nearest")
    lines.append("")
    if nearest:
        lines.append("token   norm  nearest vocabulary tokens (cosine)")
        for i, (norm, row) in enumerate(zip(norms, nearest, strict=True)):
            words = "  ".join(f"{t['token']!r} {t['cosine']:.2f}" for t in row)
            lines.append(f"{i:5d} {norm:6.3f}  {words}")
    else:
        lines.append("norm of each soft token:")
        for start in range(0, len(norms), 10):
            row = " ".join(f"{x:7.3f}" for x in norms[start : start + 10])
            lines.append(f"{start:5d}: {row}")
    return "\n".join(lines)
