"""Speed and memory: activation checkpointing, compiling the decoder layers, a model's
activation size and the device's free memory, and ``--batch-size auto``. The decisions
built on these numbers are ``softprompt.plan``'s; the attention kernel that compiled layers
use is in ``attention.py``."""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from . import distributed
from .config import CPU_AUTO_BATCH
from .errors import RunError
from .loss import block_loss
from .types import Model

log = logging.getLogger(__name__)

AUTO_BATCH_MAX = 64  # where --batch-size auto starts searching on a GPU


def decoder_layers(model: Model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers marks them ``GradientCheckpointingLayer``):
    the units that checkpointing, compiling and sharding work on. Empty if none are known."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def activation_checkpointing(model: Model, enabled: bool = True):
    """Within the block, each decoder layer keeps only its inputs for the backward pass and
    recomputes the rest (non-reentrant ``torch.utils.checkpoint`` around the layer's forward,
    only while gradients are on). The model stays in eval mode, so nothing else changes:
    transformers' own switch would need the layers in training mode, which turns on dropout
    in models such as OPT. Measured on SmolLM2-135M (CPU, bf16, 4 x 256): peak memory
    1,760 -> 1,182 MB at the same speed. A model without recognisable decoder layers runs
    unchanged (the block yields False)."""
    layers = decoder_layers(model) if enabled else []
    if not layers:
        yield False
        return
    from torch.utils.checkpoint import checkpoint

    saved = []
    for layer in layers:
        saved.append(layer.__dict__.get("forward"))
        original = layer.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward
    try:
        yield True
    finally:
        for layer, previous in zip(layers, saved, strict=True):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def activation_bytes(model: Model, positions: int) -> int:
    """About what the decoder layers keep for the backward pass without activation
    checkpointing, for ``positions`` (batch x sequence): per layer and position, 7 x hidden
    + 3 x MLP width values in the model's dtype. On SmolLM2-135M (bf16) that says 17.3 kB
    per layer and position where 12.4 kB (compiled) to 12.7 kB (eager) was measured: an
    estimate that errs on the safe side."""
    config = getattr(model, "config", None)
    hidden = model.get_input_embeddings().embedding_dim
    width = next(
        (v for k in ("intermediate_size", "n_inner", "ffn_dim") if (v := getattr(config, k, None))),
        4 * hidden,
    )
    size = next(model.parameters()).element_size()
    return len(decoder_layers(model)) * positions * (7 * hidden + 3 * width) * size


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (a GPU's free memory, the system's available memory for
    the CPU); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def compile_layers(model: Model) -> bool:
    """Compile each decoder layer in place (``Module.compile``: the module is unchanged, its
    calls go through torch.compile). The layers share their code, so the compiled graph is
    reused from layer to layer. Attention goes through ``attention.attention_forward``, whose
    faster backward pass only runs compiled. False when the model has no recognisable layers."""
    from .attention import use_fast_attention

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    if layers:
        use_fast_attention(model)
    return bool(layers)


def uncompile(model: Model) -> None:
    """Undo ``compile_layers``: calls go to the plain forward and attention again."""
    from .attention import restore_attention

    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    restore_attention(model)


def contiguous_head_input(model: Model) -> None:
    """Give the LM head a contiguous input. With ``logits_to_keep`` the model slices the last
    positions of each sequence, a strided view, and a matmul over a strided 3-D input turns
    into a batched matmul that copies the head's weight per sequence: measured on
    SmolLM2-135M (CPU, bf16, batch 4 x 256), training went from 555 to 701 tokens/s."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_softprompt_contiguous", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    head._softprompt_contiguous = True


def auto_batch_size(
    lm,
    n_tokens: int,
    blocks: np.ndarray,
    checkpointing: bool,
    ranks: distributed.Ranks,
    lead: torch.Tensor | None = None,
) -> int:
    """``--batch-size auto``: on a GPU, the largest batch whose forward and backward pass fit
    in memory, found by trying (accelerate's ``find_executable_batch_size``, halving from
    64 or the number of blocks); the smallest over the ranks. On a CPU, where memory is
    rarely the limit and throughput stops growing early, a measured default."""
    if lm.device.type != "cuda":
        chosen = CPU_AUTO_BATCH
    else:
        from accelerate.utils import find_executable_batch_size

        start = 1 << (min(AUTO_BATCH_MAX, len(blocks)).bit_length() - 1)
        size = {"now": start}

        def halve() -> int:
            size["now"] //= 2
            return size["now"]

        @find_executable_batch_size(starting_batch_size=start, reduce_batch_size_fn=halve)
        def attempt(batch_size: int) -> int:
            if batch_size < 1:
                raise RunError(
                    f"--batch-size auto: not even one block of {blocks.shape[1]} tokens fits in "
                    f"the memory of {lm.device}: lower --block-size, or shard the model"
                )
            soft = torch.zeros(n_tokens, lm.embed_dim, device=lm.device, requires_grad=True)
            batch = torch.from_numpy(np.ascontiguousarray(blocks[:batch_size])).to(lm.device)
            with activation_checkpointing(lm.model, checkpointing):
                block_loss(lm.model, soft, batch, lead=lead).backward()
            return batch_size

        chosen = attempt()
        torch.cuda.empty_cache()
    chosen = int(distributed.min_across(ranks, chosen, lm.device))
    log.info(
        "--batch-size auto: %d (%s)",
        chosen,
        "the largest that fits" if lm.device.type == "cuda" else "the CPU default",
    )
    return chosen
