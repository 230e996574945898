"""The sampling options: each sampler against a small reference computation on fixed logits,
written here from its definition (KoboldCpp's, gpttype_adapter.cpp) in plain Python, the
sampler order, greedy for tiny temperatures, and the checks that name each bad option."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.sampling import DEFAULT_ORDER, KOBOLDCPP_ORDER, SamplingOptions, resolve

INF = -math.inf
LOGITS = [3.0, 2.2, 1.9, 1.0, 0.4, -0.3, -1.2, -2.5, 0.0, 1.5]  # no two alike
IDS = [0, 3, 5, 3, 8, 1, 9]  # the context so far, oldest first


# ----------------------------------------------------------------------- references


def probs(xs):
    top = max(x for x in xs if x > INF)
    e = [math.exp(x - top) if x > INF else 0.0 for x in xs]
    return [v / sum(e) for v in e]


def keep(xs, kept):
    return [x if i in kept else INF for i, x in enumerate(xs)]


def by_prob(xs):
    p = probs(xs)
    return sorted((i for i in range(len(xs)) if xs[i] > INF), key=lambda i: -p[i]), p


def ref_top_k(xs, k):
    return keep(xs, set(by_prob(xs)[0][:k]))


def ref_top_a(xs, a):
    p = probs(xs)  # the likeliest token stays even when a x p_max > 1 (KoboldCpp's min_keep)
    return keep(xs, {i for i in range(len(xs)) if p[i] >= min(a * max(p) ** 2, max(p))})


def ref_min_p(xs, m):
    p = probs(xs)
    return keep(xs, {i for i in range(len(xs)) if p[i] >= m * max(p)})


def ref_top_p(xs, top):
    order, p = by_prob(xs)
    kept, mass = set(), 0.0
    for i in order:  # the smallest set of likeliest tokens whose mass reaches top
        kept.add(i)
        mass += p[i]
        if mass >= top:
            break
    return keep(xs, kept)


def ref_typical(xs, mass):
    p = probs(xs)
    entropy = -sum(q * math.log(q) for q in p if q > 0)
    live = [i for i in range(len(xs)) if xs[i] > INF]
    kept, total = set(), 0.0
    for i in sorted(live, key=lambda i: abs(-math.log(p[i]) - entropy)):
        kept.add(i)
        total += p[i]
        if total > mass:
            break
    return keep(xs, kept)


def ref_tail_free(xs, z):
    order, p = by_prob(xs)
    ps = [p[i] for i in order]
    d1 = [ps[i] - ps[i + 1] for i in range(len(ps) - 1)]
    d2 = [abs(d1[i] - d1[i + 1]) for i in range(len(d1) - 1)]
    d2 = [v / sum(d2) for v in d2]
    cut, mass = len(ps), 0.0
    for i, v in enumerate(d2):
        mass += v
        if mass > z and i >= 1:
            cut = i
            break
    return keep(xs, set(order[:cut]))


def ref_temperature(xs, t):
    return [x / t if x > INF else x for x in xs]


def ref_repetition(xs, ids, penalty, window, slope):
    recent = ids[-window:] if window else ids
    span = window or len(ids)
    n_near = min(span // 2, len(recent)) if 0 < slope < 1 else len(recent)
    near = set(recent[len(recent) - n_near :])
    far = set(recent[: len(recent) - n_near])
    out = []
    for t, x in enumerate(xs):
        pen = penalty if t in near else 1 + (penalty - 1) * slope if t in far else 1.0
        out.append(x / pen if x > 0 else x * pen)
    return out


# ----------------------------------------------------------------------- the code


def only(**kw) -> SamplingOptions:
    """Options with every sampler off but the ones given."""
    base = dict(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    return SamplingOptions(**{**base, **kw}).check()


def run(opts: SamplingOptions, xs=LOGITS, ids=IDS) -> list[float]:
    scores = torch.tensor([xs], dtype=torch.float32)
    context = torch.tensor([ids])
    for proc in opts.processors():
        scores = proc(context, scores)
    return scores[0].tolist()


def same(got, want):
    assert [g == INF for g in got] == [w == INF for w in want], (got, want)
    assert all(g == INF or abs(g - w) < 1e-5 for g, w in zip(got, want, strict=True)), (
        got,
        want,
    )


@pytest.mark.parametrize("k", [1, 3, 9])
def test_top_k(k):
    same(run(only(top_k=k)), ref_top_k(LOGITS, k))


@pytest.mark.parametrize("a", [0.2, 0.6, 5.0])
def test_top_a(a):
    same(run(only(top_a=a)), ref_top_a(LOGITS, a))


@pytest.mark.parametrize("m", [0.05, 0.3, 1.0])
def test_min_p(m):
    same(run(only(min_p=m)), ref_min_p(LOGITS, m))


@pytest.mark.parametrize("p", [0.3, 0.75, 0.97])
def test_top_p(p):
    same(run(only(top_p=p)), ref_top_p(LOGITS, p))


@pytest.mark.parametrize("mass", [0.2, 0.55, 0.9])
def test_typical(mass):
    same(run(only(typical=mass)), ref_typical(LOGITS, mass))


@pytest.mark.parametrize("z", [0.0, 0.5, 0.9, 0.99])
def test_tail_free(z):
    want = ref_tail_free(LOGITS, z)
    assert 1 <= sum(w > INF for w in want) <= len(LOGITS)
    same(run(only(tfs=z)), want)


def test_tail_free_sees_only_what_earlier_samplers_left():
    cut = ref_top_k(LOGITS, 6)
    same(run(only(top_k=6, tfs=0.6, sampler_order=(0, 3, 1, 2, 4, 5, 6))), ref_tail_free(cut, 0.6))


@pytest.mark.parametrize("t", [0.5, 1.7])
def test_temperature(t):
    same(run(only(temperature=t)), ref_temperature(LOGITS, t))


@pytest.mark.parametrize(
    "window, slope",
    [(0, 1.0), (6, 1.0), (6, 0.5), (3, 0.7), (10, 0.5), (0, 0.5), (1, 0.5), (6, 0.0), (6, 2.0)],
)
def test_repetition_penalty_range_and_slope(window, slope):
    opts = only(
        repetition_penalty=1.5, repetition_penalty_range=window, repetition_penalty_slope=slope
    )
    same(run(opts), ref_repetition(LOGITS, IDS, 1.5, window, slope))


def test_repetition_penalty_by_hand():
    """The last 6 tokens [3, 5, 3, 8, 1, 9]: the newer half {8, 1, 9} gets 1.5, the older
    {3, 5} 1 + 0.5 x 0.5 = 1.25; token 0 is out of range."""
    got = run(
        only(repetition_penalty=1.5, repetition_penalty_range=6, repetition_penalty_slope=0.5)
    )
    assert got[0] == 3.0
    assert got[3] == pytest.approx(1.0 / 1.25) and got[5] == pytest.approx(-0.3 * 1.25)
    assert got[1] == pytest.approx(2.2 / 1.5) and got[9] == pytest.approx(1.0)
    assert got[8] == 0.0 and got[2] == pytest.approx(1.9)


def compose(xs, order, t, top_p, min_p, k, a, z, mass, rep):
    steps = {
        0: lambda v: ref_top_k(v, k),
        1: lambda v: ref_top_a(v, a),
        2: lambda v: ref_min_p(ref_top_p(v, top_p), min_p),
        3: lambda v: ref_tail_free(v, z),
        4: lambda v: ref_typical(v, mass),
        5: lambda v: ref_temperature(v, t),
        6: lambda v: ref_repetition(v, IDS, rep, 4, 0.5),
    }
    for sampler in order:
        xs = steps[sampler](xs)
    return xs


@pytest.mark.parametrize(
    "order", [DEFAULT_ORDER, KOBOLDCPP_ORDER, (0, 1, 2, 3, 4, 5, 6), (5, 4, 3, 2, 1, 0, 6)]
)
def test_samplers_in_the_order_given(order):
    knobs = dict(t=2.5, top_p=0.9, min_p=0.02, k=8, a=0.05, z=0.97, mass=0.95, rep=1.3)
    opts = SamplingOptions(
        temperature=knobs["t"],
        top_p=knobs["top_p"],
        min_p=knobs["min_p"],
        top_k=knobs["k"],
        top_a=knobs["a"],
        tfs=knobs["z"],
        typical=knobs["mass"],
        repetition_penalty=knobs["rep"],
        repetition_penalty_range=4,
        repetition_penalty_slope=0.5,
        sampler_order=order,
    ).check()
    same(run(opts), compose(LOGITS, order, **knobs))


def test_order_changes_what_is_kept():
    """Temperature before top-p flattens the distribution, so top-p keeps more tokens."""
    first = only(temperature=3.0, top_p=0.6, sampler_order=(5, 0, 1, 2, 3, 4, 6))
    last = only(temperature=3.0, top_p=0.6, sampler_order=KOBOLDCPP_ORDER)
    assert sum(x > INF for x in run(first)) > sum(x > INF for x in run(last))


@pytest.mark.parametrize("t", [0.0, 1e-300, 5e-324, 9e-6])
def test_tiny_temperatures_are_greedy(t, tiny_llama):
    opts = SamplingOptions(temperature=t, top_k=3, min_p=0.5).check()
    assert opts.greedy and len(opts.processors()) == 1  # the repetition penalty only
    from softprompt.generate import stream_ids

    ids = tiny_llama.tokenizer("It is a truth", add_special_tokens=False)["input_ids"]
    empty = torch.zeros(0, tiny_llama.embed_dim)
    got = list(stream_ids(tiny_llama, ids, empty, opts, max_new_tokens=8))
    assert got == list(stream_ids(tiny_llama, ids, empty, temperature=0, max_new_tokens=8))


def test_defaults_are_one_set():
    opts = SamplingOptions()
    assert (opts.max_new_tokens, opts.temperature, opts.top_p, opts.top_k) == (80, 0.8, 0.95, 0)
    assert (opts.repetition_penalty, opts.repetition_penalty_range) == (1.1, 0)
    assert (opts.min_p, opts.top_a, opts.tfs, opts.typical) == (0.0, 0.0, 1.0, 1.0)
    assert opts.sampler_order == DEFAULT_ORDER and opts.problems() == {}


def test_every_bad_option_is_named():
    bad = SamplingOptions(
        max_new_tokens=0,
        temperature=-1.0,
        top_p=0.0,
        top_k=-1,
        top_a=-0.1,
        min_p=1.5,
        tfs=2.0,
        typical=0.0,
        repetition_penalty=0.9,
        repetition_penalty_range=-1,
        repetition_penalty_slope=-1.0,
        sampler_order=(0, 1, 2),
        seed=-3,
    )
    assert set(bad.problems()) == set(SamplingOptions.__dataclass_fields__)
    with pytest.raises(ConfigError) as e:
        bad.check()
    for flag in ("--max-new-tokens", "--top-p", "--min-p", "--tfs", "--sampler-order", "--seed"):
        assert flag in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "changes",
    [
        dict(top_k=True),
        dict(top_k=2.5),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(temperature="0.8"),
        dict(sampler_order=(0, 1, 2, 3, 4, 5, 5)),
        dict(sampler_order=("0", 1, 2, 3, 4, 5, 6)),
        dict(seed=2**64),
    ],
)
def test_wrong_types_are_problems_not_crashes(changes):
    with pytest.raises(ConfigError):
        resolve(**changes)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="top_q"):
        resolve(top_q=0.5)
