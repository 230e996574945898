"""Generation with and without a soft prompt on tiny random models: the sampling loop matches
Hugging Face generate, a soft prompt is the only thing that differs between the two paths,
stop sequences and context cutting work, and the CLI streams the text."""

from __future__ import annotations

import pytest
import torch

import softprompt
import softprompt.sampling
from softprompt import SoftPrompt, load_model
from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.generate import (
    Detokenizer,
    encode_prompt,
    fit_prompt,
    generate,
    stop_text,
    stream,
    stream_ids,
)
from softprompt.soft_prompt import embed_ids

PROMPT = "It is a truth universally acknowledged, that a single man"


def _hf_new_ids(lm, ids, **kwargs) -> list[int]:
    out = lm.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pad_token_id=lm.eos_token_id,
        **kwargs,
    )[0, len(ids) :].tolist()
    return out[: out.index(lm.eos_token_id)] if lm.eos_token_id in out else out


def _empty(lm) -> torch.Tensor:
    return torch.zeros(0, lm.embed_dim)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {
        a: load_model(str(tiny_models[a]), device="cpu", dtype="float32")
        for a in ("gpt2", "gpt_neox", "opt350", "gemma")
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt350", "gemma"])
def test_greedy_matches_model_generate(arch, tiny_llama, models):
    """Our KV-cache loop gives exactly the tokens of the model's own generate."""
    lm = tiny_llama if arch == "llama" else models[arch]
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ours = list(
        stream_ids(lm, ids, _empty(lm), max_new_tokens=24, temperature=0, repetition_penalty=1.3)
    )
    theirs = _hf_new_ids(lm, ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3)
    assert ours == theirs and len(ours) > 0


def test_sampling_matches_model_generate_with_same_seed(tiny_llama):
    lm = tiny_llama
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    opts = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2)
    ours = list(stream_ids(lm, ids, _empty(lm), max_new_tokens=30, seed=7, **opts))
    torch.manual_seed(7)
    theirs = _hf_new_ids(lm, ids, max_new_tokens=30, do_sample=True, **opts)
    assert ours == theirs


def test_typical_matches_model_generate(tiny_llama):
    lm = tiny_llama
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ours = list(
        stream_ids(
            lm,
            ids,
            _empty(lm),
            max_new_tokens=20,
            seed=3,
            temperature=1.0,
            top_p=1.0,
            typical=0.8,
            repetition_penalty=1.0,
        )
    )
    torch.manual_seed(3)
    theirs = _hf_new_ids(
        lm,
        ids,
        max_new_tokens=20,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        typical_p=0.8,
    )
    assert ours == theirs


def test_soft_prompt_is_the_only_difference(tiny_llama):
    """A soft prompt made of the embeddings of some tokens gives exactly what those tokens
    give as a hard prompt, with the same seed; an empty soft prompt gives what none gives."""
    lm = tiny_llama
    head = lm.tokenizer(" Chapter one. ", add_special_tokens=False)["input_ids"]
    soft = SoftPrompt(embed_ids(lm.model, torch.tensor(head)))
    for seed in (0, 1):
        opts = dict(
            max_new_tokens=25, temperature=1.0, top_p=0.9, seed=seed, repetition_penalty=1.0
        )
        with_soft = generate(lm, PROMPT, soft, **opts)
        hard = generate(lm, " Chapter one. " + PROMPT, None, **opts)
        assert with_soft == hard
        assert generate(lm, PROMPT, SoftPrompt(torch.zeros(0, lm.embed_dim)), **opts) == generate(
            lm, PROMPT, None, **opts
        )


