"""Train a soft prompt: setup -> prepare -> fit -> finish.

``train()`` reads top to bottom:

- ``setup``: check the output folder (and read its checkpoint), read the dataset, load the
  frozen model, plan the run (``plan.py``: blocks, batch, steps), build the training state
  (``checkpoint.py``: a fresh soft prompt, or the one being resumed);
- ``prepare``: one timed forward/backward step before anything is written, which proves the
  setup works, decides --checkpointing and --compile when they were not given, and gives
  the estimate; only then is the output folder created;
- ``fit``: the optimizer steps with accumulation, clipping, validation and checkpoints;
- ``finish``: the last validation, the soft prompt files and the report (``outputs.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import (
    TrainState,
    check_free_space,
    check_output,
    check_resumable,
    mtj_resume_step,
    stepping,
)
from .config import (
    LR_PER_RMS,
    PATHS,
    TrainConfig,
    absolute_paths,
    decisions,
    saved_options,
    to_toml,
)
from .data import (
    BatchSampler,
    Corpus,
    Rows,
    Split,
    TextDataset,
    read_dataset,
    split_blocks,
    split_rows,
    tokenize_dataset,
)
from .distil import (
    SAMPLED_BLOCK,
    Teacher,
    fit_block_size,
    prefix_hash,
    read_written_prompt,
    sample_key,
    sampling_options,
    teacher_blocks,
    written_prompt_ids,
)
from .errors import ConfigError, RunError, SoftPromptError
from .fileio import copy_file, format_bytes, write_text
from .formats import load_any
from .loss import fused_head, perplexity
from .model import LoadedModel, load_model, pick_device, pick_dtype
from .objective import CrossEntropy, Distillation, Objective
from .outputs import (
    Metrics,
    copy_target,
    init_text,
    soft_prompt_files,
    soft_prompt_meta,
    write_soft_prompt,
)
from .plan import (
    Plan,
    block_size_for,
    check_rows,
    decide_checkpointing,
    decide_compile,
    decide_lr,
    decide_teacher_store,
    estimate_seconds,
    make_plan,
    resolved_config,
    small_dataset_note,
)
from .runfiles import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SOFTPROMPT_FILE, StatusFile
from .sampling import SamplingOptions
from .soft_prompt import SoftPrompt, embedding_rms, init_tensor, resolve_tokens
from .speed import (
    activation_bytes,
    activation_checkpointing,
    auto_batch_size,
    compile_layers,
    free_memory,
    uncompile,
)

log = logging.getLogger(__name__)


class Interrupted(RunError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    """What a finished run produced."""

    soft_prompt: SoftPrompt
    output: Path
    files: dict[str, Path]
    steps: int
    val_loss_before: float | None
    val_loss_after: float | None
    tokens_seen: int
    seconds: float
    config: TrainConfig
    metrics: list[dict] = field(default_factory=list)

    @property
    def perplexity_before(self) -> float | None:
        return perplexity(self.val_loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return perplexity(self.val_loss_after)


# ----------------------------------------------------------------------------- the run


def train(
    config: TrainConfig | None = None,
    *,
    model: LoadedModel | None = None,
    status_file: str | os.PathLike | None = None,
    **options: Any,
) -> TrainResult:
    """Train a soft prompt. ``train(dataset="texts/", output="out", max_steps=100)`` or
    ``train(TrainConfig(...))``. A model already loaded with ``load_model`` may be passed to
    skip loading it again (a string there is the model option: an id, folder or .gguf file).
    ``status_file``: where to keep a ``status.json`` for a program watching the run (see
    ``softprompt.runfiles``). Raises SoftPromptError subclasses for anything the user can fix."""
    status = StatusFile(status_file if distributed.from_env().main else None)
    try:
        result = _run(config, model, status, options)
    except Interrupted as e:
        status.update(phase="stopped", message=str(e), force=True)
        raise
    except KeyboardInterrupt:
        status.update(phase="stopped", message="stopped at once (a second Ctrl-C)", force=True)
        raise
    except SoftPromptError as e:
        status.update(phase="failed", message=str(e), force=True)
        raise
    except BaseException as e:
        status.update(phase="failed", message=f"internal error: {_first_line(e)}", force=True)
        raise
    status.update(phase="done", force=True)
    return result


def _run(
    config: TrainConfig | None, model: LoadedModel | None, status: StatusFile, options: dict
) -> TrainResult:
    if model is not None and not isinstance(model, LoadedModel):
        options["model"], model = os.fspath(model), None
    cfg = _config(config, options)
    ranks = distributed.from_env()  # rank 0 of 1 unless launched by torchrun
    if ranks.enabled and cfg.device_map:
        raise ConfigError(
            "--device-map spreads one process's model over the GPUs; with torchrun use "
            "--shard-model instead"
        )
    device = model.device if model else distributed.rank_device(ranks, pick_device(cfg.device))
    with distributed.process_group(ranks, device), _process_state(ranks):
        run = setup(_with_decisions(cfg), model, ranks, device, status)
        resolved = prepare(run)
        _open_output(run, absolute_paths(cfg), resolved)
        run.objective.prepare(run.batches.rows.blocks, run.plan.batch_size)
        if run.checkpoint is None:
            val_before = val_latest = run.validate()
        else:  # a resumed run: the first and the latest validation of its earlier segments
            val_before, val_latest = run.metrics.first_val_loss(), run.metrics.last_val_loss()
        seconds = fit(run, val_latest)
        return finish(run, resolved, val_before, seconds)


def _config(config: TrainConfig | None, options: dict) -> TrainConfig:
    """The run's options: ``config`` changed by ``options``, or ``options`` alone; for
    ``train(output=..., resume=True)`` the rest comes from the run's saved config.toml."""
    if config is None and options.get("resume") and options.get("output"):
        options = {**saved_options(options["output"], options), **options}
    cfg = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    cfg.validate()
    return cfg


