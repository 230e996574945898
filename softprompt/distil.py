"""Distil a written prompt into the soft prompt (context distillation): the teacher is the
same frozen model with the written prompt in front, laid out ``[BOS][written prompt][block]``
(how a person runs it: KoboldAI's memory sits at the top of the context, after BOS); the
student is the model with the soft prompt in front, ``[soft][BOS][block]``. Both predict
every token of the block, and the loss is per token

    weight x KL(teacher || student) + (1 - weight) x cross-entropy(student, data)

``Teacher`` runs the written prompt once (its KV cache and its last position's state are
kept) and then only the block's tokens, on that cache copied per batch. Its result per block
is the model's last hidden state (T, d) when the logits are the LM head applied to it
(``loss.fused_head``), so the KL runs through the same chunked head as the cross-entropy and
the (tokens x vocabulary) logits never exist at once, for the teacher either; else its logits.
Those states can be stored per block (``Teacher.store``) and reused every epoch and every
validation, or computed on the fly (``plan.decide_teacher_store`` picks).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .engine import cache_kwarg, cache_of
from .errors import ConfigError
from .hf_types import Model
from .loss import _ChunkBuffers, _RowLosses, fused_head
from .model import LoadedModel
from .soft_prompt import PromptedModel, block_inputs, block_logits, lead_length, n_predicted
from .soft_prompt import prepend as _prepend

log = logging.getLogger(__name__)

FLAG = "--teacher-prompt"


# ----------------------------------------------------------------------------- the written prompt


def read_written_prompt(value: str | None) -> str:
    """``--teacher-prompt``: the text itself, or a path to a UTF-8 text file."""
    if not value or not value.strip():
        raise ConfigError(f"{FLAG} is empty: give the written prompt's text or a file holding it")
    if len(value) < 4096 and "\n" not in value:
        p = Path(value).expanduser()
        try:
            if p.is_file():
                text = p.read_text(encoding="utf-8-sig")
                if not text.strip():
                    raise ConfigError(f"{FLAG} file {p} is empty: put the written prompt in it")
                return text.replace("\r\n", "\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{FLAG} file {p} cannot be read as UTF-8 text: {e}") from None
    return value


def written_prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    """The teacher's prefix: the tokenizer's BOS (where it puts one first), then the written
    prompt's tokens. ConfigError when the tokenizer cannot read the prompt back as written
    (unknown characters) or when it leaves no room for a block in the model's context."""
    tok = lm.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    unk = getattr(tok, "unk_token_id", None)
    back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if (unk is not None and unk in ids) or back.strip() != text.strip():
        raise ConfigError(
            f"{FLAG}: the model's tokenizer does not read the written prompt back as written "
            "(it holds characters this tokenizer cannot encode): remove them, or use the "
            "model the prompt was written for"
        )
    prefix = lm.bos_ids + ids
    if len(prefix) + 2 > lm.context_length:
        raise ConfigError(
            f"{FLAG} is {len(ids)} tokens, which leaves no room for text in the model's "
            f"context of {lm.context_length}: shorten it to under {lm.context_length // 2} tokens"
        )
    return prefix


def fit_block_size(block_size: int, given: bool, n_prefix: int, context: int) -> int:
    """The block size with the teacher's prefix in front too: ``[BOS][written][block]`` must
    fit the context. A default block shrinks to fit; a given one that does not is an error."""
    room = context - n_prefix
    if block_size <= room:
        return block_size
    if not given:
        return max(2, room)
    raise ConfigError(
        f"--block-size {block_size} plus the {n_prefix} tokens of {FLAG} exceeds the model's "
        f"context of {context}: use --block-size {room} or less, or a shorter written prompt"
    )