def test_soft_prompt_changes_output_and_seed_reproduces(tiny_llama):
    lm = tiny_llama
    torch.manual_seed(0)
    soft = SoftPrompt(torch.randn(6, lm.embed_dim) * 3)
    a = generate(lm, PROMPT, soft, max_new_tokens=20, temperature=0)
    b = generate(lm, PROMPT, None, max_new_tokens=20, temperature=0)
    assert a != b
    assert generate(lm, PROMPT, soft, seed=5) == generate(lm, PROMPT, soft, seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    generate(lm, PROMPT, soft, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_python_api_names(tiny_llama):
    # softprompt.generate is the module, called as its function (see softprompt/__init__.py)
    assert softprompt.generate.generate is generate and callable(softprompt.generate)
    assert softprompt.generate.stream is stream


def test_stream_pieces_join_to_generate(tiny_llama):
    lm = tiny_llama
    pieces = list(stream(lm, PROMPT, None, max_new_tokens=30, temperature=0.7, seed=2))
    assert len(pieces) > 3
    assert "".join(pieces) == generate(lm, PROMPT, None, max_new_tokens=30, temperature=0.7, seed=2)
    ids = list(
        stream_ids(
            lm,
            encode_prompt(lm, PROMPT, 0, 30),
            _empty(lm),
            max_new_tokens=30,
            temperature=0.7,
            seed=2,
        )
    )
    assert "".join(pieces) == lm.tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenizer_holds_back_partial_characters(tiny_llama):
    tok = tiny_llama.tokenizer
    text = "caf\u00e9 \u2014 na\u00efve \U0001f600 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, [])
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    "pieces, stop, want",
    [
        (["Hello wor", "ld. Bye"], ["world"], "Hello "),
        (["ab", "c\n", "\nrest"], ["\n\n"], "abc"),
        (["one two"], ["zzz"], "one two"),
        (["x", "y", "z"], ["yz", "q"], "x"),
        (["stop here"], ["stop"], ""),
        (["a\n", "b"], ["\n\n"], "a\nb"),
    ],
)
def test_stop_text(pieces, stop, want):
    assert "".join(stop_text(pieces, stop)) == want


def test_stop_sequence_cuts_generation(tiny_llama):
    lm = tiny_llama
    full = generate(lm, PROMPT, None, max_new_tokens=40, temperature=0)
    assert len(full) > 12
    stop = full[8:11]
    cut = generate(lm, PROMPT, None, max_new_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_context_cutting(tiny_llama):
    lm = tiny_llama  # context 256
    assert lm.context_length == 256
    assert fit_prompt(list(range(300)), 256, 20, 50) == list(range(114, 300))
    long_prompt = " ".join(["the letter was written"] * 120)
    ids = lm.tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 256
    soft = SoftPrompt(torch.randn(20, lm.embed_dim))
    got = list(
        stream_ids(
            lm,
            encode_prompt(lm, long_prompt, 20, 50),
            soft.tensor,
            max_new_tokens=50,
            temperature=0,
            stop_at_eos=False,
        )
    )
    assert len(got) == 50  # soft + prompt + new tokens == 256: no overflow
    want = list(
        stream_ids(
            lm,
            ids[-(256 - 20 - 50) :],
            soft.tensor,
            max_new_tokens=50,
            temperature=0,
            stop_at_eos=False,
        )
    )
    assert got == want
    with pytest.raises(ConfigError, match="max-new-tokens"):
        generate(lm, "hi", soft, max_new_tokens=236)


def test_ban_eos_never_picks_it_and_runs_to_the_limit(tiny_llama):
    import copy
    import dataclasses

    ids = tiny_llama.tokenizer("It is a truth", add_special_tokens=False)["input_ids"]
    empty = torch.zeros(0, tiny_llama.embed_dim)
    first = next(stream_ids(tiny_llama, ids, empty, max_new_tokens=8, temperature=0))
    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(first)
    lm = dataclasses.replace(tiny_llama, tokenizer=tok)  # greedy now ends at once
    assert lm.eos_token_id == first
    assert list(stream_ids(lm, ids, empty, max_new_tokens=8, temperature=0)) == []
    banned = list(stream_ids(lm, ids, empty, max_new_tokens=8, temperature=0, ban_eos=True))
    assert len(banned) == 8 and first not in banned


def test_empty_prompt_starts_a_document(tiny_llama):
    out = generate(tiny_llama, "", None, max_new_tokens=5, temperature=0)
    assert isinstance(out, str)


def test_bad_options_are_one_error(tiny_llama):
    with pytest.raises(ConfigError) as e:
        generate(tiny_llama, "hi", None, temperature=-1, top_p=0, top_k=-2)
    assert (
        "--temperature" in str(e.value) and "--top-p" in str(e.value) and "--top-k" in str(e.value)
    )


def test_wrong_width_soft_prompt(tiny_llama):
    with pytest.raises(softprompt.SoftPromptError, match="width"):
        generate(tiny_llama, "hi", SoftPrompt(torch.zeros(3, 7)))


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def soft_file(tmp_path, tiny_llama):
    torch.manual_seed(1)
    path = tmp_path / "sp.safetensors"
    SoftPrompt(torch.randn(5, tiny_llama.embed_dim) * 3, {"name": "test"}).save(path)
    return path


def test_cli_generate_compare(tiny_models, soft_file, capsys):
    model = str(tiny_models["llama"])
    rc = main(
        [
            "generate",
            "--model",
            model,
            "--softprompt",
            str(soft_file),
            "--compare",
            "--temperature",
            "0",
            "--max-new-tokens",
            "15",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            PROMPT,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "--- with the soft prompt" in out and "--- without" in out
    lm = load_model(model, device="cpu", dtype="float32")
    sp = SoftPrompt.load(soft_file)
    with_sp = generate(lm, PROMPT, sp, max_new_tokens=15, temperature=0, repetition_penalty=1.1)
    without = generate(lm, PROMPT, None, max_new_tokens=15, temperature=0, repetition_penalty=1.1)
    assert out.index(PROMPT + with_sp) < out.index(PROMPT + without)


def test_cli_generate_samples_stop_and_prompt_file(tiny_models, tmp_path, capsys):
    model = str(tiny_models["llama"])
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    rc = main(
        [
            "generate",
            "--model",
            model,
            "--prompt-file",
            str(prompt_file),
            "-n",
            "2",
            "--seed",
            "4",
            "--max-new-tokens",
            "10",
            "--device",
            "cpu",
            "--no-echo",
            "--stop",
            "\\n",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("--- sample") == 2 and PROMPT not in out
    lm = load_model(model, device="cpu", dtype="float32")
    for seed in (4, 5):
        text = generate(
            lm, PROMPT, None, max_new_tokens=10, seed=seed, repetition_penalty=1.1, stop=["\n"]
        )
        assert text in out


def test_cli_generate_reads_stdin(tiny_models, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_models["llama"]),
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.startswith(PROMPT)


def test_cli_generate_errors_are_one_line(tiny_models, capsys):
    rc = main(["generate", "--model", str(tiny_models["llama"]), "--temperature", "-1", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--temperature" in err
    rc = main(["generate", "--model", str(tiny_models["llama"]), "--compare", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "--compare" in err


@pytest.mark.slow
def test_real_model_matches_its_own_generate(smollm):
    """On SmolLM2-135M: our loop gives the tokens of model.generate, and a soft prompt made of
    token embeddings gives exactly what those tokens give as a hard prompt."""
    lm = smollm
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ours = list(
        stream_ids(lm, ids, _empty(lm), max_new_tokens=20, temperature=0, repetition_penalty=1.0)
    )
    assert ours == _hf_new_ids(lm, ids, max_new_tokens=20, do_sample=False)
    head = lm.tokenizer("Chapter 1\n\n", add_special_tokens=False)["input_ids"]
    soft = embed_ids(lm.model, torch.tensor(head))
    opts = dict(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=3, repetition_penalty=1.0)
    with_soft = list(stream_ids(lm, ids, soft, **opts))
    assert with_soft == list(stream_ids(lm, head + ids, _empty(lm), **opts))


def test_stream_stops_when_cancelled(tiny_llama):
    import threading

    from softprompt.generate import Progress, stream_text

    cancel, progress = threading.Event(), Progress()
    ids = encode_prompt(tiny_llama, PROMPT, 0, 50)
    opts = dict(max_new_tokens=50, temperature=0, repetition_penalty=1.0)
    pieces = stream_text(
        tiny_llama,
        ids,
        _empty(tiny_llama),
        softprompt.sampling.resolve(**opts),
        ban_eos=True,
        cancel=cancel,
        progress=progress,
    )
    for i, _ in enumerate(pieces):
        if i == 2:
            cancel.set()
    assert progress.cancelled and progress.finish_reason == "stop"
    assert 3 <= progress.tokens < 10
    cancel.clear()
    assert list(stream(tiny_llama, PROMPT, None, cancel=cancel, **opts))
    cancel.set()  # set before the start: nothing is generated
    assert list(stream(tiny_llama, PROMPT, None, cancel=cancel, **opts)) == []


def test_cli_sampling_flags_are_the_sampling_options(tiny_models, capsys):
    from softprompt.cli import build_parser, sampling_from_args
    from softprompt.sampling import SamplingOptions

    assert sampling_from_args(build_parser().parse_args(["generate", "x"])) == SamplingOptions()
    model = str(tiny_models["llama"])
    flags = dict(
        max_new_tokens=12,
        temperature=1.3,
        top_p=0.9,
        top_k=50,
        top_a=0.01,
        min_p=0.02,
        tfs=0.97,
        typical=0.95,
        repetition_penalty=1.2,
        repetition_penalty_range=16,
        repetition_penalty_slope=0.5,
        seed=11,
    )
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    argv += ["--sampler-order", "6,0,1,3,4,2,5", "--no-echo", "--device", "cpu"]
    rc = main(["generate", "--model", model, *argv, PROMPT])
    assert rc == 0
    lm = load_model(model, device="cpu", dtype="float32")
    want = generate(lm, PROMPT, None, sampler_order=(6, 0, 1, 3, 4, 2, 5), **flags)
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.parametrize("t", ["1e-300", "5e-324"])
def test_cli_tiny_temperature_is_greedy(tiny_models, capsys, t):
    model = str(tiny_models["llama"])
    base = ["generate", "--model", model, "--max-new-tokens", "8", "--no-echo", PROMPT]
    assert main([*base, "--temperature", t]) == 0
    tiny = capsys.readouterr().out
    assert main([*base, "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--sampler-order", "1,2"], ["--sampler-order", "6,0,1,3,4,2,5"]),
        (["--sampler-order", "x"], ["--sampler-order"]),
        (["--tfs", "2", "--min-p", "-1"], ["--tfs", "--min-p"]),
        (["--repetition-penalty-range", "-1"], ["--repetition-penalty-range"]),
    ],
)
def test_cli_bad_sampling_flags_are_one_line(tiny_models, capsys, argv, needles):
    from conftest import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "generate", "--model", tiny_models["llama"], *argv, "hi")
    assert_one_line_error(code, err, *needles)
