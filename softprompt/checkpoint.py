"""Resumable training state: one file, ``checkpoint.pt``, replaced atomically.

It holds only tensors, numbers and strings, so it loads with ``torch.load(weights_only=True)``:
the soft prompt, optimizer and scheduler state, the torch RNG state, the step, the data
position (samples consumed), and what identifies the dataset and model it belongs to."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .errors import RunError
from .fileio import atomic_write
from .formats.common import torch_load, torch_load_reason
from .runfiles import CHECKPOINT_FILE

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
