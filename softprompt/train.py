"""Train a soft prompt: setup -> fit -> validate -> save.

The loop in ``train`` reads top to bottom: check the output folder, read the dataset, load
the frozen model, tokenize and cut blocks, initialise (or resume) the soft prompt, then run
optimizer steps with accumulation, clipping, warmup + cosine, validation and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .config import CPU_AUTO_BATCH, DEFAULT_TOKENS, TrainConfig, read_toml, to_toml
from .data import make_blocks, read_dataset, split_blocks, token_stream, tokenize_dataset
from .errors import ConfigError, DataError, RunError, SoftPromptError
from .fileio import atomic_write, safe_filename, write_text
from .formats import kobold, mtjsp, native
from .model import (
    LoadedModel,
    activation_bytes,
    activation_checkpointing,
    compile_layers,
    free_memory,
    load_model,
    pick_device,
    pick_dtype,
    uncompile,
)
from .runfiles import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SOFTPROMPT_FILE, StatusFile
from .soft_prompt import SoftPrompt, block_loss, fused_head, init_tensor, read_init_text

log = logging.getLogger(__name__)

CPU_BLOCK_CAP, GPU_BLOCK_CAP = 512, 2048


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
        return _ppl(self.val_loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return _ppl(self.val_loss_after)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


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
        result = _configure_and_train(config, model, status, options)
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _configure_and_train(
    config: TrainConfig | None, model: LoadedModel | None, status: StatusFile, options: dict
) -> TrainResult:
    if model is not None and not isinstance(model, LoadedModel):
        options["model"], model = os.fspath(model), None
    if (
        config is None
        and options.get("resume")
        and options.get("output")
        and not options.get("dataset")
    ):
        # train(output=..., resume=True): the rest comes from the run's saved config
        saved = Path(options["output"]).expanduser() / CONFIG_FILE
        if saved.is_file():
            options = {**read_toml(saved), **options}
    cfg = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    cfg.validate()
    ranks = distributed.from_env()  # rank 0 of 1 unless launched by torchrun
    if ranks.enabled and cfg.device_map:
        raise ConfigError(
            "--device-map spreads one process's model over the GPUs; with torchrun use "
            "--shard-model instead"
        )
    if not ranks.main:
        log.setLevel(logging.WARNING)  # one voice: rank 0's
    device = model.device if model else distributed.rank_device(ranks, pick_device(cfg.device))
    with distributed.process_group(ranks, device):
        return _train(cfg, model, ranks, device, status)


def _train(
    cfg: TrainConfig,
    model: LoadedModel | None,
    ranks: distributed.Ranks,
    device: torch.device,
    status: StatusFile,
) -> TrainResult:
    out = Path(cfg.output).expanduser()
    # only rank 0 reads the output folder (on several nodes it is rank 0's)
    checkpoint = distributed.broadcast(ranks, check_output(out, cfg) if ranks.main else None)

    # --- data (read before the model loads, so a bad dataset fails in a second)
    texts = read_dataset(cfg.dataset, cfg.recursive, cfg.skip_bad_files)
    if (
        checkpoint is not None
        and not cfg.force
        and checkpoint["dataset_hash"] != texts.content_hash
    ):
        raise RunError(
            f"--resume: the dataset {cfg.dataset} changed since the checkpoint in {out} was written; "
            "pass --force to resume on the new data anyway, or use another --output"
        )

    # --- model
    # --shard-model: each rank loads the model into CPU memory and FSDP then moves only its
    # shard to the rank's device, so the whole model never has to fit on one GPU
    load_on = torch.device("cpu") if cfg.shard_model else device
    with distributed.main_first(ranks):  # rank 0 fills the converted-model cache first
        lm = model or load_model(
            cfg.model,
            load_on,
            pick_dtype(cfg.dtype, device),
            device_map=cfg.device_map,
            quantize=cfg.quantize,
        )
    if cfg.shard_model:
        lm = dataclasses.replace(lm, device=device)
    if checkpoint is not None and not cfg.force and checkpoint["model"] != lm.source:
        raise RunError(
            f"--resume: the checkpoint in {out} was trained on {checkpoint['model']}, not {lm.source}; "
            "pass the same --model, or --force"
        )
    context = lm.context_length
    check_layout(checkpoint, lm, out, cfg.force)
    # every sequence is [soft prompt][BOS, when the tokenizer adds one][block], as the
    # consumers of a soft prompt (KoboldAI, PEFT) lay it out
    n_bos = len(lm.bos_ids)
    lead = torch.tensor(lm.bos_ids, dtype=torch.long, device=lm.device) if n_bos else None

    # --- soft prompt length and blocks
    init_sp = load_init_from(cfg.init_from, lm) if checkpoint is None and cfg.init_from else None
    n_tokens = resolve_tokens(cfg, lm, checkpoint, init_sp)
    if n_tokens + n_bos >= context:
        raise ConfigError(
            f"--tokens {n_tokens} must be less than the model's context of {context} tokens"
            + (" minus its BOS token" if n_bos else "")
        )
    block_size = cfg.block_size or default_block_size(context, n_tokens + n_bos, lm.device)
    if n_tokens + n_bos + block_size > context:
        bos = " and the BOS token" if n_bos else ""
        raise ConfigError(
            f"--block-size {block_size} plus {n_tokens} soft tokens{bos} exceeds the model's context "
            f"of {context}: use --block-size {context - n_tokens - n_bos} or less"
        )
    if ranks.main:
        check_free_space(out, n_tokens, lm.embed_dim)
    with distributed.main_first(ranks):  # rank 0 writes the token cache, the others read it
        corpus = tokenize_dataset(texts, lm.tokenizer, cfg.cache_dir)
    del texts
    stream = token_stream(corpus, lm.eos_token_id, cfg.seed)
    blocks = make_blocks(stream, block_size)
    need = 1 if cfg.val_fraction == 0 else 2
    if len(blocks) < need:
        raise DataError(
            f"dataset {cfg.dataset} has {len(stream)} tokens, fewer than {need} block(s) of {block_size}: "
            f"add text or lower --block-size (e.g. --block-size {max(2, len(stream) // (need + 1))})"
        )
    train_blocks, val_blocks = split_blocks(blocks, cfg.val_fraction, cfg.val_max_blocks)
    if cfg.grad_accum > len(train_blocks):
        raise ConfigError(
            f"--grad-accum {cfg.grad_accum} is more than the {len(train_blocks)} training blocks: "
            f"use --grad-accum {len(train_blocks)} or less, or add text"
        )
    wanted = (
        auto_batch_size(lm, n_tokens, train_blocks, cfg.checkpointing is not False, ranks, lead)
        if cfg.batch_size == "auto"
        else cfg.batch_size
    )
    batch_size, grad_accum = min(wanted, len(train_blocks)), cfg.grad_accum
    if batch_size < wanted:
        log.info("note: --batch-size lowered to %d, the number of training blocks", batch_size)
    if checkpoint is not None:
        batch_size, grad_accum = fit_global_batch(checkpoint, batch_size, grad_accum, ranks.world)
    checkpointing = cfg.checkpointing
    if checkpointing is None:
        checkpointing = wants_checkpointing(lm, batch_size * (n_tokens + n_bos + block_size))
    samples_per_step = batch_size * grad_accum * ranks.world  # the global batch
    steps_per_epoch = len(train_blocks) / samples_per_step
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if checkpoint is not None and checkpoint["step"] >= total_steps:
        raise RunError(
            f"--resume: the run in {out} already reached step {checkpoint['step']} of {total_steps}; "
            "raise --max-steps or --epochs to train further"
        )
    mtj_step = mtj_resume_step(cfg, init_sp)  # 0 unless continuing an mtj-softtuner run
    if mtj_step >= total_steps:
        raise RunError(
            f"--resume: {cfg.init_from} is already at step {mtj_step} of this run's {total_steps}; "
            f"pass a larger --max-steps (e.g. --max-steps {mtj_step + total_steps}) to train further"
        )
    name = cfg.name or default_name(cfg.dataset)
    resolved = dataclasses.replace(
        cfg,
        tokens=n_tokens,
        block_size=block_size,
        name=name,
        batch_size=batch_size,
        grad_accum=grad_accum,
        checkpointing=checkpointing,
    )

    log.info(
        "dataset: %d file%s, %s characters, %s tokens%s -> %d blocks of %d (%d train, %d validation)",
        len(corpus.files),
        "" if len(corpus.files) == 1 else "s",
        f"{corpus.chars:,}",
        f"{corpus.n_tokens:,}",
        " (token cache)" if corpus.cached else "",
        len(blocks),
        block_size,
        len(train_blocks),
        len(val_blocks),
    )
    if corpus.skipped:
        log.info("skipped: %s", ", ".join(corpus.skipped))
    log.info(
        "model: %s on %s (%s), context %d, embedding width %d",
        lm.name,
        lm.device,
        str(lm.dtype).removeprefix("torch."),
        context,
        lm.embed_dim,
    )

    # --- soft prompt and optimizer
    if checkpoint is not None:
        soft_init = checkpoint["soft_prompt"].float()
        if soft_init.shape != (n_tokens, lm.embed_dim):
            raise RunError(
                f"--resume: the checkpoint's soft prompt {tuple(soft_init.shape)} does not fit this model"
            )
    elif init_sp is not None:  # warm start from a soft prompt file
        soft_init = init_sp.tensor
    else:
        soft_init = init_tensor(lm.model, lm.tokenizer, cfg.init, n_tokens, cfg.init_text, cfg.seed)
    soft_init = distributed.broadcast(ranks, soft_init.float().cpu())  # identical on all ranks
    soft = torch.nn.Parameter(soft_init.to(lm.device, torch.float32))
    # what runs the model: the model itself, or (--shard-model) its FSDP-sharded wrapper
    net = distributed.shard_model(lm.model, ranks) if cfg.shard_model else lm.model
    optimizer = make_optimizer(cfg, soft)
    if mtj_step:  # the schedule picks up at the mtj run's step (LambdaLR then needs initial_lr)
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        log.info(
            "resuming the mtj-softtuner run %s at step %d; the optimizer starts fresh "
            "(its pickled optimizer state is never read)",
            cfg.init_from,
            mtj_step,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(total_steps, cfg.warmup), last_epoch=mtj_step - 1
    )
    start_step, samples_seen = mtj_step, mtj_step * samples_per_step
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        start_step, samples_seen = int(checkpoint["step"]), int(checkpoint["samples"])
    batches = BatchSampler(train_blocks, batch_size, cfg.seed, lm.device)
    mine = ranks.rank * batch_size  # this rank's offset within each global micro-batch

    # --- one forward/backward step before anything is written: it proves the setup works
    # and its time gives the estimate.
    check_batch = batches.batch(samples_seen + mine)
    fused_head(lm.model)  # its one-off check of the model runs before any layer is compiled

    def check_step() -> None:
        with activation_checkpointing(net, checkpointing):  # as in training: same memory
            check_loss = block_loss(net, soft, check_batch, lead=lead)
            if not math.isfinite(check_loss.item()):
                raise RunError(
                    f"the loss is not finite on the first batch, before any training (model "
                    f"{lm.name} in {str(lm.dtype).removeprefix('torch.')}): try --dtype float32 "
                    "or another --init"
                )
            check_loss.backward()

    def timed_step() -> float:
        t0 = time.perf_counter()
        check_step()
        soft.grad = None
        return (time.perf_counter() - t0) * grad_accum

    want_compile, step_seconds = cfg.compile, None
    if want_compile is None:  # unset: compile when the run is long enough to repay it
        step_seconds = timed_step()
        plain = step_seconds * (total_steps - start_step)
        # measured on CPUs only; on GPUs --compile is left for the user to ask for
        simple = lm.device.type == "cpu" and not (cfg.shard_model or cfg.device_map)
        want_compile = distributed.broadcast(ranks, simple and plain > COMPILE_AFTER_S)
        if simple:
            log.info(
                "--compile %s: the training steps take about %s uncompiled",
                "on" if want_compile else "off",
                format_seconds(plain),
            )
        resolved = dataclasses.replace(resolved, compile=want_compile)
    compiled = want_compile and compile_layers(lm.model)
    if compiled:  # compiling happens on the first call: time it apart from the step
        step_seconds = None
        t0 = time.perf_counter()
        try:
            check_step()
            log.info("compiled the model's layers in %s", format_seconds(time.perf_counter() - t0))
            # a later recompile (validation, another batch shape) that fails runs that call
            # in plain PyTorch instead of stopping the run
            torch._dynamo.config.suppress_errors = True
        except RunError:
            raise
        except Exception as e:  # torch.compile fails in many ways (no C compiler, an op...)
            uncompile(lm.model)
            log.warning(
                "note: --compile failed (%s); training without it",
                str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__,
            )
        soft.grad = None
    if step_seconds is None:
        step_seconds = timed_step()
    eval_seconds = (
        step_seconds / grad_accum / 3 * math.ceil(len(val_blocks) / batch_size / ranks.world)
    )
    n_evals = 2 + (total_steps - start_step) // cfg.eval_every if cfg.eval_every else 2
    estimate = step_seconds * (total_steps - start_step) + eval_seconds * n_evals
    log.info(
        "soft prompt: %d tokens, init %s%s; %s steps of %s%d x %d blocks (%.2f epochs, %.1f steps/epoch), "
        "lr %g, %s; estimate %s",
        n_tokens,
        cfg.init,
        " (resumed)" if checkpoint or mtj_step else "",
        total_steps,
        f"{ranks.world} ranks x " if ranks.enabled else "",
        batch_size,
        grad_accum,
        total_steps / steps_per_epoch,
        steps_per_epoch,
        cfg.lr,
        cfg.optimizer,
        format_seconds(estimate),
    )

    # --- the output folder: created only now that every check has passed (by rank 0 alone)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            for stale in (
                CHECKPOINT_FILE,
                METRICS_FILE,
                SOFTPROMPT_FILE,
            ):  # --force over an older run
                with contextlib.suppress(FileNotFoundError):
                    (out / stale).unlink()
        write_text(out / CONFIG_FILE, to_toml(resolved.to_dict()))
    metrics = Metrics(
        out / METRICS_FILE if ranks.main else None,
        keep_until=start_step if checkpoint else None,
    )
    meta_base = {
        "name": name,
        "description": cfg.description,
        "author": cfg.author,
        "supported": [lm.name],
        "model": lm.source,
        "init": "file" if cfg.init_from else cfg.init,
        "layout": layout_name(lm),
        **({"init_from": Path(cfg.init_from).name} if cfg.init_from else {}),
        **(
            {"init_text": read_init_text(cfg.init_text)}
            if cfg.init == "text" and not cfg.init_from
            else {}
        ),
        "softprompt_version": __version__,
    }

    saved_step = start_step if checkpoint is not None else None  # the checkpoint on disk
    # time spent training in the segments before this one (a resumed run), then in all
    elapsed_before = float(checkpoint.get("elapsed_s", 0.0)) if checkpoint is not None else 0.0
    status.update(step=start_step, total_steps=total_steps, elapsed_s=elapsed_before)

    def make_checkpoint(step: int, samples: int) -> None:
        nonlocal saved_step
        saved_step = step
        if not ranks.main:
            return
        save_checkpoint(
            out,
            {
                "step": step,
                "samples": samples,
                "soft_prompt": soft.detach().float().cpu(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "dataset_hash": corpus.content_hash,
                "model": lm.source,
                "bos_ids": lm.bos_ids,
                "total_steps": total_steps,
                "world_size": ranks.world,
                "samples_per_step": samples_per_step,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            },
        )

    def validate(step: int) -> float | None:
        if not len(val_blocks):
            return None
        # each rank scores its share of the blocks; the sums are added up across ranks
        share = val_blocks[ranks.rank :: ranks.world]
        # a sharded model runs only when every rank runs it: pad the shorter shares
        n_batches = (
            math.ceil(math.ceil(len(val_blocks) / ranks.world) / batch_size)
            if cfg.shard_model
            else 0
        )
        sums = loss_sums(
            net, soft.detach(), share, batch_size, lm.device, n_batches, val_blocks[:1], lead
        )
        total, count = distributed.sum_across(ranks, list(sums), lm.device)
        loss = total / max(count, 1)
        metrics.write({"step": step, "val_loss": loss, "val_ppl": _ppl(loss)})
        status.update(val_loss=loss)
        if not cfg.progress:  # without a bar, a line per validation shows the run is alive
            log.info("step %d/%d: validation loss %.4f", step, total_steps, loss)
        return loss

    # --- fit
    val_before = validate(start_step) if checkpoint is None else _first_val(metrics.records)
    val_last = val_before
    tokens_per_step = samples_per_step * block_size
    status.update(phase="training", force=True)
    step, tokens_seen, t_start = start_step, 0, time.perf_counter()
    bar = progress_bar(cfg.progress and ranks.main, total_steps, start_step)
    stop = StopFlag()
    with stop.installed(), activation_checkpointing(net, checkpointing):
        while step < total_steps:
            loss_sum = 0.0
            for _ in range(grad_accum):
                batch = batches.batch(samples_seen + mine)
                loss = block_loss(net, soft, batch, lead=lead) / grad_accum
                loss.backward()
                loss_sum += loss.item()
                samples_seen += batch_size * ranks.world
            # average gradient and loss over the ranks; stop together if any rank was asked
            loss_sum, stopping = distributed.sync_step(ranks, soft.grad, loss_sum, stop.requested)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_([soft], cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else soft.grad.norm()
            ).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                kept = (
                    f"the checkpoint of step {saved_step} in {out} is kept"
                    if saved_step is not None
                    else f"no checkpoint was saved yet (--save-every {cfg.save_every})"
                )
                raise RunError(
                    f"training diverged at step {step + 1}: the loss or gradient is not finite; "
                    f"{kept}; try a lower --lr (now {cfg.lr:g})"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - t_start
            record = {
                "step": step,
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": samples_seen * block_size,
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                "elapsed_s": elapsed,
            }
            metrics.write(record)
            status.update(step=step, elapsed_s=elapsed_before + elapsed)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                val_last = validate(step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {loss_sum:.3f}"
                    + (f" val {val_last:.3f}" if val_last is not None else "")
                    + f" {record['tokens_per_s']:,.0f} tok/s"
                )
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or stopping:
                make_checkpoint(step, samples_seen)
            if stopping and step < total_steps:
                if bar is not None:
                    bar.close()
                distributed.barrier(ranks)  # leave together, once rank 0 has saved
                raise Interrupted(
                    f"stopped at step {step} of {total_steps}; checkpoint saved in {out}; "
                    f"continue with: softprompt train --output {out} --resume"
                )
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    if compiled:
        uncompile(lm.model)  # the report's generation varies its shapes: plain PyTorch suits it

    # --- results
    status.update(phase="writing", step=step, elapsed_s=elapsed_before + seconds)
    val_after = validate(step) if len(val_blocks) else None
    meta = {
        **meta_base,
        "steps": step,
        "n_tokens": n_tokens,
        "val_loss": val_after,
        "val_loss_before": val_before,
    }
    result_sp = SoftPrompt(soft.detach(), meta)
    zip_path = out / (safe_filename(name) + ".zip")
    if ranks.main:
        kobold.save(result_sp, zip_path)
        native.save(result_sp, out / SOFTPROMPT_FILE)  # written last: marks a finished run
    if val_before is not None:
        log.info(
            "validation loss %.4f -> %.4f (perplexity %.2f -> %.2f)",
            val_before,
            val_after,
            _ppl(val_before),
            _ppl(val_after),
        )
    log.info("wrote %s and %s", zip_path, out / SOFTPROMPT_FILE)
    result = TrainResult(
        soft_prompt=result_sp,
        output=out,
        files={
            "kobold": zip_path,
            "safetensors": out / SOFTPROMPT_FILE,
            "config": out / CONFIG_FILE,
            "metrics": out / METRICS_FILE,
            "checkpoint": out / CHECKPOINT_FILE,
        },
        steps=step,
        val_loss_before=val_before,
        val_loss_after=val_after,
        tokens_seen=step * tokens_per_step,
        seconds=seconds,
        config=resolved,
        metrics=metrics.records,
    )
    if cfg.report and ranks.main:  # report.md + loss_curve.png, with sample continuations
        from .report import write_report

        # a sharded model runs only with all ranks, so its report has no sample continuations
        result.files["report"] = write_report(
            out, result, lm, val_blocks[:0] if cfg.shard_model else val_blocks
        )
    distributed.barrier(ranks)  # leave together, once rank 0 has written everything
    return result


# ----------------------------------------------------------------------------- helpers


def check_output(out: Path, cfg: TrainConfig) -> dict | None:
    """Refuse an output path that cannot take this run; return the checkpoint to resume from.
    Creates nothing."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file: give a folder (it is created if missing)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(
            f"--output {out} is not writable ({existing} does not allow writing): choose another folder"
        )
    checkpoint = (
        load_checkpoint(out) if out.is_dir() and not (cfg.force and not cfg.resume) else None
    )
    finished = (out / SOFTPROMPT_FILE).exists()
    if cfg.resume and checkpoint is not None:
        return checkpoint
    if cfg.resume and not (cfg.init_from and mtjsp.detect(Path(cfg.init_from).expanduser())):
        raise RunError(
            f"--resume: {out} has no checkpoint to resume from; drop --resume to start a new run "
            "(or give --init-from FILE.mtjsp to continue an mtj-softtuner run)"
        )
    # --resume with --init-from FILE.mtjsp: a new output folder, so the checks below apply
    if cfg.force:
        return None
    if finished:
        raise RunError(
            f"--output {out} already holds a finished soft prompt: pass --force to overwrite it, or choose another folder"
        )
    if checkpoint is not None:
        raise RunError(
            f"--output {out} holds an unfinished run (step {checkpoint['step']}): pass --resume to continue it, "
            "or --force to start over"
        )
    return None


