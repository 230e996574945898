"""Training end to end on tiny random models of every supported architecture."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import ARCHS, stop_after

from softprompt import SoftPrompt, load_model, train
from softprompt.loss import block_loss
from softprompt.soft_prompt import prepend

FAST = dict(
    block_size=32, batch_size=2, max_steps=4, eval_every=2, save_every=2, progress=False, lr=0.05
)


def kobold_checks(zip_path, model_dim: int) -> dict:
    """The checks KoboldAI's loader applies to a soft prompt zip (fileops.checksp and
    spRequest): .npy header version, 2-D, dtype, width, fewer than 2048 tokens, finite,
    meta.json with the fields it reads."""
    with zipfile.ZipFile(zip_path) as z:
        assert {"tensor.npy", "meta.json"} <= set(z.namelist())
        with z.open("tensor.npy") as f:
            version = np.lib.format.read_magic(f)
            assert version in ((1, 0), (2, 0), (3, 0))
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
        tensor = np.load(io.BytesIO(z.read("tensor.npy")), allow_pickle=False)
        meta = json.loads(z.read("meta.json").decode("utf-8"))
    assert len(shape) == 2 and not fortran_order
    assert dtype in (np.dtype("V2"), np.float16, np.float32)
    assert shape[1] == model_dim
    assert shape[0] < 2048
    assert np.isfinite(tensor).all()
    assert isinstance(meta["name"], str) and isinstance(meta["description"], str)
    assert isinstance(meta.get("author", ""), (str, list))
    assert isinstance(meta["supported"], list)
    return meta


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_every_architecture(tiny_models, repetitive_corpus, tmp_path, arch):
    lm = load_model(str(tiny_models[arch]), device="cpu", dtype="float32")
    before = lm.model.get_input_embeddings().weight.clone()
    result = train(
        dataset=str(repetitive_corpus),
        output=str(tmp_path / "out"),
        model=lm,
        tokens=5,
        **{**FAST, "max_steps": 8, "lr": 0.3, "warmup": 0.0},
    )

    sp = result.soft_prompt
    assert sp.tensor.shape == (5, lm.embed_dim)
    assert sp.tensor.dtype == torch.float32
    # the model stays frozen: only the soft prompt changed
    assert torch.equal(before, lm.model.get_input_embeddings().weight)
    assert all(not p.requires_grad for p in lm.model.parameters())
    # training lowered the held-out loss (even random models can learn this text's unigrams)
    assert result.val_loss_after < result.val_loss_before
    meta = kobold_checks(result.files["kobold"], lm.embed_dim)
    assert meta["name"] == "repetitive" and meta["supported"] == [arch]
    loaded = SoftPrompt.load(result.files["safetensors"])
    assert torch.equal(loaded.tensor, sp.tensor)
    assert loaded.meta["steps"] == 8


def test_opt350_width_is_the_embedding_width(tiny_models):
    lm = load_model(str(tiny_models["opt350"]), device="cpu", dtype="float32")
    assert lm.embed_dim == 16 and lm.model.config.hidden_size == 32


def test_gemma_soft_vectors_live_in_the_scaled_embedding_space(tiny_models):
    """A soft prompt made of a token's embedding output gives the same logits as the token."""
    lm = load_model(str(tiny_models["gemma"]), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 17, 42, 9]])
    soft = lm.model.get_input_embeddings()(ids[0, :2]).float()  # includes Gemma's sqrt(d) scale
    with torch.no_grad():
        via_soft = lm.model(inputs_embeds=prepend(lm.model, soft, ids[:, 2:])).logits
        via_ids = lm.model(input_ids=ids).logits
    torch.testing.assert_close(via_soft, via_ids, rtol=1e-4, atol=1e-4)


def test_loss_covers_only_real_tokens(tiny_llama):
    """block_loss equals a direct computation: every block token predicted from the soft
    prompt and the tokens before it; the soft positions carry no label."""
    model = tiny_llama.model
    soft = torch.randn(3, tiny_llama.embed_dim)
    block = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        logits = model(inputs_embeds=prepend(model, soft, block)).logits  # (2, 11, V)
        want = torch.nn.functional.cross_entropy(
            logits[:, 2:10].reshape(-1, logits.shape[-1]), block.reshape(-1)
        )
        got = block_loss(model, soft, block)
    torch.testing.assert_close(got, want)


