"""How long tokenizing a dataset takes, cold and from the token cache.

Builds an 8 MB folder of text (the bundled example chapters and test excerpt, repeated in
16 files) and tokenizes it twice with the default model's tokenizer through softprompt's
data pipeline (read, normalise, hash, tokenize in batches, cache).

    .venv/bin/python bench/tokenize_speed.py [--mb 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0)
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
        for run in ("first run (tokenize)", "second run (cache)"):
            t0 = time.perf_counter()
            corpus = tokenize_dataset(read_dataset(data), lm.tokenizer)
            print(
                f"{run:22} {size:.1f} MB, {corpus.n_tokens:,} tokens: {time.perf_counter() - t0:.2f} s"
            )


if __name__ == "__main__":
    main()
