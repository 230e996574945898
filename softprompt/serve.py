"""`softprompt serve`: the KoboldAI HTTP API (and an OpenAI-style completions API) over a
frozen model, with soft prompts chosen per request or for the whole server.

Clients that speak KoboldAI (KoboldAI Lite, SillyTavern, Agnaistic, scripts) connect to it as
they would to KoboldAI United or KoboldCpp (the routes, fields, error shapes and stream
framing those clients rely on; the README lists them). Standard library only (``http.server``):

    server = Server(lm, softprompts="prompts/", port=0)
    port = server.start()          # serves in a background thread; 0 picks a free port
    ...
    server.close()

- Soft prompts are the files in the soft prompt folder, named by file name (``x.zip``,
  ``y.safetensors``, any format ``softprompt.formats`` reads, PEFT adapter folders too); a
  name is never a path. Loading is cached (and redone when the file changes).
- One generation runs at a time; up to ``queue_size`` more wait their turn and any beyond
  that get 503 (``service_unavailable``) at once.
- ``POST /api/extra/abort`` stops the running generation between two tokens; a client that
  hangs up stops it too, streamed or not.
- With ``api_key``, ``Authorization: Bearer KEY`` is needed for everything but what
  KoboldCpp leaves open: the CORS preflight (``OPTIONS``), the connection info clients read
  before they send a key (``PUBLIC_ROUTES``; the model's name is withheld), and an abort that
  names the running generation's ``genkey``.

The small helpers (``send_json``, ``read_json_body``, ``cors_headers``, ``check_bearer``,
``HTTPError``) are module-level so other servers in softprompt can reuse them.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import os
import random
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from . import __version__
from .errors import ConfigError, SoftPromptError
from .generate import Cancel, Progress, soft_tensor, stream_text
from .model import LoadedModel
from .sampling import FIELDS as SAMPLING_FIELDS
from .sampling import SamplingOptions
from .soft_prompt import SoftPrompt

log = logging.getLogger(__name__)

KOBOLD_API_VERSION = "1.2.6"  # >= 1.2.2: clients send stop_sequence; >= 1.2.4 badwordsids
KOBOLDCPP_VERSION = "1.49"  # turns on streaming; >= 1.49: Lite sends `memory` on its own
MAX_BODY_BYTES = 4 * 1024 * 1024  # a 32k-token prompt is well under 1 MB of JSON
DEFAULT_MAX_LENGTH = SamplingOptions().max_new_tokens
DEFAULT_OPENAI_MAX_TOKENS = 16
MAX_N = 5
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 1000
DEFAULT_QUEUE = 4
DEFAULT_PORT = 5001
SOFT_PROMPT_NAME_ERROR = "Must be a valid soft prompt name."
PROTECTED_MODEL = "softprompt/protected-model"  # KoboldCpp's answer without the key
# What KoboldCpp answers without its password, and clients ask before they send a key
# (KoboldAI Lite asks for /sdapi/v1/sd-models without it, SillyTavern's KoboldAI Classic
# mode never sends one).
PUBLIC_ROUTES = frozenset(
    ("GET", r)
    for r in (
        "/api/v1/model",
        "/api/v1/info/version",
        "/api/extra/version",
        "/api/v1/config/max_context_length",
        "/api/v1/config/max_length",
        "/api/extra/true_max_context_length",
        "/api/extra/preloadstory",
        "/sdapi/v1/sd-models",
    )
)
# the abort checks the key itself: without it, only the running generation's genkey stops it
OPEN_ROUTES = PUBLIC_ROUTES | {("POST", "/api/extra/abort")}


# --------------------------------------------------------------------------- HTTP helpers


class HTTPError(Exception):
    """An answer other than success: ``status`` and the KoboldAI ``detail`` object, either
    ``{"msg": ..., "type": ...}`` or a validation dict ``{field: [message, ...]}``."""

    def __init__(self, status: int, detail: dict, headers: dict | None = None):
        super().__init__(detail.get("msg") or json.dumps(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}

    @property
    def message(self) -> str:
        if "msg" in self.detail:
            return str(self.detail["msg"])
        return "; ".join(
            f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in self.detail.items()
        )

    def kobold_body(self) -> dict:
        return {"detail": self.detail}

    def openai_body(self) -> dict:
        kind = self.detail.get("type") if "msg" in self.detail else None
        param = None if "msg" in self.detail else next(iter(self.detail), None)
        return {
            "error": {
                "message": self.message,
                "type": kind or "invalid_request_error",
                "param": param,
                "code": None,
            }
        }


def error(status: int, msg: str, kind: str, headers: dict | None = None) -> HTTPError:
    """``{"detail": {"msg": msg, "type": kind}}`` with ``status``."""
    return HTTPError(status, {"msg": msg, "type": kind}, headers)


def _unauthorized() -> HTTPError:
    return error(
        401,
        "a valid API key is needed: send Authorization: Bearer KEY",
        "unauthorized",
        {"WWW-Authenticate": "Bearer"},
    )


def validation_error(problems: dict[str, list[str]]) -> HTTPError:
    """422 ``{"detail": {field: [message, ...]}}``, as KoboldAI answers bad values."""
    return HTTPError(422, problems)


def cors_headers() -> dict[str, str]:
    """Sent on every answer: KoboldAI Lite runs in a browser, on another origin."""
    return {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, PUT, OPTIONS",
        # `*` does not cover Authorization in browsers: name it.
        "Access-Control-Allow-Headers": "*, Authorization, Content-Type",
        "Access-Control-Allow-Private-Network": "true",
        "Access-Control-Max-Age": "600",
    }


def send_json(
    handler: BaseHTTPRequestHandler, status: int, obj: Any, headers: dict | None = None
) -> None:
    """Answer ``obj`` as JSON with Content-Length and the CORS headers."""
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    handler.send_header("Content-Length", str(len(data)))
    for k, v in {**cors_headers(), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)
    handler.wfile.flush()


def read_body(handler: BaseHTTPRequestHandler, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, at most ``limit`` bytes: 413 when larger (not read), 400 when the
    length is missing with a body (chunked) or not a number."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        handler.close_connection = True
        raise error(411, "send the body with a Content-Length", "bad_input")
    raw = handler.headers.get("Content-Length")
    if raw is None:
        return b""
    try:
        length = int(raw)
        if length < 0:
            raise ValueError
    except ValueError:
        handler.close_connection = True
        raise error(400, f"bad Content-Length {raw!r}", "bad_input") from None
    if length > limit:
        handler.close_connection = True  # the body stays unread
        raise error(
            413, f"request body of {length} bytes is over the limit of {limit}", "bad_input"
        )
    data = handler.rfile.read(length)
    if len(data) < length:
        handler.close_connection = True
        raise error(400, "request body ended early", "bad_input")
    return data


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_json_body(
    handler: BaseHTTPRequestHandler, limit: int = MAX_BODY_BYTES, allow_empty: bool = False
) -> dict:
    """The request body as a JSON object: 400 ``bad_input`` when it is not JSON, 422
    ``{"_schema": ["Invalid input type."]}`` when it is JSON but not an object, 413 when over
    ``limit`` bytes. An empty body is ``{}`` when ``allow_empty``."""
    data = read_body(handler, limit)
    if not data.strip():
        if allow_empty:
            return {}
        raise error(400, "the request needs a JSON body", "bad_input")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise error(400, f"Error parsing input: {e}", "bad_input") from None
    if not isinstance(obj, dict):
        raise validation_error({"_schema": ["Invalid input type."]})
    return obj


def check_bearer(handler: BaseHTTPRequestHandler, api_key: str | None) -> bool:
    """True when no key is set or the request carries ``Authorization: Bearer <api_key>``."""
    if not api_key:
        return True
    got = handler.headers.get("Authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def normalize_path(path: str) -> str:
    """The route of a request path: no query, no trailing slash, /api/latest as /api/v1."""
    route = urlsplit(path).path or "/"
    route = "/" + route.strip("/")
    if route == "/api/latest" or route.startswith("/api/latest/"):
        route = "/api/v1" + route[len("/api/latest") :]
    return route


# --------------------------------------------------------------------------- validation


_SURROGATE = re.compile("[\ud800-\udfff]")


class _Fields:
    """Reads fields of a request body, collecting every problem (KoboldAI's messages)."""

    def __init__(self, body: dict):
        self.body = body
        self.problems: dict[str, list[str]] = {}

    def bad(self, key: str, msg: str) -> None:
        self.problems.setdefault(key, []).append(msg)

    def _range(self, key, value, lo, hi, lo_open=False) -> bool:
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and value > hi
        if not (low_bad or high_bad):
            return True
        ge = "greater than" if lo_open else "greater than or equal to"
        if lo is not None and hi is not None:
            self.bad(key, f"Must be {ge} {lo} and less than or equal to {hi}.")
        elif lo is not None:
            self.bad(key, f"Must be {ge} {lo}.")
        else:
            self.bad(key, f"Must be less than or equal to {hi}.")
        return False

    def _numeric(self, key, default, lo, hi, lo_open, integral: bool):
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = (int if integral else float)(value.strip())
            except ValueError:
                pass
        if integral and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif not integral and type(value) is int:
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float: not a valid number
                value = math.inf
        kinds = int if integral else (int, float)
        # NaN and the infinities fail the comparison
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not -math.inf < value < math.inf
        ):
            self.bad(key, f"Not a valid {'integer' if integral else 'number'}.")
            return default
        if not self._range(key, value, lo, hi, lo_open):
            return default
        return value if integral else float(value)

    def integer(self, key: str, default, lo=None, hi=None):
        return self._numeric(key, default, lo, hi, False, integral=True)

    def number(self, key: str, default, lo=None, hi=None, lo_open=False):
        return self._numeric(key, default, lo, hi, lo_open, integral=False)

    def text(self, key: str, value: str) -> bool:
        """False (and the problem noted) when ``value`` holds a lone surrogate: JSON can
        carry one (``"\\ud800"``), but it is no text a tokenizer can read."""
        bad = _SURROGATE.search(value)
        if bad:
            self.bad(key, f"Not valid text: a lone surrogate (U+{ord(bad[0]):04X}).")
        return not bad

    def string(self, key: str, default: str | None = "", required: bool = False, max_len=None):
        value = self.body.get(key)
        if value is None:
            if required:
                self.bad(key, "Missing data for required field.")
            return default
        if not isinstance(value, str):
            self.bad(key, "Not a valid string.")
            return default
        if max_len is not None and len(value) > max_len:
            self.bad(key, f"Longer than maximum length {max_len}.")
            return default
        return value if self.text(key, value) else default

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.bad(key, "Not a valid boolean.")
            return default
        return value

    def strings(self, key: str, allow_single: bool = False) -> list[str]:
        value = self.body.get(key)
        if value is None:
            return []
        if allow_single and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            self.bad(key, "Not a valid list of strings.")
            return []
        if len(value) > MAX_STOP_SEQUENCES:
            self.bad(key, f"At most {MAX_STOP_SEQUENCES} entries.")
            return []
        if any(len(s) > MAX_STOP_CHARS for s in value):
            self.bad(key, f"Each entry at most {MAX_STOP_CHARS} characters.")
            return []
        if not all(self.text(key, s) for s in value):
            return []
        return [s for s in value if s]

    def integers(self, key: str, lo: int, hi: int) -> list[int]:
        value = self.body.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value
        ):
            self.bad(key, "Not a valid list of integers.")
            return []
        if len(value) > 32 or any(not lo <= i <= hi for i in value):
            self.bad(key, f"Each entry must be between {lo} and {hi}.")
            return []
        return value

    def check(self, openai: bool = False) -> None:
        if self.problems:
            err = validation_error(self.problems)
            if openai:
                err.status = 400
            raise err


