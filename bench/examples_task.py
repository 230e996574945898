"""A small task taught by examples, where a written (hard) prompt is known to help: answer a
restaurant review with its sentiment as one line of JSON, ``{"sentiment": "positive"}``.
Without a prompt the chat model answers the review conversationally; told the format, it
mostly keeps to it. The README's measurement trains soft prompts on these chats.

    .venv/bin/python bench/examples_task.py OUT [--train 600] [--heldout 100] [--seed 0]

writes OUT/train.jsonl and OUT/heldout.jsonl (other reviews: none of one is in the other), and OUT/prompt.txt, the first held-out chat as the default model's chat template
renders it up to the assistant's turn (for `softprompt generate --prompt-file`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HARD_PROMPT = (
    'Classify the review as positive or negative. Reply only with JSON: {"sentiment": '
    '"positive"} or {"sentiment": "negative"}.'
)
THINGS = [
    "soup", "pasta", "steak", "salad", "bread", "coffee", "dessert", "pizza", "curry", "fish",
    "service", "waiter", "music", "table", "wine", "noodles", "burger", "tea", "cake", "rice",
]  # fmt: skip
GOOD = [
    "delicious", "wonderful", "fresh", "excellent", "friendly", "perfect", "lovely", "superb",
    "warm", "generous", "charming", "tasty",
]  # fmt: skip
BAD = [
    "cold", "bland", "rude", "stale", "awful", "slow", "greasy", "burnt", "dirty", "soggy",
    "overpriced", "terrible",
]  # fmt: skip
OPENINGS = [
    "",
    "We went on Friday. ",
    "Second visit here. ",
    "Came with my family. ",
    "Lunch stop. ",
]
CLOSINGS = {
    "positive": ["", " Will come back!", " Highly recommended.", " A real treat."],
    "negative": ["", " Never again.", " Avoid.", " What a waste of money."],
}


def review(rng: random.Random, sentiment: str) -> str:
    words = GOOD if sentiment == "positive" else BAD
    a, b = rng.sample(THINGS, 2)
    x, y = rng.sample(words, 2)
    body = rng.choice(
        [
            f"The {a} was {x} and the {b} was {y}.",
            f"{x.capitalize()} {a}, {y} {b}.",
            f"The {a} was {x}. The {b}? {y.capitalize()}.",
            f"Honestly the {a} was {x}, and the {b} {y}.",
        ]
    )
    return rng.choice(OPENINGS) + body + rng.choice(CLOSINGS[sentiment])


def chats(n: int, seed: int, avoid: set[str] = frozenset()) -> list[dict]:  # type: ignore[assignment]
    rng, out, seen = random.Random(seed), [], set(avoid)
    while len(out) < n:
        sentiment = rng.choice(["positive", "negative"])
        text = review(rng, sentiment)
        if text in seen:
            continue
        seen.add(text)
        answer = json.dumps({"sentiment": sentiment})
        out.append(
            {
                "messages": [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = chats(args.train, args.seed)
    heldout = chats(args.heldout, args.seed + 1, {c["messages"][0]["content"] for c in train})
    write(args.out / "train.jsonl", train)
    write(args.out / "heldout.jsonl", heldout)
    from softprompt.model import load_model

    tok = load_model().tokenizer
    prompt = tok.apply_chat_template(
        heldout[0]["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    (args.out / "prompt.txt").write_text(prompt, encoding="utf-8")
    (args.out / "hard_prompt.txt").write_text(HARD_PROMPT, encoding="utf-8")
    print(f"wrote {len(train)} + {len(heldout)} chats and prompt.txt to {args.out}")


if __name__ == "__main__":
    main()