def test_python_api_writes_every_output(tiny_llama, corpus, tmp_path):
    out = tmp_path / "out"
    result = train(
        dataset=str(corpus), output=str(out), model=tiny_llama, name='My: "Prompt"/v1', **FAST
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "My_ _Prompt__v1.zip",
        "softprompt.safetensors",
        "config.toml",
        "metrics.jsonl",
        "checkpoint.pt",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 2, 4]
    assert result.tokens_seen == 4 * 2 * 32
    config = (out / "config.toml").read_text()
    assert "tokens = 20" in config and "block-size = 32" in config


def test_grad_accumulation_matches_a_bigger_batch(tiny_llama, corpus, tmp_path):
    common = dict(
        dataset=str(corpus),
        model=tiny_llama,
        block_size=32,
        max_steps=3,
        eval_every=0,
        progress=False,
        lr=0.05,
        val_fraction=0.1,
        max_grad_norm=0,
    )
    a = train(output=str(tmp_path / "a"), batch_size=4, grad_accum=1, **common)
    b = train(output=str(tmp_path / "b"), batch_size=2, grad_accum=2, **common)
    torch.testing.assert_close(a.soft_prompt.tensor, b.soft_prompt.tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["passage", "text", "vocab", "random"])
def test_init_methods(tiny_llama, corpus, tmp_path, init):
    opts = dict(init_text="It is a truth universally acknowledged") if init == "text" else {}
    result = train(
        dataset=str(corpus),
        output=str(tmp_path / "o"),
        model=tiny_llama,
        init=init,
        **{**FAST, "max_steps": 1},
        **opts,
    )
    n = result.soft_prompt.n_tokens
    if init == "text":
        ids = tiny_llama.tokenizer(
            "It is a truth universally acknowledged", add_special_tokens=False
        )["input_ids"]
        assert n == len(ids)
    else:
        assert n == 20


def test_the_default_start_is_a_passage_of_the_training_text(tiny_llama, corpus, tmp_path):
    """With neither --init nor --init-text, the soft prompt starts as the vectors of 20
    consecutive tokens of the training text (one step at a negligible rate keeps them)."""
    from softprompt.data import read_dataset, tokenize_dataset

    r = train(
        dataset=str(corpus),
        output=str(tmp_path / "o"),
        model=tiny_llama,
        **{**FAST, "max_steps": 1, "lr": 1e-9, "eval_every": 0},
    )
    assert r.soft_prompt.meta["init"] == "passage"
    table = tiny_llama.model.get_input_embeddings().weight.float()
    ids = torch.cdist(r.soft_prompt.tensor.float(), table).argmin(1).tolist()
    assert len(set(ids)) > 5  # words, not one token repeated
    texts = tokenize_dataset(read_dataset(str(corpus)), tiny_llama.tokenizer).ids
    eos = tiny_llama.eos_token_id  # a block may run from one file into the next
    stream = [t for a in texts for t in [*a.tolist(), eos]]
    assert any(stream[i : i + 20] == ids for i in range(len(stream) - 19))


def test_the_rate_warms_up_then_holds_or_decays_to_decay_to(tiny_llama, corpus, tmp_path):
    from softprompt.checkpoint import lr_schedule

    def rates(name, **opts):
        run = dict(FAST, max_steps=10, eval_every=0, save_every=0, warmup=0.2)
        train(dataset=str(corpus), output=str(tmp_path / name), model=tiny_llama, **run, **opts)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r["lr"] for r in map(json.loads, lines) if "lr" in r]

    lr = FAST["lr"]
    assert rates("default") == pytest.approx([lr / 3, 2 * lr / 3] + [lr] * 8)
    decayed = rates("decayed", decay_to=0.1)
    assert decayed[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])
    assert decayed == pytest.approx([lr * lr_schedule(10, 0.2, 0.1)(s) for s in range(10)])
    assert 0.1 * lr < decayed[-1] < 0.15 * lr  # the floor comes as the run ends
    assert all(a > b for a, b in zip(decayed[2:], decayed[3:], strict=False))


