"""The training state and its file, ``checkpoint.pt``: what a run needs to go on exactly
where it stopped, and the checks that decide whether an output folder may take a run.

``TrainState`` is the soft prompt being trained with its optimizer, learning-rate schedule,
step, data position (samples consumed) and time trained. ``checkpoint.pt`` holds it with
what identifies the dataset, model and layout it belongs to; it holds only tensors, numbers
and strings, so it loads with ``torch.load(weights_only=True)``, and is replaced atomically.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from schedulefree import AdamWScheduleFree

from .config import TrainConfig

if TYPE_CHECKING:
    from .model import LoadedModel
from .errors import RunError
from .fileio import atomic_write, format_bytes
from .formats import mtjsp
from .formats.common import torch_load, torch_load_reason
from .runfiles import CHECKPOINT_FILE, SOFTPROMPT_FILE

FORMAT = "softprompt-checkpoint"
VERSION = 1


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write the state beside the previous checkpoint, then rename it over it: a checkpoint
    on disk is always complete."""
    path = Path(folder) / CHECKPOINT_FILE
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getbuffer())
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint in ``folder``, or None if there is none. RunError if it is damaged."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch_load(path)
    except Exception as e:  # a damaged file fails in many ways
        raise RunError(
            f"checkpoint {path} cannot be read ({torch_load_reason(e)}); "
            "remove it or pass --force to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RunError(
            f"{path} is not a softprompt checkpoint; remove it or choose another --output"
        )
    if state.get("version", 0) > VERSION:
        raise RunError(
            f"checkpoint {path} was written by a newer softprompt; upgrade softprompt to resume"
        )
    return state


# ----------------------------------------------------------------------------- the state


