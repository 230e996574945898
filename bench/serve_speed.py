"""A KoboldAI client's session, timed: how fast `serve` answers when the whole story is
resent every turn.

    python bench/serve_speed.py [--story-tokens 2000] [--turns 10] [--new-tokens 40]
                                [--threads 2] [--soft-tokens 20] [--repeats 1] [--json FILE]

The story is the start of examples/pride_and_prejudice (--story-tokens tokens after BOS).
Every turn sends the story so far, gets --new-tokens tokens (greedy, EOS banned), and the
next turn's story is that plus the new tokens plus a line of the user's text, as KoboldAI
Lite and SillyTavern resend it. The session runs without a soft prompt and with a
--soft-tokens one (vocabulary init). Per turn, taking turns so a change in the machine's
load touches them all alike:

  before    softprompt's loop as it was before the engine: one prefill of the whole
            context, the model's own DynamicCache, PyTorch's attention, nothing kept
  engine    softprompt's engine as `serve` runs it: the kept cache of the last request
            (prefix reuse), the in-place cache and the CPU decode attention
  generate  the model's own `model.generate` (input_ids, or inputs_embeds with the soft
            prompt), greedy, nothing kept between turns

Printed per turn: time to first token (TTFT, seconds) and decode speed (tokens/s after the
first token), the median of --repeats sessions; whether the engine's tokens are the
before loop's; then the targets: TTFT from turn 2 at most a quarter of turn 1's, decode at
least 1.5x `generate`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from softprompt import load_model
from softprompt.engine import Engine
from softprompt.generate import stream_ids
from softprompt.soft_prompt import init_tensor, prepend

STORY = Path(__file__).resolve().parent.parent / "examples" / "pride_and_prejudice"
USER_LINES = [
    "Elizabeth looked up from her book.",
    "Mr. Darcy said nothing for a long while.",
    "The rain had not stopped since morning.",
    "Jane came into the room with a letter.",
    "Nobody at Longbourn had expected the visit.",
]
CONTESTANTS = ("before", "engine", "generate")


class Clock:
    """A `generate` streamer that notes when each new token comes (the first put is the
    prompt)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.t0)

    def end(self) -> None:
        pass


