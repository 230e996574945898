"""Distillation's costs: the teacher on the fly against stored, and generation with the soft
prompt against the written prompt in front.

    python bench/distil.py [--prompt examples/distil/granny_thorne.txt] [--softprompt FILE]
                           [--block-size 64] [--batch-size 4] [--new-tokens 64] [--repeats 3]

1. Teacher, per micro-batch (--batch-size x --block-size tokens, 20 soft tokens):
   the student's step (forward and backward, KL through the chunked head); the teacher on
   the fly with the written prompt's KV cache (computed once); the teacher recomputing the
   written prompt for every batch (no cache); a stored batch looked up; and the bytes one
   stored block takes.
2. Generation: --new-tokens tokens, greedy (EOS does not stop it), after a short prompt with
   the soft prompt (--softprompt, or 20 vectors of the written prompt's first tokens) in
   front, then with the whole written prompt in front; prefill and per-token time.
Each case is run --repeats times, taking turns, after a warm-up; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from softprompt import SoftPrompt, load_model
from softprompt.distil import Teacher, distil_loss, written_prompt_ids
from softprompt.generate import stream_ids
from softprompt.sampling import SamplingOptions
from softprompt.soft_prompt import embed_ids

STORY = "The reporter asked her about the storm of 1962, and"


def timed(cases: dict, repeats: int) -> dict[str, float]:
    for fn in cases.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def teacher_costs(lm, prefix, args) -> None:
    teacher = Teacher(lm.model, prefix, lm.device)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(200, 20000, (args.batch_size, args.block_size), generator=gen)
    soft = torch.nn.Parameter(embed_ids(lm.model, torch.tensor(prefix[:20])))
    states = teacher.states(batch, keep=True)
    full = torch.cat([torch.tensor(prefix).expand(len(batch), -1), batch], dim=1)

    def student():
        distil_loss(lm.model, soft, batch, states, 1.0).loss.mean().backward()

    def recompute():
        with torch.no_grad():
            lm.model.base_model(input_ids=full[:, :-1], use_cache=False)

    t = timed(
        {
            "student step (forward + backward)": student,
            "teacher on the fly (prompt's KV cache)": lambda: teacher.compute(batch),
            "teacher recomputing the prompt": recompute,
            "teacher stored (looked up)": lambda: teacher.states(batch),
        },
        args.repeats,
    )
    print(f"1. per micro-batch of {args.batch_size} x {args.block_size} tokens:")
    for name, s in t.items():
        print(f"   {name:40s} {s * 1000:9.1f} ms")
    step = t["student step (forward + backward)"]
    fly = t["teacher on the fly (prompt's KV cache)"]
    print(f"   on the fly adds {fly / step:.0%} to a step; the prompt's cache saves "
          f"{1 - fly / t['teacher recomputing the prompt']:.0%} of the teacher's time")  # fmt: skip
    per_block = teacher.block_bytes(args.block_size)
    print(f"   one stored block: {per_block / 1e6:.2f} MB ({lm.dtype}); the prompt's cache: "
          f"{_cache_bytes(teacher) / 1e6:.1f} MB")  # fmt: skip


def _cache_bytes(teacher: Teacher) -> int:
    _, cache = teacher._prefix()
    total = 0
    for layer in getattr(cache, "layers", []):
        total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


def generation_speed(lm, prefix, soft, args) -> None:
    story = lm.tokenizer(STORY, add_special_tokens=False)["input_ids"]
    opts = SamplingOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=args.new_tokens)
    none = torch.zeros(0, lm.embed_dim)

    def run(lead, vectors, n):
        return lambda: list(stream_ids(lm, lead + story, vectors, opts, stop_at_eos=False))[:n]

    t = timed(
        {
            f"soft prompt ({soft.shape[0]} tokens)": run(lm.bos_ids, soft, args.new_tokens),
            f"written prompt ({len(prefix) - len(lm.bos_ids)} tokens)": run(prefix, none, 0),
        },
        args.repeats,
    )
    print(f"2. generation of {args.new_tokens} tokens after a {len(story)}-token prompt:")
    for name, s in t.items():
        print(f"   {name:40s} {s:7.2f} s  {args.new_tokens / s:6.1f} tokens/s")
    a, b = t.values()
    print(f"   the soft prompt takes {a / b:.0%} of the written prompt's time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default="examples/distil/granny_thorne.txt")
    ap.add_argument("--softprompt")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-teacher", action="store_true")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    with open(args.prompt, encoding="utf-8") as fh:
        prefix = written_prompt_ids(lm, fh.read())
    if args.softprompt:
        soft = SoftPrompt.load(args.softprompt).tensor
    else:
        soft = embed_ids(lm.model, torch.tensor(prefix[len(lm.bos_ids) :][:20]))
    print(f"{lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads")
    if not args.skip_teacher:
        teacher_costs(lm, prefix, args)
    generation_speed(lm, prefix, soft.to(lm.device), args)


if __name__ == "__main__":
    main()
