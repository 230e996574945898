"""Distilling a written prompt into a soft prompt (--teacher-prompt), on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli, stop_after

from softprompt import SoftPrompt, load_model, train
from softprompt.distil import Teacher, distil_loss, distil_rows, written_prompt_ids
from softprompt.loss import fused_head
from softprompt.soft_prompt import embed_ids

WRITTEN = (
    "Mrs. Bennet spoke always of her nerves, of her poor nerves, and of the officers, "
    "and of Mr. Bingley's five thousand a year. "
)
FAST = dict(block_size=24, batch_size=2, progress=False, lr=0.1, warmup=0.0)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {
        arch: load_model(str(tiny_models[arch]), device="cpu", dtype="float32")
        for arch in ("llama", "gpt2", "llama_bos")
    }


def _full_logits(lm, prefix, block):
    """The model's logits for each block token, the written prompt in front, no cache."""
    ids = torch.cat([torch.tensor(prefix).expand(len(block), -1), block], dim=1)
    with torch.no_grad():
        logits = lm.model(input_ids=ids[:, :-1]).logits
    return logits[:, len(prefix) - 1 :]  # (B, T, V)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_bos"])
def test_teacher_cache_is_computed_once_and_matches_recomputing(models, arch):
    lm = models[arch]
    prefix = written_prompt_ids(lm, WRITTEN)
    assert prefix[: len(lm.bos_ids)] == lm.bos_ids  # [BOS][written prompt][block]
    teacher = Teacher(lm.model, prefix, lm.device)
    gen = torch.Generator().manual_seed(0)
    for B in (3, 2, 3):  # batches of other sizes on the same kept cache
        block = torch.randint(3, 300, (B, 12), generator=gen)
        states = teacher.states(block)
        head = fused_head(lm.model)
        got = torch.nn.functional.linear(states, head.weight, head.bias) if head else states
        torch.testing.assert_close(got, _full_logits(lm, prefix, block), rtol=1e-4, atol=1e-4)
    assert teacher.prefix_runs == 1  # the written prompt ran once, for every batch


def test_stored_states_are_reused(models):
    lm = models["llama"]
    teacher = Teacher(lm.model, written_prompt_ids(lm, WRITTEN), lm.device)
    blocks = np.random.default_rng(0).integers(3, 300, (5, 10))
    teacher.store(blocks, 2)
    assert teacher.computed == 5 and teacher.stored_blocks == 5
    again = teacher.states(torch.from_numpy(blocks[[4, 1]]))
    assert teacher.computed == 5  # nothing computed again
    torch.testing.assert_close(again, teacher.compute(torch.from_numpy(blocks[[4, 1]])))


@pytest.mark.parametrize("arch", ["llama", "llama_bos"])
def test_kl_is_zero_when_student_and_teacher_see_the_same(models, arch):
    """A soft prompt made of the teacher prefix's own embeddings, with nothing between it and
    the block, is the teacher: KL 0, loss equal to the teacher's cross-entropy."""
    lm = models[arch]
    prefix = written_prompt_ids(lm, WRITTEN)
    teacher = Teacher(lm.model, prefix, lm.device)
    soft = embed_ids(lm.model, torch.tensor(prefix))
    block = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    rows = distil_loss(lm.model, soft, block, teacher.states(block), 1.0, lead=None)
    assert rows.kl.abs().max() < 1e-4
    assert rows.loss.abs().max() < 1e-4
    # a soft prompt of other tokens is measurably far from the teacher (a random tiny model
    # leans on its context little, so far is 1e-3 nats a token here)
    other = embed_ids(lm.model, torch.arange(10, 10 + len(prefix)))
    far = distil_loss(lm.model, other, block, teacher.states(block), 1.0).kl.mean()
    assert far > 1e-4 and far > 100 * rows.kl.abs().max()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_kernel_matches_autograd(fused, weight):
    """Loss, its parts and the gradient equal the plain (N, V) computation's."""
    torch.manual_seed(0)
    N, d, V = 300, 16, 50  # over two chunks of rows
    head = torch.nn.Linear(d, V)
    hs = torch.randn(N, d, requires_grad=True)
    ht, labels = torch.randn(N, d), torch.randint(0, V, (N,))
    zs, zt = head(hs), head(ht).detach()
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    ce = torch.nn.functional.cross_entropy(zs, labels, reduction="none")
    want = weight * kl + (1 - weight) * ce
    (want_grad,) = torch.autograd.grad(want.sum(), hs)
    if fused:
        x = hs.detach().requires_grad_()
        rows = distil_rows(x, ht, labels, weight, head)
    else:
        x = zs.detach().requires_grad_()
        rows = distil_rows(x, zt, labels, weight)
    rows.loss.sum().backward()
    torch.testing.assert_close(rows.loss, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.kl, kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.ce, ce.detach(), rtol=1e-5, atol=1e-5)
    grad = x.grad if fused else x.grad @ head.weight
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_gradients_flow_only_into_the_soft_prompt(models):
    lm = models["llama"]
    teacher = Teacher(lm.model, written_prompt_ids(lm, WRITTEN), lm.device)
    soft = torch.nn.Parameter(torch.randn(4, lm.embed_dim) * 0.02)
    block = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    states = teacher.states(block)
    assert not states.requires_grad and states.grad_fn is None
    distil_loss(lm.model, soft, block, states, 0.7).loss.mean().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())


