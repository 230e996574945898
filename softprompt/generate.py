"""Continue a prompt with a frozen model, with or without a soft prompt in front of it.

One sampling loop over the KV cache: the soft prompt and the prompt go through the model once
(the prefill), then every new token costs one single-token forward pass, so a soft prompt costs
its length once, not at every step. Tokens are sampled with a private ``torch.Generator`` seeded
per call: the same seed gives the same sampling noise with and without a soft prompt, and the
caller's global random state is left alone.

    text = generate(lm, "It was a dark night", soft_prompt, temperature=0)
    for piece in stream(lm, "It was a dark night", soft_prompt, stop=["\\n\\n"]):
        ...  # text pieces as they come

The sampling options are one ``softprompt.sampling.SamplingOptions`` (KoboldCpp's samplers, in
its ``sampler_order``); pass one, or change the defaults by keyword. ``temperature=0`` is greedy
decoding. A ``cancel`` event stops a stream between two tokens.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import ConfigError
from .model import LoadedModel
from .sampling import SamplingOptions, resolve
from .soft_prompt import SoftPrompt, _logits_kwarg, prepend

log = logging.getLogger(__name__)


class Cancel(Protocol):
    """What stops a stream between two tokens once set: a ``threading.Event``, or anything
    with its ``is_set`` (``serve`` also looks at the client's connection there)."""

    def is_set(self) -> bool: ...


def soft_tensor(lm: LoadedModel, soft_prompt: SoftPrompt | torch.Tensor | None) -> torch.Tensor:
    """The soft prompt as an (n, d) float32 tensor on the model's device; (0, d) for none."""
    if soft_prompt is None:
        return torch.zeros(0, lm.embed_dim, device=lm.device)
    if isinstance(soft_prompt, SoftPrompt):
        soft_prompt.check_fits(lm.model)
        return soft_prompt.tensor.to(lm.device)
    soft = soft_prompt.detach().float()
    if soft.dim() != 2 or soft.shape[1] != lm.embed_dim:
        raise ConfigError(
            f"a soft prompt tensor must be (n, {lm.embed_dim}); got {tuple(soft.shape)}"
        )
    return soft.to(lm.device)


def fit_prompt(ids: Sequence[int], context: int, n_soft: int, max_new_tokens: int) -> list[int]:
    """The prompt's last tokens that fit: soft tokens + prompt + new tokens <= context."""
    budget = context - n_soft - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} plus {n_soft} soft tokens leave no room for the prompt "
            f"in the model's context of {context} tokens: use --max-new-tokens {max(1, context - n_soft - 1)} or less"
        )
    return list(ids[-budget:])


def encode_prompt(lm: LoadedModel, prompt: str, n_soft: int, max_new_tokens: int) -> list[int]:
    """Token ids to put after the soft prompt, laid out as training lays out a block: the
    BOS token where the model's tokenizer puts one first, then the prompt's tokens cut from
    the left to fit. Without a BOS token an empty prompt becomes one EOS token: the start of
    a document in the training stream."""
    bos = lm.bos_ids
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    fitted = fit_prompt(ids, lm.context_length, n_soft + len(bos), max_new_tokens)
    if len(fitted) < len(ids):
        log.info(
            "note: the prompt was cut to its last %d of %d tokens to fit the context",
            len(fitted),
            len(ids),
        )
    return bos + fitted if bos or fitted else [lm.eos_token_id]


def eos_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.eos_token_id}
    extra = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return ids


@functools.lru_cache(maxsize=64)
def _cache_kwarg(forward_cls: type) -> str:
    """transformers 5.x calls the KV cache argument `cache`; earlier ones `past_key_values`."""
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def stream_ids(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    soft: torch.Tensor,
    options: SamplingOptions | None = None,
    *,
    stop_at_eos: bool = True,
    ban_eos: bool = False,
    cancel: Cancel | None = None,
    **changes,
) -> Iterator[int]:
    """New token ids, one at a time, after the soft prompt ``soft`` (n, d) and ``prompt_ids``
    (which must already fit the context), sampled with ``options`` (changed by ``changes``).
    Stops at EOS (not yielded), after max_new_tokens, or between two tokens once ``cancel`` is
    set; ``ban_eos`` never picks EOS, so it runs to max_new_tokens (KoboldAI's "ban EOS")."""
    opts = resolve(options, **changes)
    model, device = lm.model, lm.device
    procs = opts.processors(sorted(eos_ids(lm)) if ban_eos else ())
    stops = eos_ids(lm) if stop_at_eos else set()
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    n_prompt, max_new_tokens = len(prompt_ids), opts.max_new_tokens
    # prompt + new ids, for the repetition penalty (the soft prompt has no ids)
    ids = torch.empty(1, n_prompt + max_new_tokens, dtype=torch.long, device=device)
    ids[0, :n_prompt] = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    if cancel is not None and cancel.is_set():
        return

    # Grad mode is set per call, never held across a yield (it would leak into the caller).
    with torch.inference_mode():
        embeds = prepend(model, soft, ids[:, :n_prompt])  # (1, n + T, d)
        key, cache_key = _logits_kwarg(type(model)), _cache_kwarg(type(model))
        out = model(inputs_embeds=embeds, use_cache=True, **({key: 1} if key else {}))
        past, scores = _cache_of(out), out.logits[:, -1].float()  # (1, V)
        del out, embeds
    for i in range(max_new_tokens):
        with torch.inference_mode():
            for proc in procs:
                scores = proc(ids[:, : n_prompt + i], scores)
            if opts.greedy:
                token = scores.argmax(dim=-1, keepdim=True)  # (1, 1)
            else:
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, 1, generator=gen)  # (1, 1)
            ids[:, n_prompt + i] = token[:, 0]
            if i + 1 < max_new_tokens:
                # Queue the next step before reading the token back, so a GPU is never idle
                # waiting for the host; at EOS this one step is wasted.
                out = model(input_ids=token, use_cache=True, **{cache_key: past})
                past, scores = _cache_of(out), out.logits[:, -1].float()
                del out
        value = int(token.item())
        if value in stops:
            return
        yield value
        if cancel is not None and cancel.is_set():
            return


