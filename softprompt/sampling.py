"""How the next token is picked: one options type for `generate`, `serve`, the page and the report.

``SamplingOptions`` holds every sampling option with its default, checks them in one place
(``problems`` names each bad option), and turns them into the logits processors, applied in
``sampler_order``. The samplers and their ids are KoboldCpp's (``gpttype_adapter.cpp``:
``SampleLogits`` and the ``sample_*`` functions it calls), so a KoboldAI client's settings mean
what they mean there:

    0 top-k        keep the k likeliest tokens (0: off)
    1 top-a        drop tokens with p < top_a * p_max**2 (0: off)
    2 top-p        keep the likeliest tokens whose mass reaches top_p (1: off), then min-p:
                   drop tokens with p < min_p * p_max (0: off)
    3 tail-free    cut where the sorted probabilities' second differences reach tfs (1: off)
    4 typical      keep the tokens closest to the entropy until their mass reaches typical (1: off)
    5 temperature  divide the logits (0: greedy)
    6 repetition   penalise tokens of the last repetition_penalty_range tokens (0: the whole
                   context): positive logits divided by the penalty, negative ones multiplied;
                   with a slope s in (0, 1), the older half of the range gets 1 + (penalty - 1) * s

Each sampler sees what the ones before it left (cut tokens are -inf). The default order puts
temperature before the cut-offs, as Hugging Face ``generate`` and earlier softprompt do, so
seeded samples are the same as before; KoboldCpp's own default (and what KoboldAI Lite and
SillyTavern send) is ``KOBOLDCPP_ORDER``, with temperature last.

Temperatures below ``GREEDY_BELOW`` are greedy: that cold, sampling picks the likeliest token
anyway, and dividing by the coldest (1e-300) overflows. Greedy decoding takes the likeliest
token after the repetition penalty; the cut-offs always keep that token (but typical, which
greedy skips), so they are skipped too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import MAX_SEED
from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a sampler is made: the options alone need none
    import torch

Processor = Callable[
    ["torch.Tensor", "torch.Tensor"], "torch.Tensor"
]  # (ids (1, T), scores (1, V))

SAMPLER_NAMES = {
    0: "top-k",
    1: "top-a",
    2: "top-p and min-p",
    3: "tail-free",
    4: "typical",
    5: "temperature",
    6: "repetition penalty",
}
KOBOLDCPP_ORDER = (6, 0, 1, 3, 4, 2, 5)
DEFAULT_ORDER = (6, 5, 0, 1, 3, 2, 4)
GREEDY_BELOW = 1e-5


def _opt(default, help: str, metavar: str):
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class SamplingOptions:
    """Every sampling option, with softprompt's one set of defaults."""

    max_new_tokens: int = _opt(80, "new tokens at most", "N")
    temperature: float = _opt(0.8, "0 for greedy decoding", "T")
    top_p: float = _opt(0.95, "nucleus sampling mass, 1 = off", "P")
    top_k: int = _opt(0, "keep the K likeliest tokens, 0 = off", "K")
    top_a: float = _opt(0.0, "drop tokens below A x (top probability)^2, 0 = off", "A")
    min_p: float = _opt(0.0, "drop tokens below P x (top probability), 0 = off", "P")
    tfs: float = _opt(1.0, "tail-free sampling, 1 = off", "Z")
    typical: float = _opt(1.0, "typical sampling mass, 1 = off", "P")
    repetition_penalty: float = _opt(1.1, "1 = off", "R")
    repetition_penalty_range: int = _opt(
        0, "penalise the last N tokens (prompt included), 0 = all of them", "N"
    )
    repetition_penalty_slope: float = _opt(
        1.0, "below 1: the older half of the range gets a lighter penalty, 1 = off", "S"
    )
    sampler_order: tuple[int, ...] = _opt(
        DEFAULT_ORDER,
        "the order of the samplers, KoboldCpp's ids: 0 top-k, 1 top-a, 2 top-p and min-p, "
        "3 tail-free, 4 typical, 5 temperature, 6 repetition penalty",
        "IDS",
    )
    seed: int = _opt(0, "sampling seed", "N")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def problems(self) -> dict[str, str]:
        """{field: what is wrong with it}, for every bad option; empty when all are good."""
        out = {}
        for f in dataclasses.fields(self):
            msg = _check(f.name, getattr(self, f.name))
            if msg:
                out[f.name] = msg
        return out

    def check(self) -> SamplingOptions:
        """These options, or one ConfigError naming every bad one by its command-line flag."""
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(f"{flag(k)} {msg}" for k, msg in problems.items()))
        return self

    def processors(self, banned: Sequence[int] = ()) -> list[Processor]:
        """The logits processors, in ``sampler_order``; ``banned`` token ids are never picked.
        Greedy options keep only the repetition penalty: the rest cannot change the argmax
        (typical could, by dropping it; greedy means the likeliest token)."""
        procs = [_ban(list(banned))] if banned else []
        for sampler in self.sampler_order:
            if self.greedy and sampler != 6:
                continue
            procs += self._sampler(sampler)
        return procs

    def _sampler(self, sampler: int) -> list[Processor]:
        from transformers import TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper

        # Hugging Face's top-k, top-p and typical are KoboldCpp's (up to float rounding at
        # the boundary) and keep earlier softprompt's samples bit for bit.
        on = {
            0: self.top_k > 0,
            1: self.top_a > 0,
            3: self.tfs < 1,
            4: self.typical < 1,
            5: self.temperature != 1,
            6: self.repetition_penalty != 1,
        }
        if not on.get(sampler, True):
            return []
        if sampler == 0:
            return [TopKLogitsWarper(self.top_k)]
        if sampler == 1:
            return [_top_a(self.top_a)]
        if sampler == 2:
            procs = [TopPLogitsWarper(self.top_p)] if self.top_p < 1 else []
            return procs + ([_min_p(self.min_p)] if self.min_p > 0 else [])
        if sampler == 3:
            return [_tail_free(self.tfs)]
        if sampler == 4:
            return [TypicalLogitsWarper(self.typical)]
        if sampler == 5:
            return [_temperature(self.temperature)]
        return [
            _repetition(
                self.repetition_penalty,
                self.repetition_penalty_range,
                self.repetition_penalty_slope,
            )
        ]


