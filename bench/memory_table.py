"""Estimate the GPU memory a soft prompt training run needs, per device, for the setups in
the README's Scaling section, and print them as a Markdown table.

The estimate (activation checkpointing on, as softprompt decides when activations would
crowd the device's memory, or with --checkpointing; batch b per device, sequence T =
block + soft tokens, hidden size d, MLP width f, L layers, vocabulary V):

  weights      linear-layer parameters x bytes per weight (2 for bf16, 1 for 8-bit,
               0.5 + 1/64 for 4-bit NF4 with double quantization) + embedding and LM head
               parameters x 2 (bitsandbytes leaves them in bf16). With --shard-model each of
               W devices keeps 1/W of them and gathers two decoder layers at a time (one
               running, one prefetched).
  activations  each layer's input, kept for the backward pass: L x b x T x d x 2 bytes, plus
               the working set of the one layer being recomputed: b x T x (6d + 3f) x 2.
  logits       the LM head and the loss run 128 rows at a time (softprompt's fused head and
               cross-entropy), in a bf16 and a float32 buffer: 128 x V x (2 + 4) bytes; the
               full logits never exist. A head sharded by --shard-model or placed by
               --device-map runs as the model's own: bf16 logits and their gradient,
               2 x b x T x V x 2 bytes.
  fixed        1 GiB for the CUDA context and allocator slack. The soft prompt, its gradient
               and AdamW state (4 x n x d x 4 bytes) are a few MB and left out.

usage: python bench/memory_table.py [--seq 2048] [--batch 1]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 1024**3


@dataclass
class Shape:
    name: str
    params: float  # all parameters
    layers: int
    d: int
    f: int
    vocab: int
    tied: bool

    @property
    def embed_params(self) -> float:
        return self.vocab * self.d * (1 if self.tied else 2)

    @property
    def linear_params(self) -> float:
        return self.params - self.embed_params


MODELS = {
    "SmolLM2-135M": Shape("SmolLM2-135M", 134.5e6, 30, 576, 1536, 49152, True),
    "GPT-J-6B": Shape("GPT-J-6B", 6.05e9, 28, 4096, 16384, 50400, False),
    "Llama-3.1-8B": Shape("Llama-3.1-8B", 8.03e9, 32, 4096, 14336, 128256, False),
    "Llama-3.1-70B": Shape("Llama-3.1-70B", 70.6e9, 80, 8192, 28672, 128256, False),
}
BYTES = {"bf16": 2.0, "8bit": 1.0, "4bit": 0.5 + 1 / 64}


def estimate(
    m: Shape, weights: str, seq: int, batch: int, shards: int = 1, fused_head: bool = True
) -> dict:
    w = m.linear_params * BYTES[weights] + m.embed_params * 2
    if shards > 1:
        layer = m.linear_params / m.layers * BYTES[weights]
        w = w / shards + 2 * layer
    act = m.layers * batch * seq * m.d * 2 + batch * seq * (6 * m.d + 3 * m.f) * 2
    fused_head = fused_head and shards == 1
    logits = 128 * m.vocab * (2 + 4) if fused_head else 2 * batch * seq * m.vocab * 2
    total = w + act + logits + GiB
    return {
        "weights": w / GiB,
        "activations": act / GiB,
        "logits": logits / GiB,
        "total": total / GiB,
    }


SETUPS = [
    ("1 GPU", "Llama-3.1-8B", "bf16", 1, "softprompt train --model M --dataset D --output O"),
    ("8 GPUs, one node", "Llama-3.1-8B", "bf16", 1,
     "torchrun --nproc-per-node 8 -m softprompt train ..."),
    ("2 nodes x 8 GPUs", "Llama-3.1-8B", "bf16", 1,
     "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m softprompt train ..."),
    ("70B on one 80 GB GPU, 4-bit", "Llama-3.1-70B", "4bit", 1,
     "softprompt train --model M --load-in-4bit ..."),
    ("70B sharded over 8 GPUs", "Llama-3.1-70B", "bf16", 8,
     "torchrun --nproc-per-node 8 -m softprompt train --shard-model ..."),
    ("70B over the 8 GPUs of one process", "Llama-3.1-70B", "bf16", 0,
     "softprompt train --device-map auto ..."),
    ("CPU, the default model", "SmolLM2-135M", "bf16", 1, "softprompt train --dataset D --output O"),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (block + soft)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per device")
    a = ap.parse_args()
    print(f"per-device memory estimate, batch {a.batch} x {a.seq} tokens, checkpointing on\n")
    print("| setup | model, weights | weights | activations | logits | total per device |")
    print("|---|---|---:|---:|---:|---:|")
    for label, name, weights, shards, _ in SETUPS:
        m = MODELS[name]
        seq = min(a.seq, 512) if label.startswith("CPU") else a.seq
        if shards == 0:  # --device-map over 8 GPUs: the layers split 8 ways, one pipeline
            e = estimate(m, weights, seq, a.batch, fused_head=False)
            per = {k: v / 8 for k, v in e.items() if k in ("weights", "activations")}
            e = {**e, **per, "total": per["weights"] + per["activations"] + e["logits"] + 1}
        else:
            e = estimate(m, weights, seq, a.batch, shards)
        tokens = f", {seq} tokens" if seq != a.seq else ""
        print(
            f"| {label} | {name}, {weights}{tokens} | {e['weights']:.1f} GiB | "
            f"{e['activations']:.2f} GiB | {e['logits']:.2f} GiB | {e['total']:.1f} GiB |"
        )
    print("\ncommands:")
    for label, *_, cmd in SETUPS:
        print(f"  {label}: {cmd}")


if __name__ == "__main__":
    main()