class Detokenizer:
    """Text of new tokens as they come. Each step decodes a short window that starts a few
    tokens back (so tokenizers that drop a word's leading space at the start of a decode still
    get it right), and holds back text that ends in an incomplete UTF-8 character."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-5:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd") and text.startswith(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else text


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could begin a stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stop_text(pieces: Iterable[str], stop: Sequence[str] = ()) -> Iterator[str]:
    """Pass text pieces through until one of the ``stop`` strings appears; the stop string and
    what follows it are not passed on. Text that may be the start of a stop string is held
    back until it is known not to be."""
    stops = [s for s in stop if s]
    if not stops:
        yield from (p for p in pieces if p)
        return
    pending = ""
    for piece in pieces:
        pending += piece
        hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits):
                yield pending[: min(hits)]
            return
        ready = len(pending) - _held_back(pending, stops)
        if ready:
            yield pending[:ready]
            pending = pending[ready:]
    if pending:
        yield pending


@dataclass
class Progress:
    """What one text stream did, filled in as it runs: new tokens made, and why it ended
    ("length": it made max_new_tokens tokens; "stop": EOS, a stop string, or cancelled)."""

    tokens: int = 0
    finish_reason: str = "stop"
    cancelled: bool = False


def stream_text(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    soft: torch.Tensor,
    options: SamplingOptions | None = None,
    *,
    stop: Sequence[str] = (),
    ban_eos: bool = False,
    cancel: Cancel | None = None,
    progress: Progress | None = None,
) -> Iterator[str]:
    """The continuation of ``prompt_ids`` (already fitted to the context) as text pieces;
    ``stream_ids``'s options, and it ends before the first of the ``stop`` strings."""
    opts = resolve(options)
    progress = progress if progress is not None else Progress()
    tokens = stream_ids(lm, prompt_ids, soft, opts, ban_eos=ban_eos, cancel=cancel)
    detok = Detokenizer(lm.tokenizer, prompt_ids)
    ran_out = False  # every token was made and passed on (no stop string cut it short)

    def pieces() -> Iterator[str]:
        nonlocal ran_out
        for t in tokens:
            progress.tokens += 1
            yield detok.push(t)
        yield detok.flush()
        ran_out = True

    try:
        yield from stop_text(pieces(), stop)
    finally:
        tokens.close()  # frees the KV cache at once when the caller stops early
        progress.cancelled = cancel is not None and cancel.is_set()
        full = ran_out and progress.tokens >= opts.max_new_tokens
        progress.finish_reason = "length" if full and not progress.cancelled else "stop"


def stream(
    lm: LoadedModel,
    prompt: str,
    soft_prompt: SoftPrompt | torch.Tensor | None = None,
    options: SamplingOptions | None = None,
    *,
    stop: Sequence[str] = (),
    cancel: Cancel | None = None,
    **changes,
) -> Iterator[str]:
    """The continuation of ``prompt`` as text pieces, as they are generated, sampled with
    ``options`` (changed by ``changes``, e.g. ``temperature=0``). Ends at EOS, at
    max_new_tokens, before the first of the ``stop`` strings, or once ``cancel`` is set. The
    prompt is cut from the left so that soft tokens + prompt + new tokens fit the context."""
    opts = resolve(options, **changes)
    if isinstance(stop, str):
        stop = [stop]
    soft = soft_tensor(lm, soft_prompt)
    prompt_ids = encode_prompt(lm, prompt, soft.shape[0], opts.max_new_tokens)
    yield from stream_text(lm, prompt_ids, soft, opts, stop=stop, cancel=cancel)


def generate(
    lm: LoadedModel,
    prompt: str,
    soft_prompt: SoftPrompt | torch.Tensor | None = None,
    options: SamplingOptions | None = None,
    **changes,
) -> str:
    """The continuation of ``prompt`` (the new text only); the options are ``stream``'s."""
    return "".join(stream(lm, prompt, soft_prompt, options, **changes))


# `softprompt.generate` is this module, called as this function (softprompt/__init__.py);
# code that imported the function still finds its streaming twin as `generate.stream`.
generate.stream = stream  # type: ignore[attr-defined]
