"""The compiled-training attention gives what PyTorch's scaled_dot_product_attention gives,
forward and backward, with and without grouped-query heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softprompt import attention, load_model
from softprompt.speed import compile_layers, uncompile


def _qkv(heads, kv_heads, dtype, t=37, d=16, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(2, t, heads, d).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, t, kv_heads, d).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(2, t, kv_heads, d).to(dtype).transpose(1, 2).requires_grad_()
    return q, k, v


def _sdpa(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_causal_attention_matches_sdpa(heads, kv_heads, dtype, tol):
    q, k, v = _qkv(heads, kv_heads, dtype)
    grad = torch.randn(2, heads, 37, 16).to(dtype)
    results = []
    for fn in (_sdpa, lambda q, k, v: attention.CausalAttention.apply(q, k, v, 16**-0.5)):
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        results.append((out, *grads))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=tol, atol=tol)


def test_compiled_attention_takes_the_fast_path_and_matches_sdpa(monkeypatch):
    """Under torch.compile a causal call without a mask goes through CausalAttention; the
    same call uncompiled (generation, scoring) goes to sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    used = []
    real = attention.CausalAttention.forward

    def spy(ctx, *args):
        used.append(True)
        return real(ctx, *args)

    monkeypatch.setattr(attention.CausalAttention, "forward", staticmethod(spy))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3

    def ours(q, k, v):
        return attention.attention_forward(module, q, k, v, None, scaling=0.25)[0]

    def theirs(q, k, v):
        return sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0]

    q, k, v = _qkv(6, 2, torch.float32)
    grad = torch.randn(2, 37, 6, 16)
    ours(q, k, v)
    assert not used  # not compiling: sdpa
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(ours, fullgraph=True), theirs):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    assert used
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compile_layers_switches_the_attention_and_uncompile_restores_it(tiny_models):
    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")
    assert lm.model.config._attn_implementation == "sdpa"
    assert compile_layers(lm.model)
    assert lm.model.config._attn_implementation == attention.NAME
    uncompile(lm.model)
    assert lm.model.config._attn_implementation == "sdpa"
    layers = lm.model.model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_a_model_with_another_attention_is_left_alone(tiny_models):
    lm = load_model(str(tiny_models["gpt2"]), device="cpu", dtype="float32")
    lm.model.config._attn_implementation = "eager"
    assert not attention.use_fast_attention(lm.model)
    assert lm.model.config._attn_implementation == "eager"
