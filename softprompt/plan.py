"""The shape of a training run, decided from numbers before the model runs: block size,
batch and accumulation, steps, where a resumed run starts, and whether to checkpoint
activations and compile. Pure functions of the options and a few counts and measurements,
so each decision can be tested without a model; ``train.py`` gathers the numbers (the
model's context, the dataset's tokens, a step's time, the free memory) and acts on them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .config import LR_PER_RMS, TrainConfig
from .errors import ConfigError, DataError, RunError
from .formats.common import KOBOLD_MAX_TOKENS

CPU_BLOCK_CAP, GPU_BLOCK_CAP = 512, 2048  # default tokens per block
COMPILE_AFTER_S = 120  # CPU: compiling SmolLM2's layers took 20 s for steps 1.35x faster
CHECKPOINTING_SHARE = 4  # checkpoint activations that would take over 1/4 of free memory
MIN_USEFUL_BLOCK = 64  # a shorter block teaches too little context to suggest it as a fix
# Less text than this rarely teaches a style: soft prompts for KoboldAI were trained on
# hundreds of kilobytes to megabytes of text (20,000 tokens is about 80 KB of English).
SMALL_DATASET_TOKENS = 20_000
VALIDATIONS_PER_RUN = 10  # unset --eval-every: enough points for a loss curve
TEACHER_STORE_SHARE = 4  # keep the teacher's states for the training blocks in 1/4 of free memory


@dataclass(frozen=True)
class Plan:
    """A run's shape. Counts are blocks (sequences of ``block_size`` tokens); a step is one
    optimizer step over ``samples_per_step`` blocks, all ranks together."""

    n_tokens: int  # soft prompt length
    n_bos: int  # tokens the tokenizer puts first (0 or 1): [soft][BOS][block]
    block_size: int
    n_train: int
    n_val: int
    batch_size: int  # per rank and micro-batch
    grad_accum: int
    world: int  # ranks
    total_steps: int
    start_step: int  # 0; a checkpoint's step; an mtj-softtuner run's step
    eval_every: int = 0  # steps between validations (0: only at the start and the end)
    row_tokens: float = 0.0  # tokens in a training row on average (0: block_size, text blocks)
    row_width: int = 0  # tokens in the widest batch's rows (0: block_size)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> float:
        return self.n_train / self.samples_per_step

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained on in a step: examples count their own length, not the block's."""
        return self.tokens_after(self.samples_per_step)

    def tokens_after(self, samples: int) -> int:
        """Tokens trained on in ``samples`` rows (blocks or examples)."""
        return round(samples * (self.row_tokens or self.block_size))

    @property
    def positions(self) -> int:
        """Sequence positions in one micro-batch: what the activations scale with."""
        return self.batch_size * (self.n_tokens + self.n_bos + (self.row_width or self.block_size))


def default_block_size(context: int, n_prefix: int, device_type: str) -> int:
    """Tokens per block: what the context leaves after the ``n_prefix`` positions in front
    (soft tokens and BOS), at most 512 on a CPU and 2048 on a GPU."""
    cap = GPU_BLOCK_CAP if device_type == "cuda" else CPU_BLOCK_CAP
    return max(2, min(cap, context - n_prefix))


def block_size_for(
    cfg: TrainConfig, context: int, n_tokens: int, n_bos: int, device_type: str
) -> int:
    """--block-size, or the default; ConfigError when the soft prompt and a block do not fit
    the model's context together."""
    if n_tokens > KOBOLD_MAX_TOKENS:  # every run writes a KoboldAI zip: refuse it before
        raise ConfigError(
            f"--tokens {n_tokens}: KoboldAI loads soft prompts of at most {KOBOLD_MAX_TOKENS} "
            f"tokens and every run writes a KoboldAI zip: use --tokens {KOBOLD_MAX_TOKENS} or fewer"
        )
    if n_tokens + n_bos >= context:
        raise ConfigError(
            f"--tokens {n_tokens} must be less than the model's context of {context} tokens"
            + (" minus its BOS token" if n_bos else "")
        )
    block_size = cfg.block_size or default_block_size(context, n_tokens + n_bos, device_type)
    if n_tokens + n_bos + block_size > context:
        bos = " and the BOS token" if n_bos else ""
        raise ConfigError(
            f"--block-size {block_size} plus {n_tokens} soft tokens{bos} exceeds the model's context "
            f"of {context}: use --block-size {context - n_tokens - n_bos} or less"
        )
    return block_size