@dataclass
class GenRequest:
    """One generation request, validated, in softprompt's terms."""

    prompt: str
    options: SamplingOptions = field(default_factory=SamplingOptions)
    memory: str = ""
    max_context_length: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    ban_eos: bool = False
    soft_prompt: str | None = None  # None: the server's selection; "": none
    genkey: str = ""


# SamplingOptions field: the request keys that carry it, first found wins. KoboldCpp reads the
# KoboldAI names on its OpenAI route too, next to the OpenAI ones (koboldcpp.py,
# transform_genparams); SillyTavern sends both spellings.
KOBOLD_SAMPLING = {
    "max_new_tokens": ("max_length",),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "top_a": ("top_a",),
    "min_p": ("min_p",),
    "tfs": ("tfs",),
    "typical": ("typical",),
    "repetition_penalty": ("rep_pen",),
    "repetition_penalty_range": ("rep_pen_range",),
    "repetition_penalty_slope": ("rep_pen_slope",),
    "sampler_order": ("sampler_order",),
    "seed": ("sampler_seed",),
}
OPENAI_SAMPLING = {
    **KOBOLD_SAMPLING,
    "max_new_tokens": ("max_tokens",),
    "typical": ("typical", "typical_p"),
    "repetition_penalty": ("rep_pen", "repetition_penalty", "repeat_penalty"),
    "seed": ("seed", "sampler_seed"),
}