def _with_decisions(cfg: TrainConfig) -> TrainConfig:
    """For a resume: what the run decided itself (block size, batch size, --compile...) where
    the options leave it to the run, so the resumed segments run as the first one did."""
    if not cfg.resume or cfg.output is None:
        return cfg
    unset = {k: v for k, v in decisions(cfg.output).items() if getattr(cfg, k) in (None, "auto")}
    return dataclasses.replace(cfg, **unset)


@contextlib.contextmanager
def _process_state(ranks: distributed.Ranks):
    """Process-wide settings a run changes, put back when it ends: the library logger's
    level (ranks other than 0 keep quiet) and dynamo's fallback to eager on a failed
    recompile (set once layers are compiled)."""
    package_log = logging.getLogger("softprompt")
    level = package_log.level
    if not ranks.main:
        package_log.setLevel(logging.WARNING)  # one voice: rank 0's
    dynamo = sys.modules.get("torch._dynamo")
    suppress = dynamo.config.suppress_errors if dynamo is not None else None
    try:
        yield
    finally:
        package_log.setLevel(level)
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None:
            dynamo.config.suppress_errors = bool(suppress)


@dataclass
class Run:
    """What one training run works with, gathered by ``setup``."""

    cfg: TrainConfig
    out: Path
    lm: LoadedModel
    net: torch.nn.Module  # what runs the model: the model, or its FSDP-sharded wrapper
    ranks: distributed.Ranks
    plan: Plan
    state: TrainState
    batches: BatchSampler
    val_blocks: Rows  # the held-out blocks and examples
    lead: torch.Tensor | None  # the BOS token between soft prompt and block, if any
    identity: dict[str, Any]  # what a checkpoint of this run belongs to
    checkpoint: dict | None  # the one resumed from
    status: StatusFile
    objective: Objective = field(default_factory=CrossEntropy)  # what the loop minimises
    metrics: Metrics = field(default_factory=lambda: Metrics(None, None))
    checkpointing: bool = False
    compiled: bool = False
    copy_to: Path | None = None  # where --copy-to puts the zip

    @property
    def mine(self) -> int:
        """This rank's offset within each global micro-batch."""
        return self.ranks.rank * self.plan.batch_size

    def validate(self) -> float | None:
        """Mean loss over the held-out blocks at the current step (each rank scores its share
        and the sums are added up); recorded in metrics.jsonl and status.json."""
        if not len(self.val_blocks):
            return None
        share = self.val_blocks[self.ranks.rank :: self.ranks.world]
        # a sharded model runs only when every rank runs it: pad the shorter shares
        n_batches = 0
        if self.cfg.shard_model:
            n_batches = math.ceil(
                math.ceil(len(self.val_blocks) / self.ranks.world) / self.plan.batch_size
            )
        sums = self.objective.sums(
            self.net,
            self.state.soft.detach(),
            share,
            self.plan.batch_size,
            self.lm.device,
            lead=self.lead,
            n_batches=n_batches,
            filler=self.val_blocks[:1],
        )
        values = distributed.sum_across(self.ranks, list(sums.values()), self.lm.device)
        summed = dict(zip(sums, values, strict=True))
        count = max(summed.pop("tokens"), 1)
        loss = summed.pop("loss") / count
        step = self.state.step
        record = {"step": step, "val_loss": loss, "val_ppl": perplexity(loss)}
        # the objective's parts (distillation: val_kl, val_ce), per token
        self.metrics.write({**record, **{f"val_{k}": v / count for k, v in summed.items()}})
        self.status.update(val_loss=loss)
        if not self.cfg.progress:  # without a bar, a line per validation shows the run is alive
            log.info("step %d/%d: validation loss %.4f", step, self.plan.total_steps, loss)
        return loss

    def save(self, elapsed: float) -> None:
        self.state.save(self.out if self.ranks.main else None, self.identity, elapsed)


# ----------------------------------------------------------------------------- setup


