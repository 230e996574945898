"""`evaluate` on a tiny model: every variant scores the same tokens, and the numbers match a
cross-entropy computed by hand from the model's logits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from softprompt import SoftPrompt, evaluate
from softprompt.cli import main
from softprompt.data import load_corpus, make_blocks, split_blocks, token_stream
from softprompt.errors import ConfigError, DataError
from softprompt.loss import loss_sums

INIT_TEXT = "Mr. Darcy and Elizabeth Bennet"


def _by_hand(model, prefix_ids=None, prefix_embeds=None, blocks=()) -> float:
    """Mean CE of tokens 1..T-1 of each block, from one plain full forward pass per block."""
    total, count = 0.0, 0
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for block in blocks:
            block = torch.as_tensor(block, dtype=torch.long)
            if prefix_embeds is not None:
                n = prefix_embeds.shape[0]
                x = torch.cat([prefix_embeds, emb(block)], 0)[None]
                logits = model(inputs_embeds=x).logits[0]
            else:
                ids = list(prefix_ids or []) + block.tolist()
                n = len(prefix_ids or [])
                logits = model(input_ids=torch.tensor([ids])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            for j in range(1, len(block)):
                total -= logp[n + j - 1, block[j]].item()
                count += 1
    return total / count


@pytest.fixture(scope="module")
def soft(tiny_llama):
    torch.manual_seed(0)
    return SoftPrompt(
        torch.randn(4, tiny_llama.embed_dim), {"name": "t", "init": "text", "init_text": INIT_TEXT}
    )


def _blocks(lm, corpus, size, seed=1729):
    c = load_corpus(corpus, lm.tokenizer)
    return make_blocks(token_stream(c, lm.eos_token_id, seed), size)


def test_numbers_match_a_direct_computation(tiny_llama, soft, corpus):
    lm = tiny_llama
    result = evaluate(lm, soft, corpus, block_size=24, max_blocks=3, batch_size=2)
    blocks = _blocks(lm, corpus, 24)[-3:]
    init_ids = lm.tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"][: soft.n_tokens]
    assert [v.key for v in result.variants] == ["soft_prompt", "none", "init_text"]
    assert result.tokens_scored == 3 * 23 and result.n_blocks == 3 and result.block_size == 24
    assert result["soft_prompt"].loss == pytest.approx(
        _by_hand(lm.model, prefix_embeds=soft.tensor, blocks=blocks), rel=1e-5
    )
    assert result["none"].loss == pytest.approx(_by_hand(lm.model, blocks=blocks), rel=1e-5)
    assert result["init_text"].loss == pytest.approx(
        _by_hand(lm.model, prefix_ids=init_ids, blocks=blocks), rel=1e-5
    )
    assert result["init_text"].prefix_tokens == 4
    for v in result.variants:
        assert v.perplexity == pytest.approx(math.exp(v.loss))


def test_empty_prefix_equals_no_prompt(tiny_llama):
    blocks = np.random.default_rng(0).integers(1, 300, size=(3, 16))
    empty = loss_sums(
        tiny_llama.model, torch.zeros(0, tiny_llama.embed_dim), blocks, 2, tiny_llama.device
    )
    assert empty[1] == 3 * 15
    assert empty[0] / empty[1] == pytest.approx(_by_hand(tiny_llama.model, blocks=blocks), rel=1e-5)


def test_val_fraction_scores_the_training_hold_out(tiny_llama, soft, corpus):
    lm = tiny_llama
    result = evaluate(lm, soft, corpus, block_size=32, val_fraction=0.05, max_blocks=2, seed=5)
    _, val = split_blocks(_blocks(lm, corpus, 32, seed=5), 0.05, 2)
    assert result.n_blocks == len(val) == 2
    assert result["none"].loss == pytest.approx(_by_hand(lm.model, blocks=val), rel=1e-5)


def test_no_init_text_row_without_text_init(tiny_llama, corpus):
    sp = SoftPrompt(torch.zeros(3, tiny_llama.embed_dim), {"init": "vocab"})
    result = evaluate(tiny_llama, sp, corpus, block_size=16, max_blocks=1)
    assert [v.key for v in result.variants] == ["soft_prompt", "none"]


def test_errors(tiny_llama, soft, corpus, tmp_path):
    with pytest.raises(ConfigError, match="--block-size"):
        evaluate(tiny_llama, soft, corpus, block_size=255)  # 4 soft tokens + 255 > 256
    with pytest.raises(ConfigError, match="--max-blocks"):
        evaluate(tiny_llama, soft, corpus, max_blocks=0)
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("Hi.", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than one block"):
        evaluate(tiny_llama, soft, tmp_path / "small", block_size=64)


def test_default_block_size_fits_the_context(tiny_llama, soft, corpus):
    result = evaluate(tiny_llama, soft, corpus, max_blocks=1)
    assert result.block_size == 256 - 4


def test_cli_eval_table_and_json(tiny_models, soft, corpus, tmp_path, capsys):
    path = tmp_path / "sp.zip"
    soft.save(path)
    base = [
        "eval",
        "--model",
        str(tiny_models["llama"]),
        "--softprompt",
        str(path),
        "--dataset",
        str(corpus),
        "--block-size",
        "24",
        "--max-blocks",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    assert main(base) == 0
    table = capsys.readouterr().out
    assert (
        "soft prompt (4 tokens)" in table
        and "no prompt" in table
        and "init text as a prompt" in table
    )
    assert main([*base, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["variants"]) == {"soft_prompt", "none", "init_text"}
    assert data["tokens_scored"] == 2 * 23
    none = data["variants"]["none"]
    assert none["delta_vs_none"] == 0 and none["perplexity"] == pytest.approx(
        math.exp(none["loss"])
    )


def test_cli_eval_errors(tiny_models, corpus, capsys):
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_models["llama"]),
            "--softprompt",
            "/nope.zip",
            "--dataset",
            str(corpus),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
