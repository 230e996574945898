"""`softprompt ui`: a local web page to train soft prompts and try them.

A small server on the standard library's ``ThreadingHTTPServer`` (no web framework) serves the
static page in ``softprompt/web/`` and a JSON API. Everything lives in a workspace folder:

    WORKDIR/datasets/NAME/*.txt     uploaded .txt files
    WORKDIR/runs/ID/job.json        what the page asked for (options, command, pid, times)
    WORKDIR/runs/ID/run.toml        the options, passed with --config
    WORKDIR/runs/ID/train.log       the training process's stdout and stderr
    WORKDIR/runs/ID/out/            the run's --output (metrics.jsonl, checkpoint, <name>.zip)

Each training run is a child process, ``python -m softprompt train --config run.toml --output
out --no-progress``, started in a session of its own so that it keeps going when the page is
closed or the server stops. Its state is read back from the files alone (a live pid, the
finished ``softprompt.safetensors``, the checkpoint, the last ``softprompt: error:`` line of the
log), so reopening the page, or restarting ``softprompt ui``, lists every run as it stands.
Stop sends SIGTERM: train finishes the current step, saves a checkpoint and exits 130; Resume
runs ``train --output out --resume``.

The server binds 127.0.0.1 by default, answers only requests whose Host is that address, and
requires a custom header on every POST, so other web sites open in the browser cannot drive it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mimetypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import __version__
from .config import FIELDS, MAX_SEED, SURROGATE, TrainConfig, _coerce, flag, read_toml, to_toml
from .errors import ConfigError, RunError, SoftPromptError
from .fileio import atomic_write, safe_filename, write_text
from .runfiles import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    JOB_FILE,
    LOG_FILE,
    METRICS_FILE,
    OUTPUT_DIR,
    RUN_CONFIG,
    SOFTPROMPT_FILE,
)

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
DEFAULT_PORT = 8765
MAX_UPLOAD = 64 << 20  # bytes per uploaded file
MAX_JSON = 1 << 20  # bytes per JSON request body
IDLE_TIMEOUT = 60.0  # seconds a connection may wait for the client before it is closed
MAX_METRICS = 5000  # metric records per answer (the page asks again from where it stopped)
LOG_TAIL = 40  # log lines shown on the page
HEADER = "X-Softprompt"  # every POST carries it: a cross-site form cannot set it

# TrainConfig fields the page does not offer: the page picks the output folder, shows
# progress itself, and has its own Resume button; it starts one process, never torchrun.
HIDDEN = {"output", "progress", "resume", "force", "shard_model"}
# shown open, in this order; the rest sit under "more options"
BASIC = ["dataset", "model", "name", "max_steps", "epochs", "lr", "tokens", "block_size"]
GROUPS = ("data", "model", "soft prompt", "training", "run")

MARK = "=== softprompt ui: "  # the line the server writes to the log before each start


def default_workdir() -> Path:
    """$SOFTPROMPT_UI_DIR, else $XDG_DATA_HOME/softprompt/ui, else ~/.local/share/softprompt/ui."""
    env = os.environ.get("SOFTPROMPT_UI_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "softprompt" / "ui"


def _whole(text: str) -> int | None:
    """A whole number written in ASCII digits, else None (``str.isdigit`` takes "²", which
    ``int`` refuses)."""
    return int(text) if re.fullmatch(r"[0-9]{1,20}", text) else None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def _loads(text: str | bytes) -> Any:
    """JSON as the standard has it: Python's json also takes NaN and Infinity, and reads 1e400
    as an infinity, which no answer could carry back (and which passes a ">= 0" check).
    ValueError or RecursionError (nested too deep) if it is not."""
    return json.loads(text, parse_constant=_not_json, parse_float=_finite)


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


# ----------------------------------------------------------------------------- options


def field_kind(name: str) -> str:
    if name == "batch_size":
        return "int or auto"  # a number, or auto (the page shows a text box)
    kind = str(FIELDS[name].type)
    if "bool" in kind and FIELDS[name].default is None:
        return "bool or auto"  # unset: the run decides (the page shows auto / on / off)
    for k in ("bool", "int", "float"):
        if k in kind:
            return k
    return "str"


def option_list() -> list[dict[str, Any]]:
    """TrainConfig's fields as the page shows them: name, flag, kind, default, help, choices."""
    out = []
    for name, f in FIELDS.items():
        if name in HIDDEN:
            continue
        choices = f.metadata.get("choices") or (
            ("on", "off") if field_kind(name) == "bool or auto" else None
        )
        # an option that is on by default shows as its --no- flag, as on the command line
        invert = field_kind(name) == "bool" and f.default is True
        out.append(
            {
                "name": name,
                "flag": f"--no-{name.replace('_', '-')}" if invert else flag(name),
                "kind": field_kind(name),
                "default": f.default,
                "invert": invert,
                "help": f"do not {f.metadata['help']}" if invert else f.metadata["help"],
                "choices": list(choices) if choices else None,
                "group": f.metadata.get("group", "training"),
                "basic": BASIC.index(name) if name in BASIC else None,
                "required": name == "dataset",
            }
        )
    return out