FIELDS = {f.name: f for f in dataclasses.fields(SamplingOptions)}


def flag(name: str) -> str:
    """The command-line flag of an option: ``top_p`` -> ``--top-p``."""
    return "--" + name.replace("_", "-")


def resolve(base: SamplingOptions | None = None, **changes) -> SamplingOptions:
    """``base`` (default: the defaults) with ``changes`` (field names), checked."""
    opts = base if base is not None else SamplingOptions()
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
    if "sampler_order" in changes and changes["sampler_order"] is not None:
        changes["sampler_order"] = tuple(changes["sampler_order"])
    return dataclasses.replace(opts, **changes).check()


def parse_order(text: str) -> tuple[int, ...]:
    """``"6,0,1,3,4,2,5"`` (commas or spaces) as a tuple of ids; ValueError when not numbers."""
    return tuple(int(x) for x in text.replace(",", " ").split())


# ------------------------------------------------------------------------- checks


def _number(value, integral: bool) -> bool:
    kinds = (int,) if integral else (int, float)
    return (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and (integral or math.isfinite(value))
    )


_RULES: dict[str, tuple[bool, Callable[[float], bool], str]] = {
    # name: (integral, valid, what it must be)
    "max_new_tokens": (True, lambda v: v >= 1, "must be at least 1"),
    "temperature": (False, lambda v: v >= 0, "must be 0 (greedy) or more, e.g. 0.8"),
    "top_p": (False, lambda v: 0 < v <= 1, "must be in (0, 1], e.g. 0.95 (1 turns it off)"),
    "top_k": (True, lambda v: v >= 0, "must be 0 (off) or more, e.g. 40"),
    "top_a": (False, lambda v: v >= 0, "must be 0 (off) or more, e.g. 0.2"),
    "min_p": (False, lambda v: 0 <= v <= 1, "must be in [0, 1], e.g. 0.05 (0 turns it off)"),
    "tfs": (False, lambda v: 0 <= v <= 1, "must be in [0, 1], e.g. 0.95 (1 turns it off)"),
    "typical": (False, lambda v: 0 < v <= 1, "must be in (0, 1], e.g. 0.9 (1 turns it off)"),
    "repetition_penalty": (False, lambda v: v >= 1, "must be 1 (off) or more, e.g. 1.1"),
    "repetition_penalty_range": (
        True,
        lambda v: v >= 0,
        "must be 0 (the whole context) or more, e.g. 320",
    ),
    "repetition_penalty_slope": (False, lambda v: v >= 0, "must be 0 or more, e.g. 0.7"),
    "seed": (True, lambda v: 0 <= v <= MAX_SEED, f"must be in 0..{MAX_SEED}"),
}