def prefix_hash(prefix_ids: list[int]) -> str:
    """What identifies the teacher in a checkpoint: its prefix's token ids."""
    return hashlib.sha256(np.asarray(prefix_ids, dtype=np.int64).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- the teacher


def _cache_kwarg(module: Model) -> str:
    return cache_kwarg(module.__class__)


class Teacher:
    """The frozen model with the written prompt ``prefix_ids`` in front. ``states(batch)``
    gives, for each block (B, T), what predicts each of its T tokens: the last hidden state
    (B, T, d) when ``head`` (the fused LM head) is set, else the logits (B, T, V). The prompt
    runs once (``prefix_runs`` counts it); each batch runs only its tokens on a copy of the
    prompt's KV cache. ``store`` keeps blocks' states (on the CPU), looked up by content."""

    def __init__(self, model: Model, prefix_ids: list[int], device: torch.device):
        self.model = model.model if isinstance(model, PromptedModel) else model
        self.prefix = torch.tensor(prefix_ids, dtype=torch.long)
        self.device = device
        self.head = fused_head(self.model)
        self.prefix_runs = 0  # times the written prompt went through the model (once)
        self.computed = 0  # blocks whose states were computed
        self._prefix_state: tuple[torch.Tensor, object] | None = None
        self._stored: dict[bytes, torch.Tensor] = {}

    @property
    def n_prefix(self) -> int:
        return len(self.prefix)

    @property
    def stored_blocks(self) -> int:
        return len(self._stored)

    def _run(self, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, object]:
        """(states, KV cache) of ``ids`` (B, t): last hidden states or logits."""
        if self.head is not None:
            out = self.model.base_model(input_ids=ids, use_cache=True, **kwargs)
            states = out[0]
        else:
            out = self.model(input_ids=ids, use_cache=True, **kwargs)
            states = out.logits
        return states, cache_of(out)

    def _prefix(self) -> tuple[torch.Tensor, object]:
        """The written prompt's last state (predicting a block's first token) and KV cache,
        computed on first use and kept."""
        if self._prefix_state is None:
            states, cache = self._run(self.prefix[None].to(self.device))
            self._prefix_state = (states[0, -1].detach(), cache)
            self.prefix_runs += 1
        return self._prefix_state

    @torch.no_grad()
    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """The states of ``batch`` (B, T), computed now: the prompt's last state, then the
        block's first T - 1 tokens run on a copy of the prompt's cache grown to B rows (the
        model appends to a cache it is given, so the kept one is never handed over)."""
        last, cache = self._prefix()
        batch = batch.to(self.device)
        B, T = batch.shape
        first = last.expand(B, 1, -1)
        self.computed += B
        if T == 1:
            return first.clone()
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(B)  # type: ignore[attr-defined]
        module = self.model.base_model if self.head is not None else self.model
        states, _ = self._run(batch[:, :-1], **{_cache_kwarg(module): past})
        return torch.cat([first.to(states.dtype), states], dim=1)

    def states(self, batch: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """The states of ``batch`` (B, T): stored ones when every block is stored, else
        computed (and stored too with ``keep``)."""
        keys = [row.numpy().tobytes() for row in batch.cpu()]
        if all(k in self._stored for k in keys):
            return torch.stack([self._stored[k] for k in keys]).to(self.device)
        states = self.compute(batch)
        if keep:
            for k, s in zip(keys, states.cpu(), strict=True):
                self._stored[k] = s
        return states

    def store(self, blocks: np.ndarray, batch_size: int) -> None:
        """Compute and keep the states of every block, in order, ``batch_size`` at a time
        (the same batches every run, so a resumed run gets the same numbers)."""
        t = torch.from_numpy(np.ascontiguousarray(blocks))
        for i in range(0, len(t), batch_size):
            self.states(t[i : i + batch_size], keep=True)

    def block_bytes(self, block_size: int) -> int:
        """Bytes one stored block takes."""
        width = self.head.weight.shape[1] if self.head is not None else self._vocab()
        return block_size * width * self._dtype().itemsize

    def _vocab(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ----------------------------------------------------------------------------- the loss


class DistilRows:
    """Per-token losses of a batch: ``loss`` (what is minimised, differentiable) and its two
    parts, ``kl`` to the teacher and ``ce`` on the data (float32, no gradient)."""

    def __init__(self, loss: torch.Tensor, kl: torch.Tensor, ce: torch.Tensor):
        self.loss, self.kl, self.ce = loss, kl, ce


def distil_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    head: torch.nn.Linear | None = None,
) -> DistilRows:
    """Per row: ``weight`` x KL(teacher || student) + (1 - ``weight``) x cross-entropy.
    ``student`` and ``teacher`` (N, d) are hidden rows put through ``head`` a chunk at a time,
    or (without ``head``) logits (N, V). Differentiable with respect to ``student`` only: the
    gradient of a row's loss with respect to its logits is softmax(student) - (weight x
    p_teacher + (1 - weight) x onehot(label)), worked out with the loss (``_RowLosses``)."""
    parts: dict[str, torch.Tensor] = {}

    def compute(grad: torch.Tensor | None) -> torch.Tensor:
        loss, parts["kl"], parts["ce"] = _distil_chunks(
            student, teacher, labels, weight, head, grad
        )
        return loss

    if student.requires_grad:
        loss = _RowLosses.apply(student, compute)
    else:
        loss = compute(None)
    return DistilRows(loss, parts["kl"], parts["ce"])


def _log_probs(rows, head, z, out: torch.Tensor) -> None:
    """log_softmax of the rows' logits into ``out`` (m, V) float32."""
    if head is not None:
        z = z[: rows.shape[0]]
        torch.mm(rows, head.weight.t(), out=z)
        if head.bias is not None:
            z.add_(head.bias)
        rows = z
    torch.log_softmax(out.copy_(rows), dim=-1, out=out)


def _distil_chunks(student, teacher, labels, weight, head, grad):
    n = student.shape[0]
    vocab = head.weight.shape[0] if head is not None else student.shape[1]
    buffers = _ChunkBuffers(n, vocab, student.device)  # student log-probs, rows, losses
    logq, diff = torch.empty_like(buffers.logp), torch.empty_like(buffers.logp)
    z = student.new_empty(buffers.chunk, vocab) if head is not None else None
    kl, ce = torch.empty_like(buffers.losses), torch.empty_like(buffers.losses)
    floor = torch.finfo(torch.float32).min
    for i, m in buffers.chunks():
        ls, lt, d, rows = buffers.logp[:m], logq[:m], diff[:m], buffers.rows[:m]
        _log_probs(student[i : i + m], head, z, ls)
        _log_probs(teacher[i : i + m].to(student.dtype), head, z, lt)
        lt.clamp_(min=floor)  # a zero teacher probability adds 0, never 0 x -inf
        torch.sub(lt, ls, out=d)
        lt.exp_()  # the teacher's probabilities
        kl[i : i + m] = d.mul_(lt).sum(dim=-1)
        ce[i : i + m] = ls[rows, labels[i : i + m]].neg()
        if grad is not None:
            ls.exp_().sub_(lt, alpha=weight)
            ls[rows, labels[i : i + m]] -= 1.0 - weight
            if z is not None and head is not None:
                torch.mm(z[:m].copy_(ls), head.weight, out=grad[i : i + m])
            else:
                grad[i : i + m].copy_(ls)
    return weight * kl + (1.0 - weight) * ce, kl, ce


def distil_loss(
    model: Model,
    soft: torch.Tensor,
    block: torch.Tensor,
    teacher_states: torch.Tensor,
    weight: float,
    lead: torch.Tensor | None = None,
) -> DistilRows:
    """The per-token losses of ``block`` (B, T) laid out ``[soft][lead][block]`` against the
    teacher's states for it (``Teacher.states``: (B, T, d) hidden or (B, T, V) logits),
    flattened to (B x keep,) as ``loss.block_loss`` flattens its cross-entropy."""
    keep = n_predicted(soft.shape[0] + lead_length(lead), block.shape[1])
    labels = block[:, block.shape[1] - keep :].reshape(-1)
    target = teacher_states[:, teacher_states.shape[1] - keep :]
    target = target.reshape(-1, target.shape[-1])
    lm = model.model if isinstance(model, PromptedModel) else model
    head = fused_head(lm)
    if head is not None and target.shape[-1] == head.weight.shape[1]:
        embeds = _prepend(lm, soft, block_inputs(block, lead))
        hidden = lm.base_model(inputs_embeds=embeds, use_cache=False)[0]
        hidden = hidden[:, -keep:].reshape(-1, hidden.shape[-1])
        return distil_rows(hidden, target.to(hidden.device), labels.to(hidden.device), weight, head)
    logits = block_logits(model, soft, block, lead)
    logits = logits.reshape(-1, logits.shape[-1])
    return distil_rows(logits, target.to(logits.device), labels.to(logits.device), weight)


# ----------------------------------------------------------------------------- text from the teacher


SAMPLE_BATCH = 16  # continuations sampled side by side (fixed: the same samples every run)
SAMPLED_BLOCK = 128  # default tokens per sampled continuation: the prompt's pull is strongest
# near it, and a short block samples and trains fast


def sampling_options(temperature: float, top_p: float, seed: int):
    """How the teacher's continuations are sampled: the temperature and top-p given, nothing
    else (no repetition penalty: the model's own distribution)."""
    from .sampling import SamplingOptions

    return SamplingOptions(
        temperature=temperature, top_p=top_p, repetition_penalty=1.0, seed=seed
    ).check()


def sample_key(lm: LoadedModel, prefix_ids: list[int], n: int, block_size: int, opts) -> str:
    """What identifies a set of sampled continuations: model, tokenizer, written prompt,
    count, length and sampling settings (the cache file's name and the run's dataset hash)."""
    from .data import tokenizer_fingerprint

    parts = [
        "teacher-samples-1",
        lm.source,
        tokenizer_fingerprint(lm.tokenizer),
        prefix_hash(prefix_ids),
        str(n),
        str(block_size),
        repr(opts),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@torch.no_grad()
def sample_continuations(teacher: Teacher, n: int, block_size: int, opts, banned: list[int]):
    """``n`` continuations of the written prompt, ``block_size`` tokens each (EOS never
    picked, so every one fills a block), sampled with ``opts`` (SamplingOptions) from the
    teacher, ``SAMPLE_BATCH`` at a time on copies of the prompt's cache. (n, T) int64."""
    from .sampling import resolve

    opts = resolve(opts)
    procs = opts.processors(banned)
    gen = torch.Generator(device=teacher.device).manual_seed(opts.seed)
    model = teacher.model
    last, cache = teacher._prefix()
    head = teacher.head
    last_logits = torch.nn.functional.linear(last, head.weight, head.bias) if head else last
    out = np.zeros((n, block_size), dtype=np.int64)
    for start in range(0, n, SAMPLE_BATCH):
        b = min(SAMPLE_BATCH, n - start)
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(b)  # type: ignore[attr-defined]
        ids = teacher.prefix.to(teacher.device).expand(b, -1)
        scores = last_logits.float().expand(b, -1)
        for _ in range(block_size):
            for proc in procs:
                scores = proc(ids, scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)
            ids = torch.cat([ids, token], dim=1)
            step = model(input_ids=token, use_cache=True, **{_cache_kwarg(model): past})
            scores = step.logits[:, -1].float()
        out[start : start + b] = ids[:, teacher.n_prefix :].cpu().numpy()
    return out


def teacher_blocks(
    lm: LoadedModel, teacher: Teacher, n: int, block_size: int, opts, cache_dir=None
) -> tuple[np.ndarray, str, bool]:
    """The sampled continuations that stand in for a dataset: read from the cache when these
    exact ones were made before, else sampled now and cached. (blocks, key, from cache)."""
    from .fileio import atomic_write, cache_root

    key = sample_key(lm, teacher.prefix.tolist(), n, block_size, opts)
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root()
    path = folder / "teacher" / f"{key[:32]}.npy"
    try:
        blocks = np.load(path, allow_pickle=False)
        if blocks.shape == (n, block_size):
            return blocks, key, True
    except (OSError, ValueError):
        pass
    from .generate import eos_ids

    log.info(
        "sampling %d continuations of %d tokens from the model with the written prompt in "
        "front (once: later runs read them from %s)",
        n,
        block_size,
        path.parent,
    )
    blocks = sample_continuations(teacher, n, block_size, opts, sorted(eos_ids(lm)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            np.save(fh, blocks)
    except OSError as e:  # a cache that cannot be written only costs time
        log.warning("note: could not write the teacher's samples to %s (%s)", path, e.strerror)
    return blocks, key, False


def kl_fraction(none: float, soft: float, full: float = 0.0) -> float | None:
    """The fraction of the gap between no prompt and the full written prompt that the soft
    prompt closes, in KL to the teacher (the full prompt's KL is 0 by definition)."""
    gap = none - full
    return None if gap <= 0 or not math.isfinite(gap) else (none - soft) / gap