CHECKPOINT_COPIES = 4  # a checkpoint, its replacement being written, the .zip and .safetensors
SPACE_MARGIN = 1 << 20  # config.toml, metrics.jsonl, report.md, the loss curve


def space_needed(n_tokens: int, dim: int) -> int:
    """Bytes the output folder needs: a few copies of the float32 soft prompt with AdamW's
    two moments (3 x its size), plus a margin for the small files."""
    return CHECKPOINT_COPIES * n_tokens * dim * 4 * 3 + SPACE_MARGIN


def check_free_space(out: Path, n_tokens: int, dim: int) -> None:
    """RunError when the disk holding ``out`` has less free space than the run will write."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:  # cannot tell: let the writes speak for themselves
        return
    need = space_needed(n_tokens, dim)
    if free < need:
        raise RunError(
            f"--output {out}: the disk has {format_bytes(free)} free, but checkpoints and the "
            f"soft prompt need about {format_bytes(need)}: free some space or choose another folder"
        )


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def resolve_tokens(
    cfg: TrainConfig, lm: LoadedModel, checkpoint: dict | None, init_sp: SoftPrompt | None = None
) -> int:
    if checkpoint is not None:
        return int(checkpoint["soft_prompt"].shape[0])
    if init_sp is not None:
        if cfg.tokens and cfg.tokens != init_sp.n_tokens:
            raise ConfigError(
                f"--tokens {cfg.tokens} does not match the {init_sp.n_tokens} tokens of --init-from "
                f"{cfg.init_from}: leave --tokens out"
            )
        return init_sp.n_tokens
    if cfg.tokens:
        return cfg.tokens
    if cfg.init == "text":
        return max(
            1,
            len(lm.tokenizer(read_init_text(cfg.init_text), add_special_tokens=False)["input_ids"]),
        )
    return DEFAULT_TOKENS


def load_init_from(path: str, lm: LoadedModel) -> SoftPrompt:
    """The soft prompt of --init-from (any readable format), checked against the model's width."""
    from .formats import load_any

    sp = load_any(path)
    sp.check_fits(lm.model, where=f"--init-from {path}")
    return sp


