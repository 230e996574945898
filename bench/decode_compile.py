"""Does a compiled decode step pay on a CPU? The decode speed of one long request, four ways.

    python bench/decode_compile.py [--context 2000] [--new-tokens 40] [--threads 2]
                                   [--repeats 3] [--model M] [--json FILE]

One request: --context tokens of examples/pride_and_prejudice (after BOS), then
--new-tokens greedy tokens (EOS banned). Contestants, each timed --repeats times after one
warm-up run (which, for the compiled ones, is where compiling happens; its time is printed):

  generate          the model's own `model.generate` with its DynamicCache
  static+compile    `model.generate` with transformers' StaticCache and its compiled forward
                    (`cache_implementation="static"`, a CompileConfig allowed on a CPU):
                    transformers' own recipe for a compiled single-token step
  engine            softprompt's engine as `generate` and `serve` run it: the in-place cache
                    and the CPU decode attention, nothing compiled
  engine+compile    the engine with its single-token forward under `torch.compile`
                    (dynamic shapes: the cache grows by one position a step)

Printed: decode tokens/s (after the first token; median of the repeats, the contestants
taking turns), the warm-up time, and whether a compiled contestant's tokens are those of
its uncompiled twin (static+compile: generate's; engine+compile: engine's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# the client session's bench: its clock, its two ways of generating and its story
from serve_speed import run_generate, run_ours, story_ids  # bench/ is on sys.path

from softprompt import load_model
from softprompt.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated contestants")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    print(f"{lm.name}, {lm.model.dtype}, {args.threads} threads, torch {torch.__version__}")
    ids = story_ids(lm, args.context)
    none = torch.zeros(0, lm.embed_dim)  # no soft prompt

    compiled = Engine(reuse=False, compile=True)
    runs = {
        "generate": lambda: run_generate(lm, ids, none, args.new_tokens),
        "static+compile": lambda: run_generate(lm, ids, none, args.new_tokens, static=True),
        "engine": lambda: run_ours(lm, Engine(reuse=False), ids, none, args.new_tokens),
        "engine+compile": lambda: run_ours(lm, compiled, ids, none, args.new_tokens),
    }
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    warmups, made = {}, {}
    for name, fn in list(runs.items()):
        t0 = time.perf_counter()
        try:
            toks, _, _ = fn()
        except Exception as e:  # a contestant that cannot run here is reported, not fatal
            print(f"{name:15s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            del runs[name]
            continue
        warmups[name] = time.perf_counter() - t0
        print(f"{name:15s} warm-up {warmups[name]:.1f} s", flush=True)
    # taking turns, so a change in the machine's load touches every contestant alike
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            toks, first, total = fn()
            speeds[name].append((len(toks) - 1) / max(total - first, 1e-9))
            assert made.setdefault(name, toks) == toks, f"{name}: other tokens in a repeat"
    pairs = {"static+compile": "generate", "engine+compile": "engine"}
    same = {name: made[name] == made.get(pairs.get(name, name)) for name in runs}
    results = {}
    for name in runs:
        tps = statistics.median(speeds[name])
        results[name] = {
            "tps": tps,
            "all": speeds[name],
            "warmup_s": warmups[name],
            "same": same[name],
        }
        print(
            f"{name:15s} {tps:6.1f} tok/s  (runs "
            + ", ".join(f"{s:.1f}" for s in speeds[name])
            + f"; warm-up {warmups[name]:.1f} s; tokens those uncompiled: {same[name]})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
