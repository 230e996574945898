"""The forward passes of generation: the prefill, one token at a time after it, and the KV
cache a request leaves behind for the next one (prefix reuse).

A KoboldAI client resends the whole story with every request, and most of it is what the
last request already ran through the model. ``Engine`` keeps the KV cache of its last
requests (one per soft prompt, a small LRU with a byte budget), and a new request whose
soft prompt and leading token ids are the same runs only the rest through the model.

Reuse never changes a token. The prefill runs in chunks on a fixed grid of positions
(``[0, chunk)``, ``[chunk, 2 chunk)``, ...; the soft prompt counts), so a grid chunk is
always computed by the same call, with the same inputs, whether the request started cold or
from a kept cache: only whole grid chunks of the prefill are kept, and a request restarts at
the grid line at or before the first token that differs. The last, partial chunk of a
prompt and the generated tokens are recomputed by the next request (at most ``chunk - 1``
tokens more than the new text). Without the grid a kept prefix would differ from a cold
start in the last bits (matmuls and attention over 1,000 rows round differently from the
same rows among 1,040), and greedy decoding would sometimes pick another token.

When the client cuts whole lines from the front of the story to stay within the context,
everything after the cut has new positions and has seen different text: its keys and values
differ in every layer past the first (shifting the cached keys to new rotary positions
would fix the positions, not what the layers above saw), so it is recomputed; only the soft
prompt, the BOS token and the memory in front of the cut are reused.

The single-token step keeps its cache in place (a preallocated buffer per layer, written
where the next token goes; no copy of the whole cache per token as ``DynamicCache``'s
``torch.cat`` makes) and, on a CPU, attends with two small float32 matmuls over the grouped
query heads instead of sdpa, which copies the keys for every query head and runs the flash
kernel for one row (a whole step of the default model at a 1,000-token context, 1 thread:
118 ms with sdpa, 71 ms). Models whose cache is not one plain ``DynamicLayer`` per layer (sliding windows,
linear attention, shared KV) run the plain loop: one prefill, the model's own cache, no reuse.

``Engine(compile=True)`` (``serve --compile``) runs that single-token step under
``torch.compile`` (dynamic shapes: the cache grows a position a step). It takes a minute or
more to compile once, then decodes faster (bench/decode_compile.py has the figures); where
it cannot compile (no C++ compiler, a model dynamo cannot trace) the step falls back to the
plain one for good, with a warning, and the tokens are the same either way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .hf_types import Model
from .soft_prompt import _logits_kwarg, prepend

log = logging.getLogger(__name__)

CHUNK = 128  # the prefill grid: positions per chunk
MAX_BYTES = 1 << 30  # the kept caches, together, at most this many bytes
MAX_ENTRIES = 2  # kept caches (one per soft prompt): the page compares with and without
GROW = 256  # cache buffers grow in steps of this many positions
FAST_ATTENTION = "softprompt_decode"


@functools.lru_cache(maxsize=64)
def cache_kwarg(forward_cls: Any) -> str:
    """transformers 5.x calls the KV cache argument `cache`; earlier ones `past_key_values`."""
    import inspect

    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# --------------------------------------------------------------------------- the cache


def _layer_class():
    """``InPlaceLayer``, made on first use (transformers is imported late)."""
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A cache layer whose keys and values live in a preallocated buffer: a new token is
        written in place and the layer hands out views of the filled part."""

        capacity = GROW

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            self.length = 0
            self._k = self._buffer(key_states, self.capacity)
            self._v = self._buffer(value_states, self.capacity)
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
            self.is_initialized = True

        @staticmethod
        def _buffer(like: torch.Tensor, n: int) -> torch.Tensor:
            b, h, _, d = like.shape
            return torch.empty(b, h, n, d, dtype=like.dtype, device=like.device)

        def _grow(self, needed: int) -> None:
            n = -(-max(needed, self._k.shape[2] * 5 // 4) // GROW) * GROW
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = self._buffer(old, n)
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[2]:
                self._grow(end)
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def truncate(self, length: int) -> None:
            if self.is_initialized and length < self.length:
                self.length = length
                self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

        def crop(self, tokens_to_remove: int) -> None:
            self.truncate(self.get_seq_length() - abs(tokens_to_remove))

        def reset(self) -> None:
            self.truncate(0)

        @property
        def nbytes(self) -> int:
            if not self.is_initialized:
                return 0
            return sum(t.numel() * t.element_size() for t in (self._k, self._v))

    return InPlaceLayer


@functools.lru_cache(maxsize=1)
def _in_place_layer() -> type:
    return _layer_class()


def new_cache(model: Model, capacity: int):
    """An in-place KV cache for ``model`` with room for ``capacity`` positions (it grows past
    them), or None when the model's cache is not one plain full-attention layer per layer."""
    try:
        from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    except ImportError:
        return None
    config = getattr(model, "config", None)
    try:
        probe = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read: the model's own cache then
        return None
    if not probe.layers or any(type(layer) is not DynamicLayer for layer in probe.layers):
        return None
    layer_cls = _in_place_layer()
    layers = []
    for _ in probe.layers:
        layer = layer_cls()
        layer.capacity = -(-capacity // GROW) * GROW
        layers.append(layer)
    cache = DynamicCache.__new__(DynamicCache)
    Cache.__init__(cache, layers=layers)
    return cache


def cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_bytes(cache) -> int:
    return sum(getattr(layer, "nbytes", 0) for layer in getattr(cache, "layers", ()))


def truncate(cache, length: int) -> None:
    for layer in cache.layers:
        layer.truncate(length)


# --------------------------------------------------------------------------- attention


def decode_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers' attention-function signature. One query row on a CPU without a mask:
    the query heads that share a key/value head as one small float32 matmul each; anything
    else goes to ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = ("softcap", "position_bias", "sinks", "s_aux", "sliding_window", "head_mask")
    b, h, t, d = query.shape
    kv = key.shape[1]
    if (
        t == 1
        and attention_mask is None
        and not dropout
        and query.device.type == "cpu"
        and h % kv == 0
        and all(kw.get(k) is None for k in special)
    ):
        scale = scaling if scaling is not None else d**-0.5
        q = query.reshape(b, kv, h // kv, d).float()
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # (b, kv, g, T)
        out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # (b, kv, g, dv)
        return out.to(query.dtype).reshape(b, 1, h, value.shape[-1]), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
        is_causal=is_causal, **kw,
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _register_decode_attention() -> bool:
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(FAST_ATTENTION, decode_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)  # the masks sdpa would get
    return True


@contextlib.contextmanager
def fast_decode(model: Model) -> Iterator[None]:
    """``decode_attention`` for the model's forward passes inside, when it attends with
    ``sdpa`` (or softprompt's training attention, which is ``sdpa`` without gradients)."""
    from .attention import NAME as TRAINING_ATTENTION

    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if (
        config is None
        or original not in ("sdpa", TRAINING_ATTENTION)
        or not _register_decode_attention()
    ):
        yield
        return
    config._attn_implementation = FAST_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = original


# --------------------------------------------------------------------------- the engine


@dataclass
class Entry:
    """A kept cache: the soft prompt and token ids in front of it, and how many positions
    (soft prompt included) hold whole grid chunks of a prefill."""

    soft: torch.Tensor
    ids: list[int]
    cache: object
    length: int

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.cache)


@dataclass
class Stats:
    """What the last prefill did: positions taken from a kept cache and positions run."""

    reused: int = 0
    computed: int = 0


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    return same_kind and bool(torch.equal(a, b))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Generation's forward passes over one model, and the caches kept between requests.
    ``reuse=False``: every request starts cold (same tokens, more time). ``fast=False``: the
    plain loop (one prefill, the model's own ``DynamicCache``, PyTorch's attention), as
    models that cannot take the in-place cache run anyway. Thread-safe: a request takes its
    cache out while it runs."""

    def __init__(
        self,
        *,
        reuse: bool = True,
        fast: bool = True,
        chunk: int = CHUNK,
        max_bytes: int = MAX_BYTES,
        max_entries: int = MAX_ENTRIES,
        compile: bool = False,
    ):
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self.reuse, self.fast, self.chunk = reuse, fast, chunk
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.stats = Stats()
        self.compile = compile  # the single-token step under torch.compile
        self._compiled: dict[int, Any] = {}  # id(model) -> its compiled module
        self._entries: list[Entry] = []  # the most recently used last
        self._lock = threading.Lock()

    # the kept caches

    def take(self, soft: torch.Tensor, ids: Sequence[int]) -> tuple[object | None, int]:
        """The kept cache for ``soft`` (taken out) and how many leading positions of
        ``[soft][ids]`` it holds that this request can keep: whole grid chunks, before the
        first id that differs, leaving at least the last id to run. (None, 0) when none."""
        if not self.reuse:
            return None, 0
        with self._lock:
            found = [i for i, e in enumerate(self._entries) if _same_tensor(e.soft, soft)]
            if not found:
                return None, 0
            e = self._entries.pop(found[0])
        n_soft = soft.shape[0]
        same = n_soft + min(common_prefix(e.ids, ids), len(ids) - 1)
        keep = min(same, e.length) // self.chunk * self.chunk
        truncate(e.cache, keep)
        return e.cache, keep

    def put(self, soft: torch.Tensor, ids: Sequence[int], cache, length: int) -> None:
        """Keep ``cache`` (its first ``length`` positions) for the next request; the least
        recently used caches go first when over ``max_entries`` or ``max_bytes``."""
        if not self.reuse or cache is None or length <= 0:
            return
        truncate(cache, length)
        kept_ids = list(ids[: max(0, length - soft.shape[0])])
        entry = Entry(soft.detach().clone(), kept_ids, cache, length)
        with self._lock:
            self._entries.append(entry)
            total = sum(e.nbytes for e in self._entries)
            while self._entries and (
                len(self._entries) > self.max_entries or total > self.max_bytes
            ):
                total -= self._entries.pop(0).nbytes

    def compiled(self, model: Model):
        """``model`` under ``torch.compile`` (made on first use; compiling happens on its
        first call)."""
        with self._lock:
            if id(model) not in self._compiled:
                self._compiled[id(model)] = torch.compile(model, dynamic=True)
            return self._compiled[id(model)]

    def warm_up(self, lm, steps: int = 3) -> None:
        """A short request of nothing in particular, so that compiling (``compile=True``)
        happens now and not at the first real request; it leaves no kept cache."""
        ids = lm.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
        soft = torch.zeros(0, lm.embed_dim, device=lm.device)
        run = self.session(lm, soft, lm.bos_ids + ids, reserve=steps)
        try:
            scores = run.prefill()
            for _ in range(steps):
                with torch.inference_mode():  # the token as `generate` makes it (a guard)
                    token = scores.argmax(dim=-1, keepdim=True)
                scores = run.step(token)
        finally:
            run.cache = None  # nothing to keep
        self.clear()

    def clear(self) -> None:
        """Free every kept cache."""
        with self._lock:
            self._entries.clear()

    @property
    def kept(self) -> list[Entry]:
        """The kept caches, least recently used first (a copy of the list)."""
        with self._lock:
            return list(self._entries)

    def session(self, lm, soft: torch.Tensor, ids: Sequence[int], reserve: int = 0) -> Session:
        """The forward passes of one request: ``[soft][ids]`` then up to ``reserve`` new
        tokens. Run ``prefill`` first, then ``step`` per token; ``close`` keeps the cache."""
        return Session(self, lm, soft, ids, reserve)


class Session:
    """One request's forward passes. ``prefill()`` -> the scores (1, V) of the next token;
    ``step(token)`` -> the scores after it; ``close()`` hands the cache back to the engine."""

    def __init__(self, engine: Engine, lm, soft: torch.Tensor, ids: Sequence[int], reserve: int):
        self.engine, self.model = engine, lm.model
        self.soft, self.ids = soft, list(ids)
        self.total = soft.shape[0] + len(self.ids)
        self.cache: Any = None  # the model's KV cache (transformers' Cache)
        self.canonical = 0  # leading positions that hold whole grid chunks
        self.fast = engine.fast
        self.reserve = reserve
        self._key = _logits_kwarg(self.model.__class__)
        self._cache_key = cache_kwarg(self.model.__class__)

    def _run(self, forward=None, **inputs) -> torch.Tensor:
        extra = {self._key: 1} if self._key else {}
        if self.cache is not None:
            extra[self._cache_key] = self.cache
        out = (self.model if forward is None else forward)(use_cache=True, **inputs, **extra)
        self.cache = cache_of(out)
        return out.logits[:, -1].float()

    def _embeds(self, start: int, end: int) -> torch.Tensor:
        """Input embeddings of positions [start, end) of [soft][ids]: (1, end - start, d)."""
        n_soft = self.soft.shape[0]
        soft = self.soft[min(start, n_soft) : min(end, n_soft)]
        ids = self.ids[max(start - n_soft, 0) : max(end - n_soft, 0)]
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.soft.device)
        return prepend(self.model, soft, ids_t)

    def prefill(self) -> torch.Tensor:
        """Run the soft prompt and the ids (what no kept cache holds) through the model."""
        engine = self.engine
        with torch.inference_mode():
            if self.fast:
                self.cache, start = engine.take(self.soft, self.ids)
                if self.cache is None:
                    self.cache = new_cache(self.model, self.total + self.reserve)
                    self.fast = self.cache is not None
            if not self.fast:  # the plain loop: one prefill, the model's own cache
                engine.stats = Stats(0, self.total)
                return self._run(inputs_embeds=self._embeds(0, self.total))
            engine.stats = Stats(start, self.total - start)
            self.canonical = start
            chunk, pos = engine.chunk, start
            while True:
                end = min((pos // chunk + 1) * chunk, self.total)
                scores = self._run(inputs_embeds=self._embeds(pos, end))
                if end % chunk == 0:
                    self.canonical = end
                if end == self.total:
                    return scores
                pos = end

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The scores after ``token`` (1, 1), which follows what ran so far."""
        with torch.inference_mode():
            if not self.fast:
                return self._run(input_ids=token)
            with fast_decode(self.model):
                if self.engine.compile:
                    before = cache_length(self.cache)
                    try:
                        return self._run(self.engine.compiled(self.model), input_ids=token)
                    except Exception as e:  # cannot compile here: the plain step, for good
                        self.engine.compile = False
                        log.warning(
                            "note: the decode step could not be compiled (%s: %s); "
                            "running it uncompiled",
                            type(e).__name__,
                            str(e).strip().splitlines()[0][:200] if str(e).strip() else "",
                        )
                        truncate(self.cache, before)  # what a partial run may have written
                return self._run(input_ids=token)

    def close(self) -> None:
        """Keep the cache's whole grid chunks for the next request; drop the rest."""
        cache, self.cache = self.cache, None
        if self.fast and cache is not None:
            with torch.inference_mode():
                self.engine.put(self.soft, self.ids, cache, self.canonical)


_ENGINES_LOCK = threading.Lock()


def engine_of(lm) -> Engine:
    """The engine `generate` uses for ``lm`` (made on first use, kept with it)."""
    engine = lm.__dict__.get("_softprompt_engine")
    if engine is None:
        with _ENGINES_LOCK:
            engine = lm.__dict__.setdefault("_softprompt_engine", Engine())
    return engine
