"""The workspace folder of `softprompt ui`: its datasets and runs, and the training processes
started from it.

    WORKDIR/datasets/NAME/*.txt     uploaded .txt files
    WORKDIR/runs/ID/job.json        what the page asked for (options, command, pid, times)
    WORKDIR/runs/ID/run.toml        the options, passed with --config
    WORKDIR/runs/ID/status.json     how the run stands, kept by train (--status-file)
    WORKDIR/runs/ID/train.log       the training process's stdout and stderr
    WORKDIR/runs/ID/out/            the run's --output (metrics.jsonl, checkpoint, <name>.zip)

Each training run is a child process, ``python -m softprompt train --config run.toml --output
out --status-file status.json --no-progress``, started in a session of its own so that it
keeps going when the page is closed or the server stops; its state is read back from the
files alone (``state.py``), so reopening the page, or restarting ``softprompt ui``, lists
every run as it stands. Stop sends SIGTERM: train finishes the current step, saves a
checkpoint and exits 130; Resume runs ``train --output out --resume``.

Every file of a run is the server's to read and write: a link that leads out of the run's
folder (or out of datasets/) makes it refuse the run (or the upload).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import to_toml
from ..errors import ConfigError, RunError, SoftPromptError
from ..fileio import atomic_write, safe_filename, write_text
from ..http import loads
from ..runfiles import (
    CHECKPOINT_FILE,
    JOB_FILE,
    LOG_FILE,
    METRICS_FILE,
    OUTPUT_DIR,
    RUN_CONFIG,
    SOFTPROMPT_FILE,
    STATUS_FILE,
)
from .options import parse_options
from .state import MARK, MetricsReader, current_status, log_since_start, progress, run_state

log = logging.getLogger("softprompt.ui")

MAX_METRICS = 5000  # metric records per answer (the page asks again from where it stopped)
LOG_TAIL = 40  # log lines shown on the page


def default_workdir() -> Path:
    """$SOFTPROMPT_UI_DIR, else $XDG_DATA_HOME/softprompt/ui, else ~/.local/share/softprompt/ui."""
    env = os.environ.get("SOFTPROMPT_UI_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "softprompt" / "ui"


def _within(path: Path, base: Path) -> Path | None:
    """``path`` with every link in it resolved, or None if that is not ``base`` or inside it
    (or cannot be resolved: a loop of links)."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return None
    return real if real == base or base in real.parents else None


def _inside(path: Path, base: Path) -> Path:
    """``path`` resolved, or RunError if a link takes it out of ``base``: the server reads,
    serves and writes the workspace's files, and a link planted there must not make it read
    or write any other file (/etc/passwd through a download, say)."""
    real = _within(path, base)
    if real is None:
        raise RunError(f"{path} is a link that leads outside {base}: refused (delete the link)")
    return real


def _absolute(text: str, only: str | None = None) -> str:
    """``text`` as an absolute path (the child runs in the run's folder, and a resume may come
    from another server). ``only``: "file" or "exists", only where it names one here (a model
    may be a hub id, init text may be text). A name the file system refuses (too long, a
    ~user with no such user) is left as given, for train to report."""
    try:
        path = Path(text).expanduser()
        if only == "file" and not path.is_file() or only == "exists" and not path.exists():
            return text
        return str(path.resolve())
    except (OSError, RuntimeError):
        return text


# job.json's keys that the server uses, and their types
JOB_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "created": (int, float),
    "pid": (int, type(None)),
    "exit_code": (int, type(None)),
    "stop_requested": bool,
    "options": dict,
    "starts": list,
}