def mtj_resume_step(cfg: TrainConfig, init_sp: SoftPrompt | None) -> int:
    """The step to continue from for --resume with --init-from FILE.mtjsp (and no checkpoint
    of our own); 0 otherwise. Its optimizer state is never read, so only the soft prompt,
    the step, the schedule and the data position carry over."""
    if not (cfg.resume and init_sp is not None and init_sp.meta.get("format") == mtjsp.NAME):
        return 0
    if "step" not in init_sp.meta:
        raise RunError(
            f"--resume: {cfg.init_from} records no step to continue from; "
            "drop --resume to use it as a warm start"
        )
    return max(0, int(init_sp.meta["step"]))


AUTO_BATCH_MAX = 64  # where --batch-size auto starts searching on a GPU


COMPILE_AFTER_S = 120  # CPU: compiling SmolLM2's layers took 20 s for steps 1.35x faster


def wants_checkpointing(lm: LoadedModel, positions: int) -> bool:
    """Unset --checkpointing: on when the activations the layers would keep for ``positions``
    (micro-batch x sequence) take more than a quarter of the device's free memory, or when
    that memory cannot be read."""
    need, free = activation_bytes(lm.model, positions), free_memory(lm.device)
    on = free is None or need > free / 4
    log.info(
        "activation checkpointing %s: the layers' activations take about %s, %s free on %s",
        "on" if on else "off",
        format_bytes(need),
        "?" if free is None else format_bytes(free),
        lm.device,
    )
    return on


