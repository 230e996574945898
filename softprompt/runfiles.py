"""The files of a run, named in one place, and ``status.json``: what a running ``softprompt
train`` tells a program that watches it (the web page), so that nothing has to read the
wording of its log.

A run's output folder (``--output``) holds the soft prompt in two formats, the resolved
options, the metrics, the checkpoint and the report. The web page keeps, beside each run's
output folder, what it asked for and how it launched the run.

``status.json`` (written with ``--status-file PATH``; every write replaces the file whole):

    {"phase": "training", "step": 12, "total_steps": 100, "val_loss": 3.41,
     "elapsed_s": 95.2, "message": "", "pid": 4242, "updated": 1764748800.0}

``phase`` is one of PHASES; ``message`` is the one-line error of a failed run, or how to
continue a stopped one; ``elapsed_s`` counts the time spent training over every segment of
a resumed run; ``total_steps`` and ``val_loss`` are null until known.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .fileio import write_text

# --- in a run's output folder (softprompt train --output DIR)
SOFTPROMPT_FILE = "softprompt.safetensors"  # written last: marks a finished run
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
REPORT_FILE = "report.md"
CURVE_FILE = "loss_curve.png"

# --- in a web page run's folder (WORKDIR/runs/ID/), beside the output folder
OUTPUT_DIR = "out"
JOB_FILE = "job.json"  # how the page launched the run (pid, command, start time)
LOG_FILE = "train.log"
RUN_CONFIG = "run.toml"  # what the page asked for; train writes out/config.toml, resolved
STATUS_FILE = "status.json"

# starting: checking options, data and model; training: optimizer steps (and validations);
# writing: the soft prompt files and the report; then one of the three ends
PHASES = ("starting", "training", "writing", "done", "stopped", "failed")
ENDED = ("done", "stopped", "failed")


class StatusFile:
    """Writes ``status.json`` for one run. ``update`` rewrites it when the phase changes, and
    otherwise at most once every ``every`` seconds (``force`` writes at once), so a fast
    training step is never slowed by it; a path of None writes nothing."""

    def __init__(self, path: str | os.PathLike | None, every: float = 1.0):
        self.path = Path(path) if path is not None else None
        self.every = every
        self.state: dict[str, Any] = {
            "phase": "starting",
            "step": 0,
            "total_steps": None,
            "val_loss": None,
            "elapsed_s": 0.0,
            "message": "",
            "pid": os.getpid(),
        }
        self._written = -math.inf

    def update(self, force: bool = False, **fields: Any) -> None:
        if "phase" in fields and fields["phase"] not in PHASES:
            raise ValueError(f"unknown phase {fields['phase']!r}")
        changed = fields.get("phase", self.state["phase"]) != self.state["phase"]
        self.state.update(fields)
        now = time.monotonic()
        if self.path is None or not (force or changed or now - self._written >= self.every):
            return
        self._written = now
        record = {k: _finite(v) for k, v in {**self.state, "updated": time.time()}.items()}
        try:
            write_text(self.path, json.dumps(record) + "\n")
        except OSError:  # a status that cannot be written must not stop the run
            pass


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a diverged loss is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_status(path: str | os.PathLike) -> dict[str, Any] | None:
    """The status a run last wrote, or None when there is none (not started, or not
    readable): a watcher then falls back on the process and the files."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("phase") not in PHASES:
        return None
    return data