def _check(name: str, value) -> str | None:
    if name == "sampler_order":
        ids = isinstance(value, tuple) and all(_number(i, True) for i in value)
        if ids and sorted(value) == list(range(7)):
            return None
        return (
            "must list each sampler id 0-6 once ("
            + ", ".join(f"{i} {n}" for i, n in SAMPLER_NAMES.items())
            + f"), e.g. {','.join(map(str, KOBOLDCPP_ORDER))}"
        )
    integral, valid, msg = _RULES[name]
    if not _number(value, integral):
        return f"{msg} ({'a whole number' if integral else 'a finite number'})"
    return None if valid(value) else msg


# ------------------------------------------------------------------------- the samplers


def _ban(ids: list[int]) -> Processor:
    import torch

    def ban(_ids, scores):
        return scores.index_fill(-1, torch.tensor(ids, device=scores.device), -math.inf)

    return ban


def _temperature(t: float) -> Processor:
    return lambda _ids, scores: scores / t


def _top_a(a: float) -> Processor:
    import torch

    def top_a(_ids, scores):
        probs = torch.softmax(scores, dim=-1)
        top = probs.max(dim=-1, keepdim=True).values
        # the likeliest token always stays, even when a * p_max > 1
        return scores.masked_fill((probs < a * top * top) & (probs < top), -math.inf)

    return top_a


def _min_p(p: float) -> Processor:
    import torch

    def min_p(_ids, scores):
        probs = torch.softmax(scores, dim=-1)
        top = probs.max(dim=-1, keepdim=True).values
        return scores.masked_fill(probs < p * top, -math.inf)

    return min_p


def _tail_free(z: float) -> Processor:
    import torch

    def tail_free(_ids, scores):
        out = scores.clone()
        for row, s in enumerate(scores):
            n = int(torch.isfinite(s).sum())  # the tokens earlier samplers left
            if n <= 2:
                continue
            probs, order = torch.softmax(s, dim=-1).sort(descending=True)
            d1 = probs[: n - 1] - probs[1:n]
            d2 = (d1[:-1] - d1[1:]).abs()
            total = d2.sum()
            d2 = d2 / total if total > 1e-6 else torch.full_like(d2, 1 / len(d2))
            # the first cut at index >= 1 (one token always stays) where the mass passes z
            past = torch.nonzero(d2.cumsum(0)[1:] > z)
            if len(past):
                out[row, order[int(past[0]) + 1 :]] = -math.inf
        return out

    return tail_free


def _repetition(penalty: float, window: int, slope: float) -> Processor:
    import torch

    # KoboldCpp keeps a window of exactly `window` tokens (padded with token 0 when the
    # context is shorter; the padding is not penalised here): its newer half gets the full
    # penalty, the older half the reduced one. A slope of 0 or from 1 up means no reduction.
    reduced = 1 + (penalty - 1) * slope if 0 < slope < 1 else penalty

    def repetition(ids, scores):
        ctx = ids[:, -window:] if window else ids
        if ctx.shape[1] == 0:
            return scores
        span = window or ctx.shape[1]
        n_near = ctx.shape[1] if reduced == penalty else min(span // 2, ctx.shape[1])
        split = ctx.shape[1] - n_near
        out = scores
        for group, pen in ((ctx[:, :split], reduced), (ctx[:, split:], penalty)):
            if group.shape[1]:
                s = scores.gather(1, group)
                out = out.scatter(1, group, torch.where(s < 0, s * pen, s / pen))
        return out

    return repetition