def _sampling_value(f: _Fields, name: str, key: str, max_length_limit: int | None):
    """The value of one sampling field in the request's terms; None when absent or bad."""
    if name == "max_new_tokens":
        return f.integer(key, None, 1, max_length_limit)
    if name == "seed":  # -1 (or none): a random seed, as in KoboldAI
        seed = f.integer(key, None, -1, 2**64 - 1)
        return seed if seed is None or seed >= 0 else random.randrange(2**63)
    if name == "sampler_order":
        order = f.integers(key, 0, 6) or None
        # a list of the six samplers before repetition penalty had an id: it goes first, as
        # KoboldAI United does
        if order is not None and sorted(order) == list(range(6)):
            return (6, *order)
        return tuple(order) if order is not None else None
    integral = type(SAMPLING_FIELDS[name].default) is int
    value = (f.integer if integral else f.number)(key, None)
    if name in ("top_p", "typical") and value == 0:
        return 1.0  # KoboldAI clients send 0 for "off", as 1
    return value


def parse_sampling(
    f: _Fields, keys: dict[str, tuple[str, ...]], max_length_limit: int | None = None, **defaults
) -> SamplingOptions:
    """The SamplingOptions of a request body (``keys``: field -> request keys), with
    ``defaults`` for fields the request leaves out; each bad value is noted under its key."""
    values, key_of = {"seed": random.randrange(2**63), **defaults}, {}
    for name, candidates in keys.items():
        key = next((k for k in candidates if f.body.get(k) is not None), None)
        if key is None:
            continue
        key_of[name] = key
        value = _sampling_value(f, name, key, max_length_limit)
        if value is not None:
            values[name] = value
    opts = SamplingOptions(**values)
    for name, msg in opts.problems().items():
        f.bad(key_of.get(name, name), msg[0].upper() + msg[1:] + ".")
    return opts


def _ban_eos(f: _Fields) -> bool:
    """KoboldCpp's ``ban_eos_token``, or KoboldAI's ``use_default_badwordsids`` (which bans the
    end-of-text token, so generation runs to the length asked for)."""
    if f.body.get("ban_eos_token") is not None:
        return f.boolean("ban_eos_token", False)
    return f.boolean("use_default_badwordsids", False)


