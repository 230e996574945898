"""How long tokenizing a dataset takes, cold and from the token cache.

Builds an 8 MB folder of text (the bundled example chapters and test excerpt, repeated in
16 files) and tokenizes it twice with the default model's tokenizer through softprompt's
data pipeline (read, normalise, hash, tokenize in batches, cache).

Then 100,000 chats (``--chats``; one to three exchanges, a third with a system message) in
one .jsonl file, prepared twice the same way (read, check every line, render each with the
model's chat template turn by turn, tokenize the pieces, label mask, cache), against the
time the training steps over them would take: one epoch at batch 4, each step timed on the
default model (``--steps`` of them, the first left out as warm-up).

    .venv/bin/python bench/tokenize_speed.py [--mb 8] [--chats 100000] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a tea garden letter ball morning walk visit sister brother estate evening house "
    "dance question answer book carriage town officer kind quiet proud merry long short"
).split()


def chat(rng: random.Random) -> dict:
    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    messages = []
    if rng.random() < 1 / 3:
        messages.append({"role": "system", "content": sentence(rng.randint(5, 15))})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": sentence(rng.randint(5, 30)) + " Why?"})
        messages.append({"role": "assistant", "content": sentence(rng.randint(5, 40))})
    return {"messages": messages}


def chats_vs_steps(lm, folder: Path, n: int, steps: int) -> None:
    """Prepare ``n`` chats (cold, then from the cache) and time training steps on them."""
    import numpy as np
    import torch

    from softprompt.data import BatchSampler, read_dataset, split_rows, tokenize_dataset
    from softprompt.loss import block_loss

    rng = random.Random(0)
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps(chat(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    mb = path.stat().st_size / 1e6
    for run in ("first run (prepare)", "second run (cache)"):
        t0, c0 = time.perf_counter(), time.process_time()
        corpus = tokenize_dataset(
            read_dataset(path), lm.tokenizer, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids
        )
        prepare_s, prepare_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"{run:22} {n:,} chats, {mb:.1f} MB, {corpus.n_tokens:,} tokens: {prepare_s:.2f} s "
            f"({prepare_cpu:.2f} CPU s)"
        )
        if run.startswith("first"):
            cold_s, cold_cpu = prepare_s, prepare_cpu
    rows = split_rows(corpus, lm.eos_token_id, 512, 1729, 0.0, 64).train
    sampler = BatchSampler(rows, 4, 1729, lm.device)
    soft = torch.zeros(20, lm.embed_dim, requires_grad=True)
    lead = torch.tensor(lm.bos_ids) if lm.bos_ids else None
    times, cpu = [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        batch, mask = sampler.batch_with_mask(step * 4)
        block_loss(lm.model, soft, batch, lead=lead, mask=mask).backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    step_s, step_cpu = float(np.mean(times[1:] or times)), float(np.mean(cpu[1:] or cpu))
    n_steps = -(-len(rows) // 4)
    print(
        f"training one epoch on them: {n_steps:,} steps of 4 chats x {step_s:.2f} s "
        f"({step_cpu:.2f} CPU s) = {n_steps * step_s / 3600:.1f} h "
        f"({n_steps * step_cpu / 3600:.1f} CPU h); preparing them took {cold_s:.1f} s, "
        f"{cold_s / (n_steps * step_s):.2%} of that ({cold_cpu:.1f} CPU s, "
        f"{cold_cpu / (n_steps * step_cpu):.2%})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text (0: only the chats)")
    ap.add_argument("--chats", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    sources = sorted((ROOT / "examples").rglob("*.txt")) + sorted(
        (ROOT / "tests" / "data").glob("*.txt")
    )
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        data.mkdir()
        per_file = int(args.mb * 1e6 / 16)
        for i in range(16):
            chunk = (text * (per_file // len(text) + 1))[:per_file]
            (data / f"part_{i:02d}.txt").write_text(f"Part {i}.\n" + chunk, encoding="utf-8")
        os.environ["SOFTPROMPT_CACHE"] = str(cache)
        import softprompt
        from softprompt.data import read_dataset, tokenize_dataset

        lm = softprompt.load_model()
        size = sum(p.stat().st_size for p in data.iterdir()) / 1e6
        for run in ("first run (tokenize)", "second run (cache)") if args.mb > 0 else ():
            t0 = time.perf_counter()
            corpus = tokenize_dataset(read_dataset(data), lm.tokenizer)
            print(
                f"{run:22} {size:.1f} MB, {corpus.n_tokens:,} tokens: {time.perf_counter() - t0:.2f} s"
            )
        if args.chats:
            chats_vs_steps(lm, Path(tmp), args.chats, args.steps)


if __name__ == "__main__":
    main()
