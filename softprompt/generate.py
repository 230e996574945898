"""Continue a prompt with a frozen model, with or without a soft prompt in front of it."""

from __future__ import annotations

import torch

from .model import LoadedModel
from .soft_prompt import SoftPrompt, prepend


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompt: str,
    soft_prompt: SoftPrompt | None = None,
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (the new text only). The prompt is cut from the left so
    that soft tokens + prompt + new tokens fit the model's context; the same seed gives the
    same sampling noise with and without the soft prompt."""
    model, tok = lm.model, lm.tokenizer
    n_soft = soft_prompt.n_tokens if soft_prompt is not None else 0
    if soft_prompt is not None:
        soft_prompt.check_fits(model)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    budget = max(1, lm.context_length - n_soft - max_new_tokens)
    ids = ids[-budget:] or [lm.eos_token_id]
    input_ids = torch.tensor([ids], device=lm.device)
    soft = (
        soft_prompt.tensor.to(lm.device)
        if soft_prompt is not None
        else torch.zeros(0, lm.embed_dim, device=lm.device)
    )
    embeds = prepend(model, soft, input_ids)  # (1, n + T, d)
    sample = temperature > 0
    kwargs = dict(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=lm.device),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        repetition_penalty=repetition_penalty,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else lm.eos_token_id,
    )
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(**kwargs)
    return tok.decode(out[0], skip_special_tokens=True)