def setup(
    cfg: TrainConfig,
    model: LoadedModel | None,
    ranks: distributed.Ranks,
    device: torch.device,
    status: StatusFile,
) -> Run:
    """Everything is checked and loaded; nothing is written yet."""
    out = cfg.output_dir
    # only rank 0 reads the output folder (on several nodes it is rank 0's)
    checkpoint = distributed.broadcast(ranks, check_output(out, cfg) if ranks.main else None)
    copy_to = copy_target(cfg) if ranks.main else None
    texts = _read_dataset(cfg)  # read first: a problem there fails in a second
    lm = _load_model(cfg, model, ranks, device)
    cfg = _with_lr(cfg, lm)
    init_sp = load_init_from(cfg.init_from, lm) if checkpoint is None and cfg.init_from else None
    n_tokens = resolve_tokens(cfg, lm.tokenizer, checkpoint, init_sp)
    # every sequence is [soft prompt][BOS, when the tokenizer puts one first][block], as
    # the consumers of a soft prompt (KoboldAI, PEFT) lay it out
    n_bos = len(lm.bos_ids)
    lead = torch.tensor(lm.bos_ids, dtype=torch.long, device=lm.device) if n_bos else None
    block_size = block_size_for(cfg, lm.context_length, n_tokens, n_bos, lm.device.type)
    teacher, block_size = _teacher(cfg, lm, block_size)
    teacher_hash = prefix_hash(teacher.prefix.tolist()) if teacher else None
    data_hash = texts.content_hash if texts else _sampled_hash(cfg, lm, teacher, block_size)
    check_resumable(checkpoint, cfg, out, data_hash, lm, teacher_hash)  # same data, model, ...
    if ranks.main:
        check_free_space(out, n_tokens, lm.embed_dim)
    data = _data(cfg, lm, ranks, texts, teacher, block_size)
    split = data.split
    wanted = cfg.batch_size
    if wanted == "auto":
        wanted = auto_batch_size(
            lm, n_tokens, split.train.probe(), cfg.checkpointing is not False, ranks, lead
        )
    mtj_step = mtj_resume_step(cfg, init_sp.meta if init_sp is not None else None)
    plan = make_plan(
        cfg,
        n_tokens=n_tokens,
        n_bos=n_bos,
        block_size=block_size,
        n_train=len(split.train),
        n_val=len(split.val),
        batch_size=int(wanted),
        world=ranks.world,
        checkpoint=checkpoint,
        mtj_step=mtj_step,
        row_tokens=split.train.mean_tokens,
        row_width=split.train.width,
    )
    _log_setup(data, plan, lm, int(wanted), checkpoint, cfg.loss_on)
    state = _initial_state(cfg, lm, plan, ranks, checkpoint, init_sp, split.train)
    identity = {
        "dataset_hash": data.content_hash,
        "model": lm.source,
        "bos_ids": lm.bos_ids,
        "teacher": teacher_hash,
        "total_steps": plan.total_steps,
        "world_size": ranks.world,
        "samples_per_step": plan.samples_per_step,
    }
    return Run(
        cfg=cfg,
        out=out,
        lm=lm,
        net=distributed.shard_model(lm.model, ranks) if cfg.shard_model else lm.model,
        ranks=ranks,
        plan=plan,
        state=state,
        batches=BatchSampler(split.train, plan.batch_size, cfg.seed, lm.device),
        val_blocks=split.val,
        lead=lead,
        identity=identity,
        checkpoint=checkpoint,
        status=status,
        objective=_objective(teacher, cfg, plan, lm),
        copy_to=copy_to,
    )


def _with_lr(cfg: TrainConfig, lm: LoadedModel) -> TrainConfig:
    """``cfg`` with --lr auto made a number for ``lm`` (config.toml's [decided] keeps it)."""
    if cfg.lr != "auto":
        return cfg
    rms = embedding_rms(lm.model, lm.tokenizer)
    lr = decide_lr(rms)
    log.info("--lr auto: %g, %g x the RMS of the model's token vectors (%.4f)", lr, LR_PER_RMS, rms)
    return dataclasses.replace(cfg, lr=lr)


@dataclass
class Data:
    """The rows a run trains and validates on, what identifies them, and where they came
    from: the dataset's ``corpus``, or (None) text sampled from the teacher, which
    ``summary`` describes."""

    split: Split
    content_hash: str
    corpus: Corpus | None = None
    summary: str = ""


def _read_dataset(cfg: TrainConfig) -> TextDataset | None:
    """The dataset's files, read first (a problem there fails in a second); None without
    --dataset. Distillation takes text blocks only: a dataset holding examples (pairs,
    chats) is refused with --teacher-prompt."""
    if not cfg.dataset:
        return None
    texts = read_dataset(cfg.dataset, cfg.recursive, cfg.skip_bad_files)
    if cfg.teacher_prompt and texts.has_examples:
        raise ConfigError(
            f"dataset {cfg.dataset} holds examples (pairs or chats): --teacher-prompt distils "
            "on text (.txt files) only; leave the examples out, or train without "
            "--teacher-prompt"
        )
    return texts