def _read_job(folder: Path) -> dict:
    """A run's job.json; RunError naming it if it is damaged (not a JSON object, NaN or an
    infinity in it, a value of the wrong type), so that one bad folder shows as damaged
    instead of breaking every answer that lists it."""
    path = folder / JOB_FILE
    try:
        job = loads(path.read_text(encoding="utf-8"), finite=True)
        if not isinstance(job, dict):
            raise ValueError("not a JSON object")
        for key, kind in JOB_TYPES.items():
            if key in job and not isinstance(job[key], kind):
                raise ValueError(f"{key} is {type(job[key]).__name__}")
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(
            f"{folder.name}/{JOB_FILE} is damaged ({e}): delete the folder {folder}"
        ) from None
    return job


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def pid_alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` is a live process whose command line holds ``marker`` (where /proc
    exists: a pid reused by another program after a reboot does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if (proc / "stat").read_text().split(")")[-1].split()[0] == "Z":
                return False  # a zombie: finished, waiting to be reaped
            return marker in (proc / "cmdline").read_bytes().decode("utf-8", "replace")
        except (OSError, IndexError):
            return False


class NoSuchRun(KeyError):
    """A run id with no run folder: a 404."""


class Workspace:
    """The runs and datasets under one folder, and the training processes started from it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.runs = self.root / "runs"
        self.datasets = self.root / "datasets"
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            self.datasets.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"--workdir {self.root} cannot be created ({e.strerror}): choose another folder"
            ) from None
        # links the owner made to put runs/ or datasets/ on another disk are kept: the bounds
        # that links inside them may not leave are these folders as they are now
        self.runs, self.datasets = self.runs.resolve(), self.datasets.resolve()
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._metrics = MetricsReader()

    # --- runs
    def run_dir(self, run_id: str) -> Path:
        """The run's folder; NoSuchRun (a KeyError) if there is none, RunError if it or a link in it leads
        out of it (every file of a run is the server's to read and write)."""
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,120}", run_id) or run_id.startswith("."):
            raise NoSuchRun(run_id)
        folder = self.runs / run_id
        if not (folder / JOB_FILE).is_file():
            raise NoSuchRun(run_id)
        real = _inside(folder, self.runs)
        for parent, dirs, files in os.walk(real):  # a linked folder is listed, not entered
            for name in dirs + files:
                if os.path.islink(os.path.join(parent, name)):
                    _inside(Path(parent, name), real)
        return folder

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first; a damaged one as status "damaged" with the reason."""
        out = []
        for folder in self.runs.iterdir():
            try:
                out.append(self.status(folder.name, summary=True))
            except KeyError:
                continue  # not a run's folder
            except (SoftPromptError, OSError) as e:
                created = 0.0
                with contextlib.suppress(OSError):
                    created = folder.lstat().st_mtime
                out.append(
                    {
                        "id": folder.name,
                        "name": folder.name,
                        "created": created,
                        "status": "damaged",
                        "message": str(e),
                        "step": 0,
                        "total_steps": None,
                    }
                )
        out.sort(key=lambda r: r["created"], reverse=True)
        return out

    def start(self, options: dict[str, Any]) -> dict[str, Any]:
        values = parse_options(options)
        for key, only in (
            ("dataset", None),
            ("cache_dir", None),
            ("model", "exists"),
            ("init_from", "exists"),
            ("init_text", "file"),
        ):
            if values.get(key):
                values[key] = _absolute(values[key], only)
        name = values.get("name") or Path(str(values["dataset"]).rstrip("/\\")).name or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:40] or "run"
        base = f"{stamp}-{slug}"
        with self._lock:
            run_id, i = base, 1
            while (self.runs / run_id).exists():
                i += 1
                run_id = f"{base}-{i}"
            folder = self.runs / run_id
            folder.mkdir(parents=True)
        write_text(folder / RUN_CONFIG, to_toml(values))
        job = {
            "id": run_id,
            "name": name,
            "created": time.time(),
            "options": values,
            "starts": [],
        }
        _write_json(folder / JOB_FILE, job)
        self._launch(folder, ["--config", str(folder / RUN_CONFIG)])
        return self.status(run_id)

    def resume(self, run_id: str, max_steps: int | None = None) -> dict[str, Any]:
        folder = self.run_dir(run_id)
        state = self.status(run_id, summary=True)
        if state["status"] == "running":
            raise ConfigError("this run is still running")
        if not state["can_resume"]:
            raise ConfigError("this run has no checkpoint to resume from: start a new run")
        extra = ["--resume"]
        if max_steps is not None:
            if max_steps < 1:
                raise ConfigError("--max-steps must be at least 1")
            extra += ["--max-steps", str(max_steps)]
        self._launch(folder, extra)
        return self.status(run_id)

    def _launch(self, folder: Path, args: list[str]) -> None:
        out = folder / OUTPUT_DIR
        cmd = [
            sys.executable,
            "-m",
            "softprompt",
            "train",
            *args,
            "--output",
            str(out),
            "--status-file",
            str(folder / STATUS_FILE),
            "--no-progress",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        with (folder / LOG_FILE).open("a", encoding="utf-8") as fh:
            fh.write(f"{MARK}{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd[2:])}\n")
            fh.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # survives the page, the server and its Ctrl-C
            )
        with self._lock:
            self._children[folder.name] = proc
            job = _read_job(folder)
            job["pid"] = proc.pid
            job["stop_requested"] = False
            job["exit_code"] = None
            job.setdefault("starts", []).append({"time": time.time(), "args": args})
            _write_json(folder / JOB_FILE, job)
        log.info("started %s (pid %d)", folder.name, proc.pid)

    def stop(self, run_id: str) -> dict[str, Any]:
        folder = self.run_dir(run_id)
        job = _read_job(folder)
        pid = job.get("pid")
        if not self._alive(run_id, job):
            raise ConfigError("this run is not running")
        job["stop_requested"] = True
        _write_json(folder / JOB_FILE, job)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # train saves a checkpoint after this step, exits 130
        return self.status(run_id)

    def _alive(self, run_id: str, job: dict) -> bool:
        proc = self._children.get(run_id)
        if proc is not None and proc.pid == job.get("pid"):
            code = proc.poll()  # reaps our own child, so it is not left a zombie
            if code is None:
                return True
            if job.get("exit_code") is None:
                job["exit_code"] = code
                with contextlib.suppress(OSError):
                    _write_json(self.runs / run_id / JOB_FILE, job)
            return False
        return pid_alive(job.get("pid"), str(self.runs / run_id))

    def status(self, run_id: str, since: int = 0, summary: bool = False) -> dict[str, Any]:
        """How the run stands (see state.py); with its metrics from record ``since`` on and
        the log's tail, unless ``summary``."""
        folder = self.run_dir(run_id)
        job = _read_job(folder)
        out = folder / OUTPUT_DIR
        running = self._alive(run_id, job)
        records = self._metrics.read(out / METRICS_FILE)
        current = current_status(folder / STATUS_FILE, job)
        lines = log_since_start(folder / LOG_FILE)
        finished = (out / SOFTPROMPT_FILE).is_file()
        checkpoint = (out / CHECKPOINT_FILE).is_file()
        state, message = run_state(running, current, finished, checkpoint, job, lines)
        zips = sorted(out.glob("*.zip")) if finished else []
        info: dict[str, Any] = {
            "id": run_id,
            "name": job.get("name", run_id),
            "created": job.get("created", 0),
            "status": state,
            "message": message,
            "phase": current["phase"] if current else None,  # runfiles.PHASES, when known
            "dataset": job.get("options", {}).get("dataset"),
            "model": job.get("options", {}).get("model"),
            "options": job.get("options", {}),
            "output": str(out),
            "zip": zips[0].name if zips else None,
            "can_resume": checkpoint and not running and state != "finished",
            "can_generate": finished and not running,
            **progress(records, lines, running, current),
        }
        starting = current is None or current["phase"] == "starting"
        if state == "running" and starting and not records:  # what it does before training
            info["activity"] = next(
                (x for x in reversed(lines) if x.strip() and not x.startswith(MARK)),
                "starting",
            )
        if not summary:
            since = max(0, min(since, len(records)))
            info["metrics"] = records[since : since + MAX_METRICS]
            info["metrics_from"] = since
            info["metrics_count"] = len(records)
            info["log"] = lines[-LOG_TAIL:]
        return info

    def zip_path(self, run_id: str) -> Path:
        info = self.status(run_id, summary=True)
        if not info["zip"]:
            raise ConfigError("this run has no finished soft prompt yet")
        return self.run_dir(run_id) / OUTPUT_DIR / info["zip"]

    # --- datasets
    def list_datasets(self) -> list[dict[str, Any]]:
        """The dataset folders and their .txt files; what a link takes out of datasets/ is
        left out."""
        out = []
        for folder in sorted(self.datasets.iterdir()):
            real = _within(folder, self.datasets)
            if real is not None and real.is_dir():
                files = [
                    f
                    for f in sorted(real.glob("*.txt"))
                    if _within(f, self.datasets) and f.is_file()
                ]
                out.append(
                    {
                        "name": folder.name,
                        "path": str(real),
                        "files": [f.name for f in files],
                        "bytes": sum(f.stat().st_size for f in files),
                    }
                )
        return out

    def upload(self, dataset: str, filename: str, data: bytes) -> dict[str, Any]:
        name = safe_filename(dataset or "", default="dataset")
        given = Path(filename or "").name.strip() or "text.txt"
        if not given.lower().endswith(".txt"):
            raise ConfigError(f"{filename}: only .txt files can be uploaded")
        # the extension is kept apart: cutting a long name short must not cut it off
        fname = safe_filename(given[:-4], default="text") + ".txt"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{fname} is not UTF-8 text (bad byte at offset {e.start}): save it as UTF-8"
            ) from None
        folder = _inside(self.datasets / name, self.datasets)
        try:
            folder.mkdir(exist_ok=True)
            with atomic_write(folder / fname) as fh:
                fh.write(data)
        except OSError as e:
            raise ConfigError(f"{name}/{fname} cannot be saved ({e.strerror or e})") from None
        return {"name": name, "path": str(folder), "file": fname, "bytes": len(data)}
