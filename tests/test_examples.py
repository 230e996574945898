"""Training from examples: .jsonl (and .json) files of texts, prompt/completion pairs and
chats. What is checked here: each shape is read and stated, every bad line is one error
naming the file and line; the label mask is exactly the completion (the assistant turns),
token by token, against pieces written out by hand; a row's loss sees nothing of another
example (nor of the padding); validation holds out whole examples; a resumed run is bit
exact; the token cache is keyed by content and chat template; eval scores completions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli, stop_after

from softprompt import evaluate, load_model, train
from softprompt.data import (
    BatchSampler,
    Rows,
    load_corpus,
    read_dataset,
    split_rows,
    tokenize_dataset,
)
from softprompt.errors import DataError
from softprompt.examples import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from softprompt.loss import block_loss, loss_sums

# A chat template with plain-text markers (the tiny tokenizer has no chat special tokens):
# the generation prompt is the assistant's header, and each turn ends with a newline.
TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
BOS_TEMPLATE = "{{ bos_token }}" + TEMPLATE  # as Llama 3's template writes the BOS token

CHAT = [
    {"role": "system", "content": "Answer as Mr. Darcy."},
    {"role": "user", "content": "Do you dance?"},
    {"role": "assistant", "content": "Not if I can help it."},
    {"role": "user", "content": "And Elizabeth?"},
    {"role": "assistant", "content": "She is tolerable."},
]
# the same chat as the template renders it, cut by hand where the assistant turns are
CHAT_PIECES = [
    ("### system:\nAnswer as Mr. Darcy.\n### user:\nDo you dance?\n### assistant:\n", False),
    ("Not if I can help it.\n", True),
    ("### user:\nAnd Elizabeth?\n### assistant:\n", False),
    ("She is tolerable.\n", True),
]


@pytest.fixture(scope="module")
def chat_folders(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The tiny Llama without and with a BOS token, copied with a chat template."""
    from transformers import AutoTokenizer

    out = {}
    for arch, template in (("llama", TEMPLATE), ("llama_bos", BOS_TEMPLATE)):
        folder = tmp_path_factory.mktemp(f"chat_{arch}")
        shutil.copytree(tiny_models[arch], folder, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = template
        tok.save_pretrained(folder)
        out[arch] = str(folder)
    return out


@pytest.fixture(scope="module")
def chat_lm(chat_folders):
    return load_model(chat_folders["llama"], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def chat_bos_lm(chat_folders):
    return load_model(chat_folders["llama_bos"], device="cpu", dtype="float32")


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def pairs(n: int, start: int = 0) -> list[dict]:
    names = ["Elizabeth", "Jane", "Lydia", "Kitty", "Mary", "Darcy", "Bingley", "Collins"]
    return [
        {
            "prompt": f"Who called on {names[i % 8]} on day {i}? ",
            "completion": f"Mr. {names[(i * 3) % 8]} did.",
        }
        for i in range(start, start + n)
    ]


def chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} and {i + 1}?"},
                    {"role": "assistant", "content": f"It is {2 * i + 1}, madam."},
                ]
            }
        )
    return out


