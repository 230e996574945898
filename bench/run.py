"""`make bench`: softprompt's trainer against PEFT prompt tuning on the same job.

Runs, in one process tree, on the real default model (SmolLM2-135M-Instruct):
  1. softprompt's own trainer (`softprompt.train`),
  2. PEFT prompt tuning (`get_peft_model` + `PromptTuningConfig`) with a plain PyTorch loop,
with the same data, blocks, batch order, soft prompt length and initial vectors, optimizer,
schedule, steps, seed and dtype. Each contestant runs in its own child process so its peak
resident memory is its own. Then prints one table (training tokens/s, peak RSS, model load
time, held-out loss after the same steps, and softprompt/PEFT ratios) and the fraction of the
machine's bf16/fp32 matmul peak (measured here with a large matmul) that each reached.

    .venv/bin/python bench/run.py [--steps 20] [--batch-size 4] [--block-size 256] [--dtype auto]
                                  [--compile | --no-compile]
                                  [--checkpointing | --no-checkpointing]
                                  [--optimizer adamw|schedulefree|adafactor]

softprompt runs AdamW here, as PEFT's loop does, unless --optimizer says otherwise (its
default, schedule-free AdamW, keeps the same two tensors of state and adds an interpolation
per step: `--optimizer schedulefree` measures that its step costs the same).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "pride_and_prejudice"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul at this dtype: the machine's practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - t0)


def flops_per_token(model, n_soft: int, block: int) -> float:
    """Forward + backward to the input of a frozen model: about 2N (forward) + 2N (input
    gradients, no weight gradients) FLOPs per position, N = the weights used in matmuls
    (the embedding lookup is not a matmul; the LM head is, and runs once per predicted token).
    Attention scores add 4 x layers x width x context per position, forward and backward."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n_all = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)
    n_embed = emb.weight.numel()
    n_head = head.weight.numel()
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    n_body = n_all - n_embed - (0 if tied else n_head)
    cfg = model.config
    positions = n_soft + block - 1
    attn = 4 * cfg.num_hidden_layers * cfg.hidden_size * positions  # QK^T and AV, fwd
    per_position = 4 * n_body + 2 * attn
    return (per_position * positions + 4 * n_head * block) / block  # per trained token


def common_setup(args):
    """The blocks, the initial soft prompt and the loaded model, identical for both sides."""
    import torch

    import softprompt
    from softprompt.data import (
        make_blocks,
        read_dataset,
        split_blocks,
        token_stream,
        tokenize_dataset,
    )
    from softprompt.soft_prompt import init_tensor

    t0 = time.perf_counter()
    if args.child == "peft":  # as a PEFT user loads it: transformers' GGUF loader, no cache
        lm = plain_load(args.dtype)
    else:
        lm = softprompt.load_model(None, "cpu", args.dtype)
    load_s = time.perf_counter() - t0
    corpus = tokenize_dataset(read_dataset(DATA), lm.tokenizer)
    blocks = make_blocks(token_stream(corpus, lm.eos_token_id, args.seed), args.block_size)
    train_blocks, val_blocks = split_blocks(blocks, 0.05, 16)
    init = init_tensor(lm.model, lm.tokenizer, "vocab", args.tokens, seed=args.seed)
    torch.manual_seed(args.seed)
    return lm, load_s, train_blocks, val_blocks, init


def plain_load(dtype_name: str):
    """The default model loaded with transformers alone, the way a PEFT user would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from softprompt.model import LoadedModel, default_model_path, pick_dtype

    path = default_model_path()
    dtype = pick_dtype(dtype_name, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=GgufConfig(dequantize=True),
    )
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model, tok, "SmolLM2-135M-Instruct", str(path), torch.device("cpu"), dtype)


def run_warm(args) -> dict:
    """Load once, so softprompt's converted-model cache exists: returns the cold load time."""
    import softprompt

    t0 = time.perf_counter()
    softprompt.load_model(None, "cpu", args.dtype)
    return {"load_s": time.perf_counter() - t0}


def run_softprompt(args) -> dict:
    import softprompt

    lm, load_s, _, _, _ = common_setup(args)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = softprompt.train(
            dataset=str(DATA),
            output=out,
            model=lm,
            tokens=args.tokens,
            init="vocab",
            seed=args.seed,
            max_steps=args.steps,
            batch_size=args.batch_size,
            block_size=args.block_size,
            lr=args.lr,
            optimizer=args.optimizer,
            val_fraction=0.05,
            val_max_blocks=16,
            eval_every=0,
            save_every=0,
            progress=False,
            compile=args.compile,
            checkpointing=args.checkpointing,
        )
        total_s = time.perf_counter() - t0
    train_s = r.metrics[-2]["elapsed_s"] if "elapsed_s" in r.metrics[-2] else r.seconds
    return {
        "tokens_per_s": r.tokens_seen / train_s,
        "train_s": train_s,
        "total_s": total_s,
        "load_s": load_s,
        "val_loss": r.val_loss_after,
        "val_loss_before": r.val_loss_before,
        "flops_per_token": flops_per_token(lm.model, args.tokens, args.block_size),
        "peak_rss_mb": peak_rss_mb(),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "checkpointing": r.config.checkpointing,
        "compile": r.config.compile,
    }


