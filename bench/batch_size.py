"""Training throughput and peak memory against the batch size, on the real default model
(SmolLM2-135M-Instruct), to choose what `--batch-size auto` means on a CPU.

Each batch size runs in its own child process (so the peak resident memory is its own):
load the model, one warm-up step, then timed forward + backward steps with the soft prompt,
as `softprompt train` runs them uncompiled (activation checkpointing off, as it decides for
this model on a machine with a few GB free; --checkpointing to turn it on).

    .venv/bin/python bench/batch_size.py [--block-size 512] [--sizes 1,2,4,8] [--steps 3]
                                         [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(batch: int, block: int, steps: int, checkpointing: bool) -> dict:
    import torch

    from softprompt import load_model
    from softprompt.loss import block_loss
    from softprompt.speed import activation_checkpointing

    lm = load_model()
    soft = torch.zeros(20, lm.embed_dim, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.model.config.vocab_size, (batch, block), generator=g)
    with activation_checkpointing(lm.model, checkpointing):
        block_loss(lm.model, soft, ids).backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            block_loss(lm.model, soft, ids).backward()
        seconds = time.perf_counter() - t0
    return {
        "batch": batch,
        "tokens_per_s": batch * block * steps / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.block_size, a.steps, a.checkpointing)))
        return
    print(
        f"SmolLM2-135M, block {a.block_size}, {a.steps} timed steps per size, activation "
        f"checkpointing {'on' if a.checkpointing else 'off'}\n"
    )
    print("| batch | tokens/s | peak RSS |")
    print("|---:|---:|---:|")
    for size in [int(s) for s in a.sizes.split(",")]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(size), "--block-size", str(a.block_size),
             "--steps", str(a.steps), *(["--checkpointing"] if a.checkpointing else [])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} MB |")


if __name__ == "__main__":
    main()
