"""The loss of a block given a soft prompt, and the kernels behind it.

``block_loss`` is what training minimises and validation and ``eval`` report: the
cross-entropy of the block's tokens laid out as ``[soft][BOS][block]``
(``soft_prompt.block_logits`` defines what predicts what). When the model's logits are its LM
head applied to its last hidden state (``fused_head``), the head and the loss run together
CE_CHUNK rows at a time (``head_cross_entropy``), so the (tokens x vocabulary) logits never
exist at once; otherwise the model's own logits go through the same chunked cross-entropy.
``loss_sums`` adds losses up over many blocks, for validation and ``eval``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import Rows
from .hf_types import Model
from .soft_prompt import (
    PromptedModel,
    block_inputs,
    block_logits,
    lead_length,
    n_predicted,
    prepend,
)


def perplexity(loss: float | None) -> float | None:
    """exp(loss) (nats per token), capped so a diverged loss stays a float."""
    return None if loss is None else math.exp(min(loss, 50.0))


def block_loss(
    model: Model,
    soft: torch.Tensor,
    block: torch.Tensor,
    reduction: str = "mean",
    lead: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy (float32) of the tokens of ``block`` (B, T) laid out as
    ``[soft][lead][block]`` (``lead``: the tokenizer's BOS, see ``LoadedModel.bos_ids``).
    ``reduction="none"`` gives one loss per token (flattened, B x keep; see block_logits).

    ``mask`` (B, T) bool, when given, says which tokens are labels (a completion, an
    assistant turn; False for a prompt and for padding): the others carry no loss, the LM
    head does no work on them, "mean" is over the labels and "none" gives the labels' losses
    only (row by row). None: every token is a label.

    When the model's logits are its LM head applied to its last hidden state (checked once
    per model, see ``fused_head``), the head and the loss run together a chunk of rows at a
    time (``head_cross_entropy``) and the (tokens x vocabulary) logits never exist at once."""
    keep = n_predicted(soft.shape[0] + lead_length(lead), block.shape[1])
    labels = block[:, block.shape[1] - keep :].reshape(-1)  # (B x keep,)
    rows = None if mask is None else label_rows(mask, keep)
    if rows is not None:
        labels = labels[rows.to(labels.device)]
    lm = model.model if isinstance(model, PromptedModel) else model
    head = fused_head(lm)
    if head is not None:
        embeds = prepend(lm, soft, block_inputs(block, lead))  # (B, n + k + T - 1, d)
        hidden = lm.base_model(inputs_embeds=embeds, use_cache=False)[0]
        hidden = hidden[:, -keep:].reshape(-1, hidden.shape[-1])  # (B x keep, d)
        if rows is not None:
            hidden = hidden[rows.to(hidden.device)]
        losses = head_cross_entropy(hidden, head.weight, head.bias, labels.to(hidden.device))
    else:
        logits = block_logits(model, soft, block, lead)  # (B, keep, V)
        logits = logits.reshape(-1, logits.shape[-1])
        if rows is not None:
            logits = logits[rows.to(logits.device)]
        losses = cross_entropy(logits, labels.to(logits.device))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.mean() if rows is None else losses.sum() / max(len(losses), 1)


