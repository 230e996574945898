"""Which soft prompt initialisation trains best on the default model?

Trains the same soft prompt (20 tokens, same data, steps, lr and seed) from each --init and
prints the held-out loss before and after. The default `--init` was chosen from this table.

    .venv/bin/python bench/init_compare.py [--steps 40] [--lr 0.03]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import softprompt

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "pride_and_prejudice"
INIT_TEXT = "The following is a passage from a novel."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.03])
    ap.add_argument("--inits", nargs="+", default=["vocab", "text", "random"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lm = softprompt.load_model()
    print(
        f"model {lm.name}, {lm.device}, {lm.dtype}; data {DATA.name}; {args.steps} steps, batch 4 x 256 tokens"
    )
    print(f"{'init':8} {'lr':>6} {'val before':>11} {'val after':>10} {'seconds':>8}")
    for lr in args.lr:
        for init in args.inits:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                r = softprompt.train(
                    dataset=str(DATA),
                    output=out,
                    model=lm,
                    init=init,
                    tokens=20,
                    lr=lr,
                    init_text=INIT_TEXT if init == "text" else None,
                    max_steps=args.steps,
                    block_size=256,
                    batch_size=4,
                    eval_every=0,
                    progress=False,
                    seed=1729,
                )
                print(
                    f"{init:8} {lr:6g} {r.val_loss_before:11.4f} {r.val_loss_after:10.4f} "
                    f"{time.perf_counter() - t0:8.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
