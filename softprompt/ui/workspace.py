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
checkpoint and exits 130; Resume runs ``train --output out --resume`` (with ``--max-steps N``
to train a finished run further). A run that is not running, and an uploaded dataset, can be
deleted: the folder goes, and a link in it goes without what it leads to.

Every file of a run is the server's to read and write: a link that leads out of the run's
folder (or out of datasets/) makes it refuse the run (or the upload).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
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
    read_status,
)
from .datacheck import check_dataset
from .options import parse_options
from .state import (
    MARK,
    MetricsReader,
    current_status,
    log_since_start,
    progress,
    run_state,
    stopped_message,
)

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
    "earlier": (dict, type(None)),
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


def _asked_steps(job: dict) -> int | None:
    """The --max-steps the latest resume that gave one asked for (a resume without one keeps
    it), or None."""
    asked = None
    for start in job.get("starts") or []:
        args = start.get("args") if isinstance(start, dict) else None
        if isinstance(args, list) and "--max-steps" in args[:-1]:
            value = args[args.index("--max-steps") + 1]
            asked = int(value) if isinstance(value, str) and value.isdigit() else asked
    return asked


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
    return True  # no /proc to ask (macOS): the process is there


def _trained_on(runs: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """The runs (summaries) whose dataset is ``folder`` or in it."""
    out = []
    for run in runs:
        dataset = run.get("dataset")
        if isinstance(dataset, str) and dataset:
            path = Path(dataset)
            if path == folder or folder in path.parents:
                out.append(run)
    return out


class NoSuchRun(KeyError):
    """A run id with no run folder: a 404."""


class NoSuchDataset(KeyError):
    """A dataset name with no dataset folder: a 404."""


RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,120}")


def _remove(path: Path) -> None:
    """Delete a file or folder of the workspace: a link is removed, never what it leads to
    (rmtree does not follow the links inside a folder either). ConfigError if it cannot."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError as e:
        raise ConfigError(f"{path} cannot be deleted ({e.strerror or e})") from None


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
        if not RUN_ID.fullmatch(run_id) or run_id.startswith("."):
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
        found = check_dataset(
            values["dataset"], values.get("recursive", False), values.get("skip_bad_files", False)
        )
        if not found["ok"]:  # train would stop on it: no run is made
            raise ConfigError(found["message"])
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
        job: dict[str, Any] = {
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
        if max_steps is not None and max_steps < 1:
            raise ConfigError("Steps (--max-steps) must be at least 1")
        done = state["step"]
        if state["status"] == "finished" and (max_steps is None or max_steps <= done):
            raise ConfigError(
                f"this run has finished its {done} steps: give Steps (--max-steps) above "
                f"{done} to train it further"
            )
        extra = ["--resume"] + (["--max-steps", str(max_steps)] if max_steps else [])
        self._launch(folder, extra)
        return self.status(run_id)

    def delete_run(self, run_id: str) -> dict[str, Any]:
        """Delete a run that is not running, its folder and everything in it (a damaged one
        too: a link is removed, not followed)."""
        if not RUN_ID.fullmatch(run_id) or run_id.startswith("."):
            raise NoSuchRun(run_id)
        folder = self.runs / run_id
        if not folder.is_symlink() and not (folder / JOB_FILE).is_file():
            raise NoSuchRun(run_id)
        with self._lock:
            try:
                running = self._alive(run_id, _read_job(folder))
            except SoftPromptError:  # a damaged job.json: only our own child is known
                child = self._children.get(run_id)
                running = child is not None and child.poll() is None
            if running:
                raise ConfigError("this run is running: stop it before deleting it")
            _remove(folder)
            self._children.pop(run_id, None)
        log.info("deleted run %s", run_id)
        return {"deleted": run_id}

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
        earlier = read_status(folder / STATUS_FILE)  # the segment before: this one replaces it
        try:
            json.dumps(earlier, allow_nan=False)
        except ValueError:  # NaN written by hand: not JSON, not kept
            earlier = None
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
            job["earlier"] = earlier
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
        if not pid or not self._alive(run_id, job):
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
        # the last segment's status.json, kept at a resume for the page until this one knows
        earlier = job.get("earlier") if running else None
        lines = log_since_start(folder / LOG_FILE)
        finished = (out / SOFTPROMPT_FILE).is_file()
        checkpoint = (out / CHECKPOINT_FILE).is_file()
        state, message = run_state(running, current, finished, checkpoint, job, lines)
        asked = _asked_steps(job)
        numbers = progress(records, lines, running, current, earlier, asked)
        if state == "stopped":  # what to do on this page, not train's command line
            message = stopped_message(numbers["step"], numbers["total_steps"], checkpoint)
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
            "options": {**job.get("options", {}), **({"max_steps": asked} if asked else {})},
            "output": str(out),
            "zip": zips[0].name if zips else None,
            # a finished run keeps its checkpoint: it can be trained further
            "can_resume": checkpoint and not running,
            "can_generate": finished and not running,
            **numbers,
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
        """The dataset folders, their .txt files, and the runs trained on each; what a link
        takes out of datasets/ is left out."""
        out = []
        runs = None
        for folder in sorted(self.datasets.iterdir()):
            real = _within(folder, self.datasets)
            if real is not None and real.is_dir():
                files = [
                    f
                    for f in sorted(real.glob("*.txt"))
                    if _within(f, self.datasets) and f.is_file()
                ]
                runs = self.list_runs() if runs is None else runs
                out.append(
                    {
                        "name": folder.name,
                        "path": str(real),
                        "files": [f.name for f in files],
                        "bytes": sum(f.stat().st_size for f in files),
                        "runs": [r["name"] for r in _trained_on(runs, real)],
                    }
                )
        return out

    def check_dataset(self, path: str, recursive: bool, skip_bad_files: bool) -> dict:
        """What train would make of the dataset path (``datacheck.check_dataset``)."""
        if not path.strip() or "\0" in path:
            message = "give a dataset" if not path.strip() else "a path holds no NUL character"
            return {"ok": False, "message": message, "files": 0, "bytes": 0}
        return check_dataset(_absolute(path.strip()), recursive, skip_bad_files)

    def delete_dataset(self, name: str) -> dict[str, Any]:
        """Delete an uploaded dataset (a folder of datasets/; a link there is removed, not
        followed), unless a run that is running trains on it."""
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise NoSuchDataset(name)
        entry = self.datasets / name
        if not os.path.lexists(entry):
            raise NoSuchDataset(name)
        real = _within(entry, self.datasets)
        for run in _trained_on(self.list_runs(), real) if real is not None else []:
            if run["status"] == "running":
                raise ConfigError(
                    f"the run {run['name']} is training on this dataset: stop it before "
                    "deleting the dataset"
                )
        _remove(entry)
        log.info("deleted dataset %s", name)
        return {"deleted": name}

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