def auto_batch_size(
    lm: LoadedModel,
    n_tokens: int,
    blocks: np.ndarray,
    checkpointing: bool,
    ranks,
    lead: torch.Tensor | None = None,
) -> int:
    """``--batch-size auto``: on a GPU, the largest batch whose forward and backward pass fit
    in memory, found by trying (accelerate's ``find_executable_batch_size``, halving from
    64 or the number of blocks); the smallest over the ranks. On a CPU, where memory is
    rarely the limit and throughput stops growing early, a measured default."""
    if lm.device.type != "cuda":
        chosen = CPU_AUTO_BATCH
    else:
        from accelerate.utils import find_executable_batch_size

        start = 1 << (min(AUTO_BATCH_MAX, len(blocks)).bit_length() - 1)
        size = {"now": start}

        def halve() -> int:
            size["now"] //= 2
            return size["now"]

        @find_executable_batch_size(starting_batch_size=start, reduce_batch_size_fn=halve)
        def attempt(batch_size: int) -> int:
            if batch_size < 1:
                raise RunError(
                    f"--batch-size auto: not even one block of {blocks.shape[1]} tokens fits in "
                    f"the memory of {lm.device}: lower --block-size, or shard the model"
                )
            soft = torch.zeros(n_tokens, lm.embed_dim, device=lm.device, requires_grad=True)
            batch = torch.from_numpy(np.ascontiguousarray(blocks[:batch_size])).to(lm.device)
            with activation_checkpointing(lm.model, checkpointing):
                block_loss(lm.model, soft, batch, lead=lead).backward()
            return batch_size

        chosen = attempt()
        torch.cuda.empty_cache()
    chosen = int(distributed.min_across(ranks, chosen, lm.device))
    log.info(
        "--batch-size auto: %d (%s)",
        chosen,
        "the largest that fits" if lm.device.type == "cuda" else "the CPU default",
    )
    return chosen


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
        new = batch_size, target // (batch_size * world)
    elif target % (grad_accum * world) == 0:
        new = target // (grad_accum * world), grad_accum
    else:
        raise ConfigError(
            f"--resume: the checkpoint was written by {saved_world} ranks with a global batch of "
            f"{target} blocks, which {world} ranks cannot split evenly; resume on a number of "
            f"ranks that divides {target}"
        )
    log.info(
        "resuming a %d-rank run on %d rank%s: per-rank batch %d, accumulation %d, global batch %d kept",
        saved_world,
        world,
        "" if world == 1 else "s",
        new[0],
        new[1],
        target,
    )
    return new


