"""Where should the BOS token go: after the soft prompt or before it?

On a model whose tokenizer puts a BOS token first, softprompt lays every sequence out as
``[soft][BOS][text]``, the way KoboldAI and PEFT apply a soft prompt. This trains the same soft
prompt (same init, data, batches, optimizer, schedule and steps) with each layout and scores
held-out blocks with the layout each was trained on, next to the model alone (``[BOS][text]``
and, to show what leaving BOS out costs, ``[text]``).

    .venv/bin/python bench/bos_layout.py --model path/to/model.gguf [--steps 60] [--dataset D]

The model must put a BOS token first (``LoadedModel.bos_ids``); the default model does not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from plain_step import update  # bench/ is on sys.path

import softprompt
from softprompt.checkpoint import lr_schedule
from softprompt.data import (
    BatchSampler,
    make_blocks,
    read_dataset,
    split_blocks,
    token_stream,
    tokenize_dataset,
)
from softprompt.loss import block_loss, loss_sums
from softprompt.soft_prompt import embed_ids, init_tensor

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "pride_and_prejudice"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model whose tokenizer adds BOS")
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--val-blocks", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1729)
    args = ap.parse_args()

    lm = softprompt.load_model(args.model, device="cpu")
    if not lm.bos_ids:
        raise SystemExit(f"{args.model}: its tokenizer puts no BOS token first; nothing to compare")
    corpus = tokenize_dataset(read_dataset(args.dataset), lm.tokenizer)
    blocks = make_blocks(token_stream(corpus, lm.eos_token_id, args.seed), args.block_size)
    train_blocks, val = split_blocks(blocks, 0.1, args.val_blocks)
    bos = torch.tensor(lm.bos_ids)
    bos_vec = embed_ids(lm.model, bos)  # (1, d): the BOS token as a fixed vector
    init = init_tensor(lm.model, lm.tokenizer, "vocab", args.tokens, seed=args.seed)
    print(
        f"model {lm.name} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f} M, "
        f"{lm.dtype}, BOS {lm.bos_ids}); data {Path(args.dataset).name}: {len(train_blocks)} "
        f"train / {len(val)} held-out blocks of {args.block_size}; {args.tokens} soft tokens, "
        f"{args.steps} steps of {args.batch_size}, AdamW lr {args.lr}, the default schedule"
    )

    def held_out(prefix: torch.Tensor, lead: torch.Tensor | None) -> float:
        total, count = loss_sums(
            lm.model, prefix, val, args.batch_size, lm.device, lead=lead, first=0
        )
        return total / count

    empty = torch.zeros(0, lm.embed_dim)
    # [text] cannot predict a block's first token: score tokens 1.. for both model-alone rows
    alone_bos = loss_sums(lm.model, empty, val, args.batch_size, lm.device, lead=bos, first=1)
    alone = loss_sums(lm.model, empty, val, args.batch_size, lm.device, first=1)
    print(f"model alone, tokens 2..T: [BOS][text] {alone_bos[0] / alone_bos[1]:.4f}, ", end="")
    print(f"[text] {alone[0] / alone[1]:.4f}")
    print(f"model alone, [BOS][text], all tokens: {held_out(empty, bos):.4f}")
    print(f"{'layout':18} {'held-out before':>15} {'after':>8} {'seconds':>8}")
    layouts = {
        "[soft][BOS][text]": (lambda soft: soft, bos),  # softprompt's, KoboldAI's, PEFT's
        "[BOS][soft][text]": (lambda soft: torch.cat([bos_vec.to(soft), soft]), None),
    }
    for name, (prefix_of, lead) in layouts.items():
        soft = torch.nn.Parameter(init.clone())
        opt = torch.optim.AdamW([soft], lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args.steps, 0.1, 0.1))
        batches = BatchSampler(train_blocks, args.batch_size, args.seed, lm.device)
        before = held_out(prefix_of(soft.detach()), lead)
        t0 = time.perf_counter()
        for step in range(args.steps):
            batch = batches.batch(step * args.batch_size)
            loss = block_loss(lm.model, prefix_of(soft), batch, lead=lead)
            update(soft, opt, sched, loss, name, step)
        after = held_out(prefix_of(soft.detach()), lead)
        print(f"{name:18} {before:15.4f} {after:8.4f} {time.perf_counter() - t0:8.0f}", flush=True)


if __name__ == "__main__":
    main()