def run_peft(args) -> dict:
    import numpy as np
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt.checkpoint import lr_schedule
    from softprompt.config import DEFAULT_DECAY_TO
    from softprompt.data import BatchSampler

    lm, load_s, train_blocks, val_blocks, init = common_setup(args)
    model = get_peft_model(
        lm.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.tokens)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(init)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_schedule(args.steps, 0.1, DEFAULT_DECAY_TO)
    )  # softprompt's
    batches = BatchSampler(train_blocks, args.batch_size, args.seed, torch.device("cpu"))

    def val_loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val_blocks), args.batch_size):
                b = torch.from_numpy(np.ascontiguousarray(val_blocks[i : i + args.batch_size]))
                loss = model(
                    input_ids=b, labels=b
                ).loss  # PEFT pads labels with -100 for the prompt
                total += loss.item() * b.numel()
                count += b.numel()
        return total / count

    before = val_loss()
    t0 = time.perf_counter()
    for step in range(args.steps):
        b = batches.batch(step * args.batch_size)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    return {
        "tokens_per_s": args.steps * args.batch_size * args.block_size / train_s,
        "train_s": train_s,
        "load_s": load_s,
        "val_loss": val_loss(),
        "val_loss_before": before,
        "flops_per_token": flops_per_token(lm.model, args.tokens, args.block_size),
        "peak_rss_mb": peak_rss_mb(),
        "dtype": str(lm.dtype).removeprefix("torch."),
    }


def child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from softprompt.config import OPTIMIZERS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=1729)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--optimizer", default="adamw", choices=OPTIMIZERS,
        help="softprompt's optimizer (PEFT's loop is AdamW; default adamw: the same job)",
    )  # fmt: skip
    for option, decides in (("compile", "the run's length"), ("checkpointing", "free memory")):
        for value, flag in ((True, f"--{option}"), (False, f"--no-{option}")):
            ap.add_argument(
                flag, dest=option, action="store_const", const=value, default=None,
                help=f"softprompt with {flag} (default: softprompt decides, from {decides})",
            )  # fmt: skip
    ap.add_argument("--child", choices=("warm", "softprompt", "peft"))
    args = ap.parse_args()
    if args.child:
        fn = {"warm": run_warm, "softprompt": run_softprompt, "peft": run_peft}[args.child]
        print(json.dumps(fn(args)))
        return

    import platform

    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"job: SmolLM2-135M-Instruct, {args.tokens} soft tokens, batch {args.batch_size} x {args.block_size} "
        f"tokens, {args.steps} steps, AdamW lr {args.lr}, seed {args.seed}"
    )
    warm = child("warm", args)
    sp = child("softprompt", args)
    print(
        f"softprompt: --compile {'on (compile time not counted)' if sp['compile'] else 'off'}"
        + (" (decided from the run's length)" if args.compile is None else "")
        + f", activation checkpointing {'on' if sp['checkpointing'] else 'off'}"
        + (" (decided from free memory)" if args.checkpointing is None else "")
    )
    pf = child("peft", args)
    peak = matmul_peak(sp["dtype"])
    rows = [
        ("training tokens/s", "tokens_per_s", "{:,.0f}"),
        ("peak resident memory (MB)", "peak_rss_mb", "{:,.0f}"),
        ("model load time (s)", "load_s", "{:.1f}"),
        ("held-out loss before", "val_loss_before", "{:.4f}"),
        ("held-out loss after", "val_loss", "{:.4f}"),
    ]
    print(f"\ndtype {sp['dtype']}")
    print(f"{'':28} {'softprompt':>12} {'PEFT':>12} {'ratio':>8}")
    for label, key, fmt in rows:
        ratio = sp[key] / pf[key] if pf[key] else math.nan
        print(f"{label:28} {fmt.format(sp[key]):>12} {fmt.format(pf[key]):>12} {ratio:8.2f}")
    print(
        f"(softprompt's first load of this .gguf, converting and caching it: {warm['load_s']:.1f} s)"
    )
    for name, r in (("softprompt", sp), ("PEFT", pf)):
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        print(
            f"{name}: {achieved / 1e9:,.0f} GFLOP/s = {achieved / peak:.1%} of the measured {sp['dtype']} "
            f"matmul peak ({peak / 1e9:,.0f} GFLOP/s)"
        )


if __name__ == "__main__":
    main()