def tokens(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- shapes


def test_each_shape_is_read_and_named(tmp_path):
    write_jsonl(tmp_path / "a_text.jsonl", [{"text": "Plain text."}, {"text": "More text."}])
    write_jsonl(tmp_path / "b_pairs.jsonl", pairs(3))
    write_jsonl(tmp_path / "c_io.jsonl", [{"input": "2+2=", "output": "4", "id": 7}])
    alpaca = [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hello."},
    ]
    (tmp_path / "d_alpaca.json").write_text(json.dumps(alpaca), encoding="utf-8")
    write_jsonl(tmp_path / "e_chat.jsonl", [{"messages": CHAT}])
    (tmp_path / "f.txt").write_text("A text file.", encoding="utf-8")
    ds = read_dataset(tmp_path)
    assert ds.files == [
        "a_text.jsonl",
        "b_pairs.jsonl",
        "c_io.jsonl",
        "d_alpaca.json",
        "e_chat.jsonl",
        "f.txt",
    ]
    shapes = {f.name: f.shape for f in ds.examples}
    assert shapes == {
        "a_text.jsonl": "text",
        "b_pairs.jsonl": "prompt/completion",
        "c_io.jsonl": "input/output",
        "d_alpaca.json": "instruction/input/output",
        "e_chat.jsonl": "messages",
    }
    # {"text"} lines are texts, as a .txt file is
    assert ds.texts == ["Plain text.", "More text.", "A text file."]
    by_name = {f.name: f for f in ds.examples}
    assert by_name["c_io.jsonl"].items == [("2+2=", "4")]
    assert by_name["d_alpaca.json"].items == [
        (ALPACA_PROMPT.format(instruction="Add.", input="2 and 2"), "4"),
        (ALPACA_PROMPT_NO_INPUT.format(instruction="Greet."), "Hello."),
    ]
    assert by_name["e_chat.jsonl"].describe() == (
        'e_chat.jsonl: 1 {"messages"} chats rendered with the model\'s chat template, loss on '
        "the assistant turns"
    )
    assert by_name["b_pairs.jsonl"].describe("all").endswith("loss on every token (--loss-on all)")


BAD_LINES = [
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "line 2 is not JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 'line 2 has no "completion"'),
    ('{"prompt": "a", "completion": 3}\n', 'line 1: "completion" must be a string, not a number'),
    ('{"prompt": "a", "completion": "  "}\n', 'line 1: "completion" is empty'),
    (
        '{"prompt": "a", "completion": "b"}\n\n{"text": "c"}\n',
        "line 3 is a text example, but line 1",
    ),
    ('{"text": "a"}\n[1, 2]\n', "line 2 is an array, not an object"),
    ('{"title": "a"}\n', "line 1: not an example (its keys: title)"),
    ('{"messages": "hi"}\n', '"messages" must be a list of messages, not a string'),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', 'no message has the role "assistant"'),
    ('{"messages": [{"role": "assistant", "content": ""}]}\n', "the assistant's, is empty"),
    ('{"messages": [{"role": "user", "content": null}]}\n', '"content" must be a string, not null'),
    ('{"instruction": "a", "input": 1, "output": "b"}\n', '"input" must be a string, not a number'),
]


@pytest.mark.parametrize("content,needle", BAD_LINES)
def test_a_bad_line_is_named(tmp_path, content, needle):
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl") as e:
        read_dataset(tmp_path)
    assert needle in str(e.value) and "--skip-bad-files" in str(e.value)


def test_json_array_errors_name_the_item(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "x"}, {"text": 5}]', encoding="utf-8")
    with pytest.raises(DataError, match=r'a\.json item 2: "text" must be a string, not a number'):
        read_dataset(tmp_path)
    (tmp_path / "a.json").write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json holds an object, not an array of examples"):
        read_dataset(tmp_path)


def test_tables_get_a_hint(tmp_path):
    (tmp_path / "t.csv").write_text("prompt,completion\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.csv.*save examples as \.jsonl"):
        read_dataset(tmp_path)
    with pytest.raises(DataError, match=r"t\.csv is a \.csv table.*\.jsonl"):
        read_dataset(tmp_path / "t.csv")


def test_bad_file_is_skipped_and_counted(tmp_path, chat_folders, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "good.jsonl", pairs(40))
    (data / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n', "utf-8")
    out = tmp_path / "out"
    common = ["--model", chat_folders["llama"], "--max-steps", "1", "--no-progress"]
    code, _, err = run_cli(capsys, "train", "--dataset", data, "--output", out, *common)
    assert_one_line_error(code, err, "bad.jsonl line 2 is not JSON", "--skip-bad-files")
    assert not out.exists()
    code, _, err = run_cli(
        capsys,
        "train",
        "--dataset",
        data,
        "--output",
        out,
        "--skip-bad-files",
        "--no-report",
        *common,
    )
    assert code == 0, err
    assert "skipping" in err and "bad.jsonl line 2" in err and "skipped: bad.jsonl" in err
    assert "good.jsonl: 40 prompt/completion pairs, loss on the completions" in err


def test_chats_need_a_chat_template(tiny_models, tmp_path, capsys):
    write_jsonl(tmp_path / "chats.jsonl", chats(4))
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "train", "--dataset", tmp_path / "chats.jsonl", "--output", out,
        "--model", tiny_models["llama"], "--max-steps", "1", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "chats.jsonl holds chats", "no chat template")
    assert not out.exists()