def default_block_size(context: int, n_prefix: int, device: torch.device) -> int:
    """Tokens per block: what the context leaves after the ``n_prefix`` positions in front
    (soft tokens and BOS), at most 512 on a CPU and 2048 on a GPU."""
    cap = GPU_BLOCK_CAP if device.type == "cuda" else CPU_BLOCK_CAP
    return max(2, min(cap, context - n_prefix))


def layout_name(lm: LoadedModel) -> str:
    """How the soft prompt meets the text, as the file's metadata records it."""
    return "[soft prompt][BOS][text]" if lm.bos_ids else "[soft prompt][text]"


def check_layout(checkpoint: dict | None, lm: LoadedModel, out: Path, force: bool) -> None:
    """Refuse to resume a run whose sequences were laid out without the BOS token this model's
    tokenizer puts first (softprompt before 0.2 left it out), or with other leading tokens."""
    if checkpoint is None or force:
        return
    saved = checkpoint.get("bos_ids")
    if saved is None and lm.bos_ids:
        raise RunError(
            f"--resume: the checkpoint in {out} was trained without the BOS token that this "
            f"model's tokenizer puts first (an older softprompt left it out), so its soft "
            f"prompt would meet other sequences now: start a new run in another --output, or "
            f"pass --force to continue it with the BOS token"
        )
    if saved is not None and list(saved) != lm.bos_ids:
        raise RunError(
            f"--resume: the checkpoint in {out} was trained with leading tokens {list(saved)}, "
            f"but this tokenizer puts {lm.bos_ids} first: pass the same --model, or --force"
        )


