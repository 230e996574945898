"""Examples one to a row, padded per batch (what softprompt does), against examples packed
several to a row: which trains faster, and which as well?

Both train the same soft prompt (same init, optimizer, schedule, seed) on the same chats,
the same number of examples per step, for the same steps; only the layout differs:

- padded: ``[soft][BOS][example][pad...]``, a batch padded to its longest row (rounded up
  to 16): each example right behind the soft prompt, as it is met when the soft prompt is
  used;
- packed: whole examples concatenated into rows of up to ``--pack-block`` tokens, first fit
  in seeded order (none cut), ``[soft][BOS][example 1][example 2]...``: no padding but a
  row's tail, but every example after the first sees the ones before it, and the soft
  prompt is no longer right before it. Labels stay each example's own completion, so no
  loss crosses examples; attention does.

The held-out loss is measured the one way the soft prompt is used: each held-out example
alone behind it (its completion's tokens). Positions are the sequence positions the model
ran (soft prompt included): what the work grows with.

    .venv/bin/python bench/examples_task.py /tmp/fmt
    .venv/bin/python bench/examples_layout.py /tmp/fmt/train.jsonl [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def packed(rows, block: int, seed: int):
    """The examples of ``rows`` packed whole into rows of at most ``block`` tokens."""
    from softprompt.data import Rows

    ids, labels, counts = [], [], []
    cur_ids: list[np.ndarray] = []
    cur_labels: list[np.ndarray] = []

    def flush() -> None:
        if cur_ids:
            ids.append(np.concatenate(cur_ids))
            labels.append(np.concatenate(cur_labels))
            counts.append(len(cur_ids))
            cur_ids.clear()
            cur_labels.clear()

    for i in np.random.default_rng(seed).permutation(len(rows.ids)):
        if sum(len(a) for a in cur_ids) + len(rows.ids[i]) > block:
            flush()
        cur_ids.append(rows.ids[i])
        cur_labels.append(rows.labels[i])
    flush()
    return Rows(np.zeros((0, block), np.int64), ids, labels, rows.pad_id), float(np.mean(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--pack-block", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=1729)
    args = ap.parse_args()

    import torch
    from plain_step import update  # bench/ is on sys.path

    from softprompt.checkpoint import lr_schedule
    from softprompt.data import load_corpus, split_rows
    from softprompt.loss import block_loss, loss_sums
    from softprompt.model import load_model
    from softprompt.soft_prompt import init_tensor

    lm = load_model()
    corpus = load_corpus(args.dataset, lm.tokenizer, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids)
    split = split_rows(corpus, lm.eos_token_id, args.pack_block, args.seed, 0.05, 64)
    rows_packed, per_row = packed(split.train, args.pack_block, args.seed)
    lead = torch.tensor(lm.bos_ids) if lm.bos_ids else None
    init = init_tensor(lm.model, lm.tokenizer, "vocab", args.tokens, seed=args.seed)
    print(
        f"{lm.name}, {len(split.train)} training chats, {len(split.val)} held out; "
        f"{args.steps} steps of {args.batch} examples; packed rows of <= {args.pack_block} "
        f"tokens hold {per_row:.1f} examples"
    )
    print(f"{'layout':8} {'rows/step':>9} {'positions':>10} {'padding':>8} {'seconds':>8} "
          f"{'held-out before':>15} {'after':>7}")  # fmt: skip
    layouts = {
        "padded": (split.train, args.batch),
        "packed": (rows_packed, max(1, round(args.batch / per_row))),
    }

    def held_out(soft: torch.Tensor) -> float:
        total, count = loss_sums(lm.model, soft, split.val, args.batch, lm.device, lead=lead)
        return total / count

    before = held_out(init)  # the same start and held-out chats for both layouts
    for name, (rows, batch) in layouts.items():
        soft = torch.nn.Parameter(init.clone())
        opt = torch.optim.AdamW([soft], lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args.steps, 0.1, 0.1))
        order = np.random.default_rng(args.seed).permutation(len(rows))
        positions = real = 0
        t0 = time.perf_counter()
        for step in range(args.steps):
            idx = [int(order[s % len(rows)]) for s in range(step * batch, (step + 1) * batch)]
            ids_np, mask_np = rows.take(idx)
            ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
            loss = block_loss(lm.model, soft, ids, lead=lead, mask=mask)
            update(soft, opt, sched, loss, name, step)
            positions += ids.shape[0] * (args.tokens + len(lm.bos_ids) + ids.shape[1])
            real += sum(len(rows.ids[i]) for i in idx)
        seconds = time.perf_counter() - t0
        prefix = args.steps * batch * (args.tokens + len(lm.bos_ids))
        pad = 1 - (real + prefix) / positions
        print(
            f"{name:8} {batch:9d} {positions:10,d} {pad:8.1%} {seconds:8.0f} "
            f"{before:15.4f} {held_out(soft.detach()):7.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
