"""Models whose tokenizer puts a BOS token before every text (Llama, Mistral, Gemma...): every
sequence softprompt builds is ``[soft prompt][BOS][text]``, the layout KoboldAI and PEFT use
when they apply a soft prompt, in training, validation, eval, generate and serve. Models
without one (GPT-2, SmolLM2) keep ``[soft prompt][text]``.

The expected numbers are computed here from the model's own forward pass on the sequence
written out by hand, and the expected tokens from transformers' ``generate`` on the ids the
tokenizer gives by default."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BOS_ARCHS, assert_one_line_error, run_cli

from softprompt import SoftPrompt, evaluate, load_model
from softprompt.data import make_blocks, read_dataset, split_blocks, token_stream, tokenize_dataset
from softprompt.generate import encode_prompt, stream_ids
from softprompt.loss import block_loss
from softprompt.serve import Server

PROMPT = "It is a truth universally acknowledged, that a single man"
INIT_TEXT = "Mr. Darcy and Elizabeth Bennet"


@pytest.fixture(scope="module")
def models(tiny_models):
    return {
        a: load_model(str(tiny_models[a]), device="cpu", dtype="float32")
        for a in (*BOS_ARCHS, "gpt2", "llama")
    }


def _mean_ce(lm, soft: torch.Tensor, lead: list[int], blocks, first: int) -> float:
    """Mean cross-entropy of tokens ``first``..T-1 of each block, from one plain forward pass
    over ``[soft][lead][block]`` per block."""
    emb = lm.model.get_input_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            block = torch.as_tensor(np.asarray(block), dtype=torch.long)
            ids = torch.tensor(list(lead) + block.tolist())
            x = torch.cat([soft.to(emb.weight.dtype), emb(ids)])[None]
            logp = torch.log_softmax(lm.model(inputs_embeds=x).logits[0].double(), -1)
            n = soft.shape[0] + len(lead)
            for j in range(first, len(block)):
                total -= logp[n + j - 1, block[j]].item()
                count += 1
    return total / count


def test_bos_ids_follow_the_tokenizer(models):
    for arch in BOS_ARCHS:
        lm = models[arch]
        assert lm.bos_ids == [lm.tokenizer.bos_token_id]
        assert lm.tokenizer(PROMPT)["input_ids"][0] == lm.tokenizer.bos_token_id
    assert models["gpt2"].bos_ids == [] and models["llama"].bos_ids == []


@pytest.mark.parametrize("arch", [*BOS_ARCHS, "gpt2"])
def test_block_loss_is_soft_then_bos_then_text(models, arch):
    """Loss and gradient equal those of the model's logits over [soft][BOS][block], every
    block token predicted (the first one from the BOS position)."""
    lm = models[arch]
    torch.manual_seed(0)
    soft = torch.randn(3, lm.embed_dim, requires_grad=True)
    block = torch.randint(2, 300, (2, 9))
    lead = torch.tensor(lm.bos_ids, dtype=torch.long) if lm.bos_ids else None
    got = block_loss(lm.model, soft, block, lead=lead)
    (g_got,) = torch.autograd.grad(got, soft)
    ids = torch.cat([torch.tensor(lm.bos_ids, dtype=torch.long).expand(2, -1), block], 1)
    x = torch.cat([soft.expand(2, -1, -1), lm.model.get_input_embeddings()(ids)], 1)
    n = 3 + len(lm.bos_ids)
    logits = lm.model(inputs_embeds=x).logits[:, n - 1 : n - 1 + 9]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), block.reshape(-1))
    (g_want,) = torch.autograd.grad(want, soft)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def _val_blocks(lm, corpus, block_size, seed=1729):
    corpus_ = tokenize_dataset(read_dataset(corpus), lm.tokenizer)
    blocks = make_blocks(token_stream(corpus_, lm.eos_token_id, seed), block_size)
    return split_blocks(blocks, 0.05, 2)[1]


@pytest.mark.parametrize("arch", BOS_ARCHS)
def test_training_validates_on_the_bos_layout(models, arch, corpus, tmp_path):
    """The run's step-0 validation loss is that of [soft][BOS][block] for its initial soft
    prompt, and the files record the layout."""
    from softprompt import train

    lm = models[arch]
    torch.manual_seed(1)
    init = SoftPrompt(torch.randn(4, lm.embed_dim) * 0.1, {"name": "init"})
    init.save(tmp_path / "init.safetensors")
    result = train(
        dataset=str(corpus),
        output=str(tmp_path / "out"),
        model=lm,
        init_from=str(tmp_path / "init.safetensors"),
        block_size=24,
        batch_size=2,
        max_steps=2,
        val_max_blocks=2,
        progress=False,
        report=False,
        compile=False,
    )
    val = _val_blocks(lm, corpus, 24)
    bos = _mean_ce(lm, init.tensor, lm.bos_ids, val, 0)
    assert result.val_loss_before == pytest.approx(bos, rel=1e-5)
    # the old layout, [soft][block], gives another number: the test tells them apart
    assert abs(_mean_ce(lm, init.tensor, [], val, 0) - bos) > 1e-3
    assert SoftPrompt.load(result.files["safetensors"]).meta["layout"] == (
        "[soft prompt][BOS][text]"
    )


@pytest.mark.parametrize("arch", BOS_ARCHS)
def test_eval_rows_all_start_with_bos(models, arch, corpus):
    """soft prompt: [soft][BOS][text]; no prompt: [BOS][text]; init text: [BOS][init][text];
    every row scores all T tokens of each block."""
    lm = models[arch]
    torch.manual_seed(0)
    sp = SoftPrompt(torch.randn(4, lm.embed_dim), {"init": "text", "init_text": INIT_TEXT})
    result = evaluate(lm, sp, corpus, block_size=24, max_blocks=3, batch_size=2)
    corpus_ = tokenize_dataset(read_dataset(corpus), lm.tokenizer)
    blocks = make_blocks(token_stream(corpus_, lm.eos_token_id, 1729), 24)[-3:]
    init_ids = lm.tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"][:4]
    empty = torch.zeros(0, lm.embed_dim)
    bos = lm.bos_ids
    assert result.tokens_scored == 3 * 24 and result.bos
    assert result["soft_prompt"].loss == pytest.approx(
        _mean_ce(lm, sp.tensor, bos, blocks, 0), rel=1e-5
    )
    assert result["none"].loss == pytest.approx(_mean_ce(lm, empty, bos, blocks, 0), rel=1e-5)
    assert result["init_text"].loss == pytest.approx(
        _mean_ce(lm, empty, bos + init_ids, blocks, 0), rel=1e-5
    )
    assert result["init_text"].prefix_tokens == 4
    assert "tokens 1..24" in result.table() and "BOS" in result.table()


def test_eval_without_bos_is_unchanged(models, corpus):
    lm = models["gpt2"]
    sp = SoftPrompt(torch.randn(4, lm.embed_dim), {})
    result = evaluate(lm, sp, corpus, block_size=24, max_blocks=2)
    corpus_ = tokenize_dataset(read_dataset(corpus), lm.tokenizer)
    blocks = make_blocks(token_stream(corpus_, lm.eos_token_id, 1729), 24)[-2:]
    assert result.tokens_scored == 2 * 23 and not result.bos
    assert result["none"].loss == pytest.approx(
        _mean_ce(lm, torch.zeros(0, lm.embed_dim), [], blocks, 1), rel=1e-5
    )
    assert "tokens 2..24" in result.table()


def _hf_greedy(lm, soft: torch.Tensor, ids: list[int], n: int, cut: bool = False) -> list[int]:
    """transformers' own greedy generate from [soft][ids] (``cut``: up to the first EOS)."""
    emb = lm.model.get_input_embeddings()(torch.tensor([ids]))
    x = torch.cat([soft[None].to(emb.dtype), emb], 1)
    out = lm.model.generate(
        inputs_embeds=x,
        attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=lm.eos_token_id,
        eos_token_id=None,
    )[0].tolist()[-n:]
    return out[: out.index(lm.eos_token_id)] if cut and lm.eos_token_id in out else out