def default_name(dataset: str) -> str:
    p = Path(dataset).expanduser()
    return (p.stem if p.is_file() else p.resolve().name) or "softprompt"


def make_optimizer(cfg: TrainConfig, soft: torch.nn.Parameter) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
    if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
        return torch.optim.Adafactor([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor  # pragma: no cover

    return Adafactor(  # pragma: no cover
        [soft],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
    )


def lr_schedule(total_steps: int, warmup: float):
    """Linear warmup over ``warmup`` of the steps, then cosine decay to 0.1 x the peak."""
    warm = int(round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class BatchSampler:
    """Batches as a pure function of the data position (samples consumed so far): sample s is
    block ``perm_e[s % N]`` of epoch ``e = s // N``, each epoch's permutation seeded. So a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int, device: torch.device):
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks))
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=gen)}
        return self._perms[epoch]

    def batch(self, start: int) -> torch.Tensor:
        n = len(self.blocks)
        idx = [int(self._perm(s // n)[s % n]) for s in range(start, start + self.batch_size)]
        return self.blocks[idx].to(self.device, non_blocking=True)  # (B, T)


@torch.no_grad()
def loss_sums(
    model,
    soft: torch.Tensor,
    blocks: np.ndarray,
    batch_size: int,
    device,
    n_batches: int = 0,
    filler: np.ndarray | None = None,
    lead: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy and token count over ``blocks`` (N, T) with the soft prompt
    ``soft``. With ``n_batches`` the model runs exactly that many times, on the ``filler``
    blocks (uncounted) once ``blocks`` run out: a model sharded across ranks needs every
    rank to run it equally often."""
    total, count = 0.0, 0
    for b in range(max(n_batches, math.ceil(len(blocks) / batch_size))):
        part = blocks[b * batch_size : (b + 1) * batch_size]
        batch = torch.from_numpy(np.ascontiguousarray(part if len(part) else filler))
        losses = block_loss(model, soft, batch.to(device), reduction="none", lead=lead)
        if len(part):
            total += losses.double().sum().item()
            count += losses.numel()
    return total, count


class Metrics:
    """Appends one JSON line per record to metrics.jsonl; on resume, drops the lines written
    after the checkpoint's step so the file reads as one uninterrupted run."""

    def __init__(self, path: Path | None, keep_until: int | None):
        self.path = path  # None: keep the records in memory only (ranks other than 0)
        self.records: list[dict] = []
        if path is None:
            return
        if keep_until is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and rec.get("step", 0) <= keep_until:
                        self.records.append(rec)
        with atomic_write(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.records)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _first_val(records: list[dict]) -> float | None:
    return next((r["val_loss"] for r in records if "val_loss" in r), None)


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


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