def _distil(lm, tmp_path, name, **options):
    return train(
        output=str(tmp_path / name),
        model=lm,
        teacher_prompt=WRITTEN,
        tokens=4,
        teacher_samples=10,
        **{**FAST, **options},
    )


def test_distils_on_sampled_text_and_lowers_the_kl(models, tmp_path, caplog):
    lm = models["llama"]
    caplog.set_level("INFO", logger="softprompt")
    result = _distil(lm, tmp_path, "a", max_steps=12, eval_every=6, val_fraction=0.2)
    vals = [r for r in result.metrics if "val_kl" in r]
    assert vals[-1]["val_kl"] < vals[0]["val_kl"]
    assert vals[0]["val_loss"] == pytest.approx(vals[0]["val_kl"])  # weight 1: KL alone
    assert "continuations of 24 tokens at temperature 1" in caplog.text
    sp = SoftPrompt.load(result.files["safetensors"])
    assert sp.meta["distil"]["teacher_prompt"] == WRITTEN
    assert sp.meta["init"] == "text" and sp.meta["init_text"] == WRITTEN  # its first 4 tokens
    assert sp.meta["name"] == "distilled"
    # the samples were cached: a second run reads them back
    caplog.clear()
    _distil(lm, tmp_path, "b", max_steps=1)
    assert "(from the cache)" in caplog.text


def test_stored_teacher_states_train_exactly_as_on_the_fly(models, tmp_path, monkeypatch):
    """Storing the teacher's states (epochs > 1) changes the time, not the numbers."""
    import softprompt.train as t

    lm = models["llama"]
    stored = _distil(lm, tmp_path, "stored", epochs=3, val_fraction=0.2, distill_weight=0.5)
    monkeypatch.setattr(t, "decide_teacher_store", lambda *a: False)
    fly = _distil(lm, tmp_path, "fly", epochs=3, val_fraction=0.2, distill_weight=0.5)
    assert torch.equal(stored.soft_prompt.tensor, fly.soft_prompt.tensor)


def test_resume_is_bit_exact(models, tmp_path, monkeypatch):
    from softprompt.train import Interrupted

    lm = models["llama_bos"]
    whole = _distil(lm, tmp_path, "whole", max_steps=6, save_every=0, distill_weight=0.8)
    stop_after(monkeypatch.setattr, 3)
    with pytest.raises(Interrupted):
        _distil(lm, tmp_path, "parts", max_steps=6, save_every=0, distill_weight=0.8)
    monkeypatch.undo()
    resumed = train(output=str(tmp_path / "parts"), model=lm, resume=True, progress=False)
    assert torch.equal(whole.soft_prompt.tensor, resumed.soft_prompt.tensor)