# ----------------------------------------------------------------------------- label masks


def test_pair_labels_are_the_completion_and_eos(chat_lm, tmp_path):
    lm = chat_lm
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Who came? ", "completion": "Mr. Darcy."}])
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id)
    prompt, completion = tokens(lm, "Who came? "), tokens(lm, "Mr. Darcy.")
    want = [*prompt, *completion, lm.eos_token_id]
    assert c.example_ids[0].tolist() == want
    assert c.example_labels[0].tolist() == [False] * len(prompt) + [True] * (len(completion) + 1)


def test_chat_labels_are_the_assistant_turns_token_by_token(chat_lm, tmp_path):
    lm = chat_lm
    write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id)
    want_ids, want_labels = [], []
    for text, label in CHAT_PIECES:
        ids = tokens(lm, text)
        want_ids += ids
        want_labels += [label] * len(ids)
    assert c.example_ids[0].tolist() == want_ids
    assert c.example_labels[0].tolist() == want_labels
    # the pieces are the template's own rendering, and the labels read back as the turns
    rendered = lm.tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert "".join(t for t, _ in CHAT_PIECES) == rendered
    labelled = c.example_ids[0][c.example_labels[0]].tolist()
    assert lm.tokenizer.decode(labelled) == "Not if I can help it.\nShe is tolerable.\n"


def test_a_template_that_writes_bos_gets_one_bos(chat_bos_lm, tmp_path):
    """[soft][BOS][example]: the BOS the template writes is the layout's, not a second one."""
    lm = chat_bos_lm
    assert lm.bos_ids == [lm.tokenizer.bos_token_id]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids)
    want = [i for text, _ in CHAT_PIECES for i in tokens(lm, text)]
    assert c.example_ids[0].tolist() == want  # the leading BOS is gone
    assert lm.tokenizer.bos_token_id not in c.example_ids[0].tolist()


def test_loss_on_all_labels_every_training_token_but_validation_scores_completions(
    chat_lm, tmp_path
):
    lm = chat_lm
    write_jsonl(tmp_path / "p.jsonl", pairs(20))
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id)
    split = split_rows(c, lm.eos_token_id, 64, 1, 0.1, 64, loss_on="all")
    assert all(m.all() for m in split.train.labels)
    assert not any(m.all() for m in split.val.labels)
    completion = split_rows(c, lm.eos_token_id, 64, 1, 0.1, 64)
    assert not any(m.all() for m in completion.train.labels)


# ----------------------------------------------------------------------------- rows and loss


def test_validation_holds_out_whole_examples_whatever_the_block_size(chat_lm, tmp_path):
    lm = chat_lm
    write_jsonl(tmp_path / "p.jsonl", pairs(40))
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id)
    split = split_rows(c, lm.eos_token_id, 64, 7, 0.1, 64)
    assert (len(split.train), len(split.val), split.too_long) == (36, 4, 0)
    as_tuples = lambda rows: {tuple(a.tolist()) for a in rows.ids}  # noqa: E731
    assert not as_tuples(split.train) & as_tuples(split.val)
    assert as_tuples(split.train) | as_tuples(split.val) == {
        tuple(a.tolist()) for a in c.example_ids
    }
    # a block too small for some examples leaves them out of either side, counted
    shortest = min(len(a) for a in c.example_ids)
    small = split_rows(c, lm.eos_token_id, shortest, 7, 0.1, 64)
    assert 0 < small.too_long < 40 and len(small.train) + len(small.val) == 40 - small.too_long
    assert as_tuples(small.val) <= as_tuples(split.val)