@pytest.mark.parametrize("arch", [*BOS_ARCHS, "gpt2"])
def test_generate_puts_bos_after_the_soft_prompt(models, arch):
    """The prompt's ids are what the tokenizer gives by default (BOS first where it puts
    one), and the soft prompt goes before them."""
    lm = models[arch]
    assert encode_prompt(lm, PROMPT, 4, 10) == lm.tokenizer(PROMPT)["input_ids"]
    torch.manual_seed(0)
    soft = torch.randn(4, lm.embed_dim)
    ids = encode_prompt(lm, PROMPT, 4, 12)
    ours = list(
        stream_ids(
            lm,
            ids,
            soft,
            max_new_tokens=12,
            temperature=0,
            repetition_penalty=1.0,
            stop_at_eos=False,
        )
    )
    assert ours == _hf_greedy(lm, soft, lm.tokenizer(PROMPT)["input_ids"], 12)


def test_empty_prompt_is_bos_alone(models):
    assert encode_prompt(models["llama_bos"], "", 4, 10) == models["llama_bos"].bos_ids
    assert encode_prompt(models["gpt2"], "", 4, 10) == [models["gpt2"].eos_token_id]


@pytest.mark.parametrize("arch", BOS_ARCHS)
def test_cut_prompt_keeps_bos_first(models, arch):
    lm = models[arch]
    long_prompt = PROMPT * 40
    ids = encode_prompt(lm, long_prompt, 20, 50)
    assert ids[0] == lm.tokenizer.bos_token_id and len(ids) == lm.context_length - 20 - 50
    plain = lm.tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert ids[1:] == plain[-(len(ids) - 1) :]