def _data(
    cfg: TrainConfig,
    lm: LoadedModel,
    ranks: distributed.Ranks,
    texts: TextDataset | None,
    teacher: Teacher | None,
    block_size: int,
) -> Data:
    """The dataset's rows (text blocks, examples); without a dataset, continuations of the
    written prompt sampled from the teacher (made once, then read from the cache), as rows
    of text blocks."""
    if texts is None:
        assert teacher is not None  # config.validate: no --dataset needs --teacher-prompt
        opts = teacher_sampling(cfg)
        with distributed.main_first(ranks):  # rank 0 samples and caches, the others read it
            blocks, key, cached = teacher_blocks(
                lm, teacher, cfg.teacher_samples, block_size, opts, cfg.cache_dir
            )
        train_blocks, val_blocks = split_blocks(blocks, cfg.val_fraction, cfg.val_max_blocks)
        split = Split(Rows(train_blocks), Rows(val_blocks), 0, len(blocks), 0, 0)
        summary = (
            f"text sampled from the model continuing the written prompt: {len(blocks)} "
            f"continuations of {block_size} tokens at temperature {opts.temperature:g}, top-p "
            f"{opts.top_p:g}, seed {opts.seed}{' (from the cache)' if cached else ''}"
        )
        return Data(split, key, None, summary)
    with distributed.main_first(ranks):  # rank 0 writes the token cache, the others read it
        corpus = tokenize_dataset(
            texts, lm.tokenizer, cfg.cache_dir, eos_id=lm.eos_token_id, bos_ids=lm.bos_ids
        )
    return Data(_split(cfg, corpus, lm, block_size), corpus.content_hash, corpus)


def _split(cfg: TrainConfig, corpus: Corpus, lm: LoadedModel, block_size: int) -> Split:
    """The training and validation rows (text blocks, examples), checked to be enough."""
    split = split_rows(
        corpus,
        lm.eos_token_id,
        block_size,
        cfg.seed,
        cfg.val_fraction,
        cfg.val_max_blocks,
        cfg.loss_on,
    )
    check_rows(
        cfg,
        block_size,
        n_stream=split.n_stream,
        n_blocks=split.n_blocks,
        n_examples=split.n_examples,
        too_long=split.too_long,
        n_train=len(split.train),
        n_val=len(split.val),
    )
    return split


def _teacher(cfg: TrainConfig, lm: LoadedModel, block_size: int) -> tuple[Teacher | None, int]:
    """With --teacher-prompt: the teacher (the model with the written prompt in front) and
    the block size that leaves room for the prompt in the context; else (None, block_size)."""
    if not cfg.teacher_prompt:
        return None, block_size
    prefix = written_prompt_ids(lm, read_written_prompt(cfg.teacher_prompt))
    if cfg.dataset is None and cfg.block_size is None:
        block_size = min(block_size, SAMPLED_BLOCK)
    size = fit_block_size(block_size, cfg.block_size is not None, len(prefix), lm.context_length)
    return Teacher(lm.model, prefix, lm.device), size


def teacher_sampling(cfg: TrainConfig) -> SamplingOptions:
    """How the teacher's continuations are sampled (``distil.sampling_options``)."""
    return sampling_options(cfg.teacher_temperature, cfg.teacher_top_p, cfg.seed)


def _sampled_hash(cfg: TrainConfig, lm: LoadedModel, teacher, block_size: int) -> str:
    return sample_key(
        lm, teacher.prefix.tolist(), cfg.teacher_samples, block_size, teacher_sampling(cfg)
    )


def _objective(teacher: Teacher | None, cfg: TrainConfig, plan: Plan, lm: LoadedModel):
    """Cross-entropy, or distillation with --teacher-prompt; the teacher's states for the
    training blocks are stored when blocks come round more than once and they fit."""
    if teacher is None:
        return CrossEntropy()
    passes = (plan.total_steps - plan.start_step) * plan.samples_per_step / plan.n_train
    need = plan.n_train * teacher.block_bytes(plan.block_size)
    store = decide_teacher_store(need, passes, free_memory(lm.device))
    log.info(
        "distilling a %d-token written prompt%s (its KV cache computed once), weight %g on "
        "the KL; the teacher's predictions for the %d training blocks %s",
        teacher.n_prefix - len(lm.bos_ids),
        " after the BOS token" if lm.bos_ids else "",
        cfg.distill_weight,
        plan.n_train,
        f"computed once and kept ({format_bytes(need)}), as each is seen {passes:.1f} times"
        if store
        else f"computed at each step (each block is seen {passes:.1f} times)",
    )
    return Distillation(teacher, cfg.distill_weight, store)


def _load_model(
    cfg: TrainConfig, model: LoadedModel | None, ranks: distributed.Ranks, device: torch.device
) -> LoadedModel:
    if model is not None:
        return model
    # --shard-model: each rank loads the model into CPU memory and FSDP then moves only its
    # shard to the rank's device, so the whole model never has to fit on one GPU
    load_on = torch.device("cpu") if cfg.shard_model else device
    with distributed.main_first(ranks):  # rank 0 fills the converted-model cache first
        lm = load_model(
            cfg.model,
            load_on,
            pick_dtype(cfg.dtype, device),
            device_map=cfg.device_map,
            quantize=cfg.quantize,
        )
    return dataclasses.replace(lm, device=device) if cfg.shard_model else lm