def test_a_batch_pads_after_each_example_and_only_labels_count(chat_lm, tmp_path):
    lm = chat_lm
    write_jsonl(tmp_path / "p.jsonl", pairs(6))
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id)
    rows = split_rows(c, lm.eos_token_id, 64, 1, 0.0, 64).train
    ids, mask = rows.take([0, 1, 2])
    assert ids.shape[1] % 16 == 0 and ids.shape[1] >= max(len(rows.ids[i]) for i in range(3))
    for r in range(3):
        n = len(rows.ids[r])
        assert ids[r, :n].tolist() == rows.ids[r].tolist()
        assert mask[r, :n].tolist() == rows.labels[r].tolist() and not mask[r, n:].any()


def _alone(lm, soft, lead, example, labels) -> list[float]:
    """The losses of an example's labels from one forward pass over [soft][lead][example]
    alone: nothing else in the sequence, no padding."""
    emb = lm.model.get_input_embeddings()
    ids = torch.tensor([*lead, *example.tolist()])
    x = torch.cat([soft, emb(ids)])[None]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(inputs_embeds=x).logits[0].double(), -1)
    n = soft.shape[0] + len(lead)
    return [-logp[n + j - 1, example[j]].item() for j in range(len(example)) if labels[j]]


@pytest.mark.parametrize("which", ["chat_lm", "chat_bos_lm"])
def test_no_label_sees_another_example(which, request, tmp_path):
    """Each label's loss in a padded batch of different examples equals its loss with the
    example alone behind the soft prompt (and BOS): no other example, no padding, is seen."""
    lm = request.getfixturevalue(which)
    write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, *chats(3)])
    write_jsonl(tmp_path / "p.jsonl", pairs(3))
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids)
    rows = split_rows(c, lm.eos_token_id, 128, 1, 0.0, 64).train
    torch.manual_seed(0)
    soft = torch.randn(3, lm.embed_dim) * 0.1
    lead = torch.tensor(lm.bos_ids) if lm.bos_ids else None
    order = list(range(len(rows)))
    ids, mask = rows.take(order)
    got = block_loss(lm.model, soft, torch.from_numpy(ids), "none", lead, torch.from_numpy(mask))
    want = [x for i in order for x in _alone(lm, soft, lm.bos_ids, rows.ids[i], rows.labels[i])]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
    # and the mean is over the labels
    mean = block_loss(lm.model, soft, torch.from_numpy(ids), lead=lead, mask=torch.from_numpy(mask))
    assert mean.item() == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_masked_loss_and_gradient_match_cross_entropy(tiny_llama):
    """The fused head skips the masked rows: its loss and gradient are those of plain
    cross-entropy over the kept positions."""
    lm = tiny_llama
    torch.manual_seed(0)
    soft = torch.randn(3, lm.embed_dim, requires_grad=True)
    block = torch.randint(2, 300, (2, 9))
    mask = torch.rand(2, 9) > 0.5
    mask[0, 4] = True
    got = block_loss(lm.model, soft, block, mask=mask)
    (g_got,) = torch.autograd.grad(got, soft)
    x = torch.cat([soft.expand(2, -1, -1), lm.model.get_input_embeddings()(block)], 1)
    logits = lm.model(inputs_embeds=x).logits[:, 2 : 2 + 9]
    want = F.cross_entropy(logits[mask], block[mask])
    (g_want,) = torch.autograd.grad(want, soft)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    # a mask of every token is no mask
    full = block_loss(lm.model, soft, block, mask=torch.ones(2, 9, dtype=torch.bool))
    torch.testing.assert_close(full, block_loss(lm.model, soft, block), rtol=1e-6, atol=1e-6)