def run_ours(lm, engine, ids, soft, n) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds in all)."""
    t0, first, out = time.perf_counter(), None, []
    kw = dict(max_new_tokens=n, temperature=0, repetition_penalty=1.0, ban_eos=True)
    for t in stream_ids(lm, ids, soft, engine=engine, **kw):
        if first is None:
            first = time.perf_counter() - t0
        out.append(t)
    return out, first, time.perf_counter() - t0


def run_generate(lm, ids, soft, n, static: bool = False) -> tuple[list[int], float, float]:
    """``model.generate``; ``static``: with transformers' StaticCache and its compiled
    forward (allowed on a CPU, which transformers compiles for only when told)."""
    clock = Clock()
    ids_t = torch.tensor([ids])
    kw: dict = dict(
        attention_mask=torch.ones(1, soft.shape[0] + len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=lm.eos_token_id,
        streamer=clock,
    )
    if static:
        from transformers import CompileConfig

        cfg = CompileConfig(fullgraph=False, mode="default", dynamic=False)
        cfg._compile_all_devices = True
        kw.update(cache_implementation="static", compile_config=cfg)
    with torch.inference_mode():
        if soft.shape[0]:
            out = lm.model.generate(inputs_embeds=prepend(lm.model, soft, ids_t), **kw)[0]
        else:
            out = lm.model.generate(ids_t, **kw)[0, len(ids) :]
    return out.tolist(), clock.times[0], clock.times[-1]


def story_ids(lm, n: int) -> list[int]:
    text = "\n\n".join(p.read_text() for p in sorted(STORY.glob("chapter_*.txt")))
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    return lm.bos_ids + ids


def session(lm, soft, args) -> dict[str, list[dict]]:
    """One session: per contestant, per turn, {ttft, tps, same}."""
    engines = {"before": Engine(reuse=False, fast=False), "engine": Engine()}
    context = story_ids(lm, args.story_tokens)
    rows: dict[str, list[dict]] = {c: [] for c in CONTESTANTS}
    for turn in range(args.turns):
        made = {}
        for c in CONTESTANTS:
            if c == "generate":
                toks, ttft, total = run_generate(lm, context, soft, args.new_tokens)
            else:
                toks, ttft, total = run_ours(lm, engines[c], context, soft, args.new_tokens)
            made[c] = toks
            tps = (len(toks) - 1) / max(total - ttft, 1e-9)
            rows[c].append({"ttft": ttft, "tps": tps, "context": len(context)})
        for c in CONTESTANTS:
            rows[c][-1]["same"] = made[c] == made["before"]
        line = lm.tokenizer("\n\n" + USER_LINES[turn % len(USER_LINES)] + "\n\n")["input_ids"]
        context = context + made["before"] + [i for i in line if i not in lm.bos_ids]
        print(
            f"  turn {turn + 1:2d} ({len(context):5d} tokens next): "
            + "  ".join(f"{c} {rows[c][-1]['ttft']:.2f}s {rows[c][-1]['tps']:.1f}/s" for c in rows)
            + f"  engine's tokens the before loop's: {rows['engine'][-1]['same']}",
            flush=True,
        )
    return rows


def medians(sessions: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in CONTESTANTS:
        turns = zip(*(s[c] for s in sessions), strict=True)
        out[c] = [
            {
                "ttft": statistics.median(r["ttft"] for r in rs),
                "tps": statistics.median(r["tps"] for r in rs),
                "same": all(r["same"] for r in rs),
                "context": rs[0]["context"],
            }
            for rs in turns
        ]
    return out


def report(label: str, m: dict[str, list[dict]]) -> dict:
    print(f"\n{label}: turn, context tokens, then TTFT s / decode tokens/s per contestant")
    print("| turn | context | " + " | ".join(f"{c} TTFT | {c} tok/s" for c in CONTESTANTS) + " |")
    print("| --- " * (2 + 2 * len(CONTESTANTS)) + "|")
    for i in range(len(m["before"])):
        cells = " | ".join(f"{m[c][i]['ttft']:.2f} | {m[c][i]['tps']:.1f}" for c in CONTESTANTS)
        print(f"| {i + 1} | {m['before'][i]['context']} | {cells} |")
    eng, gen = m["engine"], m["generate"]
    later = [r["ttft"] for r in eng[1:]]
    ratio = max(later) / eng[0]["ttft"] if later else float("nan")
    typical = statistics.median(later) / eng[0]["ttft"] if later else float("nan")
    pairs = zip(eng[1:], m["before"][1:], strict=True)
    vs_before = statistics.median(e["ttft"] / b["ttft"] for e, b in pairs) if later else 1.0
    speed = statistics.median(r["tps"] for r in eng) / statistics.median(r["tps"] for r in gen)
    same = all(r["same"] for r in eng)
    print(
        f"engine: TTFT of turns 2+ at most {ratio:.2f} of turn 1's, median {typical:.2f} "
        f"(target <= 0.25: {'met' if ratio <= 0.25 else 'not met'}); median {vs_before:.2f} of "
        f"the before loop's in the same turn; decode {speed:.2f}x generate's (target "
        f">= 1.5: {'met' if speed >= 1.5 else 'not met'}); tokens the before loop's every "
        f"turn: {same}"
    )
    return {
        "turns": m,
        "ttft_ratio": ratio,
        "ttft_ratio_median": typical,
        "ttft_vs_before": vs_before,
        "decode_vs_generate": speed,
        "same_tokens": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--story-tokens", type=int, default=2000)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--soft-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    print(f"{lm.name}, {lm.model.dtype}, {args.threads} threads, torch {torch.__version__}")
    softs = {
        "no soft prompt": torch.zeros(0, lm.embed_dim),
        f"a {args.soft_tokens}-token soft prompt": init_tensor(
            lm.model, lm.tokenizer, "vocab", args.soft_tokens
        ),
    }
    results = {}
    for label, soft in softs.items():
        sessions = []
        for r in range(args.repeats):
            print(f"{label}, session {r + 1} of {args.repeats}", flush=True)
            sessions.append(session(lm, soft, args))
        results[label] = report(label, medians(sessions))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