def test_a_run_from_before_decay_to_resumes_on_its_own_schedule(
    tiny_llama, corpus, tmp_path, monkeypatch
):
    """A run whose config.toml has no decay-to (written before the option existed) decayed
    to 0.1 x lr: resumed now, it goes on on that schedule and ends where it would have."""
    from softprompt.train import Interrupted

    common = dict(dataset=str(corpus), model=tiny_llama, **{**FAST, "max_steps": 6})
    full = train(output=str(tmp_path / "full"), decay_to=0.1, **common)
    with monkeypatch.context() as m:
        stop_after(m.setattr, 3)
        with pytest.raises(Interrupted):
            train(output=str(tmp_path / "old"), decay_to=0.1, **common)
    config = tmp_path / "old" / "config.toml"
    lines = config.read_text().splitlines()
    assert "decay-to = 0.1" in lines
    config.write_text("\n".join(x for x in lines if not x.startswith("decay-to")) + "\n")
    resumed = train(output=str(tmp_path / "old"), resume=True, **common)
    assert torch.equal(resumed.soft_prompt.tensor, full.soft_prompt.tensor)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_lr_auto_follows_the_scale_of_the_models_token_vectors(tiny_models, corpus, tmp_path, arch):
    """--lr auto (the default) is LR_PER_RMS x the RMS of the vectors the embedding puts out:
    Gemma's are scaled by sqrt(width), and so is its rate. config.toml keeps the number in its
    [decided] table, so a resume trains on at that rate."""
    from softprompt.config import read_toml
    from softprompt.plan import decide_lr
    from softprompt.soft_prompt import embedding_rms

    lm = load_model(str(tiny_models[arch]), device="cpu", dtype="float32")
    out = tmp_path / "o"
    run = {**FAST, "max_steps": 2, "warmup": 0.0, "lr": "auto"}
    train(dataset=str(corpus), output=str(out), model=lm, **run)
    rms = embedding_rms(lm.model, lm.tokenizer)
    table_rms = lm.model.get_input_embeddings().weight.float().pow(2).mean().sqrt().item()
    if arch == "gemma":
        assert rms == pytest.approx(table_rms * lm.embed_dim**0.5, rel=0.05)
    else:
        assert rms == pytest.approx(table_rms, rel=0.05)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [r["lr"] for r in map(json.loads, lines) if "lr" in r] == [decide_lr(rms)] * 2
    assert read_toml(out / "config.toml")["lr"] == "auto"
    assert read_toml(out / "config.toml", decided=True)["lr"] == decide_lr(rms)


def test_init_text_is_repeated_or_cut(tiny_llama):
    from softprompt.soft_prompt import embed_ids, init_tensor

    text = "Once upon a time"
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    table = embed_ids(tiny_llama.model, torch.tensor(ids))
    long = init_tensor(tiny_llama.model, tiny_llama.tokenizer, "text", len(ids) * 2 + 1, text)
    torch.testing.assert_close(long[: len(ids)], table)
    torch.testing.assert_close(long[len(ids) : 2 * len(ids)], table)
    short = init_tensor(tiny_llama.model, tiny_llama.tokenizer, "text", 2, text)
    torch.testing.assert_close(short, table[:2])


def test_vocab_init_avoids_special_tokens_and_is_seeded(tiny_llama):
    from softprompt.soft_prompt import embed_ids, init_tensor

    a = init_tensor(tiny_llama.model, tiny_llama.tokenizer, "vocab", 50, seed=1)
    b = init_tensor(tiny_llama.model, tiny_llama.tokenizer, "vocab", 50, seed=1)
    assert torch.equal(a, b)
    eos = embed_ids(tiny_llama.model, torch.tensor([tiny_llama.eos_token_id]))
    assert not (a == eos).all(dim=1).any()


def test_random_init_matches_the_embedding_spread(tiny_llama):
    from softprompt.soft_prompt import init_tensor

    r = init_tensor(tiny_llama.model, tiny_llama.tokenizer, "random", 200, seed=3)
    table_std = tiny_llama.model.get_input_embeddings().weight.std().item()
    assert 0.7 * table_std < r.std().item() < 1.3 * table_std


