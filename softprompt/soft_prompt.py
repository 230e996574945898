"""The soft prompt: n learned vectors in the output space of the model's input embedding,
how they are initialised, and how they are put in front of a batch of token embeddings."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelError


@dataclass
class SoftPrompt:
    """A soft prompt: a float32 tensor of shape (n_tokens, dim) and its metadata.

    ``meta`` holds name, description, author, supported (model names) and whatever the
    trainer records (init, steps, val_loss...). Values are JSON-friendly.
    """

    tensor: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tensor.dim() == 3 and self.tensor.shape[0] == 1:
            self.tensor = self.tensor[0]
        if self.tensor.dim() != 2:
            raise ModelError(
                f"a soft prompt is 2-D (n_tokens, dim); got shape {tuple(self.tensor.shape)}"
            )
        self.tensor = self.tensor.detach().to("cpu", torch.float32).contiguous()

    @property
    def n_tokens(self) -> int:
        return self.tensor.shape[0]

    @property
    def dim(self) -> int:
        return self.tensor.shape[1]

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or "softprompt")

    def check_fits(self, model: torch.nn.Module, where: str = "soft prompt") -> None:
        """Raise if the vectors do not match the model's input embedding width."""
        want = model.get_input_embeddings().embedding_dim
        if self.dim != want:
            raise ModelError(
                f"{where} has width {self.dim} but the model's input embeddings are {want} wide: "
                "it was made for another model"
            )

    @classmethod
    def load(cls, path: str | Path) -> SoftPrompt:
        """Read any soft prompt file softprompt knows (see softprompt.formats)."""
        from .formats import load_any

        return load_any(path)

    def save(self, path: str | Path, format: str | None = None) -> Path:
        """Write the soft prompt; the format follows the extension unless given."""
        from .formats import save

        return save(self, path, format)


# ----------------------------------------------------------------------------- initialisation


def special_token_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i in added)
    return ids