def load_init_from(path: str, lm: LoadedModel) -> SoftPrompt:
    """The soft prompt of --init-from (any readable format), checked against the model's width."""
    sp = load_any(path)
    sp.check_fits(lm.model, where=f"--init-from {path}")
    return sp


def _initial_state(
    cfg: TrainConfig,
    lm: LoadedModel,
    plan: Plan,
    ranks: distributed.Ranks,
    checkpoint: dict | None,
    init_sp: SoftPrompt | None,
    train_rows: Rows,
) -> TrainState:
    """The state to train from: the checkpoint's, a warm start from --init-from, or a fresh
    --init (``passage``: from ``train_rows``); identical on every rank."""
    if checkpoint is not None:
        soft_init = checkpoint["soft_prompt"].float()
        if soft_init.shape != (plan.n_tokens, lm.embed_dim):
            raise RunError(
                f"--resume: the checkpoint's soft prompt {tuple(soft_init.shape)} does not fit this model"
            )
    elif init_sp is not None:  # warm start from a soft prompt file
        soft_init = init_sp.tensor
    else:
        soft_init = init_tensor(
            lm.model,
            lm.tokenizer,
            cfg.init or "passage",
            plan.n_tokens,
            init_text(cfg) if cfg.init == "text" else None,
            cfg.seed,
            train_rows.passage(plan.n_tokens, cfg.seed) if cfg.init == "passage" else None,
        )
    soft_init = distributed.broadcast(ranks, soft_init.float().cpu())
    # a checkpoint brings its own schedule position; an mtj-softtuner run starts at its step
    start = plan.start_step if checkpoint is None else 0
    state = TrainState.create(
        cfg, soft_init, lm.device, plan.total_steps, start, plan.samples_per_step
    )
    if checkpoint is not None:
        state.restore(checkpoint)
    elif start:
        log.info(
            "resuming the mtj-softtuner run %s at step %d; the optimizer starts fresh "
            "(its pickled optimizer state is never read)",
            cfg.init_from,
            start,
        )
    return state


def _log_setup(
    data: Data,
    plan: Plan,
    lm: LoadedModel,
    wanted: int,
    checkpoint,
    loss_on: str = "completion",
) -> None:
    if checkpoint is not None and int(checkpoint.get("world_size", 1)) != plan.world:
        log.info(
            "resuming a %d-rank run on %d rank%s: per-rank batch %d, accumulation %d, global "
            "batch %d kept",
            int(checkpoint.get("world_size", 1)),
            plan.world,
            "" if plan.world == 1 else "s",
            plan.batch_size,
            plan.grad_accum,
            plan.samples_per_step,
        )
    elif plan.batch_size < wanted:
        log.info("note: --batch-size lowered to %d, the number of training blocks", plan.batch_size)
    _log_data(data, plan, loss_on)
    log.info(
        "model: %s on %s (%s), context %d, embedding width %d",
        lm.name,
        lm.device,
        str(lm.dtype).removeprefix("torch."),
        lm.context_length,
        lm.embed_dim,
    )


def _log_data(data: Data, plan: Plan, loss_on: str) -> None:
    """Where the rows came from and how many there are: the sampled text, the dataset's
    text blocks, or its examples."""
    corpus, split = data.corpus, data.split
    if corpus is None:
        log.info(
            "%s -> %d blocks of %d (%d train, %d validation)",
            data.summary,
            split.n_blocks,
            plan.block_size,
            plan.n_train,
            plan.n_val,
        )
        return
    if split.n_examples:
        _log_examples(corpus, split, plan, loss_on)
    else:
        log.info(
            "dataset: %d file%s, %s characters, %s tokens%s -> %d blocks of %d (%d train, %d validation)",
            len(corpus.files),
            "" if len(corpus.files) == 1 else "s",
            f"{corpus.chars:,}",
            f"{corpus.n_tokens:,}",
            " (token cache)" if corpus.cached else "",
            split.n_blocks,
            plan.block_size,
            plan.n_train,
            plan.n_val,
        )
    if corpus.skipped:
        log.info("skipped: %s", ", ".join(corpus.skipped))
    if not split.n_examples and (note := small_dataset_note(split.n_stream)) is not None:
        log.warning("%s", note)


