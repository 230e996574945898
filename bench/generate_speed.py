"""Generation speed with and without a soft prompt, against the model's own `generate`.

    python bench/generate_speed.py [--model M] [--device cpu] [--tokens 20] [--new-tokens 100] [--threads 1]

Greedy decoding of exactly --new-tokens tokens (EOS does not stop it) from the same prompt:
  1. Hugging Face `model.generate(input_ids)`: the model's own loop, no soft prompt
  2. softprompt's loop, no soft prompt
  3. softprompt's loop with a --tokens soft prompt (vocabulary init, or --softprompt FILE)
  4. Hugging Face `model.generate(inputs_embeds=...)` with the same soft prompt, for reference
  5. PEFT prompt tuning's `generate` (`get_peft_model` + `PromptTuningConfig`) with the same
     soft prompt vectors (when peft, a dev extra, is installed)
Each is run --repeats times, taking turns, after one warm-up; the median is printed as tokens
per second.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from softprompt import SoftPrompt, load_model
from softprompt.generate import stream_ids
from softprompt.soft_prompt import init_tensor, prepend

PROMPT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be"
)


def timed(cases: list, repeats: int) -> list[tuple[float, int]]:
    """Median seconds and tokens of each case; the cases take turns, so a change in the
    machine's load touches them all alike."""
    for _, fn in cases:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in cases]
    counts = [0] * len(cases)
    for _ in range(repeats):
        for i, (_, fn) in enumerate(cases):
            t0 = time.perf_counter()
            counts[i] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), n) for t, n in zip(times, counts, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--softprompt", default=None, help="a soft prompt file (default: a vocab-init one)"
    )
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 avoids stalls when other processes share the cores)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    lm = load_model(args.model, args.device, args.dtype)
    print(
        f"model {lm.name} on {lm.device} ({str(lm.dtype).removeprefix('torch.')}), "
        f"loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}"
    )
    if args.softprompt:
        soft = SoftPrompt.load(args.softprompt).tensor
    else:
        soft = init_tensor(lm.model, lm.tokenizer, "vocab", args.tokens)
    soft = soft.to(lm.device)
    empty = torch.zeros(0, lm.embed_dim, device=lm.device)
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    n_new = args.new_tokens
    input_ids = torch.tensor([ids], device=lm.device)
    # exactly n_new greedy tokens from Hugging Face generate (EOS does not stop it)
    greedy = dict(
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        pad_token_id=lm.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )

    def hf_ids() -> int:
        with torch.inference_mode():
            out = lm.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                **greedy,
            )
        return out.shape[1] - len(ids)

    def hf_embeds() -> int:
        with torch.inference_mode():
            embeds = prepend(lm.model, soft, input_ids)
            out = lm.model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=lm.device),
                **greedy,
            )
        return out.shape[1]

    def ours(prefix: torch.Tensor):
        def run() -> int:
            return sum(
                1
                for _ in stream_ids(
                    lm,
                    ids,
                    prefix,
                    max_new_tokens=n_new,
                    temperature=0,
                    repetition_penalty=1.0,  # as model.generate here
                    stop_at_eos=False,
                )
            )

        return run

    cases = [
        ("model.generate(input_ids), no soft prompt", hf_ids),
        ("softprompt loop, no soft prompt", ours(empty)),
        (f"softprompt loop, {soft.shape[0]}-token soft prompt", ours(soft)),
        (f"model.generate(inputs_embeds), {soft.shape[0]}-token soft prompt", hf_embeds),
    ]
    peft_model = peft_prompt_tuning(lm.model, soft)
    if peft_model is None:
        print("peft is not installed: its generate is left out (pip install -e '.[dev]')")
    else:

        def peft_generate() -> int:
            with torch.inference_mode():
                out = peft_model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    **greedy,
                )
            return out.shape[1] - len(ids)

        cases.append((f"PEFT generate, {soft.shape[0]}-token soft prompt", peft_generate))
    print(f"prompt {len(ids)} tokens, {n_new} new tokens, greedy, median of {args.repeats}")
    base = None
    for (name, _), (seconds, n) in zip(cases, timed(cases, args.repeats), strict=True):
        rate = n / seconds
        base = base or rate
        print(
            f"  {name:55s} {rate:8.1f} tok/s  ({n} tokens in {seconds:.2f} s, {rate / base:6.1%} of model.generate)"
        )


def peft_prompt_tuning(model, soft: torch.Tensor):
    """PEFT's prompt tuning wrapper around ``model`` with ``soft`` as its virtual tokens.
    Prompt tuning adds no layers to the model, so the other cases can keep using it."""
    try:
        from peft import PromptTuningConfig, TaskType, get_peft_model
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=soft.shape[0])
    peft_model = get_peft_model(model, config)
    emb = peft_model.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(soft.to(emb.weight.dtype))
    return peft_model.eval()


if __name__ == "__main__":
    main()
