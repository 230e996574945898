"""How a run stands, as the page shows it.

The written contract with `softprompt train` is ``status.json`` (``softprompt.runfiles``:
``StatusFile``, ``read_status``), which the page asks for with ``--status-file`` at every
start: its phase, step, total steps, latest validation loss, the time trained over every
segment of a resumed run, and the one-line error. ``run_state`` reads it; a run started
before the page asked for it (no status.json, or one left by an earlier segment) is read as
before, from the process and the files: a finished soft prompt, the checkpoint, and the
last error line of the log. The loss curve and the speed come from ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from pathlib import Path
from typing import Any

from ..runfiles import read_status

MARK = "=== softprompt ui: "  # the line the server writes to the log before each start
# the fallback's wording of train's log (runs without status.json)
TOTAL_RE = re.compile(r"; (\d+) steps of \d+ x \d+ blocks")
ERROR_PREFIXES = ("softprompt: error: ", "softprompt: internal error: ")


def _record(rec: Any) -> dict | None:
    """A metrics record as the page uses it (a whole-number step, numbers, NaN and infinities
    as None since JSON has neither), or None for a line that is not one (a damaged file)."""
    if not isinstance(rec, dict) or type(rec.get("step")) is not int:
        return None
    if any(type(v) not in (int, float) for v in rec.values()):
        return None
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()
    }


class MetricsReader:
    """metrics.jsonl files, read incrementally: train appends to them, and replaces one
    whole (a new file) only when a resume trims it, so a cached prefix stays valid while the
    file is the same inode and has not shrunk."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, int, list[dict]]] = {}  # inode, offset, records

    def read(self, path: Path) -> list[dict]:
        with self._lock:
            try:
                st = path.stat()
            except OSError:
                self._cache.pop(path, None)
                return []
            inode, offset, records = self._cache.get(path, (-1, 0, []))
            if inode != st.st_ino or st.st_size < offset:
                inode, offset, records = st.st_ino, 0, []
            if st.st_size > offset:
                try:
                    with path.open("rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read(st.st_size - offset)
                except OSError:
                    return list(records)
                end = chunk.rfind(b"\n") + 1  # only whole lines; a partial one waits
                for line in chunk[:end].splitlines():
                    with contextlib.suppress(ValueError, UnicodeDecodeError):
                        rec = _record(json.loads(line))
                        if rec is not None:
                            records.append(rec)
                offset += end
            self._cache[path] = (inode, offset, records)
            return list(records)


def log_since_start(path: Path) -> list[str]:
    """The log lines written since the last start (re)started the run."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith(MARK)]
    return lines[starts[-1] + 1 :] if starts else lines


def progress(
    records: list[dict],
    lines: list[str],
    running: bool,
    status: dict | None = None,
    earlier: dict | None = None,
    asked: int | None = None,
) -> dict[str, Any]:
    """Step, total, loss, validation loss, tokens/s, elapsed time and ETA. ``status`` is the
    run's status.json (None: a run started without one): the total, the latest validation
    loss and the time trained over every segment come from it; the rest from metrics.jsonl,
    and without it the total from the log and the time from this segment's metrics.
    ``earlier``: the status.json of the segment before a resume, and ``asked`` the resume's
    --max-steps: until the resumed process knows its plan, the total, the time and the ETA
    come from them."""
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    total = _total_from_log(lines) if status is None else status.get("total_steps")
    if total is None and running and (earlier or asked):
        total = asked or _number((earlier or {}).get("total_steps"))
    last = steps[-1] if steps else None
    info: dict[str, Any] = {
        "step": last["step"] if last else 0,
        "total_steps": total,
        "loss": last.get("loss") if last else None,
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "val_loss_first": vals[0]["val_loss"] if vals else None,
        "tokens_per_s": last.get("tokens_per_s") if last else None,
        "tokens": last.get("tokens") if last else None,
        "elapsed_s": None,
        "eta_s": None,
    }
    if last is not None:
        # metrics' elapsed_s counts from the start of this invocation; it starts over on
        # --resume, so the rate comes from this segment's steps
        first = len(steps) - 1
        while first > 0 and steps[first - 1].get("elapsed_s", 0) < steps[first].get("elapsed_s", 0):
            first -= 1
        done = last["step"] - steps[first]["step"] + 1
        elapsed = float(last.get("elapsed_s") or 0.0)
        info["elapsed_s"] = elapsed
        if running and total and done > 0 and elapsed > 0:
            info["eta_s"] = max(0.0, (total - last["step"]) * elapsed / done)
    if status is not None:
        info["step"] = max(info["step"], _number(status.get("step")) or 0)
        for key in ("val_loss", "elapsed_s"):
            if _number(status.get(key)) is not None:
                info[key] = status[key]
    if running and earlier and (status is None or status.get("phase") == "starting"):
        _resuming(info, earlier)
    return info


def _resuming(info: dict[str, Any], earlier: dict) -> None:
    """A resumed run before its first step: the step, time and validation loss of the
    segments before, and an ETA at their pace."""
    done, elapsed = _number(earlier.get("step")) or 0, _number(earlier.get("elapsed_s"))
    info["step"] = max(info["step"], done)
    if elapsed:
        info["elapsed_s"] = elapsed
    if info["val_loss"] is None and _number(earlier.get("val_loss")) is not None:
        info["val_loss"] = earlier["val_loss"]
    total = info["total_steps"]
    if total and done and elapsed:
        info["eta_s"] = max(0.0, (total - info["step"]) * elapsed / done)


def stopped_message(step: int, total: int | None, checkpoint: bool) -> str:
    """A stopped run's line on the page: where it stopped and what the page can do next."""
    where = f"Stopped at step {step}" + (f" of {total}" if total else "")
    if checkpoint:
        return f"{where}; Resume to continue"
    if step:
        return f"{where} before a checkpoint was saved; start a new run to train"
    return "Stopped before training began; start a new run to train"


def _total_from_log(lines: list[str]) -> int | None:
    total = None
    for line in lines:
        m = TOTAL_RE.search(line)
        if m:
            total = int(m.group(1))
    return total


def _number(value: Any) -> int | float | None:
    ok = type(value) in (int, float) and math.isfinite(value)
    return value if ok else None


def current_status(path: Path, job: dict) -> dict | None:
    """The run's status.json when the latest start wrote it (the pid it names is the one the
    page launched last), else None: not written yet, or left by an earlier segment."""
    status = read_status(path)
    if status is None or job.get("pid") is None or status.get("pid") != job.get("pid"):
        return None
    return status


def run_state(
    running: bool,
    status: dict | None,
    finished: bool,
    checkpoint: bool,
    job: dict,
    lines: list[str],
) -> tuple[str, str | None]:
    """(state, message): running, finished, stopped or failed, and the one line to show.
    ``status``: the current status.json (None: the fallback reads the log); ``finished``:
    the soft prompt file is there; ``checkpoint``: checkpoint.pt is; ``lines``: the log since
    the latest start."""
    if running:
        return "running", None
    if status is not None:
        phase, message = status["phase"], " ".join(str(status.get("message") or "").split())
        if phase == "done":
            return "finished", None
        if phase == "stopped":  # a finished run trained further, stopped part way
            return "stopped", message or "stopped"
        if finished:
            return "finished", None
        if phase == "failed":
            return "failed", message or "the training process failed"
        # it ended in the middle of a phase without a word: killed, or out of memory
        return _ended(checkpoint, job)
    errors = [line for line in lines if line.startswith(ERROR_PREFIXES)]
    said = errors[-1].split(": ", 2)[-1] if errors else None
    if finished:
        return "finished", said
    if said and not said.startswith("stopped at step"):
        return "failed", said
    return _ended(checkpoint, job, said)


def _ended(checkpoint: bool, job: dict, message: str | None = None) -> tuple[str, str]:
    """A run that ended without saying how: stopped if it can go on (or was asked to stop),
    else failed with its exit code."""
    if checkpoint or job.get("stop_requested"):
        if not message:
            message = (
                "stopped; the checkpoint is kept" if checkpoint else "stopped before training began"
            )
        return "stopped", message
    code = job.get("exit_code")
    return "failed", "the training process ended without a message" + (
        f" (exit code {code})" if code is not None else ""
    )