def check_blocks(cfg: TrainConfig, n_stream: int, block_size: int, n_blocks: int) -> None:
    """DataError when the dataset does not fill the blocks a run needs (one to train, and
    one to hold out unless --val-fraction is 0). A smaller --block-size is suggested only
    while it stays useful."""
    need = 1 if cfg.val_fraction == 0 else 2
    if n_blocks >= need:
        return
    fits = n_stream // (need + 1)
    fix = (
        f"add text or lower --block-size (e.g. --block-size {fits})"
        if fits >= MIN_USEFUL_BLOCK
        else "add text: a soft prompt learns a style from tens of thousands of tokens or more"
    )
    raise DataError(
        f"dataset {cfg.dataset} has {n_stream} tokens, fewer than {need} block(s) of "
        f"{block_size}: {fix}"
    )


def check_rows(
    cfg: TrainConfig,
    block_size: int,
    *,
    n_stream: int,
    n_blocks: int,
    n_examples: int,
    too_long: int,
    n_train: int,
    n_val: int,
) -> None:
    """``check_blocks``, for a dataset with examples too: DataError unless a row (block or
    example) is left to train on and, unless --val-fraction is 0, one held out."""
    if not n_examples:
        return check_blocks(cfg, n_stream, block_size, n_blocks)
    if n_train and (n_val or cfg.val_fraction == 0):
        return None
    longer = f" ({too_long} longer, left out)" if too_long else ""
    fix = "add examples" + (f" or raise --block-size (now {block_size})" if too_long else "")
    raise DataError(
        f"dataset {cfg.dataset}: {n_examples - too_long} of its {n_examples} examples fit in "
        f"--block-size {block_size}{longer}, which leaves {n_train} to train on and {n_val} "
        f"held out; a run needs one of each (--val-fraction 0: none held out): {fix}"
    )


def small_dataset_note(n_tokens: int) -> str | None:
    """A warning when the text is too little to learn a style from, else None."""
    if n_tokens >= SMALL_DATASET_TOKENS:
        return None
    return (
        f"warning: the dataset has only {n_tokens:,} tokens; a soft prompt learns a style from "
        f"much more text (people train on hundreds of kilobytes to megabytes, {SMALL_DATASET_TOKENS:,} "
        "tokens at the very least), so expect it to learn little but this text by heart"
    )


