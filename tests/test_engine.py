"""The generation engine (softprompt/engine.py) on tiny random models: a replayed client
session gives, turn by turn, the tokens of cold starts (greedy and sampled), across soft
prompt switches, an aborted generation and a trimmed front; a kept cache is used only for
the same soft prompt and memory stays within its limits; the fast decode attention is
sdpa's; models whose cache is not plain run the plain loop."""

from __future__ import annotations

import threading

import pytest
import torch

from softprompt import load_model
from softprompt.engine import Engine, decode_attention, new_cache
from softprompt.generate import stream_ids

GREEDY = dict(temperature=0, repetition_penalty=1.0, stop_at_eos=False)
CHUNK = 8  # a small grid, so short prompts cross several grid lines


def _ids(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def _soft(lm, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, lm.embed_dim, generator=torch.Generator().manual_seed(seed))


def _run(lm, engine, ids, soft, n=12, cancel_after=None, **opts) -> list[int]:
    cancel = threading.Event()
    out = []
    for t in stream_ids(lm, ids, soft, engine=engine, max_new_tokens=n, cancel=cancel, **opts):
        out.append(t)
        if cancel_after is not None and len(out) >= cancel_after:
            cancel.set()
    return out


def _play(lm, run_turn) -> list[list[int]]:
    """A client's session: every turn resends the story so far (the last turn's new tokens
    and the next bit of the user's text included) to ``run_turn(soft, ids, abort)``, which
    returns the new tokens. The soft prompt switches (a, a, none, b, b, a), the fourth turn
    is aborted after 3 tokens, and the seventh cuts the story's first line."""
    names = ["Anna", "Bert", "Cleo", "Dora", "Emil", "Finn"]
    lines = [f"{name} sat on the mat and looked at the door.\n" for name in names]
    a, b, none = _soft(lm, 5, 1), _soft(lm, 11, 2), torch.zeros(0, lm.embed_dim)
    plan = [
        (a, None),
        (a, None),
        (none, None),
        (b, 3),
        (b, None),
        (a, None),
        (a, "trim"),
        (a, None),
    ]
    context = [i for line in lines for i in _ids(lm, line)]
    out = []
    for k, (soft, what) in enumerate(plan):
        if what == "trim":
            context = context[len(_ids(lm, lines[0])) :]
        made = run_turn(soft, context, what if isinstance(what, int) else None)
        out.append(made)
        context = context + made + _ids(lm, f" Then turn {k} came.")
    return out


def _replay(lm, engine, **opts) -> list[list[int]]:
    return _play(
        lm, lambda soft, ids, abort: _run(lm, engine, ids, soft, cancel_after=abort, **opts)
    )


@pytest.fixture(scope="module")
def bf16_llama(tiny_models):
    return load_model(str(tiny_models["llama"]), device="cpu", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reuse_replays_a_session_as_cold_starts(tiny_llama, bf16_llama, dtype):
    """Greedy: every turn with kept caches gives the tokens of a cold start, and from the
    second turn on with the same soft prompt it runs only the tail."""
    lm = tiny_llama if dtype == "float32" else bf16_llama
    warm = Engine(chunk=CHUNK, max_entries=3)
    cold = Engine(chunk=CHUNK, reuse=False)
    reused, computed = [], []

    def both(soft, ids, abort):
        got = _run(lm, warm, ids, soft, cancel_after=abort, **GREEDY)
        reused.append(warm.stats.reused)
        computed.append(warm.stats.computed)
        want = _run(lm, cold, ids, soft, cancel_after=abort, **GREEDY)
        assert got == want and len(got) == (abort or 12)
        assert cold.stats.reused == 0
        return got

    turns = _play(lm, both)
    # turn 2 (the soft prompt of turn 1) runs only turn 1's tokens, the new text and what
    # lay after turn 1's last grid line
    new_text = len(_ids(lm, " Then turn 0 came."))
    assert reused[0] == 0 and reused[1] > 0 and computed[1] <= 12 + new_text + CHUNK - 1
    assert reused[2] == 0 and reused[3] == 0  # a soft prompt not seen before: a new cache
    assert reused[4] > 0  # after the abort, the aborted turn's prefill is kept
    assert reused[5] > 0  # back to the first soft prompt: still kept (3 entries)
    assert reused[6] <= 5  # trimmed front: at most the soft prompt, in front of the cut
    assert reused[7] > reused[6]  # and the trimmed story is kept for the next turn
    if dtype == "float32":  # and the plain loop (one prefill, the model's cache) agrees
        assert _replay(lm, Engine(reuse=False, fast=False), **GREEDY) == turns


def test_sampling_with_a_seed_is_the_same_with_reuse(tiny_llama):
    """Kept caches hold only the prefill: sampling with a seed gives the cold start's tokens."""
    opts = dict(temperature=0.9, top_p=0.9, top_k=30, repetition_penalty=1.1, seed=5)
    warm = _replay(tiny_llama, Engine(chunk=CHUNK, max_entries=3), **opts)
    cold = _replay(tiny_llama, Engine(chunk=CHUNK, reuse=False), **opts)
    assert warm == cold


def test_a_soft_prompt_longer_than_a_chunk(tiny_llama):
    """A soft prompt over several grid chunks gives the logits of one whole prefill."""
    lm = tiny_llama
    soft, ids = _soft(lm, 19, 3), _ids(lm, "It was a dark and stormy night; the rain fell.")
    scores = {}
    for chunk in (4, 1000):
        run = Engine(chunk=chunk, reuse=False).session(lm, soft, ids)
        scores[chunk] = run.prefill()
        run.close()
    torch.testing.assert_close(scores[4], scores[1000], rtol=1e-4, atol=1e-4)
    plain = _run(lm, Engine(reuse=False, fast=False), ids, soft, **GREEDY)
    assert _run(lm, Engine(chunk=4), ids, soft, **GREEDY) == plain


def test_kept_caches_follow_the_soft_prompt_and_the_budget(tiny_llama):
    """A cache is used only for the very same soft prompt (one changed value: none reused);
    with one entry, a new soft prompt drops the old cache; a byte budget keeps nothing
    bigger than itself."""
    lm = tiny_llama
    ids = _ids(lm, "One two three four five six seven eight nine ten eleven twelve.")
    a = _soft(lm, 4, 1)
    engine = Engine(chunk=CHUNK, max_entries=1)
    _run(lm, engine, ids, a, n=3, **GREEDY)
    assert len(engine.kept) == 1 and engine.kept[0].length > 0
    _run(lm, engine, ids, a, n=3, **GREEDY)
    assert engine.stats.reused > 0
    changed = a.clone()
    changed[0, 0] += 1e-3
    _run(lm, engine, ids, changed, n=3, **GREEDY)
    assert engine.stats.reused == 0
    [entry] = engine.kept
    assert torch.equal(entry.soft, changed)  # the first soft prompt's cache was dropped
    _run(lm, engine, ids, a, n=3, **GREEDY)
    assert engine.stats.reused == 0
    small = Engine(chunk=CHUNK, max_bytes=1)
    _run(lm, small, ids, a, n=3, **GREEDY)
    assert small.kept == []
    off = Engine(chunk=CHUNK, reuse=False)
    _run(lm, off, ids, a, n=3, **GREEDY)
    assert off.kept == []
    engine.clear()
    assert engine.kept == []


def test_decode_attention_is_sdpas():
    """One query row over grouped key/value heads: the fast path gives sdpa's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 16, generator=g)
    k, v = torch.randn(1, 2, 37, 16, generator=g), torch.randn(1, 2, 37, 16, generator=g)
    fast, _ = decode_attention(module, q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_models_run_the_plain_loop(tiny_models):
    """A model whose cache is not one plain layer per layer (a sliding window) gets no
    in-place cache and keeps nothing; its tokens are the plain loop's."""
    from transformers import AutoModelForCausalLM, MistralConfig

    lm = load_model(str(tiny_models["mistral"]), device="cpu", dtype="float32")
    config = MistralConfig(**{**lm.model.config.to_dict(), "sliding_window": 4})
    torch.manual_seed(0)
    lm.model = AutoModelForCausalLM.from_config(config).eval()
    assert new_cache(lm.model, 16) is None
    ids = _ids(lm, "It was a dark and stormy night; the rain fell in torrents.")
    engine = Engine(chunk=CHUNK)
    got = _run(lm, engine, ids, torch.zeros(0, lm.embed_dim), **GREEDY)
    assert engine.kept == [] and engine.stats.reused == 0
    assert got == _run(lm, Engine(fast=False), ids, torch.zeros(0, lm.embed_dim), **GREEDY)


def test_the_compiled_step_gives_the_plain_steps_tokens(tiny_llama):
    """`serve --compile`: after the warm-up, a replayed session, greedy and sampled, gives
    the tokens of the uncompiled step, running compiled (no fallback) across contexts of
    every length without compiling again."""
    from torch._dynamo.utils import counters

    sampled = dict(temperature=0.9, top_p=0.9, top_k=30, repetition_penalty=1.1, seed=5)
    compiled = Engine(chunk=CHUNK, max_entries=3, compile=True)
    compiled.warm_up(tiny_llama)  # as `serve --compile` does before it listens
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and compiled.kept == []
    for opts in (GREEDY, sampled):
        want = _replay(tiny_llama, Engine(chunk=CHUNK, max_entries=3), **opts)
        assert _replay(tiny_llama, compiled, **opts) == want
    assert compiled.compile and compiled._compiled  # still on: nothing fell back
    assert counters["stats"]["unique_graphs"] == graphs  # and nothing compiled again


def test_a_step_that_cannot_compile_falls_back_with_a_warning(tiny_llama, monkeypatch, caplog):
    """Where torch.compile fails (here: after the model wrote to the cache, as a half-run
    graph would), the step runs uncompiled for good, with a warning, and the tokens are the
    plain step's; the warm-up leaves no cache behind."""
    calls = []

    def broken_compile(model, **kw):
        def run(*args, **kwargs):
            calls.append(1)
            model(*args, **kwargs)  # writes this position's keys and values
            raise RuntimeError("InductorError: no C++ compiler found\nmore lines")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(chunk=CHUNK, max_entries=3, compile=True)
    engine.warm_up(tiny_llama)
    assert not engine.compile and calls == [1] and engine.kept == []
    assert "could not be compiled (RuntimeError: InductorError: no C++ compiler found)" in (
        caplog.text
    )
    engine.compile = True  # once more, now in a real session
    want = _replay(tiny_llama, Engine(chunk=CHUNK, max_entries=3), **GREEDY)
    assert _replay(tiny_llama, engine, **GREEDY) == want
    assert not engine.compile and len(calls) == 2