def _log_examples(corpus: Corpus, split: Split, plan: Plan, loss_on: str) -> None:
    """The summary of a dataset with examples: the rows, then each example file's shape
    (ten at most) and what carries the loss."""
    files = len(corpus.files)
    blocks = f" and {split.n_blocks} text blocks" if split.n_blocks else ""
    longer = f", {split.too_long:,} longer than {plan.block_size} tokens left out"
    log.info(
        "dataset: %d file%s, %s characters, %s tokens%s -> %s examples%s%s; rows of at most "
        "%d tokens, %d train, %d validation (held out by example)",
        files,
        "" if files == 1 else "s",
        f"{corpus.chars:,}",
        f"{corpus.n_tokens:,}",
        " (token cache)" if corpus.cached else "",
        f"{split.n_examples:,}",
        longer if split.too_long else "",
        blocks,
        plan.block_size,
        plan.n_train,
        plan.n_val,
    )
    for f in corpus.examples[:10]:
        log.info("  %s", f.describe(loss_on))
    if len(corpus.examples) > 10:
        log.info("  and %d more example files", len(corpus.examples) - 10)
    if split.too_long > split.n_examples // 10:
        log.warning(
            "warning: %d of the %d examples are longer than --block-size %d and are left out",
            split.too_long,
            split.n_examples,
            plan.block_size,
        )


# ----------------------------------------------------------------------------- prepare


def prepare(run: Run) -> TrainConfig:
    """One forward/backward step before anything is written: it proves the setup works, its
    time gives the estimate and (when --compile is not given) decides compiling. Returns the
    options as the run uses them."""
    cfg, plan, lm = run.cfg, run.plan, run.lm
    if cfg.checkpointing is not None:
        run.checkpointing = cfg.checkpointing
    else:
        need, free = activation_bytes(lm.model, plan.positions), free_memory(lm.device)
        run.checkpointing = decide_checkpointing(need, free)
        log.info(
            "activation checkpointing %s: the layers' activations take about %s, %s free on %s",
            "on" if run.checkpointing else "off",
            format_bytes(need),
            "?" if free is None else format_bytes(free),
            lm.device,
        )
    batch = run.batches.batch_with_mask(run.state.samples + run.mine)
    fused_head(lm.model)  # its one-off check of the model runs before any layer is compiled
    want_compile, step_seconds = cfg.compile, None
    if want_compile is None and cfg.teacher_prompt:
        want_compile = False  # the teacher's calls on its KV cache would recompile the layers
    if want_compile is None:  # unset: compile when the run is long enough to repay it
        step_seconds = _timed_check_step(run, batch)
        plain = step_seconds * (plan.total_steps - plan.start_step)
        spread = bool(cfg.shard_model or cfg.device_map)
        want_compile = distributed.broadcast(
            run.ranks, decide_compile(plain, lm.device.type, spread)
        )
        if lm.device.type == "cpu" and not spread:  # measured on CPUs only
            log.info(
                "--compile %s: the training steps take about %s uncompiled",
                "on" if want_compile else "off",
                format_seconds(plain),
            )
    if want_compile and compile_layers(lm.model):
        run.compiled = _first_compiled_step(run, batch)
        step_seconds = None
    if step_seconds is None:
        step_seconds = _timed_check_step(run, batch)
    log.info(
        "soft prompt: %d tokens, init %s%s; %s steps of %s%d x %d blocks (%.2f epochs, "
        "%.1f steps/epoch), lr %g, %s; estimate %s",
        plan.n_tokens,
        cfg.init,
        " (resumed)" if plan.start_step else "",
        plan.total_steps,
        f"{plan.world} ranks x " if run.ranks.enabled else "",
        plan.batch_size,
        plan.grad_accum,
        plan.total_steps / plan.steps_per_epoch,
        plan.steps_per_epoch,
        cfg.lr,
        cfg.optimizer,
        format_seconds(estimate_seconds(plan, step_seconds)),
    )
    return resolved_config(cfg, plan, run.checkpointing, want_compile)