@torch.no_grad()
def embed_ids(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Vectors of token ids as the input embedding module outputs them, float32 (n, d)."""
    emb = model.get_input_embeddings()
    return emb(ids.to(emb.weight.device)).float().cpu()


def init_tensor(
    model: torch.nn.Module,
    tokenizer,
    init: str,
    n_tokens: int | None,
    init_text: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Initial soft prompt vectors, float32 (n, d).

    text: the init text's token vectors, repeated or cut to n_tokens (its own length when
    n_tokens is None). vocab: n distinct ids sampled from the vocabulary, special tokens
    excluded. random: uniform noise with the embedding table's per-element spread.
    """
    from .config import DEFAULT_TOKENS

    gen = torch.Generator().manual_seed(seed)
    vocab_size = min(model.get_input_embeddings().num_embeddings, len(tokenizer))
    if init == "text":
        text = read_init_text(init_text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("--init-text gives no tokens: use a longer text")
        n = n_tokens or len(ids)
        ids = (ids * (n // len(ids) + 1))[:n]
        return embed_ids(model, torch.tensor(ids))
    n = n_tokens or DEFAULT_TOKENS
    if init == "vocab":
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        for i in special_token_ids(tokenizer):
            if 0 <= i < vocab_size:
                allowed[i] = False
        pool = allowed.nonzero().squeeze(1)
        if len(pool) < n:
            raise ConfigError(
                f"--init vocab needs {n} distinct ordinary tokens but the vocabulary has {len(pool)}"
            )
        ids = pool[torch.randperm(len(pool), generator=gen)[:n]]
        return embed_ids(model, ids)
    if init == "random":
        sample = torch.randperm(vocab_size, generator=gen)[: min(vocab_size, 4096)]
        std = embed_ids(model, sample).std().item()
        half_width = std * 3**0.5  # a uniform on [-a, a] has std a / sqrt(3)
        d = model.get_input_embeddings().embedding_dim
        return (torch.rand(n, d, generator=gen) * 2 - 1) * half_width
    raise ConfigError(f"--init must be one of text, vocab, random (got {init!r})")


def read_init_text(value: str | None) -> str:
    """--init-text is either the text itself or a path to a UTF-8 text file."""
    if not value:
        raise ConfigError("--init text needs --init-text TEXT_OR_FILE")
    if len(value) < 4096 and "\n" not in value:
        p = Path(value).expanduser()
        try:
            if p.is_file():
                return p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--init-text file {p} cannot be read as UTF-8 text: {e}") from None
    return value


# ----------------------------------------------------------------------------- forward pass


def prepend(model: torch.nn.Module, soft: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings of ``input_ids`` (B, T) with the soft prompt in front: (B, n + T, d).

    The soft prompt (n, d) is cast to the embedding dtype here, so its master copy stays float32.
    """
    tok = model.get_input_embeddings()(input_ids)  # (B, T, d)
    prefix = soft.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(tok.shape[0], -1, -1)
    return torch.cat([prefix, tok], dim=1)


@functools.lru_cache(maxsize=64)
def _logits_kwarg(forward_cls: type) -> str | None:
    params = inspect.signature(forward_cls.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def block_inputs(block: torch.Tensor, lead: torch.Tensor | None) -> torch.Tensor:
    """The token ids fed in for ``block`` (B, T): the ``lead`` ids (k,) (the tokenizer's BOS,
    or a hard prompt), then the block without its last token: (B, k + T - 1)."""
    ids = block[:, :-1]
    if lead is None or not len(lead):
        return ids
    return torch.cat([lead.to(ids.device, ids.dtype).expand(len(ids), -1), ids], dim=1)


def block_logits(
    model: torch.nn.Module,
    soft: torch.Tensor,
    block: torch.Tensor,
    lead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits predicting the tokens of ``block`` (B, T) laid out as ``[soft][lead][block]``,
    each from everything before it: (B, keep, V), keep = T when anything comes before the
    block, else T - 1. The last token is not fed in, and no LM head work is done on the
    prefix positions except the last one, which predicts the block's first token.
    ``model`` is a causal LM or a ``PromptedModel`` around one."""
    keep = n_predicted(soft.shape[0] + _len(lead), block.shape[1])
    if isinstance(model, PromptedModel):
        return model(soft, block_inputs(block, lead), keep)
    return _prompted_logits(model, soft, block_inputs(block, lead), keep)


def _len(lead: torch.Tensor | None) -> int:
    return 0 if lead is None else len(lead)


def _prompted_logits(
    model: torch.nn.Module, soft: torch.Tensor, input_ids: torch.Tensor, keep: int
) -> torch.Tensor:
    embeds = prepend(model, soft, input_ids)  # (B, n + T - 1, d)
    key = _logits_kwarg(type(model))
    if key is not None:
        return model(inputs_embeds=embeds, use_cache=False, **{key: keep}).logits
    return model(inputs_embeds=embeds, use_cache=False).logits[:, -keep:]


class PromptedModel(torch.nn.Module):
    """A causal LM and the soft prompt's concatenation in one module: the logits of the last
    ``keep`` positions of ``[soft; embed(input_ids)]``. The embedding lookup happens inside
    this module's forward, which is what a model sharded with FSDP needs (its embedding
    weights are gathered only while the module that owns them runs)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, soft: torch.Tensor, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return _prompted_logits(self.model, soft, input_ids, keep)


def n_predicted(n_prefix: int, T: int) -> int:
    """How many tokens of a T-token block get a prediction: all of them when something comes
    before the block (a soft prompt or a BOS token: its last position predicts the first
    token), else all but the first."""
    return T if n_prefix > 0 else T - 1


def block_loss(
    model: torch.nn.Module,
    soft: torch.Tensor,
    block: torch.Tensor,
    reduction: str = "mean",
    lead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy (float32) of the tokens of ``block`` (B, T) laid out as
    ``[soft][lead][block]`` (``lead``: the tokenizer's BOS, see ``LoadedModel.bos_ids``).
    ``reduction="none"`` gives one loss per token (flattened, B x keep; see block_logits).

    When the model's logits are its LM head applied to its last hidden state (checked once
    per model, see ``fused_head``), the head and the loss run together a chunk of rows at a
    time (``head_cross_entropy``) and the (tokens x vocabulary) logits never exist at once."""
    keep = n_predicted(soft.shape[0] + _len(lead), block.shape[1])
    labels = block[:, block.shape[1] - keep :].reshape(-1)  # (B x keep,)
    lm = model.model if isinstance(model, PromptedModel) else model
    head = fused_head(lm)
    if head is not None:
        embeds = prepend(lm, soft, block_inputs(block, lead))  # (B, n + k + T - 1, d)
        hidden = lm.base_model(inputs_embeds=embeds, use_cache=False)[0]
        hidden = hidden[:, -keep:].reshape(-1, hidden.shape[-1])  # (B x keep, d)
        losses = head_cross_entropy(hidden, head.weight, head.bias, labels.to(hidden.device))
    else:
        logits = block_logits(model, soft, block, lead)  # (B, keep, V)
        losses = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(logits.device))
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def fused_head(model: torch.nn.Module) -> torch.nn.Linear | None:
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
def _head_gives_logits(model: torch.nn.Module, head: torch.nn.Linear) -> bool:
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
    buffers = _ChunkBuffers(*logits.shape, logits.device)
    for i, m in buffers.chunks():
        z = logits[i : i + m] if grad is None else grad[i : i + m].copy_(logits[i : i + m])
        buffers.losses[i : i + m] = buffers.rows_losses(z, labels[i : i + m], grad is not None)
    return buffers.losses


class _ChunkBuffers:
    """Cross-entropy of (n, vocab) logits CE_CHUNK rows at a time, in a float32 buffer reused
    from chunk to chunk: fresh memory for every chunk costs more in page faults than the
    arithmetic (SmolLM2, CPU, 1,024 rows: 130 ms with fresh tensors, 30 ms reused)."""

    def __init__(self, n: int, vocab: int, device) -> None:
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
