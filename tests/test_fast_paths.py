"""The fast paths give what the plain paths give: chunked cross-entropy and the fused LM
head + cross-entropy against F.cross_entropy, the contiguous LM-head input against the
model's own logits, bfloat16 against float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softprompt.loss as L
import softprompt.soft_prompt as sp
from softprompt import load_model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n", [1, 127, 128, 300])
def test_chunked_cross_entropy_matches_torch(dtype, tol, n, monkeypatch):
    monkeypatch.setattr(L, "CE_CHUNK", 128)
    torch.manual_seed(n)
    logits = (torch.randn(n, 1000) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (n,))
    weights = torch.rand(n)  # a non-uniform upstream gradient
    got = L.cross_entropy(logits, labels)
    (got * weights).sum().backward()
    got_grad = logits.grad.clone()
    logits.grad = None
    want = F.cross_entropy(logits.float(), labels, reduction="none")
    (want * weights).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.float(), logits.grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n", [1, 127, 128, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_head_cross_entropy_matches_torch(dtype, tol, n, bias, monkeypatch):
    monkeypatch.setattr(L, "CE_CHUNK", 128)
    torch.manual_seed(n)
    hidden = torch.randn(n, 16).to(dtype).requires_grad_()
    weight = (torch.randn(1000, 16) * 0.5).to(dtype)
    b = torch.randn(1000).to(dtype) if bias else None
    labels = torch.randint(0, 1000, (n,))
    weights = torch.rand(n)  # a non-uniform upstream gradient
    got = L.head_cross_entropy(hidden, weight, b, labels)
    (got * weights).sum().backward()
    got_grad = hidden.grad.clone()
    hidden.grad = None
    logits = F.linear(hidden.float(), weight.float(), None if b is None else b.float())
    want = F.cross_entropy(logits, labels, reduction="none")
    (want * weights).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.float(), hidden.grad.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # without gradients: the same losses, no gradient work
        torch.testing.assert_close(L.head_cross_entropy(hidden, weight, b, labels), got)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "opt350", "llama", "gemma", "gpt_neox"])
def test_block_loss_matches_the_plain_computation(tiny_models, arch):
    """The fused head + loss (GPT-J's head has a bias, OPT-350m projects its last hidden
    state) gives the loss and gradient of the model's own logits."""
    lm = load_model(str(tiny_models[arch]), device="cpu", dtype="float32")
    assert L.fused_head(lm.model) is lm.model.get_output_embeddings()
    soft = torch.randn(4, lm.embed_dim, requires_grad=True)
    block = torch.randint(0, 300, (3, 10))
    got = L.block_loss(lm.model, soft, block)
    (g_got,) = torch.autograd.grad(got, soft)
    logits = lm.model(inputs_embeds=sp.prepend(lm.model, soft, block)).logits[:, 3:13]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), block.reshape(-1))
    (g_want,) = torch.autograd.grad(want, soft)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_logits_that_are_not_the_plain_head_use_the_models_own(tiny_models):
    """A model whose logits are more than its head (here a hook doubles them, as soft-capping
    or a logit scale would change them) is not given the fused head: the loss is that of
    its own logits."""
    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")
    lm.model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out * 2)
    assert L.fused_head(lm.model) is None
    soft = torch.randn(4, lm.embed_dim)
    block = torch.randint(0, 300, (2, 10))
    logits = lm.model(inputs_embeds=sp.prepend(lm.model, soft, block)).logits[:, 3:13]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), block.reshape(-1))
    torch.testing.assert_close(L.block_loss(lm.model, soft, block), want)


def test_bfloat16_training_loss_tracks_float32(tiny_models):
    soft = torch.randn(4, 32) * 0.1
    block = torch.randint(0, 300, (2, 16))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(str(tiny_models["llama"]), device="cpu", dtype=dtype)
        losses[dtype] = L.block_loss(lm.model, soft, block).item()
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.05


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt350", "gemma", "gpt_neox"])
def test_activation_checkpointing_gives_the_same_loss_and_gradient(tiny_models, arch):
    from softprompt.speed import activation_checkpointing

    lm = load_model(str(tiny_models[arch]), device="cpu", dtype="float32")
    torch.manual_seed(0)
    soft = torch.randn(4, lm.embed_dim, requires_grad=True)
    block = torch.randint(0, 300, (2, 12))
    results = []
    for enabled in (False, True):
        with activation_checkpointing(lm.model, enabled) as active:
            assert active is enabled
            loss = L.block_loss(lm.model, soft, block)
            (grad,) = torch.autograd.grad(loss, soft)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    # the model is left as it was: eval mode, the layers' own forward methods
    assert not any(m.training for m in lm.model.modules())
    assert not any("forward" in m.__dict__ for m in lm.model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt350"])
def test_prompted_model_wrapper_gives_the_same_loss_and_gradient(tiny_models, arch):
    """The module --shard-model hands to FSDP computes what block_loss computes directly."""
    lm = load_model(str(tiny_models[arch]), device="cpu", dtype="float32")
    torch.manual_seed(0)
    soft = torch.randn(3, lm.embed_dim, requires_grad=True)
    block = torch.randint(0, 300, (2, 10))
    results = []
    for net in (lm.model, sp.PromptedModel(lm.model)):
        loss = L.block_loss(net, soft, block)
        (grad,) = torch.autograd.grad(loss, soft)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def _train_cli(tiny_models, corpus, out, *extra, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "softprompt", "train", "--dataset", str(corpus), "--output",
         str(out), "--model", str(tiny_models["llama"]), "--device", "cpu", "--dtype",
         "float32", "--block-size", "32", "--batch-size", "2", "--max-steps", "3",
         "--eval-every", "0", "--no-progress", "--no-report", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_compile_trains_the_same_soft_prompt_and_falls_back_when_compiling_fails(
    tiny_models, corpus, tmp_path
):
    """--compile gives the plain run's soft prompt; on a machine where torch.compile cannot
    build its kernels (here: no working C++ compiler) the run goes on uncompiled, with a note."""
    from softprompt.formats import native

    plain = _train_cli(tiny_models, corpus, tmp_path / "plain")
    compiled = _train_cli(tiny_models, corpus, tmp_path / "compiled", "--compile")
    broken = _train_cli(
        tiny_models, corpus, tmp_path / "broken", "--compile",
        env={"CXX": "/bin/false", "CC": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")},
    )  # fmt: skip
    for r in (plain, compiled, broken):
        assert r.returncode == 0, r.stderr
    assert "compiled the model's layers in" in compiled.stderr
    assert "--compile failed" in broken.stderr and "training without it" in broken.stderr
    ref = native.load(tmp_path / "plain" / "softprompt.safetensors").tensor
    for name in ("compiled", "broken"):
        got = native.load(tmp_path / name / "softprompt.safetensors").tensor
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