def test_adafactor_and_fractional_epochs(tiny_llama, repetitive_corpus, tmp_path):
    result = train(
        dataset=str(repetitive_corpus),
        output=str(tmp_path / "o"),
        model=tiny_llama,
        optimizer="adafactor",
        epochs=0.5,
        block_size=16,
        batch_size=2,
        progress=False,
        eval_every=0,
        lr=0.3,
        warmup=0.0,
    )
    # 0.5 epochs over the training blocks, 2 blocks per step
    n_blocks = (
        3 * len(tiny_llama.tokenizer("My dear Mr. Bennet, said his lady. " * 60)["input_ids"]) + 3
    ) // 16
    n_train = n_blocks - max(1, round(n_blocks * 0.05))
    assert result.steps == -(-n_train // 4)
    assert result.val_loss_after < result.val_loss_before


@pytest.mark.parametrize("optimizer", ["schedulefree", "adamw"])
def test_interrupt_saves_a_checkpoint_and_resume_is_bit_exact(
    tiny_llama, corpus, tmp_path, monkeypatch, optimizer
):
    from softprompt.train import Interrupted

    common = dict(
        dataset=str(corpus),
        model=tiny_llama,
        block_size=32,
        batch_size=2,
        grad_accum=2,
        eval_every=3,
        save_every=5,
        progress=False,
        lr=0.05,
        max_steps=7,
        optimizer=optimizer,
    )
    full = train(output=str(tmp_path / "full"), **common)
    with monkeypatch.context() as m:
        stop_after(m.setattr, 3)
        with pytest.raises(Interrupted, match="stopped at step 3 of 7.*--resume"):
            train(output=str(tmp_path / "part"), **common)
    assert not (tmp_path / "part" / "softprompt.safetensors").exists()
    resumed = train(output=str(tmp_path / "part"), resume=True, **common)
    assert torch.equal(full.soft_prompt.tensor, resumed.soft_prompt.tensor)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"loss"' in x] == list(range(1, 8))
    assert resumed.val_loss_before == full.val_loss_before


def test_schedule_free_steps_are_the_librarys_and_the_prompt_between_them_is_the_average():
    """softprompt moves schedule-free AdamW's soft prompt to its training point for each
    step and back to the average after (so validation, checkpoints and the written file see
    the average): the same run as the library's own use, train() once and eval() at the end."""
    from schedulefree import AdamWScheduleFree

    from softprompt.checkpoint import stepping

    torch.manual_seed(0)
    target, start = torch.randn(4, 8), torch.randn(4, 8)
    grads = [torch.randn(4, 8) for _ in range(6)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours, opt_theirs = (AdamWScheduleFree([p], lr=0.1) for p in (ours, theirs))

    def loss(p, noise):
        return ((p - target) ** 2).sum() + (p * noise).sum()

    opt_theirs.train()
    for noise in grads:
        with stepping(opt_ours):
            at = ours.detach().clone()  # where the gradient is taken
            loss(ours, noise).backward()
            opt_ours.step()
            opt_ours.zero_grad()
        assert torch.allclose(at, theirs.detach(), atol=1e-6)  # the same training point
        loss(theirs, noise).backward()
        opt_theirs.step()
        opt_theirs.zero_grad()
    opt_theirs.eval()
    assert torch.allclose(ours.detach(), theirs.detach(), atol=1e-6)
    z = opt_ours.state[ours]["z"]
    assert not torch.allclose(ours.detach(), z)  # the average, not the last iterate


def test_finished_run_can_be_extended_with_resume(tiny_llama, corpus, tmp_path):
    common = dict(
        dataset=str(corpus),
        model=tiny_llama,
        block_size=32,
        batch_size=2,
        progress=False,
        eval_every=0,
    )
    train(output=str(tmp_path / "o"), max_steps=2, **common)
    # from Python too, the output folder is enough: the rest comes from its config.toml
    more = train(
        output=str(tmp_path / "o"), max_steps=4, resume=True, model=tiny_llama, progress=False
    )
    assert more.steps == 4 and more.config.dataset == str(corpus)


def test_token_cache_is_used_and_keyed_by_content(tiny_llama, corpus, tmp_path):
    from softprompt.data import load_corpus

    first = load_corpus(corpus, tiny_llama.tokenizer)
    second = load_corpus(corpus, tiny_llama.tokenizer)
    assert not first.cached and second.cached
    assert all(np.array_equal(a, b) for a, b in zip(first.ids, second.ids, strict=True))
    (corpus / "chapter_01.txt").write_text("Changed text.\n", encoding="utf-8")
    third = load_corpus(corpus, tiny_llama.tokenizer)
    assert not third.cached