@dataclass
class TrainState:
    """The soft prompt being trained (a float32 Parameter), its optimizer and schedule, the
    step, the data position in samples, and the time trained before this segment."""

    soft: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    samples: int = 0
    elapsed_before: float = 0.0  # seconds trained in earlier segments of a resumed run
    saved_step: int | None = None  # the step of the checkpoint on disk
    # --patience: the best validation loss so far, its step and soft prompt, and how many
    # validations since then have not beaten it
    best_val: float | None = None
    best_step: int = 0
    best_soft: torch.Tensor | None = None
    bad_validations: int = 0

    @classmethod
    def create(
        cls,
        cfg: TrainConfig,
        soft_init: torch.Tensor,
        device: torch.device,
        total_steps: int,
        start_step: int = 0,
        samples_per_step: int = 0,
    ) -> TrainState:
        """A fresh state from ``soft_init`` (n, d), at ``start_step`` of the schedule (an
        mtj-softtuner run continued: its optimizer state is never read, so it starts fresh)."""
        soft = torch.nn.Parameter(soft_init.to(device, torch.float32))
        optimizer = make_optimizer(cfg, soft)
        if start_step:  # LambdaLR picks up at a step only with initial_lr set
            for group in optimizer.param_groups:
                group["initial_lr"] = cfg.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(total_steps, cfg.warmup, cfg.decay_to), last_epoch=start_step - 1
        )
        return cls(soft, optimizer, scheduler, start_step, start_step * samples_per_step)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint: optimizer, schedule, torch's RNG, step, data position."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        self.step, self.samples = int(checkpoint["step"]), int(checkpoint["samples"])
        self.elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        self.saved_step = self.step
        if "best_val" in checkpoint:
            self.best_val, self.best_step = (
                float(checkpoint["best_val"]),
                int(checkpoint["best_step"]),
            )
            self.best_soft = checkpoint["best_soft"].to(self.soft.device, torch.float32)
            self.bad_validations = int(checkpoint["bad_validations"])

    def observe(self, val_loss: float) -> None:
        """--patience: count a validation; a new best keeps a copy of its soft prompt."""
        if self.best_val is None or val_loss < self.best_val:
            self.best_val, self.best_step, self.bad_validations = val_loss, self.step, 0
            self.best_soft = self.soft.detach().clone()
        else:
            self.bad_validations += 1

    def save(self, folder: Path | None, identity: dict[str, Any], elapsed: float) -> None:
        """Write checkpoint.pt (``folder`` None: only remember the step, as ranks other than
        0 do). ``identity`` says what the state belongs to (dataset, model, layout, ranks)."""
        self.saved_step = self.step
        if folder is None:
            return
        save_checkpoint(
            folder,
            {
                "step": self.step,
                "samples": self.samples,
                "soft_prompt": self.soft.detach().float().cpu(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "elapsed_s": self.elapsed_before + elapsed,
                **self._patience(),
                **identity,
            },
        )

    def _patience(self) -> dict[str, Any]:
        if self.best_val is None or self.best_soft is None:
            return {}
        return {
            "best_val": self.best_val,
            "best_step": self.best_step,
            "best_soft": self.best_soft.detach().float().cpu(),
            "bad_validations": self.bad_validations,
        }


def make_optimizer(cfg: TrainConfig, soft: torch.nn.Parameter) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` (whose --lr auto the run has made a number) over ``soft``."""
    lr = cfg.lr
    if not isinstance(lr, (int, float)):
        raise TypeError(f"the optimizer needs a number for lr; --lr {lr} is decided by the run")
    if cfg.optimizer == "schedulefree":
        return AdamWScheduleFree([soft], lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([soft], lr=lr, weight_decay=cfg.weight_decay)
    if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
        return torch.optim.Adafactor([soft], lr=lr, weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor  # pragma: no cover

    return Adafactor(  # pragma: no cover
        [soft],
        lr=lr,
        weight_decay=cfg.weight_decay,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
    )


@contextmanager
def stepping(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around one optimizer step (its forward and backward passes included). Schedule-free
    AdamW takes its gradients at a point between the average it keeps (the soft prompt
    outside its steps: what validation scores, a checkpoint keeps and the run writes) and
    the point its steps move: it moves the soft prompt there for the step and back after.
    Other optimizers train the soft prompt itself."""
    if not isinstance(optimizer, AdamWScheduleFree):
        yield
        return
    optimizer.train()
    try:
        yield
    finally:
        optimizer.eval()


def lr_schedule(total_steps: int, warmup: float, decay_to: float):
    """Linear warmup over ``warmup`` of the steps, then cosine decay to ``decay_to`` x the
    peak as the run ends (1: the peak to the end)."""
    warm = int(round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return decay_to + (1.0 - decay_to) * cosine

    return factor


# ----------------------------------------------------------------------------- output folder


def check_output(out: Path, cfg: TrainConfig) -> dict | None:
    """Refuse an output path that cannot take this run; return the checkpoint to resume from.
    Creates nothing."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file: give a folder (it is created if missing)")
    existing = _existing(out)
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


def check_resumable(
    checkpoint: dict | None,
    cfg: TrainConfig,
    out: Path,
    dataset_hash: str,
    lm: LoadedModel,
    teacher: str | None = None,
) -> None:
    """Refuse to resume a checkpoint made on other data, another model, another layout or
    another written prompt to distil (``teacher``: its hash) (``--force`` resumes anyway),
    or one that --patience stopped."""
    if checkpoint is None or cfg.force:
        return
    check_stopped_early(checkpoint, cfg, out)
    model_source, bos_ids = lm.source, lm.bos_ids
    saved_teacher = checkpoint.get("teacher")
    if saved_teacher != teacher:
        how = (
            "without --teacher-prompt"
            if saved_teacher is None
            else "to distil a written prompt (--teacher-prompt)"
            if teacher is None
            else "to distil another written prompt"
        )
        raise RunError(
            f"--resume: the checkpoint in {out} was trained {how}: pass the same "
            "--teacher-prompt as before, or --force"
        )
    if checkpoint["dataset_hash"] != dataset_hash:
        what = (
            f"the dataset {cfg.dataset} changed"
            if cfg.dataset
            else "the text sampled from the written prompt is not the same (--teacher-samples, "
            "--block-size, the sampling options or --seed changed)"
        )
        raise RunError(
            f"--resume: {what} since the checkpoint in {out} was written; "
            "pass --force to resume on the new data anyway, or use another --output"
        )
    if checkpoint["model"] != model_source:
        raise RunError(
            f"--resume: the checkpoint in {out} was trained on {checkpoint['model']}, not {model_source}; "
            "pass the same --model, or --force"
        )
    saved = checkpoint.get("bos_ids")
    if saved is None and bos_ids:  # softprompt before 0.2 left the BOS token out
        raise RunError(
            f"--resume: the checkpoint in {out} was trained without the BOS token that this "
            f"model's tokenizer puts first (an older softprompt left it out), so its soft "
            f"prompt would meet other sequences now: start a new run in another --output, or "
            f"pass --force to continue it with the BOS token"
        )
    if saved is not None and list(saved) != bos_ids:
        raise RunError(
            f"--resume: the checkpoint in {out} was trained with leading tokens {list(saved)}, "
            f"but this tokenizer puts {bos_ids} first: pass the same --model, or --force"
        )


def check_stopped_early(checkpoint: dict | None, cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a run that --patience stopped, under the same --patience: it would
    stop again at once. A larger --patience, or 0, trains on from where it stopped."""
    if checkpoint is None or not cfg.patience:
        return
    bad = int(checkpoint.get("bad_validations", 0))
    if bad >= cfg.patience:
        raise RunError(
            f"--resume: the run in {out} stopped early at step {checkpoint['step']}: its "
            f"validation loss did not improve in {bad} validations (--patience "
            f"{cfg.patience}; the best was at step {checkpoint['best_step']}); pass a larger "
            "--patience, or --patience 0, to train on"
        )


def mtj_resume_step(cfg: TrainConfig, init_meta: dict[str, Any] | None) -> int:
    """The step to continue from for --resume with --init-from FILE.mtjsp (and no checkpoint
    of our own); 0 otherwise. Its optimizer state is never read, so only the soft prompt,
    the step, the schedule and the data position carry over."""
    if not (cfg.resume and init_meta is not None and init_meta.get("format") == mtjsp.NAME):
        return 0
    if "step" not in init_meta:
        raise RunError(
            f"--resume: {cfg.init_from} records no step to continue from; "
            "drop --resume to use it as a warm start"
        )
    return max(0, int(init_meta["step"]))


CHECKPOINT_COPIES = 4  # a checkpoint, its replacement being written, the .zip and .safetensors
SPACE_MARGIN = 1 << 20  # config.toml, metrics.jsonl, report.md, the loss curve


def space_needed(n_tokens: int, dim: int) -> int:
    """Bytes the output folder needs: a few copies of the float32 soft prompt with its
    optimizer's two tensors (AdamW's moments, schedule-free AdamW's iterate and second
    moment: 3 x its size), plus a margin for the small files."""
    return CHECKPOINT_COPIES * n_tokens * dim * 4 * 3 + SPACE_MARGIN


def check_free_space(out: Path, n_tokens: int, dim: int) -> None:
    """RunError when the disk holding ``out`` has less free space than the run will write."""
    try:
        free = shutil.disk_usage(_existing(out)).free
    except OSError:  # cannot tell: let the writes speak for themselves
        return
    need = space_needed(n_tokens, dim)
    if free < need:
        raise RunError(
            f"--output {out}: the disk has {format_bytes(free)} free, but checkpoints and the "
            f"soft prompt need about {format_bytes(need)}: free some space or choose another folder"
        )


def _existing(path: Path) -> Path:
    """``path`` or its nearest folder that exists: where it would be created."""
    while not path.exists():
        path = path.parent
    return path
