"""What a training run writes besides its checkpoint: ``metrics.jsonl`` as it goes, and at
the end the soft prompt (the KoboldAI ``.zip`` and ``softprompt.safetensors``, which is
written last and so marks a finished run) with the metadata that travels in both."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from . import __version__
from .config import TrainConfig
from .errors import RunError
from .fileio import atomic_write, check_copy_target, safe_filename
from .formats import kobold, native
from .model import LoadedModel
from .plan import default_name
from .runfiles import SOFTPROMPT_FILE
from .soft_prompt import SoftPrompt, read_init_text


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

    def first_val_loss(self) -> float | None:
        """The validation loss before training (a resumed run reads it back)."""
        return next((r["val_loss"] for r in self.records if "val_loss" in r), None)

    def last_val_loss(self) -> float | None:
        """The latest validation loss recorded."""
        return next((r["val_loss"] for r in reversed(self.records) if "val_loss" in r), None)


def layout_name(lm: LoadedModel) -> str:
    """How the soft prompt meets the text, as the file's metadata records it."""
    return "[soft prompt][BOS][text]" if lm.bos_ids else "[soft prompt][text]"


def soft_prompt_meta(cfg: TrainConfig, lm: LoadedModel) -> dict[str, Any]:
    """What a trained soft prompt's files say about it before the run's figures are in:
    name, description, author, the model it was made for, how it started and its layout."""
    meta: dict[str, Any] = {
        "name": cfg.name,
        "description": cfg.description,
        "author": cfg.author,
        "supported": [lm.name],
        "model": lm.model_id or lm.name,  # portable: never this machine's path
        "init": "file" if cfg.init_from else cfg.init,
        "layout": layout_name(lm),
    }
    if cfg.init_from:
        meta["init_from"] = Path(cfg.init_from).name
    elif cfg.init == "text":
        meta["init_text"] = read_init_text(cfg.init_text)
    meta["softprompt_version"] = __version__
    return meta


def zip_name(name: str) -> str:
    """The KoboldAI zip's file name for a soft prompt called ``name``."""
    return safe_filename(name) + ".zip"


def soft_prompt_files(sp: SoftPrompt, out: Path) -> dict[str, Path]:
    """Where a finished soft prompt goes: the KoboldAI zip, named after it, and
    softprompt.safetensors."""
    return {"kobold": out / zip_name(sp.name), "safetensors": out / SOFTPROMPT_FILE}


def copy_target(cfg: TrainConfig) -> Path | None:
    """Where --copy-to puts the zip, checked before training: RunError if that cannot be."""
    if not cfg.copy_to:
        return None
    name = zip_name(cfg.name or default_name(cfg.dataset))
    ours = Path(cfg.output).expanduser() / name  # a run extended: its earlier zip was copied
    target = Path(cfg.copy_to).expanduser() / name
    replaces_ours = ours.is_file() and target.is_file() and ours.read_bytes() == target.read_bytes()
    try:
        return check_copy_target(cfg.copy_to, name, cfg.force or replaces_ours, "--copy-to")
    except ValueError as e:
        raise RunError(str(e)) from None


def write_soft_prompt(sp: SoftPrompt, files: dict[str, Path]) -> None:
    """Write both files; softprompt.safetensors last, as its presence marks a finished run."""
    kobold.save(sp, files["kobold"])
    native.save(sp, files["safetensors"])