def parse_options(raw: Any) -> dict[str, Any]:
    """The page's form values (strings, numbers, booleans) as TrainConfig values; empty
    strings mean the default. Raises ConfigError naming the option."""
    if not isinstance(raw, dict):
        raise ConfigError("options must be a JSON object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS or name in HIDDEN:
            raise ConfigError(f"unknown option {key!r}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        kind = field_kind(name)
        if isinstance(value, str):
            text = value.strip()
            try:
                if kind == "int":
                    value = int(text)
                elif kind == "int or auto":
                    value = text if text == "auto" else int(text)
                elif kind == "float":
                    value = float(text)
                elif kind in ("bool", "bool or auto"):
                    value = {"true": True, "false": False, "on": True, "off": False}[text.lower()]
                else:
                    value = text if name != "description" else value
            except (ValueError, KeyError):
                kind_text = {"int or auto": "a number or auto", "bool or auto": "on or off"}.get(
                    kind, f"a {kind}"
                )
                raise ConfigError(f"{flag(name)} must be {kind_text}, got {text!r}") from None
        values[name] = _coerce(name, value, flag(name))
    cfg = TrainConfig(**values, output="-")
    cfg.validate()
    # the defaults are left to train; only what was set is written
    return {k: v for k, v in values.items() if v != FIELDS[k].default}


# ----------------------------------------------------------------------------- runs


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
        job = _loads(path.read_text(encoding="utf-8"))
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
    return True


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


TOTAL_RE = re.compile(r"; (\d+) steps of \d+ x \d+ blocks")
ERROR_PREFIXES = ("softprompt: error: ", "softprompt: internal error: ")


def progress(records: list[dict], lines: list[str], running: bool) -> dict[str, Any]:
    """Step, total, loss, validation loss, tokens/s and ETA from metrics.jsonl and the log."""
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    total = None
    for line in lines:
        m = TOTAL_RE.search(line)
        if m:
            total = int(m.group(1))
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
        # elapsed_s counts from the start of this invocation; it starts over on --resume
        first = len(steps) - 1
        while first > 0 and steps[first - 1].get("elapsed_s", 0) < steps[first].get("elapsed_s", 0):
            first -= 1
        done = last["step"] - steps[first]["step"] + 1
        elapsed = float(last.get("elapsed_s") or 0.0)
        info["elapsed_s"] = elapsed
        if running and total and done > 0 and elapsed > 0:
            info["eta_s"] = max(0.0, (total - last["step"]) * elapsed / done)
    return info


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
        """The run's folder; KeyError if there is none, RunError if it or a link in it leads
        out of it (every file of a run is the server's to read and write)."""
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,120}", run_id) or run_id.startswith("."):
            raise KeyError(run_id)
        folder = self.runs / run_id
        if not (folder / JOB_FILE).is_file():
            raise KeyError(run_id)
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
        folder = self.run_dir(run_id)
        job = _read_job(folder)
        out = folder / OUTPUT_DIR
        running = self._alive(run_id, job)
        records = self._metrics.read(out / METRICS_FILE)
        lines = log_since_start(folder / LOG_FILE)
        errors = [line for line in lines if line.startswith(ERROR_PREFIXES)]
        message = errors[-1].split(": ", 2)[-1] if errors else None
        finished = (out / SOFTPROMPT_FILE).is_file()
        checkpoint = (out / CHECKPOINT_FILE).is_file()
        stopped_msg = message is not None and message.startswith("stopped at step")
        if running:
            status = "running"
            message = None
        elif finished:
            status = "finished"
        elif message and not stopped_msg:
            status = "failed"
        elif checkpoint or job.get("stop_requested"):
            status = "stopped"
            if not message:
                message = (
                    "stopped; the checkpoint is kept"
                    if checkpoint
                    else "stopped before training began"
                )
        else:
            status = "failed"
            code = job.get("exit_code")
            message = "the training process ended without a message" + (
                f" (exit code {code})" if code is not None else ""
            )
        zips = sorted(out.glob("*.zip")) if finished else []
        info: dict[str, Any] = {
            "id": run_id,
            "name": job.get("name", run_id),
            "created": job.get("created", 0),
            "status": status,
            "message": message,
            "dataset": job.get("options", {}).get("dataset"),
            "model": job.get("options", {}).get("model"),
            "options": job.get("options", {}),
            "output": str(out),
            "zip": zips[0].name if zips else None,
            "can_resume": checkpoint and not running and status != "finished",
            "can_generate": finished and not running,
            **progress(records, lines, running),
        }
        if status == "running" and not records:
            info["phase"] = next(
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


# ----------------------------------------------------------------------------- try it


# what the page's try-it box sends; the rest of the sampling options keep their defaults
TRY_KEYS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")
TRY_WHOLE = {"max_new_tokens": (1, 1000), "seed": (0, MAX_SEED)}  # and their ranges


def _try_option(key: str, value: Any) -> int | float | None:
    """One try-it option as the page sends it (text, or a number; None when left empty);
    ConfigError naming it.
    The sampling ranges are generate's to check: here, what would fail before them (a seed
    torch refuses, an infinity)."""
    label = key.replace("_", " ")
    if value is None or value == "":
        return None
    if key in TRY_WHOLE:
        low, high = TRY_WHOLE[key]
        number = _whole(str(value).strip())
        if number is None or not low <= number <= high:
            raise ConfigError(f"{label} must be a whole number from {low} to {high}")
        return number
    try:
        real = float(value)
    except (TypeError, ValueError):
        real = math.nan
    if not math.isfinite(real):
        raise ConfigError(f"{label} must be a finite number")
    return real


class Generator:
    """Continuations with and without a run's soft prompt; the last model loaded is kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._lm = None

    def model(self, cfg: TrainConfig):
        """The model a run trained with (its config.toml), loaded once and kept."""
        from .model import load_model

        key = (cfg.model, cfg.device, cfg.dtype, cfg.device_map, cfg.quantize)
        if self._key != key:
            self._lm = None  # free the old one first
            self._lm = load_model(
                cfg.model, cfg.device, cfg.dtype, device_map=cfg.device_map, quantize=cfg.quantize
            )
            self._key = key
        return self._lm

    def compare(self, run_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
        from .generate import generate
        from .sampling import SamplingOptions
        from .soft_prompt import SoftPrompt

        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("type a prompt first")
        if SURROGATE.search(prompt):  # JSON's "\ud800": no tokenizer takes it
            raise ConfigError("the prompt is not valid Unicode text (it holds a lone surrogate)")
        given = {key: _try_option(key, request.get(key)) for key in TRY_KEYS}
        options = SamplingOptions(**{k: v for k, v in given.items() if v is not None}).check()
        out = run_dir / OUTPUT_DIR
        cfg = TrainConfig(**read_toml(out / CONFIG_FILE))
        sp = SoftPrompt.load(out / SOFTPROMPT_FILE)
        with self._lock:
            lm = self.model(cfg)
            t0 = time.perf_counter()
            with_sp = generate(lm, prompt, sp, options)
            without = generate(lm, prompt, None, options)
        return {
            "prompt": prompt,
            "with": with_sp,
            "without": without,
            "seed": options.seed,
            "model": lm.name,
            "seconds": time.perf_counter() - t0,
        }


# ----------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    server_version = "softprompt-ui"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        # a client that connects and then sends nothing (or half a request) would keep its
        # thread for ever: every read and write waits at most this long, then the
        # connection is closed
        self.timeout = self.server.idle_timeout
        super().setup()

    # --- plumbing
    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        # \u escapes throughout: a file name that is not UTF-8 (a surrogate escape) is sent
        # as one, where encoding it as UTF-8 would fail
        body = json.dumps(data, allow_nan=False, default=str).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, message: str, status: int = 400) -> None:
        self._json({"error": " ".join(str(message).split())}, status)

    def _host_ok(self) -> bool:
        """Only requests addressed to the bound host: a web page that rebinds its own name
        to 127.0.0.1 still sends its own name. (Bound to every address, any host goes.)"""
        if self.server.allowed_hosts is None:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        return host in self.server.allowed_hosts

    def _read_body(self, limit: int) -> bytes:
        """The request body, read whole (the connection is kept alive, so nothing of it may
        be left for the next request); ConfigError if it is over ``limit``."""
        n = _whole(self.headers.get("Content-Length", "0").strip())
        if n is None:
            self.close_connection = True  # where its body ends is unknown
            raise ConfigError("the request has no valid Content-Length")
        if n > limit:
            self.close_connection = True
            # read and drop it in pieces so the browser sees the answer, not a reset
            left = n if n <= 4 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            raise ConfigError(f"the upload is {n:,} bytes, more than the limit of {limit:,}")
        return self.rfile.read(n) if n else b""

    def _json_body(self) -> dict:
        try:
            data = _loads(self.body or b"{}")
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"the request body is not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError("the request body must be a JSON object")
        return data

    def _dispatch(self, method: str) -> None:
        if not self._host_ok():
            self.close_connection = True
            self._error("unexpected Host header", 403)
            return
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        self.body = b""
        try:
            if method == "POST":
                if self.headers.get(HEADER) != "1":
                    self.close_connection = True  # its body is never read
                    self._error(f"POST requests need the header {HEADER}: 1", 403)
                    return
                limit = MAX_UPLOAD if url.path == "/api/upload" else MAX_JSON
                self.body = self._read_body(limit)
            self._route(method, url.path, parts, query)
        except KeyError:
            self._error("no such run", 404)
        except SoftPromptError as e:
            self._error(str(e), 400)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client left, or stopped sending: no answer
        except Exception as e:  # one line for the page; the traceback goes to the log
            log.exception("ui request %s %s failed", method, self.path)
            self._error(f"internal error: {type(e).__name__}: {e}", 500)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # --- routes
    def _route(self, method: str, path: str, parts: list[str], query: dict) -> None:
        ws = self.server.workspace
        if method == "GET" and path in STATIC:
            self._static(STATIC[path])
        elif method == "GET" and path == "/api/info":
            self._json(
                {
                    "workdir": str(ws.root),
                    "datasets_dir": str(ws.datasets),
                    "version": self.server.version,
                    "max_upload": MAX_UPLOAD,
                    "pid": os.getpid(),
                }
            )
        elif method == "GET" and path == "/api/options":
            self._json({"options": option_list(), "groups": list(GROUPS)})
        elif method == "GET" and path == "/api/datasets":
            self._json({"datasets": ws.list_datasets()})
        elif method == "POST" and path == "/api/upload":
            self._json(ws.upload(query.get("dataset", ""), query.get("filename", ""), self.body))
        elif method == "GET" and path == "/api/runs":
            self._json({"runs": ws.list_runs()})
        elif method == "POST" and path == "/api/runs":
            body = self._json_body()
            self._json(ws.start(body.get("options", body)), 201)
        elif len(parts) >= 3 and parts[:2] == ["api", "runs"]:
            run_id, action = parts[2], (parts[3] if len(parts) > 3 else "")
            if method == "GET" and action == "":
                self._json(ws.status(run_id, _whole(query.get("since", "0")) or 0))
            elif method == "POST" and action == "stop":
                self._json(ws.stop(run_id))
            elif method == "POST" and action == "resume":
                body = self._json_body()
                steps = body.get("max_steps")
                try:
                    steps = int(steps) if steps not in (None, "") else None
                except (TypeError, ValueError):
                    raise ConfigError("--max-steps must be a whole number") from None
                self._json(ws.resume(run_id, steps))
            elif method == "POST" and action == "generate":
                body = self._json_body()
                folder = ws.run_dir(run_id)
                if not ws.status(run_id, summary=True)["can_generate"]:
                    raise ConfigError("this run has no finished soft prompt to try yet")
                self._json(self.server.generator.compare(folder, body))
            elif method == "GET" and action == "download":
                zp = ws.zip_path(run_id)
                quoted = urllib.parse.quote(zp.name)
                ascii_name = zp.name.encode("ascii", "replace").decode().replace('"', "_")
                self._send(
                    200,
                    zp.read_bytes(),
                    "application/zip",
                    {
                        "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"
                    },
                )
            else:
                self._error("not found", 404)
        else:
            self._error("not found", 404)

    def _static(self, name: str) -> None:
        path = WEB / name
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(
            200,
            path.read_bytes(),
            ctype,
            {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:"},
        )


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, workspace: Workspace, host: str, port: int):
        self.workspace = workspace
        self.generator = Generator()
        self.version = __version__
        self.idle_timeout = IDLE_TIMEOUT
        self.allowed_hosts: set[str] | None = (
            None
            if host in ("", "0.0.0.0", "::")
            else {"127.0.0.1", "localhost", "::1", host.lower()}
        )
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"


def make_server(
    workdir: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> UIServer:
    """The page's server, bound but not yet serving (call ``serve_forever``). Port 0 picks a
    free one (see ``.url``). Raises ConfigError if the port is taken or the folder unusable."""
    ws = Workspace(workdir or default_workdir())
    try:
        return UIServer(ws, host, port)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): pass --port 0 for a free port"
        ) from None


__all__ = ["Workspace", "UIServer", "make_server", "default_workdir", "option_list"]