def parse_kobold(body: dict, max_length_limit: int | None = None) -> GenRequest:
    """A KoboldAI ``/api/v1/generate`` body as a GenRequest; 422 with every bad field.
    Unknown keys are ignored (the README lists what clients send and what is applied)."""
    f = _Fields(body)
    req = GenRequest(
        prompt=f.string("prompt", "", required=True),
        options=parse_sampling(
            f, KOBOLD_SAMPLING, max_length_limit, max_new_tokens=DEFAULT_MAX_LENGTH
        ),
        memory=f.string("memory", ""),
        max_context_length=f.integer("max_context_length", None, 1),
        n=f.integer("n", 1, 1, MAX_N),
        stop=f.strings("stop_sequence"),
        ban_eos=_ban_eos(f),
        soft_prompt=f.string("soft_prompt", None),
        genkey=f.string("genkey", "", max_len=200),
    )
    f.boolean("quiet", False)
    f.check()
    return req


def parse_openai(body: dict, max_length_limit: int | None = None) -> tuple[GenRequest, str]:
    """An OpenAI ``/v1/completions`` body: (GenRequest, model); 400 with every bad field."""
    f = _Fields(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        f.bad("prompt", "Missing data for required field.")
    elif not isinstance(prompt, str):
        f.bad("prompt", "Must be a string (or a list of one string).")
    elif not f.text("prompt", prompt):
        prompt = ""
    model = f.string("model", "")
    f.integer("n", 1, 1, 1)  # one completion per request
    req = GenRequest(
        prompt=prompt if isinstance(prompt, str) else "",
        options=parse_sampling(
            f, OPENAI_SAMPLING, max_length_limit, max_new_tokens=DEFAULT_OPENAI_MAX_TOKENS
        ),
        max_context_length=f.integer("max_context_length", None, 1),
        stop=f.strings("stop", allow_single=True),
        ban_eos=_ban_eos(f),
        soft_prompt=f.string("soft_prompt", None),
    )
    f.boolean("stream", False)
    f.check(openai=True)
    return req, model


# --------------------------------------------------------------------------- the server


def soft_prompt_suffixes() -> tuple[str, ...]:
    from .formats import FORMATS

    return tuple(sorted({e for m in FORMATS.values() for e in m.EXTENSIONS}))


def valid_name(name: str) -> bool:
    """A file name only: no path separators, no `..`, no hidden files, nothing odd."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
        and name.isprintable()
    )


class UnknownSoftPrompt(ConfigError):
    """A soft prompt name that is not a file in the soft prompt folder."""


@dataclass
class Generation:
    """A generation: the client's genkey ("" when it sent none), its abort flag and its text
    so far."""

    genkey: str
    cancel: threading.Event = field(default_factory=threading.Event)
    text: list[str] = field(default_factory=list)


@dataclass
class _Job:
    ids: list[int]
    soft: torch.Tensor
    req: GenRequest
    soft_prompt: str = ""


def client_gone(sock: socket.socket) -> bool:
    """True when the client has closed the connection (or reset it). Data waiting to be read
    is a next request on the same connection, not a hang-up."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _HangUp:
    """A generation's abort flag that also trips when the client of a non-streamed request
    hangs up, looked at between two tokens (a streamed request notices when a write fails)."""

    def __init__(self, cancel: threading.Event, sock: socket.socket):
        self.cancel, self.sock = cancel, sock

    def is_set(self) -> bool:
        if not self.cancel.is_set() and client_gone(self.sock):
            log.info("the client hung up: generation stopped")
            self.cancel.set()
        return self.cancel.is_set()


def _kobold_event(token: str, finish: str | None) -> str:
    """One event of KoboldCpp's stream; ``finish_reason`` is the string "null" until the end.
    ASCII-only JSON: U+2028 and friends would break the client's line regex."""
    data = json.dumps({"token": token, "finish_reason": finish or "null"})
    return f"event: message\ndata: {data}\n\n"


Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """The KoboldAI-compatible server over ``lm``. ``softprompts`` is the soft prompt folder
    (None: no soft prompts); ``softprompt`` a file name in it to select at the start (or,
    without a folder, a path to a soft prompt file, whose folder becomes the folder)."""

    def __init__(
        self,
        lm: LoadedModel,
        softprompts: str | Path | None = None,
        softprompt: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        api_key: str | None = None,
        queue_size: int = DEFAULT_QUEUE,
        max_length_limit: int | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        check_listen_options(port, queue_size, api_key, max_length_limit)
        self.lm = lm
        lm.bos_ids  # noqa: B018 - asks the tokenizer once now, before threads share it
        self.folder, selected = resolve_softprompts(softprompts, softprompt)
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self.queue_size = queue_size
        self.max_length_limit = max_length_limit
        self.max_body_bytes = max_body_bytes
        self.selected = ""
        self._cache: dict[str, tuple[tuple, SoftPrompt]] = {}
        self._cache_lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(queue_size + 1)
        self._current: Generation | None = None
        self._latest: Generation | None = None  # the running one, else the last one
        self._count_lock = threading.Lock()
        self._closing = threading.Event()
        self.pending = 0  # generation requests running or waiting
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if selected:
            try:
                self.select(selected)
            except UnknownSoftPrompt:
                found = ", ".join(self.list_soft_prompts()) or "none"
                raise ConfigError(
                    f"--softprompt {selected}: no such soft prompt in {self.folder} (found: {found})"
                ) from None
            except SoftPromptError as e:
                raise ConfigError(f"--softprompt {selected}: {e}") from None
        self.routes: dict[tuple[str, str], Route] = {}
        self._add_kobold_routes()

    # ------------------------------------------------------------------ soft prompts

    def list_soft_prompts(self) -> list[str]:
        """File names of the soft prompts in the folder (and PEFT adapter folders), sorted."""
        if self.folder is None:
            return []
        suffixes = soft_prompt_suffixes()
        names = []
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return []
        for p in entries:
            if not valid_name(p.name):
                continue
            if p.is_file() and p.suffix.lower() in suffixes:
                names.append(p.name)
            elif p.is_dir() and (p / "adapter_config.json").is_file():
                names.append(p.name)
        return sorted(names, key=lambda n: (n.lower(), n))

    def load_soft_prompt(self, name: str) -> SoftPrompt | None:
        """The soft prompt file ``name`` of the folder ("" or None: no soft prompt), cached.
        UnknownSoftPrompt when it is not one; other SoftPromptErrors when it cannot be used
        (damaged, or made for a model of another width)."""
        if not name:
            return None
        if not valid_name(name) or self.folder is None or name not in self.list_soft_prompts():
            raise UnknownSoftPrompt(f"no soft prompt named {name!r}")
        path = self.folder / name
        try:
            st = path.stat()
        except OSError:
            raise UnknownSoftPrompt(f"no soft prompt named {name!r}") from None
        key = (st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
        from .formats import load_any

        sp = load_any(path)
        sp.check_fits(self.lm.model, where=f"soft prompt {name}")
        with self._cache_lock:
            self._cache[name] = (key, sp)
        return sp

    def select(self, name: str) -> None:
        """Make ``name`` the server's soft prompt ("" for none)."""
        self.load_soft_prompt(name)
        self.selected = name or ""

    def _soft_for(self, name: str | None, field_name: str, status: int = 422):
        """The soft prompt a request asks for (None: the server's), or an HTTPError."""
        chosen = self.selected if name is None else name
        try:
            return chosen, self.load_soft_prompt(chosen)
        except UnknownSoftPrompt:
            raise HTTPError(status, {field_name: [SOFT_PROMPT_NAME_ERROR]}) from None
        except SoftPromptError as e:
            msg = " ".join(str(e).split())
            if self.folder is not None:  # name the file, not where the server keeps it
                msg = msg.replace(f"{self.folder}{os.sep}", "")
            raise HTTPError(status, {field_name: [msg]}) from None

    # ------------------------------------------------------------------ generation

    @property
    def context_length(self) -> int:
        return self.lm.context_length

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        with self._tok_lock:
            return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prepare(self, req: GenRequest, sp: SoftPrompt | None, openai: bool = False) -> _Job:
        """Token ids that fit (memory kept, the prompt cut from the left), the soft tensor
        and the seed; 422 (400 for OpenAI) when nothing of the prompt would fit."""
        soft = soft_tensor(self.lm, sp)
        n_soft = soft.shape[0]
        ctx = self.context_length
        if req.max_context_length is not None:
            ctx = min(ctx, req.max_context_length)
        # What is left for the prompt: the one place the request's token budget is worked out.
        # Laid out as training does: [soft][BOS][memory + prompt].
        bos = self.lm.bos_ids
        new_tokens = req.options.max_new_tokens
        budget = ctx - n_soft - len(bos) - new_tokens
        if budget < 1:
            key = "max_tokens" if openai else "max_length"
            raise HTTPError(
                400 if openai else 422,
                {
                    key: [
                        f"{new_tokens} new tokens plus {n_soft} soft prompt tokens leave "
                        f"no room for the prompt in a context of {ctx} tokens: ask for at most "
                        f"{max(0, ctx - n_soft - len(bos) - 1)}."
                    ]
                },
            )
        memory = self.encode(req.memory)[-budget:]
        rest = budget - len(memory)
        prompt = self.encode(req.prompt)
        prompt = prompt[-rest:] if rest > 0 else []
        ids = bos + memory + prompt or [self.lm.eos_token_id]
        return _Job(ids, soft, req)

    def pieces(self, job: _Job, seed: int, progress: Progress, cancel: Cancel) -> Iterator[str]:
        """Text pieces of one continuation with ``seed``, as ``softprompt.generate.stream``
        makes them, stopping between tokens once ``cancel`` is set; fills in ``progress``."""
        req = job.req
        return stream_text(
            self.lm,
            job.ids,
            job.soft,
            dataclasses.replace(req.options, seed=seed),
            stop=req.stop,
            ban_eos=req.ban_eos,
            cancel=cancel,
            progress=progress,
        )

    @contextmanager
    def slot(self, genkey: str = ""):
        """Wait for the model (one generation at a time, ``queue_size`` waiting); 503 when
        the queue is full."""
        if self._closing.is_set() or not self._slots.acquire(blocking=False):
            raise error(503, "Server is busy; please try again later.", "service_unavailable")
        with self._count_lock:
            self.pending += 1
        try:
            with self._gen_lock:
                if self._closing.is_set():
                    raise error(503, "The server is stopping.", "service_unavailable")
                gen = Generation(genkey)
                self._current = self._latest = gen
                try:
                    yield gen
                finally:
                    self._current = None
        finally:
            with self._count_lock:
                self.pending -= 1
            self._slots.release()

    def abort(self, genkey: str = "") -> bool:
        """Stop the running generation (only if its genkey matches, when one is given)."""
        gen = self._current
        if gen is None or (genkey and genkey != gen.genkey):
            return False
        gen.cancel.set()
        return True

    def text_so_far(self, genkey: str = "") -> str:
        """The text of the running generation, or of the last one, only for its own client:
        the genkey it was started with (KoboldCpp's rule: none matches one started without)."""
        gen = self._latest
        if gen is None or genkey != gen.genkey:
            return ""
        return "".join(gen.text)

    def busy(self) -> bool:
        return self._current is not None

    # ------------------------------------------------------------------ routes

    def add_route(self, method: str, path: str, fn: Route) -> None:
        """Answer ``method path`` (a normalized path, see ``normalize_path``) with ``fn``,
        which gets the request handler (``handler.app`` is this server)."""
        self.routes[(method.upper(), normalize_path(path))] = fn

    def _add_kobold_routes(self) -> None:
        r = self.add_route
        r(
            "GET",
            "/api/v1/model",
            lambda h: send_json(
                h, 200, {"result": self.lm.name if h.authorized else PROTECTED_MODEL}
            ),
        )
        r(
            "GET",
            "/api/v1/info/version",
            lambda h: send_json(h, 200, {"result": KOBOLD_API_VERSION}),
        )
        r("GET", "/api/extra/version", self._extra_version)
        for route in (
            "/api/v1/config/max_context_length",
            "/api/extra/true_max_context_length",
        ):
            r("GET", route, lambda h: send_json(h, 200, {"value": self.context_length}))
        r(
            "GET",
            "/api/v1/config/max_length",
            lambda h: send_json(h, 200, {"value": DEFAULT_MAX_LENGTH}),
        )
        r(
            "GET",
            "/api/v1/config/soft_prompt",
            lambda h: send_json(h, 200, {"value": self.selected}),
        )
        r("PUT", "/api/v1/config/soft_prompt", self._put_soft_prompt)
        r("GET", "/api/v1/config/soft_prompts_list", self._soft_prompts_list)
        r("POST", "/api/v1/generate", lambda h: self._kobold_generate(h, stream=False))
        r("POST", "/api/extra/generate/stream", lambda h: self._kobold_generate(h, stream=True))
        r("GET", "/api/extra/generate/check", self._check)
        r("POST", "/api/extra/generate/check", self._check)
        r("POST", "/api/extra/abort", self._abort)
        r("POST", "/api/extra/tokencount", self._tokencount)
        r("GET", "/v1/models", self._openai_models)
        # KoboldCpp's answers when it has no saved story to offer and no image model
        r("GET", "/api/extra/preloadstory", lambda h: send_json(h, 200, {}))
        r("GET", "/sdapi/v1/sd-models", lambda h: send_json(h, 200, []))
        r("POST", "/v1/completions", self._openai_completions)

    def _extra_version(self, h) -> None:
        send_json(
            h,
            200,
            {
                "result": "KoboldCpp",
                "version": KOBOLDCPP_VERSION,
                "protected": self.api_key is not None,
                "server": f"softprompt {__version__}",
            },
        )

    def _soft_prompts_list(self, h) -> None:
        send_json(h, 200, {"values": [{"value": n} for n in self.list_soft_prompts()]})

    def _put_soft_prompt(self, h) -> None:
        body = read_json_body(h, self.max_body_bytes)
        f = _Fields(body)
        name = f.string("value", None, required=True)
        f.check()
        self._soft_for(name, "value")
        self.selected = name
        log.info("soft prompt: %s", name or "(none)")
        send_json(h, 200, {})

    def _tokencount(self, h) -> None:
        body = read_json_body(h, self.max_body_bytes)
        f = _Fields(body)
        prompt = f.string("prompt", "", required=True)
        f.check()
        ids = self.encode(prompt)
        send_json(h, 200, {"value": len(ids), "ids": ids})

    def _abort(self, h) -> None:
        try:
            body = read_json_body(h, self.max_body_bytes, allow_empty=True)
        except HTTPError as e:
            if e.status == 413:
                raise
            body = {}
        genkey = body.get("genkey") if isinstance(body.get("genkey"), str) else ""
        gen = self._current
        # Without the key, only the client that knows the running genkey may stop it (the
        # stop buttons of KoboldAI Lite and SillyTavern; SillyTavern sends no key here).
        if not h.authorized and not (genkey and gen is not None and genkey == gen.genkey):
            raise _unauthorized()
        done = self.abort(genkey)
        send_json(h, 200, {"success": "true" if done else "false", "done": "true"})

    def _check(self, h) -> None:
        body = {}
        if h.command == "POST":
            try:
                body = read_json_body(h, self.max_body_bytes, allow_empty=True)
            except HTTPError as e:
                if e.status == 413:
                    raise
        genkey = body.get("genkey") if isinstance(body.get("genkey"), str) else ""
        send_json(h, 200, {"results": [{"text": self.text_so_far(genkey)}]})

    def _kobold_generate(self, h, stream: bool) -> None:
        body = read_json_body(h, self.max_body_bytes)
        req = parse_kobold(body, self.max_length_limit)
        name, sp = self._soft_for(req.soft_prompt, "soft_prompt")
        job = self.prepare(req, sp)
        job.soft_prompt = name
        with self.slot(req.genkey) as gen:
            if stream:
                self._stream(h, job, gen, _kobold_event)
                return
            results = []
            cancel = _HangUp(gen.cancel, h.connection)
            for i in range(req.n):
                progress = Progress()
                seed = req.options.seed + i
                text = "".join(self._collect(job, seed, progress, gen, cancel))
                results.append({"text": text, "finish_reason": progress.finish_reason})
                if progress.cancelled:
                    break
        send_json(h, 200, {"results": results})

    def _collect(
        self,
        job: _Job,
        seed: int,
        progress: Progress,
        gen: Generation,
        cancel: Cancel | None = None,
    ):
        """The pieces of one continuation, kept as the generation's text so far; ``cancel``
        (default: the generation's abort flag) stops it."""
        gen.text.clear()
        start = time.perf_counter()
        try:
            pieces = self.pieces(job, seed & (2**64 - 1), progress, cancel or gen.cancel)
            for piece in pieces:
                if piece:
                    gen.text.append(piece)
                    yield piece
        finally:
            took = time.perf_counter() - start
            log.info(
                "generated %d tokens in %.1f s (%s%s), soft prompt: %s",
                progress.tokens,
                took,
                progress.finish_reason,
                ", aborted" if progress.cancelled else "",
                job.soft_prompt or "none",
            )

    def _start_stream(self, h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("X-Accel-Buffering", "no")
        h.send_header("Connection", "close")
        for k, v in cors_headers().items():
            h.send_header(k, v)
        h.end_headers()
        h.close_connection = True
        h.streaming = True  # from here on, errors can only end the stream
        h.wfile.flush()

    def _stream(
        self, h, job: _Job, gen: Generation, event: Callable[[str, str | None], str]
    ) -> None:
        """Send one continuation as an event stream: ``event(piece, None)`` for each piece,
        then ``event("", finish_reason)``. A client that hangs up stops the generation."""
        self._start_stream(h)
        progress = Progress()
        pieces = self._collect(job, job.req.options.seed, progress, gen)
        try:
            for piece in pieces:
                h.wfile.write(event(piece, None).encode())
                h.wfile.flush()
            h.wfile.write(event("", progress.finish_reason).encode())
            h.wfile.flush()
        except OSError:  # the client hung up: stop generating
            gen.cancel.set()
        finally:
            pieces.close()

    # ------------------------------------------------------------------ OpenAI

    def _openai_models(self, h) -> None:
        now = int(time.time())
        data = [{"id": self.lm.name, "object": "model", "created": now, "owned_by": "softprompt"}]
        data += [
            {"id": n, "object": "model", "created": now, "owned_by": "softprompt"}
            for n in self.list_soft_prompts()
        ]
        send_json(h, 200, {"object": "list", "data": data})

    def _openai_completions(self, h) -> None:
        body = read_json_body(h, self.max_body_bytes)
        req, model = parse_openai(body, self.max_length_limit)
        if req.soft_prompt is None and model and model in self.list_soft_prompts():
            req.soft_prompt = model
        chosen, sp = self._soft_for(
            req.soft_prompt, "soft_prompt" if "soft_prompt" in body else "model", 400
        )
        job = self.prepare(req, sp, openai=True)
        job.soft_prompt = chosen
        cid, created, name = (
            f"cmpl-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            model or self.lm.name,
        )

        def chunk(text: str, finish: str | None) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        def event(text: str, finish: str | None) -> str:
            done = "data: [DONE]\n\n" if finish else ""
            return f"data: {json.dumps(chunk(text, finish))}\n\n{done}"

        with self.slot() as gen:
            if body.get("stream") is True:
                self._stream(h, job, gen, event)
                return
            progress = Progress()
            cancel = _HangUp(gen.cancel, h.connection)
            text = "".join(self._collect(job, req.options.seed, progress, gen, cancel))
        result = chunk(text, progress.finish_reason)
        result["usage"] = {
            "prompt_tokens": len(job.ids),
            "completion_tokens": progress.tokens,
            "total_tokens": len(job.ids) + progress.tokens,
        }
        send_json(h, 200, result)

    # ------------------------------------------------------------------ running

    def bind(self) -> int:
        """Bind the listening socket; the port (the free one picked when port is 0)."""
        if self.httpd is not None:
            return self.port
        handler = type("Handler", (_Handler,), {"app": self})
        server_cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            self.httpd = server_cls((self.host, self.port), handler)
        except OSError as e:
            reason = (
                "is in use"
                if e.errno in (48, 98, 10048)
                else f"cannot be opened ({e.strerror or e})"
            )
            raise ConfigError(
                f"--host {self.host} --port {self.port} {reason}: choose another with --port"
            ) from None
        self.port = self.httpd.server_address[1]
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "", "::"):
            host = "[::1]" if self.host == "::" else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        """Bind and serve in a background thread; returns the port."""
        port = self.bind()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="softprompt-serve", daemon=True
        )
        self._thread.start()
        return port

    def serve_forever(self) -> None:
        """Bind and serve in this thread until ``close`` (or Ctrl-C)."""
        self.bind()
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stop serving: abort the running generation and close the socket."""
        self._closing.set()
        gen = self._current
        if gen is not None:
            gen.cancel.set()
        if self.httpd is not None:
            if self._thread is not None:
                self.httpd.shutdown()
                self._thread.join(timeout=10)
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_softprompts(folder: str | Path | None, name: str | None) -> tuple[Path | None, str]:
    """(soft prompt folder, name to select) from ``--softprompts DIR`` and ``--softprompt
    NAME``; without DIR, NAME may be a path to a soft prompt file (its folder becomes DIR).
    ConfigError for a missing folder or a name that is a path inside DIR."""
    name = name or ""
    if folder is None and name and ("/" in name or "\\" in name or Path(name).exists()):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"--softprompt {name}: no such file")
        return path.resolve().parent, path.name
    if folder is None:
        if name:
            raise ConfigError(
                f"--softprompt {name}: give --softprompts DIR, the folder it is in (or a path to the file)"
            )
        return None, ""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--softprompts {folder}: no such folder")
    if name and not valid_name(name):
        raise ConfigError(
            f"--softprompt {name}: give a file name in --softprompts {folder}, not a path"
        )
    return path.resolve(), name


def check_listen_options(
    port: int,
    queue_size: int,
    api_key: str | None = None,
    max_length_limit: int | None = None,
) -> None:
    """ConfigError for a port, queue size, API key or length limit that cannot be used
    (``softprompt serve`` checks them before it loads the model)."""
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"--port {port} is not a port number: use 1 to 65535 (0: any free)")
    if queue_size < 0:
        raise ConfigError(f"--queue {queue_size}: use 0 or more")
    # Browsers send only Latin-1 in a header, and clients cannot agree on how to encode
    # anything past ASCII: such a key could never be sent right.
    if api_key and not re.fullmatch(r"[\x21-\x7e]+", api_key):
        raise ConfigError(
            "--api-key (or $SOFTPROMPT_API_KEY) must be printable ASCII without spaces: "
            "clients cannot send other characters in a header"
        )
    if max_length_limit is not None and max_length_limit < 1:
        raise ConfigError(f"--max-length-limit {max_length_limit}: use 1 or more")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"softprompt/{__version__}"
    timeout = 120  # seconds a client may take to send its request
    app: Server
    streaming = False
    authorized = False  # the request carries the API key (or none is set)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_OPTIONS(self) -> None:  # the CORS preflight: never needs the key
        self.send_response(200)
        for k, v in cors_headers().items():
            self.send_header(k, v)
        self.send_header("Allow", "GET, POST, PUT, OPTIONS")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        route = normalize_path(self.path)
        openai = route == "/v1" or route.startswith("/v1/")
        self.streaming = False
        try:
            self.authorized = check_bearer(self, self.app.api_key)
            if not self.authorized and (method, route) not in OPEN_ROUTES:
                self.close_connection = True
                raise _unauthorized()
            fn = self.app.routes.get((method, route))
            if fn is None:
                self.close_connection = True
                allowed = sorted(m for m, p in self.app.routes if p == route)
                if allowed:
                    raise error(
                        405,
                        f"{method} is not allowed on {route}: use {', '.join(allowed)}",
                        "method_not_allowed",
                        {"Allow": ", ".join([*allowed, "OPTIONS"])},
                    )
                raise error(404, f"no route {route}", "not_found")
            fn(self)
        except HTTPError as e:
            if self.streaming:
                self.close_connection = True
                return
            status, headers = e.status, e.headers
            body = e.openai_body() if openai else e.kobold_body()
            self._try(lambda: send_json(self, status, body, headers))
        except OSError:  # the client went away
            self.close_connection = True
        except Exception as e:  # a bug: one line to the log, a 500 to the client
            log.exception("internal error answering %s %s", method, route)
            self.close_connection = True
            if self.streaming:
                return
            err = error(500, f"internal error: {type(e).__name__}: {e}", "server_error")
            body = err.openai_body() if openai else err.kobold_body()
            self._try(lambda: send_json(self, 500, body))

    def _try(self, fn) -> None:
        try:
            fn()
        except OSError:
            self.close_connection = True


__all__ = [
    "HTTPError",
    "Server",
    "check_bearer",
    "cors_headers",
    "error",
    "normalize_path",
    "parse_kobold",
    "parse_openai",
    "read_body",
    "read_json_body",
    "send_json",
    "validation_error",
]