def _check_step(run: Run, batch: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    with activation_checkpointing(run.net, run.checkpointing):  # as in training: same memory
        loss = run.objective(run.net, run.state.soft, batch[0], lead=run.lead, mask=batch[1])
        if not math.isfinite(loss.item()):
            lm = run.lm
            raise RunError(
                f"the loss is not finite on the first batch, before any training (model "
                f"{lm.name} in {str(lm.dtype).removeprefix('torch.')}): try --dtype float32 "
                "or another --init"
            )
        loss.backward()
    run.state.soft.grad = None


def _timed_check_step(run: Run, batch: tuple[torch.Tensor, torch.Tensor | None]) -> float:
    """Seconds of one optimizer step (the check step times the accumulation)."""
    t0 = time.perf_counter()
    _check_step(run, batch)
    return (time.perf_counter() - t0) * run.plan.grad_accum


def _first_compiled_step(run: Run, batch: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    """Compiling happens on the first call: run it apart from the timing. A failure to
    compile (no C compiler, an unsupported op...) falls back to plain PyTorch with a note."""
    t0 = time.perf_counter()
    try:
        _check_step(run, batch)
    except RunError:
        raise
    except Exception as e:
        uncompile(run.lm.model)
        run.state.soft.grad = None
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        log.warning("note: --compile failed (%s); training without it", why)
        return False
    log.info("compiled the model's layers in %s", format_seconds(time.perf_counter() - t0))
    # a later recompile (validation, another batch shape) that fails runs that call in plain
    # PyTorch instead of stopping the run (put back when the run ends)
    torch._dynamo.config.suppress_errors = True
    return True


def _open_output(run: Run, asked: TrainConfig, resolved: TrainConfig) -> None:
    """The output folder, created only now that every check has passed (by rank 0 alone),
    with config.toml (the options ``asked`` for, and in its [decided] table what the run
    decided itself) and the metrics file (trimmed back to a resumed checkpoint)."""
    out, resumed = run.out, run.checkpoint is not None
    if run.ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        if not resumed:  # --force over an older run
            for stale in (CHECKPOINT_FILE, METRICS_FILE, SOFTPROMPT_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (out / stale).unlink()
        given, used = asked.to_dict(), resolved.to_dict()
        # paths were made absolute in ``asked`` only: they are asked for, never decided
        decided = {
            k: v for k, v in used.items() if given[k] != v and k not in (*PATHS, "init_text")
        }
        write_text(out / CONFIG_FILE, to_toml(given, decided))
    run.metrics = Metrics(
        out / METRICS_FILE if run.ranks.main else None,
        keep_until=run.plan.start_step if resumed else None,
    )
    state = run.state
    run.status.update(
        step=state.step, total_steps=run.plan.total_steps, elapsed_s=state.elapsed_before
    )


# ----------------------------------------------------------------------------- fit


def fit(run: Run, val_loss: float | None) -> float:
    """The optimizer steps from the state's step to the plan's last, with validation every
    --eval-every steps and a checkpoint every --save-every and at the end; Ctrl-C or SIGTERM
    stops after the current step with a checkpoint (Interrupted). Returns the seconds spent."""
    cfg, plan, state = run.cfg, run.plan, run.state
    run.status.update(phase="training", force=True)
    bar = progress_bar(cfg.progress and run.ranks.main, plan.total_steps, state.step)
    stop, tokens, t_start = StopFlag(), 0, time.perf_counter()
    if cfg.patience and run.checkpoint is None and val_loss is not None:
        state.observe(val_loss)  # the soft prompt before training counts too
    early = False
    with stop.installed(), activation_checkpointing(run.net, run.checkpointing):
        while state.step < plan.total_steps and not early:
            loss, lr, grad_norm, stopping = _step(run, stop.requested)
            tokens += plan.tokens_per_step
            elapsed = time.perf_counter() - t_start
            _record_step(run, loss, lr, grad_norm, tokens, elapsed)
            if (
                plan.eval_every
                and state.step % plan.eval_every == 0
                and state.step < plan.total_steps
            ):
                val_loss = run.validate()
                early = _patience_ran_out(run, val_loss)
            _show(bar, loss, val_loss, tokens / max(elapsed, 1e-9))
            last = state.step == plan.total_steps or early
            if (cfg.save_every and state.step % cfg.save_every == 0) or last or stopping:
                run.save(elapsed)
            if stopping and not last:
                _stop(run, bar)
    if bar is not None:
        bar.close()
    return time.perf_counter() - t_start


def _step(run: Run, stop_requested: bool) -> tuple[float, float, float, bool]:
    """One optimizer step over --grad-accum micro-batches: the loss, the rate it stepped at,
    the gradient's norm before clipping, and whether any rank was asked to stop."""
    cfg, plan, state = run.cfg, run.plan, run.state
    with stepping(state.optimizer):
        loss = 0.0
        for _ in range(plan.grad_accum):
            batch, mask = run.batches.batch_with_mask(state.samples + run.mine)
            part = run.objective(run.net, state.soft, batch, lead=run.lead, mask=mask)
            part = part / plan.grad_accum
            part.backward()
            loss += part.item()
            state.samples += plan.batch_size * plan.world
        # average gradient and loss over the ranks; stop together if any rank was asked
        grad = state.soft.grad
        assert grad is not None  # backward() has run
        loss, stopping = distributed.sync_step(run.ranks, grad, loss, stop_requested)
        grad_norm = _clip(state.soft, cfg.max_grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise _diverged(run)
        lr = float(state.scheduler.get_last_lr()[0])
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss, lr, grad_norm, stopping


def _patience_ran_out(run: Run, val_loss: float | None) -> bool:
    """--patience: count this validation; True when the last N have not beaten the best."""
    patience, state = run.cfg.patience, run.state
    if not patience or val_loss is None:
        return False
    state.observe(val_loss)
    if state.bad_validations < patience:
        return False
    log.info(
        "stopping early at step %d of %d: the validation loss has not beaten %.4f (step %d) "
        "in %d validations (--patience %d)",
        state.step,
        run.plan.total_steps,
        state.best_val,
        state.best_step,
        state.bad_validations,
        patience,
    )
    return True


def _clip(soft: torch.nn.Parameter, max_norm: float) -> float:
    """Clip the gradient to ``max_norm`` (0: no clipping); its norm before clipping."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_([soft], max_norm).item()
    return 0.0 if soft.grad is None else soft.grad.norm().item()


def _record_step(
    run: Run, loss: float, lr: float, grad_norm: float, tokens: int, elapsed: float
) -> None:
    state = run.state
    run.metrics.write(
        {
            "step": state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": run.plan.tokens_after(state.samples),
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "elapsed_s": state.elapsed_before + elapsed,  # over every segment of the run
        }
    )
    run.status.update(step=state.step, elapsed_s=state.elapsed_before + elapsed)


def _diverged(run: Run) -> RunError:
    state, cfg = run.state, run.cfg
    kept = (
        f"the checkpoint of step {state.saved_step} in {run.out} is kept"
        if state.saved_step is not None
        else f"no checkpoint was saved yet (--save-every {cfg.save_every})"
    )
    return RunError(
        f"training diverged at step {state.step + 1}: the loss or gradient is not finite; "
        f"{kept}; try a lower --lr (now {cfg.lr:g})"
    )


def _stop(run: Run, bar) -> None:
    if bar is not None:
        bar.close()
    distributed.barrier(run.ranks)  # leave together, once rank 0 has saved
    raise Interrupted(
        f"stopped at step {run.state.step} of {run.plan.total_steps}; checkpoint saved in "
        f"{run.out}; continue with: softprompt train --output {run.out} --resume"
    )


# ----------------------------------------------------------------------------- finish


def finish(
    run: Run, resolved: TrainConfig, val_before: float | None, seconds: float
) -> TrainResult:
    """The last validation, the soft prompt files, the report."""
    lm, state = run.lm, run.state
    if run.compiled:
        uncompile(lm.model)  # the report's generation varies its shapes: plain PyTorch suits it
    run.status.update(phase="writing", elapsed_s=state.elapsed_before + seconds)
    early = state.step < run.plan.total_steps  # --patience stopped it, just after a validation
    if early:
        val_after = run.metrics.last_val_loss()
    else:
        val_after = run.validate() if len(run.val_blocks) else None
    soft, best = _best_soft_prompt(run, None if early else val_after)
    meta = {
        **soft_prompt_meta(resolved, lm),
        "steps": state.step,
        "n_tokens": run.plan.n_tokens,
        "val_loss": val_after if best is None else best,
        "val_loss_before": val_before,
    }
    if best is not None:
        meta["best_step"], val_after = state.best_step, best
    sp = SoftPrompt(soft, meta)
    out = run.out
    files = soft_prompt_files(sp, out)
    if run.ranks.main:
        write_soft_prompt(sp, files)
        if run.copy_to is not None:
            files["copy"] = copy_file(files["kobold"], run.copy_to)
            log.info("copied %s to %s", files["kobold"].name, run.copy_to.parent)
    if val_before is not None:
        log.info(
            "validation loss %.4f -> %.4f (perplexity %.2f -> %.2f)",
            val_before,
            val_after,
            perplexity(val_before),
            perplexity(val_after),
        )
    log.info("wrote %s and %s", files["kobold"], files["safetensors"])
    files.update(
        config=out / CONFIG_FILE, metrics=out / METRICS_FILE, checkpoint=out / CHECKPOINT_FILE
    )
    result = TrainResult(
        soft_prompt=sp,
        output=out,
        files=files,
        steps=state.step,
        val_loss_before=val_before,
        val_loss_after=val_after,
        tokens_seen=run.plan.tokens_after(state.samples),
        seconds=state.elapsed_before + seconds,  # over every segment of a resumed run
        config=resolved,
        metrics=run.metrics.records,
    )
    if run.cfg.report and run.ranks.main:  # report.md + loss_curve.png, with continuations
        from .report import write_report

        # a sharded model runs only with all ranks, so its report has no sample continuations
        shown = run.val_blocks[:0] if run.cfg.shard_model else run.val_blocks
        result.files["report"] = write_report(out, result, lm, shown)
    distributed.barrier(run.ranks)  # leave together, once rank 0 has written everything
    return result


def _best_soft_prompt(run: Run, val_after: float | None) -> tuple[torch.Tensor, float | None]:
    """The soft prompt to write: the last one, or with --patience the best validated one
    (and its validation loss) when an earlier one beat the last."""
    state = run.state
    if run.cfg.patience:
        if val_after is not None:
            state.observe(val_after)
        if state.best_step != state.step and state.best_soft is not None:
            log.info(
                "keeping the soft prompt of step %d (validation loss %.4f), the best of the run",
                state.best_step,
                state.best_val,
            )
            return state.best_soft, state.best_val
    return state.soft.detach(), None


# ----------------------------------------------------------------------------- helpers


class StopFlag:
    """Ctrl-C or SIGTERM during training asks for a stop after the current step (which then
    saves a checkpoint); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _show(bar, loss: float, val_loss: float | None, tokens_per_s: float) -> None:
    if bar is None:
        return
    bar.update(1)
    val = f" val {val_loss:.3f}" if val_loss is not None else ""
    bar.set_postfix_str(f"loss {loss:.3f}{val} {tokens_per_s:,.0f} tok/s")


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