def label_rows(mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The flat indices, among the B x keep predicted positions, of the tokens ``mask``
    (B, T) marks as labels."""
    return mask[:, mask.shape[1] - keep :].reshape(-1).nonzero().squeeze(1)


def fused_head(model: Model) -> torch.nn.Linear | None:
    """The model's LM head when ``head_cross_entropy`` may stand in for the model's own
    logits: a plain ``nn.Linear`` with ordinary weights (not quantized, not sharded, not
    spread over devices by a device map), and logits that are exactly that head applied to
    the base model's last hidden state (no final soft-capping or scaling). The numerical
    check runs once per model, on eight tokens, and its answer is kept on the model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if (
        type(head) is not torch.nn.Linear
        or base is model
        or len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
        or hasattr(head, "_hf_hook")
        or head.weight.device.type == "meta"
        or type(head.weight.data) is not torch.Tensor  # a DTensor when sharded
    ):
        return None
    verdict = model.__dict__.get("_softprompt_fused_head")
    if verdict is None:
        verdict = model.__dict__["_softprompt_fused_head"] = _head_gives_logits(model, head)
    return head if verdict else None


@torch.no_grad()
def _head_gives_logits(model: Model, head: torch.nn.Linear) -> bool:
    device = head.weight.device
    ids = torch.arange(1, 9, device=device).remainder(head.weight.shape[0])[None]
    try:
        want = model(input_ids=ids, use_cache=False).logits.float()
        hidden = model.base_model(input_ids=ids, use_cache=False)[0]
        got = torch.nn.functional.linear(hidden, head.weight, head.bias).float()  # no hooks
    except Exception:  # an architecture whose base model wants other inputs: use its logits
        return False
    return got.shape == want.shape and bool(
        (got - want).abs().max() <= 1e-3 * want.abs().max() + 1e-5
    )


CE_CHUNK = 128  # rows of logits turned into float32 at a time (128 measured fastest on CPU)


class _RowLosses(torch.autograd.Function):
    """Per-row losses of ``x`` (N, ...) whose gradients are worked out with them:
    ``compute(grad)`` returns the (N,) losses and writes into ``grad`` (shaped like ``x``)
    the gradient of each row's loss with respect to that row. A row's loss depends on its
    row alone, so the backward pass only scales the saved gradient by the upstream one:
    nothing is recomputed and no (N, V) float32 tensor is kept."""

    @staticmethod
    def forward(ctx, x, compute):
        grad = torch.empty_like(x)
        losses = compute(grad)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each row of the logits ``hidden @ weight.T (+ bias)`` (N, d) -> (N, V)
    against ``labels`` (N,): float32 (N,), differentiable with respect to ``hidden`` only. The
    logits exist CE_CHUNK rows at a time and the head's matmul runs once."""
    if hidden.requires_grad:
        return _RowLosses.apply(hidden, lambda g: _head_losses(hidden, weight, bias, labels, g))
    return _head_losses(hidden, weight, bias, labels, None)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` (N, V) against ``labels`` (N,): float32 (N,).
    Unlike ``F.cross_entropy(logits.float())`` it never holds an (N, V) float32 copy of the
    logits (400 MB less on SmolLM2 at batch 4 x 256 tokens)."""
    if logits.requires_grad:
        return _RowLosses.apply(logits, lambda g: _logits_losses(logits, labels, g))
    return _logits_losses(logits, labels, None)


def _head_losses(hidden, weight, bias, labels, grad: torch.Tensor | None) -> torch.Tensor:
    """The work of ``head_cross_entropy``: each chunk's logits go into one buffer reused from
    chunk to chunk; with ``grad``, each row's gradient with respect to its hidden row is
    written there."""
    n, vocab = hidden.shape[0], weight.shape[0]
    buffers = _ChunkBuffers(n, vocab, hidden.device)
    logits = hidden.new_empty(buffers.chunk, vocab)
    for i, m in buffers.chunks():
        z = logits[:m]
        torch.mm(hidden[i : i + m], weight.t(), out=z)
        if bias is not None:
            z.add_(bias)
        buffers.losses[i : i + m] = buffers.rows_losses(z, labels[i : i + m], grad is not None)
        if grad is not None:
            torch.mm(z, weight, out=grad[i : i + m])
    return buffers.losses


def _logits_losses(logits, labels, grad: torch.Tensor | None) -> torch.Tensor:
    """The work of ``cross_entropy``; with ``grad``, each row's gradient is written there."""
    buffers = _ChunkBuffers(logits.shape[0], logits.shape[1], logits.device)
    for i, m in buffers.chunks():
        z = logits[i : i + m] if grad is None else grad[i : i + m].copy_(logits[i : i + m])
        buffers.losses[i : i + m] = buffers.rows_losses(z, labels[i : i + m], grad is not None)
    return buffers.losses


class _ChunkBuffers:
    """Cross-entropy of (n, vocab) logits CE_CHUNK rows at a time, in a float32 buffer reused
    from chunk to chunk: fresh memory for every chunk costs more in page faults than the
    arithmetic (SmolLM2, CPU, 1,024 rows: 130 ms with fresh tensors, 30 ms reused)."""

    def __init__(self, n: int, vocab: int, device: torch.device) -> None:
        self.n, self.chunk = n, min(CE_CHUNK, n)
        self.logp = torch.empty(self.chunk, vocab, dtype=torch.float32, device=device)
        self.rows = torch.arange(self.chunk, device=device)
        self.losses = torch.empty(n, dtype=torch.float32, device=device)

    def chunks(self):
        for i in range(0, self.n, self.chunk):
            yield i, min(self.chunk, self.n - i)

    def rows_losses(self, z: torch.Tensor, labels: torch.Tensor, grad: bool) -> torch.Tensor:
        """Losses of the logits rows ``z`` (m, vocab) against ``labels`` (m,); with ``grad``,
        d loss / d logits (softmax - onehot) is written back into ``z``."""
        m = z.shape[0]
        lp, rows = self.logp[:m], self.rows[:m]
        torch.log_softmax(lp.copy_(z), dim=-1, out=lp)
        losses = lp[rows, labels].neg()
        if grad:
            lp.exp_()
            lp[rows, labels] -= 1.0
            z.copy_(lp)
        return losses


@torch.no_grad()
def loss_sums(
    model: Model,
    soft: torch.Tensor,
    blocks: np.ndarray | torch.Tensor | Rows,
    batch_size: int,
    device,
    *,
    lead: torch.Tensor | None = None,
    first: int | None = None,
    n_batches: int = 0,
    filler: np.ndarray | Rows | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) of tokens ``first``..T-1 of every block (N, T) laid out as
    ``[soft][lead][block]``, and how many tokens that is. ``first`` defaults to every token
    that has a prediction (0 when anything comes before the block, else 1). ``blocks`` may
    be ``data.Rows``: then only their labels count (an example's completion), among the
    tokens from ``first`` on. With ``n_batches`` the model runs exactly that many times, on
    the ``filler`` blocks (uncounted) once ``blocks`` run out: a model sharded across ranks
    needs every rank to run it equally often."""
    if isinstance(blocks, torch.Tensor):
        blocks = blocks.cpu().numpy()
    rows = blocks if isinstance(blocks, Rows) else Rows(np.asarray(blocks))
    spare = filler if isinstance(filler, Rows) or filler is None else Rows(np.asarray(filler))
    total, count = 0.0, 0
    for b in range(max(n_batches, math.ceil(len(rows) / batch_size))):
        part = range(b * batch_size, min((b + 1) * batch_size, len(rows)))
        ids, mask = (rows if len(part) else spare).take(part if len(part) else [0])  # type: ignore[union-attr]
        batch = torch.from_numpy(ids).to(device)  # (B, T)
        T = batch.shape[1]
        keep = n_predicted(soft.shape[0] + lead_length(lead), T)
        start = T - keep if first is None else first
        if mask is not None:
            mask[:, :start] = False
            losses = block_loss(model, soft, batch, "none", lead, torch.from_numpy(mask))
            if len(part):
                total += losses.double().sum().item()
                count += int(mask.sum())
            continue
        losses = block_loss(model, soft, batch, reduction="none", lead=lead).view(len(batch), -1)
        if len(part):
            total += losses[:, start - (T - keep) :].double().sum().item()
            count += len(part) * (T - start)
    return total, count