def test_resume_with_another_written_prompt_is_refused(models, tmp_path, capsys):
    lm = models["llama"]
    _distil(lm, tmp_path, "run", max_steps=2)
    from softprompt.errors import RunError

    with pytest.raises(RunError, match="distil another written prompt"):
        train(
            output=str(tmp_path / "run"),
            model=lm,
            resume=True,
            max_steps=4,
            teacher_prompt="A different prompt altogether.",
        )


def test_bad_written_prompts_are_one_line_errors(tiny_models, tmp_path, capsys):
    model = tiny_models["llama"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    long = tmp_path / "long.txt"
    long.write_text("the nerves of Mrs. Bennet " * 200, encoding="utf-8")
    out = tmp_path / "out"
    cases = [
        (["--teacher-prompt", ""], "--teacher-prompt is empty"),
        (["--teacher-prompt", empty], "is empty"),
        (["--teacher-prompt", long], "leaves no room for text"),
        (["--teacher-prompt", WRITTEN, "--block-size", "230"], "--block-size 230 plus the"),
        (["--teacher-prompt", WRITTEN, "--distill-weight", "2"], "--distill-weight"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(capsys, "train", "--model", model, "--output", out, *extra)
        assert_one_line_error(code, err, needle)
        assert not out.exists()


def test_no_dataset_without_a_teacher_is_still_an_error(tiny_models, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", "--model", tiny_models["llama"], "--output", tmp_path / "o"
    )
    assert_one_line_error(code, err, "--dataset is required", "--teacher-prompt")


def test_distils_on_a_dataset_with_cross_entropy_mixed_in(models, corpus, tmp_path):
    result = train(
        dataset=str(corpus),
        output=str(tmp_path / "out"),
        model=models["gpt2"],
        teacher_prompt=WRITTEN,
        distill_weight=0.5,
        tokens=3,
        max_steps=2,
        **FAST,
    )
    rec = [r for r in result.metrics if "val_kl" in r][-1]
    assert rec["val_loss"] == pytest.approx(0.5 * rec["val_kl"] + 0.5 * rec["val_ce"])
    assert json.loads(json.dumps(result.soft_prompt.meta))["distil"]["distill_weight"] == 0.5


def test_a_dataset_holding_examples_is_refused(models, tiny_models, tmp_path, capsys):
    """Distillation works on text blocks: examples (pairs, chats) are a one-line error,
    for train before anything is written, and for eval."""
    from softprompt.errors import ConfigError
    from softprompt.evaluate import evaluate

    data = tmp_path / "data"
    data.mkdir()
    (data / "story.txt").write_text(WRITTEN * 20, encoding="utf-8")
    pairs = [{"prompt": f"Q{i}: ", "completion": f"A{i}."} for i in range(20)]
    (data / "pairs.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8"
    )
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "train",
        "--dataset",
        data,
        "--model",
        tiny_models["llama"],
        "--output",
        out,
        "--teacher-prompt",
        WRITTEN,
        "--max-steps",
        "1",
    )
    assert_one_line_error(code, err, f"dataset {data} holds examples", "--teacher-prompt")
    assert not out.exists()
    with pytest.raises(ConfigError, match="holds examples"):
        evaluate(models["llama"], None, str(data), block_size=24, teacher_prompt=WRITTEN)


def test_eval_report_and_compare_show_the_written_prompt(models, tiny_models, tmp_path, capsys):
    from softprompt.evaluate import evaluate

    lm = models["llama"]
    result = _distil(lm, tmp_path, "e", max_steps=4, val_fraction=0.2, report=True)
    ev = evaluate(lm, result.soft_prompt, None)  # the held-out part of the sampled text
    assert [v.key for v in ev.variants] == ["soft_prompt", "written", "written_cut", "none"]
    assert ev.n_blocks == 2 and ev.block_size == 24
    assert abs(ev["written"].kl) < 1e-4 and ev["none"].kl > 1e-4
    assert ev["written_cut"].prefix_tokens == 4 and ev.gap_closed is not None
    report = (tmp_path / "e" / "report.md").read_text(encoding="utf-8")
    assert "## Against the written prompt" in report and "written prompt cut to 4 tokens" in report
    file = result.files["safetensors"]
    code, out, _ = run_cli(capsys, "eval", "--model", tiny_models["llama"], "--softprompt", file)
    assert code == 0, out
    assert "KL to the written prompt" in out and "of the KL gap" in out
    code, out, err = run_cli(
        capsys, "generate", "--model", tiny_models["llama"], "--softprompt", file, "--compare",
        "--max-new-tokens", "4", "--temperature", "0", "Mrs. Bennet",
    )  # fmt: skip
    assert code == 0, err
    titles = [line for line in out.splitlines() if line.startswith("--- ")]
    assert titles == [
        "--- with the soft prompt (distilled)",
        "--- with the written prompt in front",
        "--- without",
    ]
    assert err.count("tokens in") == 3


def test_eval_without_a_dataset_needs_a_distilled_soft_prompt(
    tiny_llama, tiny_models, corpus, tmp_path, capsys
):
    result = train(
        dataset=str(corpus), output=str(tmp_path / "o"), model=tiny_llama, max_steps=1, **FAST
    )
    code, _, err = run_cli(
        capsys, "eval", "--model", tiny_models["llama"], "--softprompt", result.files["kobold"]
    )
    assert_one_line_error(code, err, "eval needs --dataset")


def test_two_ranks_distil_as_one_does(tiny_models, tmp_path):
    """torchrun: rank 0 samples the teacher's text and caches it, rank 1 reads it; the run
    equals one process with the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    common = [
        "-m", "softprompt", "train", "--teacher-prompt", WRITTEN, "--teacher-samples", 8,
        "--model", tiny_models["llama"], "--device", "cpu", "--dtype", "float32",
        "--tokens", 4, "--block-size", 16, "--max-steps", 3, "--lr", 0.05, "--seed", 5,
        "--no-progress", "--no-report",
    ]  # fmt: skip

    def run(*launcher, out, batch):
        args = [*launcher, *common, "--output", tmp_path / out, "--batch-size", batch]
        return subprocess.run(
            [sys.executable, *map(str, args)],
            capture_output=True, text=True, timeout=300, env=env, cwd=root,
        )  # fmt: skip

    two = run(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", out="two", batch=2
    )
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("text sampled from the model") == 1, two.stderr
    one = run(out="one", batch=4)
    assert one.returncode == 0, one.stderr
    assert "(from the cache)" in one.stderr
    a = SoftPrompt.load(tmp_path / "two" / "softprompt.safetensors").tensor
    b = SoftPrompt.load(tmp_path / "one" / "softprompt.safetensors").tensor
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_page_offers_the_written_prompt_to_distil():
    from softprompt.ui.options import GROUPS, option_list, parse_options

    opt = next(o for o in option_list() if o["name"] == "teacher_prompt")
    assert opt["group"] == "distillation" in GROUPS and opt["flag"] == "--teacher-prompt"
    written = "Granny Thorne talks like a sailor.\n\nGranny Thorne:\n"
    # no dataset is needed, and the prompt is kept as typed, line breaks and all
    assert parse_options({"teacher_prompt": written}) == {"teacher_prompt": written}


def test_the_server_serves_a_distilled_soft_prompt_as_any_other(models, tmp_path):
    import http.client

    from softprompt.generate import generate
    from softprompt.serve import Server

    lm = models["llama"]
    result = _distil(lm, tmp_path, "s", max_steps=1)
    assert SoftPrompt.load(result.files["kobold"]).meta["distil"]["teacher_prompt"] == WRITTEN
    with Server(lm, tmp_path / "s", "distilled.zip", port=0) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = {"prompt": "Mrs. Bennet", "max_length": 5, "temperature": 0, "rep_pen": 1}
        conn.request(
            "POST", "/api/v1/generate", json.dumps(body), {"Content-Type": "application/json"}
        )
        answer = json.loads(conn.getresponse().read())
    want = generate(lm, "Mrs. Bennet", result.soft_prompt, temperature=0, max_new_tokens=5,
                    repetition_penalty=1.0)  # fmt: skip
    assert answer["results"][0]["text"] == want
