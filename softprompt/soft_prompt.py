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
from .hf_types import Model


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

    def check_fits(
        self, model: Model, where: str = "soft prompt", model_name: str | None = None
    ) -> None:
        """Raise if the vectors do not match the model's input embedding width, naming the
        model the soft prompt was made for when its metadata says."""
        want = model.get_input_embeddings().embedding_dim
        if self.dim != want:
            supported = self.meta.get("supported")
            made_for = self.meta.get("model") or (
                supported[0] if isinstance(supported, list) and supported else None
            )
            this = f" ({model_name})" if model_name else ""
            raise ModelError(
                f"{where} has width {self.dim} but the model's input embeddings{this} are {want} "
                f"wide: it was made for {made_for or 'another model'}"
                + (f": pass --model {made_for}" if made_for else "")
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
def embed_ids(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """Vectors of token ids as the input embedding module outputs them, float32 (n, d)."""
    emb = model.get_input_embeddings()
    return emb(ids.to(emb.weight.device)).float().cpu()


def token_sample(model: Model, tokenizer, sample: int = 4096, seed: int = 0) -> torch.Tensor:
    """The vectors (as the input embedding puts them out: scaled, for a model that scales
    them) of ``sample`` token ids picked by ``seed``, float32 (sample, d)."""
    vocab_size = min(model.get_input_embeddings().num_embeddings, len(tokenizer))
    ids = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:sample]
    return embed_ids(model, ids)


def embedding_rms(model: Model, tokenizer, sample: int = 4096, seed: int = 0) -> float:
    """The root mean square of the model's token vectors, over a ``token_sample``."""
    return token_sample(model, tokenizer, sample, seed).pow(2).mean().sqrt().item()


def init_tensor(
    model: Model,
    tokenizer,
    init: str,
    n_tokens: int | None,
    init_text: str | None = None,
    seed: int = 0,
    passage: Any = None,
) -> torch.Tensor:
    """Initial soft prompt vectors, float32 (n, d).

    passage: the vectors of ``passage``'s token ids (the first tokens of a training row,
    Rows.passage). text: the init text's token vectors, repeated or cut to n_tokens (its own
    length when n_tokens is None). vocab: n distinct ids sampled from the vocabulary, special
    tokens excluded. random: uniform noise with the embedding table's per-element spread.
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
    if init == "passage":
        if passage is None:
            raise ValueError("init passage needs the passage's token ids")
        return embed_ids(model, torch.as_tensor(passage, dtype=torch.long)[:n])
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
    raise ConfigError(f"--init must be one of passage, text, vocab, random (got {init!r})")


def resolve_tokens(cfg, tokenizer, checkpoint: dict | None, init_sp: SoftPrompt | None) -> int:
    """The soft prompt's length for a run (``cfg`` a TrainConfig): a resumed checkpoint's,
    --init-from's (--tokens must agree), --tokens, the init text's length, or the default."""
    from .config import DEFAULT_TOKENS

    if checkpoint is not None:
        return int(checkpoint["soft_prompt"].shape[0])
    if init_sp is not None:
        if cfg.tokens and cfg.tokens != init_sp.n_tokens:
            raise ConfigError(
                f"--tokens {cfg.tokens} does not match the {init_sp.n_tokens} tokens of --init-from "
                f"{cfg.init_from}: leave --tokens out"
            )
        return init_sp.n_tokens
    if cfg.tokens:
        return cfg.tokens
    if cfg.init == "text" and (cfg.init_text or not cfg.teacher_prompt):
        # a written prompt to distil is the init text, but does not set the length: a soft
        # prompt as long as it would save nothing
        text = read_init_text(cfg.init_text)
        return max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return DEFAULT_TOKENS


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


def prepend(model: Model, soft: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings of ``input_ids`` (B, T) with the soft prompt in front: (B, n + T, d).

    The soft prompt (n, d) is cast to the embedding dtype here, so its master copy stays float32.
    """
    tok = model.get_input_embeddings()(input_ids)  # (B, T, d)
    prefix = soft.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(tok.shape[0], -1, -1)
    return torch.cat([prefix, tok], dim=1)


@functools.lru_cache(maxsize=64)
def _logits_kwarg(forward_cls: Any) -> str | None:
    """The keyword of the model class's ``forward`` that keeps only the last logits."""
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
    model: Model,
    soft: torch.Tensor,
    block: torch.Tensor,
    lead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits predicting the tokens of ``block`` (B, T) laid out as ``[soft][lead][block]``,
    each from everything before it: (B, keep, V), keep = T when anything comes before the
    block, else T - 1. The last token is not fed in, and no LM head work is done on the
    prefix positions except the last one, which predicts the block's first token.
    ``model`` is a causal LM or a ``PromptedModel`` around one."""
    keep = n_predicted(soft.shape[0] + lead_length(lead), block.shape[1])
    if isinstance(model, PromptedModel):
        return model(soft, block_inputs(block, lead), keep)
    return _prompted_logits(model, soft, block_inputs(block, lead), keep)


def lead_length(lead: torch.Tensor | None) -> int:
    """How many token ids ``lead`` holds (0 for None)."""
    return 0 if lead is None else len(lead)


def _prompted_logits(
    model: Model, soft: torch.Tensor, input_ids: torch.Tensor, keep: int
) -> torch.Tensor:
    embeds = prepend(model, soft, input_ids)  # (B, n + T - 1, d)
    key = _logits_kwarg(model.__class__)
    if key is not None:
        return model(inputs_embeds=embeds, use_cache=False, **{key: keep}).logits
    return model(inputs_embeds=embeds, use_cache=False).logits[:, -keep:]


class PromptedModel(torch.nn.Module):
    """A causal LM and the soft prompt's concatenation in one module: the logits of the last
    ``keep`` positions of ``[soft; embed(input_ids)]``. The embedding lookup happens inside
    this module's forward, which is what a model sharded with FSDP needs (its embedding
    weights are gathered only while the module that owns them runs)."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, soft: torch.Tensor, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return _prompted_logits(self.model, soft, input_ids, keep)


def n_predicted(n_prefix: int, T: int) -> int:
    """How many tokens of a T-token block get a prediction: all of them when something comes
    before the block (a soft prompt or a BOS token: its last position predicts the first
    token), else all but the first."""
    return T if n_prefix > 0 else T - 1