def make_plan(
    cfg: TrainConfig,
    *,
    n_tokens: int,
    n_bos: int,
    block_size: int,
    n_train: int,
    n_val: int,
    batch_size: int,
    world: int = 1,
    checkpoint: dict | None = None,
    mtj_step: int = 0,
    row_tokens: float = 0.0,
    row_width: int = 0,
) -> Plan:
    """The run's shape from the options and the counts; ``batch_size`` is the wanted per-rank
    batch (--batch-size, or what ``auto`` found). Resuming keeps the checkpoint's global
    batch on another number of ranks and starts at its step."""
    if cfg.grad_accum > n_train:
        raise ConfigError(
            f"--grad-accum {cfg.grad_accum} is more than the {n_train} training blocks: "
            f"use --grad-accum {n_train} or less, or add text"
        )
    batch, grad_accum = min(batch_size, n_train), cfg.grad_accum
    if checkpoint is not None:
        batch, grad_accum = fit_global_batch(checkpoint, batch, grad_accum, world)
    steps_per_epoch = n_train / (batch * grad_accum * world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    start = mtj_step
    if checkpoint is not None:
        start = int(checkpoint["step"])
        if start >= total:
            raise RunError(
                f"--resume: the run in {cfg.output_dir} already reached step "
                f"{start} of {total}; raise --max-steps or --epochs to train further"
            )
    if mtj_step >= total:
        raise RunError(
            f"--resume: {cfg.init_from} is already at step {mtj_step} of this run's {total}; "
            f"pass a larger --max-steps (e.g. --max-steps {mtj_step + total}) to train further"
        )
    eval_every = cfg.eval_every
    if eval_every is None:
        eval_every = max(1, round(total / VALIDATIONS_PER_RUN))
    return Plan(
        n_tokens,
        n_bos,
        block_size,
        n_train,
        n_val,
        batch,
        grad_accum,
        world,
        total,
        start,
        eval_every,
        row_tokens,
        row_width,
    )


def fit_global_batch(
    checkpoint: dict, batch_size: int, grad_accum: int, world: int
) -> tuple[int, int]:
    """Per-rank batch and accumulation that keep a resumed run's global batch (samples per
    step) when it resumes on a different number of ranks: the accumulation changes first, so
    each rank's memory stays the same; else the per-rank batch."""
    saved_world = int(checkpoint.get("world_size", 1))
    if saved_world == world:
        return batch_size, grad_accum
    target = int(checkpoint.get("samples_per_step", batch_size * grad_accum * saved_world))
    if target % (batch_size * world) == 0:
        return batch_size, target // (batch_size * world)
    if target % (grad_accum * world) == 0:
        return target // (grad_accum * world), grad_accum
    raise ConfigError(
        f"--resume: the checkpoint was written by {saved_world} ranks with a global batch of "
        f"{target} blocks, which {world} ranks cannot split evenly; resume on a number of "
        f"ranks that divides {target}"
    )


def decide_checkpointing(need_bytes: int, free_bytes: int | None) -> bool:
    """Unset --checkpointing: on when the activations the layers would keep take more than a
    quarter of the device's free memory, or when that memory cannot be read."""
    return free_bytes is None or need_bytes > free_bytes / CHECKPOINTING_SHARE


def decide_lr(embedding_rms: float) -> float:
    """--lr auto: LR_PER_RMS x the RMS of the model's token vectors, to two figures. AdamW's
    steps are about the rate in every element whatever the gradient's scale, so a rate that
    suits one model's vectors is too small for a model whose vectors are larger (Gemma scales
    its by the square root of the width)."""
    return float(f"{LR_PER_RMS * embedding_rms:.2g}")


def decide_compile(uncompiled_seconds: float, device_type: str, spread: bool) -> bool:
    """Unset --compile: on for a CPU run whose uncompiled steps would take over
    COMPILE_AFTER_S; never by itself on a GPU, or for a model sharded or spread over devices
    (not measured there)."""
    return device_type == "cpu" and not spread and uncompiled_seconds > COMPILE_AFTER_S


def decide_teacher_store(need_bytes: int, passes: float, free_bytes: int | None) -> bool:
    """Distillation: keep the teacher's states for every training block (computed once, up
    front) rather than compute them at each step, when the blocks come round more than once
    (else storing saves nothing: each is computed once either way) and they take at most a
    quarter of the free memory."""
    return (
        passes > 1.0 and free_bytes is not None and need_bytes <= free_bytes / TEACHER_STORE_SHARE
    )


def estimate_seconds(plan: Plan, step_seconds: float) -> float:
    """Time left: the steps, plus validations (a validation batch costs about a third of a
    training micro-batch: no backward pass)."""
    val_batches = math.ceil(plan.n_val / plan.batch_size / plan.world)
    eval_seconds = step_seconds / plan.grad_accum / 3 * val_batches
    steps = plan.total_steps - plan.start_step
    n_evals = 2 + steps // plan.eval_every if plan.eval_every else 2
    return step_seconds * steps + eval_seconds * n_evals


def default_name(dataset: str | None, teacher_prompt: str | None = None) -> str:
    """A run's name: its dataset's (file stem or folder name); distilling a written prompt
    without a dataset, the prompt file's stem, or "distilled"."""
    if dataset is None:
        p = Path(teacher_prompt or "").expanduser()
        return (
            p.stem if teacher_prompt and "\n" not in teacher_prompt and p.is_file() else "distilled"
        )
    p = Path(dataset).expanduser()
    return (p.stem if p.is_file() else p.resolve().name) or "softprompt"


def resolved_config(
    cfg: TrainConfig, plan: Plan, checkpointing: bool, compile: bool | None
) -> TrainConfig:
    """The options as this run uses them, for config.toml (so a resume keeps them)."""
    return dataclasses.replace(
        cfg,
        tokens=plan.n_tokens,
        block_size=plan.block_size,
        name=cfg.name or default_name(cfg.dataset, cfg.teacher_prompt),
        batch_size=plan.batch_size,
        grad_accum=plan.grad_accum,
        checkpointing=checkpointing,
        compile=compile,
    )