def test_text_only_batches_are_unchanged(tiny_llama, corpus):
    """Plain text keeps no mask and the very batches it had: the blocks, in the sampler's
    order."""
    from softprompt.data import make_blocks, token_stream

    c = load_corpus(corpus, tiny_llama.tokenizer)
    blocks = make_blocks(token_stream(c, tiny_llama.eos_token_id, 3), 32)
    split = split_rows(c, tiny_llama.eos_token_id, 32, 3, 0.05, 64)
    assert split.train.ids == [] and np.array_equal(split.train.blocks, blocks[: len(split.train)])
    sampler = BatchSampler(split.train, 4, 3, torch.device("cpu"))
    ids, mask = sampler.batch_with_mask(10)
    perm = torch.randperm(
        len(blocks[: len(split.train)]), generator=torch.Generator().manual_seed(3 * 100_003)
    )
    assert mask is None and torch.equal(ids, torch.from_numpy(blocks[perm[10:14].numpy()]))


# ----------------------------------------------------------------------------- training


def test_trains_on_chats_and_resumes_bit_exact(chat_folders, tmp_path, monkeypatch):
    from softprompt.train import Interrupted

    lm = load_model(chat_folders["llama"], device="cpu", dtype="float32")
    write_jsonl(tmp_path / "c.jsonl", chats(24))
    write_jsonl(tmp_path / "p.jsonl", pairs(24))
    common = dict(
        dataset=str(tmp_path),
        model=lm,
        batch_size=3,
        grad_accum=2,
        eval_every=3,
        save_every=5,
        progress=False,
        lr=0.1,
        max_steps=7,
        block_size=64,
    )
    corpus = load_corpus(str(tmp_path), lm.tokenizer, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids)
    rows = split_rows(corpus, lm.eos_token_id, 64, 1729, 0.05, 64).train
    full = train(output=str(tmp_path / "full"), **common)
    with monkeypatch.context() as m:
        stop_after(m.setattr, 3)
        with pytest.raises(Interrupted):
            train(output=str(tmp_path / "part"), **common)
    resumed = train(output=str(tmp_path / "part"), resume=True, **common)
    assert torch.equal(full.soft_prompt.tensor, resumed.soft_prompt.tensor)
    assert full.val_loss_after < full.val_loss_before
    report = (tmp_path / "full" / "report.md").read_text()
    assert "The example's completion:" in report
    # tokens seen are the examples' own (42 of them), not 42 blocks of 64
    mean = np.mean([len(a) for a in rows.ids])
    assert full.tokens_seen == round(7 * 6 * mean) < 7 * 6 * 64
    assert [m["tokens"] for m in full.metrics if "tokens" in m][-1] == full.tokens_seen


def test_validation_is_the_completion_loss(chat_lm, tmp_path):
    """The run's step-0 validation loss is the mean loss of the held-out examples'
    completion tokens, each example alone behind the soft prompt."""
    from softprompt import SoftPrompt

    lm = chat_lm
    write_jsonl(tmp_path / "p.jsonl", pairs(30))
    torch.manual_seed(1)
    init = SoftPrompt(torch.randn(4, lm.embed_dim) * 0.1, {"name": "init"})
    init.save(tmp_path / "init.safetensors")
    result = train(
        dataset=str(tmp_path / "p.jsonl"),
        output=str(tmp_path / "out"),
        model=lm,
        init_from=str(tmp_path / "init.safetensors"),
        max_steps=1,
        progress=False,
        report=False,
        loss_on="all",  # training on every token; validation still on the completions
    )
    c = load_corpus(tmp_path / "p.jsonl", lm.tokenizer, eos_id=lm.eos_token_id)
    val = split_rows(c, lm.eos_token_id, 256, 1729, 0.05, 64).val
    losses = [
        x
        for a, m in zip(val.ids, val.labels, strict=True)
        for x in _alone(lm, init.tensor, [], a, m)
    ]
    assert result.val_loss_before == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert result.config.loss_on == "all"


def test_too_long_examples_are_counted_or_refused(chat_lm, tmp_path, caplog):
    lm = chat_lm
    long = {"prompt": "word " * 200, "completion": "done"}
    write_jsonl(tmp_path / "p.jsonl", [*pairs(30), long, long])
    with caplog.at_level("INFO", logger="softprompt"):
        train(
            dataset=str(tmp_path / "p.jsonl"), output=str(tmp_path / "o"), model=lm,
            max_steps=1, block_size=48, progress=False, report=False,
        )  # fmt: skip
    assert "32 examples, 2 longer than 48 tokens left out" in caplog.text
    with pytest.raises(
        DataError, match="0 of its 32 examples fit in --block-size 8.*raise --block-size"
    ):
        train(
            dataset=str(tmp_path / "p.jsonl"), output=str(tmp_path / "o2"), model=lm,
            max_steps=1, block_size=8, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "o2").exists()