def test_serve_lays_out_soft_bos_memory_prompt(models, tmp_path):
    lm = models["llama_bos"]
    torch.manual_seed(0)
    sp = SoftPrompt(torch.randn(4, lm.embed_dim), {"name": "x"})
    (tmp_path / "sp").mkdir()
    sp.save(tmp_path / "sp" / "x.safetensors")
    memory = "Chapter 1\n\n"
    with Server(lm, tmp_path / "sp", port=0) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = {
            "prompt": PROMPT,
            "memory": memory,
            "max_length": 10,
            "temperature": 0,
            "rep_pen": 1,
            "soft_prompt": "x.safetensors",
        }
        conn.request("POST", "/api/v1/generate", json.dumps(body))
        resp = conn.getresponse()
        text = json.loads(resp.read())["results"][0]["text"]
        conn.close()
    memory_ids = lm.tokenizer(memory, add_special_tokens=False)["input_ids"]
    prompt_ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = lm.bos_ids + memory_ids + prompt_ids  # memory and prompt are tokenized apart
    want = lm.tokenizer.decode(_hf_greedy(lm, sp.tensor, ids, 10, cut=True))
    assert resp.status == 200 and text == want and text


def test_resuming_a_run_made_without_bos_is_refused(tiny_models, corpus, tmp_path, capsys):
    """A checkpoint written before the BOS layout (it records no bos_ids) trained its soft
    prompt on [soft][text]: resuming it on a BOS model is refused unless --force; on a model
    without BOS nothing changed and it resumes."""
    for arch, refused in (("llama_bos", True), ("gpt2", False)):
        out = tmp_path / arch
        args = ["train", "--dataset", corpus, "--output", out, "--model", tiny_models[arch]]
        args += ["--block-size", 24, "--batch-size", 2, "--no-progress", "--no-report"]
        code, _, err = run_cli(capsys, *args, "--max-steps", 2)
        assert code == 0, err
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state.pop("bos_ids") == ([0] if refused else [])
        torch.save(state, out / "checkpoint.pt")
        code, _, err = run_cli(capsys, *args, "--max-steps", 3, "--resume")
        if refused:
            assert_one_line_error(code, err, "without the BOS token", "--force")
            code, _, err = run_cli(capsys, *args, "--max-steps", 3, "--resume", "--force")
        assert code == 0, err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_the_page_tries_the_soft_prompt_on_the_bos_layout(models, tiny_models, tmp_path):
    """The web page's try-it box: with and without the run's soft prompt, both laid out as
    [soft][BOS][prompt] and [BOS][prompt]."""
    from softprompt.config import TrainConfig, to_toml
    from softprompt.ui import OUTPUT_DIR, Generator

    lm = models["llama_bos"]
    torch.manual_seed(0)
    sp = SoftPrompt(torch.randn(4, lm.embed_dim), {"name": "x"})
    out = tmp_path / "run" / OUTPUT_DIR
    out.mkdir(parents=True)
    sp.save(out / "softprompt.safetensors")
    # float32, as ``lm`` is: the reference below is greedy on that model
    cfg = TrainConfig(
        dataset="d", output=str(out), model=str(tiny_models["llama_bos"]), dtype="float32"
    )
    (out / "config.toml").write_text(to_toml(cfg.to_dict()), encoding="utf-8")
    request = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}
    got = Generator().compare(tmp_path / "run", {**request, "repetition_penalty": 1})
    ids = lm.tokenizer(PROMPT)["input_ids"]
    empty = torch.zeros(0, lm.embed_dim)
    for key, soft in (("with", sp.tensor), ("without", empty)):
        want = _hf_greedy(lm, soft, ids, 8, cut=True)
        assert got[key] == lm.tokenizer.decode(want, skip_special_tokens=True), key