def test_token_cache_is_keyed_by_content_and_template(chat_folders, tmp_path):
    from transformers import AutoTokenizer

    write_jsonl(tmp_path / "c.jsonl", chats(5))
    tok = AutoTokenizer.from_pretrained(chat_folders["llama"])
    first = load_corpus(tmp_path, tok)
    second = load_corpus(tmp_path, tok)
    assert not first.cached and second.cached
    for a, b in zip(
        first.example_labels + first.example_ids,
        second.example_labels + second.example_ids,
        strict=True,
    ):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    tok.chat_template = TEMPLATE.replace("### ", "## ")
    changed = load_corpus(tmp_path, tok)
    assert not changed.cached and changed.example_ids[0].tolist() != first.example_ids[0].tolist()
    write_jsonl(tmp_path / "c.jsonl", chats(6))
    assert not load_corpus(tmp_path, tok).cached


# ----------------------------------------------------------------------------- eval


def test_eval_scores_the_completions_of_the_held_out_examples(chat_lm, tmp_path):
    from softprompt import SoftPrompt

    lm = chat_lm
    write_jsonl(tmp_path / "c.jsonl", chats(30))
    torch.manual_seed(2)
    sp = SoftPrompt(torch.randn(3, lm.embed_dim) * 0.1, {"name": "x"})
    result = evaluate(lm, sp, tmp_path, val_fraction=0.1, seed=4)
    c = load_corpus(tmp_path, lm.tokenizer, eos_id=lm.eos_token_id)
    val = split_rows(c, lm.eos_token_id, result.block_size, 4, 0.1, 64).val
    assert result.examples == result.n_blocks == len(val) == 3
    soft = [
        x for a, m in zip(val.ids, val.labels, strict=True) for x in _alone(lm, sp.tensor, [], a, m)
    ]
    assert result["soft_prompt"].loss == pytest.approx(float(np.mean(soft)), rel=1e-5)
    assert result.tokens_scored == sum(int(m[1:].sum()) for m in val.labels)
    assert "the completions of 3 examples" in result.table()


def test_loss_sums_counts_only_labels(tiny_llama):
    rows = Rows(
        np.zeros((0, 16), np.int64),
        [np.arange(2, 9, dtype=np.uint32)],
        [np.array([0, 0, 0, 1, 1, 0, 1], bool)],
    )
    total, count = loss_sums(tiny_llama.model, torch.zeros(2, tiny_llama.embed_dim), rows, 4, "cpu")
    assert count == 3 and total > 0


def test_summary_states_each_file(chat_lm, tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", pairs(30))
    write_jsonl(tmp_path / "b.jsonl", chats(30))
    (tmp_path / "c.txt").write_text("My dear Mr. Bennet, said his lady. " * 40, encoding="utf-8")
    with caplog.at_level("INFO", logger="softprompt"):
        train(
            dataset=str(tmp_path), output=str(tmp_path / "o"), model=chat_lm, block_size=64,
            max_steps=1, progress=False, report=False,
        )  # fmt: skip
    text = caplog.text
    assert "3 files" in text and "60 examples" in text and "text blocks" in text
    assert "a.jsonl: 30 prompt/completion pairs, loss on the completions" in text
    assert (
        'b.jsonl: 30 {"messages"} chats rendered with the model\'s chat template, loss on the '
        "assistant turns" in text
    )
    assert "held out by example" in text


def test_tokenize_dataset_alone_reads_the_tokenizer_eos(chat_lm, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", pairs(2))
    c = tokenize_dataset(read_dataset(tmp_path), chat_lm.tokenizer)
    assert c.example_ids[0][-1] == chat_lm.tokenizer.eos_token_id and c.example_labels[0][-1]
