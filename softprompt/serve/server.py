"""``Server``: `softprompt serve` put together: the model, the soft prompt library
(``library.py``), the generation queue (``queue.py``) and the KoboldAI and OpenAI route
tables (``kobold.py``, ``openai.py``), on the shared HTTP base (``softprompt.http``), with
the API key, CORS and KoboldAI's error shapes."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import __version__
from ..errors import ConfigError, SoftPromptError
from ..generate import Cancel, Progress, soft_tensor, stream_text
from ..http import App, HTTPError, Listener, Request, Route, Router
from ..model import LoadedModel
from ..soft_prompt import SoftPrompt
from .kobold import OPEN_ROUTES, unauthorized
from .kobold import ROUTES as KOBOLD_ROUTES
from .library import SoftPromptLibrary, UnknownSoftPrompt, resolve_softprompts
from .openai import ROUTES as OPENAI_ROUTES
from .queue import GenerationQueue, Job
from .request import MAX_BODY_BYTES, GenRequest

log = logging.getLogger("softprompt.serve")

DEFAULT_QUEUE = 4
DEFAULT_PORT = 5001


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


def check_bearer(request, api_key: str | None) -> bool:
    """True when no key is set or the request carries ``Authorization: Bearer <api_key>``."""
    if not api_key:
        return True
    got = request.headers.get("Authorization", "")
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


def preflight(r: Request) -> None:
    """The CORS preflight, on any path: never needs the key."""
    r.send_response(200)
    for k, v in cors_headers().items():
        r.send_header(k, v)
    r.send_header("Allow", "GET, POST, PUT, OPTIONS")
    r.send_header("Content-Length", "0")
    r.end_headers()


class Server(App):
    """The KoboldAI-compatible server over ``lm``. ``softprompts`` is the soft prompt folder
    (None: no soft prompts); ``softprompt`` a file name in it to select at the start (or,
    without a folder, a path to a soft prompt file, whose folder becomes the folder)."""

    server_version = f"softprompt/{__version__}"
    idle_timeout = 120.0  # seconds a client may take to send its request (or read an answer)
    log = log

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
        folder, selected = resolve_softprompts(softprompts, softprompt)
        self.library = SoftPromptLibrary(folder, lm.model)
        self.queue = GenerationQueue(queue_size)
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self.queue_size = queue_size
        self.max_length_limit = max_length_limit
        self.max_body_bytes = max_body_bytes
        self._tok_lock = threading.Lock()
        self.httpd: Listener | None = None
        self._thread: threading.Thread | None = None
        if selected:
            self._select_at_start(selected)
        self.routes = Router()
        for method, path, fn in [*KOBOLD_ROUTES, *OPENAI_ROUTES, ("OPTIONS", "*", preflight)]:
            self.routes.add(method, path, fn)

    def _select_at_start(self, name: str) -> None:
        try:
            self.select(name)
        except UnknownSoftPrompt:
            found = ", ".join(self.list_soft_prompts()) or "none"
            raise ConfigError(
                f"--softprompt {name}: no such soft prompt in {self.folder} (found: {found})"
            ) from None
        except SoftPromptError as e:
            raise ConfigError(f"--softprompt {name}: {e}") from None

    # ------------------------------------------------------------------ soft prompts

    @property
    def folder(self) -> Path | None:
        return self.library.folder

    @property
    def selected(self) -> str:
        """The soft prompt of requests that name none ("": none)."""
        return self.library.selected

    @selected.setter
    def selected(self, name: str) -> None:
        self.library.selected = name

    def list_soft_prompts(self) -> list[str]:
        """File names of the soft prompts in the folder (and PEFT adapter folders), sorted."""
        return self.library.names()

    def load_soft_prompt(self, name: str) -> SoftPrompt | None:
        """The soft prompt file ``name`` of the folder, cached (see SoftPromptLibrary.load)."""
        return self.library.load(name)

    def select(self, name: str) -> None:
        """Make ``name`` the server's soft prompt ("" for none)."""
        self.library.select(name)

    # ------------------------------------------------------------------ generation

    @property
    def context_length(self) -> int:
        return self.lm.context_length

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        with self._tok_lock:
            return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prepare(self, req: GenRequest, sp: SoftPrompt | None, openai: bool = False) -> Job:
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
        return Job(ids, soft, req)

    def pieces(self, job: Job, seed: int, progress: Progress, cancel: Cancel) -> Iterator[str]:
        """Text pieces of one continuation with ``seed``, as ``softprompt.generate.stream``
        makes them, stopping between tokens once ``cancel`` is set; fills in ``progress``."""
        req = job.req
        return stream_text(
            self.lm,
            job.ids,
            job.soft,
            dataclasses.replace(req.options, seed=seed & (2**64 - 1)),
            stop=req.stop,
            ban_eos=req.ban_eos,
            cancel=cancel,
            progress=progress,
        )

    # the queue, as the server's own (tests and callers use these)
    def slot(self, genkey: str = ""):
        """Wait for the model (see GenerationQueue.slot)."""
        return self.queue.slot(genkey)

    def abort(self, genkey: str = "") -> bool:
        """Stop the running generation (only if its genkey matches, when one is given)."""
        return self.queue.abort(genkey)

    def text_so_far(self, genkey: str = "") -> str:
        """The text of the running (or last) generation, for the genkey it started with."""
        return self.queue.text_so_far(genkey)

    def busy(self) -> bool:
        return self.queue.busy()

    @property
    def pending(self) -> int:
        """Generation requests running or waiting."""
        return self.queue.pending

    # ------------------------------------------------------------------ HTTP

    def add_route(self, method: str, path: str, fn: Route) -> None:
        """Answer ``method path`` (a normalized path, see ``normalize_path``) with ``fn``,
        which gets the request (``request.app`` is this server)."""
        self.routes.add(method, normalize_path(path), fn)

    def headers(self) -> dict[str, str]:
        return cors_headers()

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")

    def route_path(self, raw: str) -> str:
        return normalize_path(raw)

    def before(self, r: Request) -> None:
        """The API key: needed for everything but the preflight and the open routes."""
        r.authorized = check_bearer(r, self.api_key)
        method = "GET" if r.command == "HEAD" else r.command
        if r.command == "OPTIONS" or r.authorized or (method, r.route) in OPEN_ROUTES:
            return
        r.close_connection = True
        raise unauthorized()

    def error_body(self, r: Request, err: HTTPError) -> Any:
        """OpenAI's shape under /v1, KoboldAI's elsewhere."""
        openai = r.route == "/v1" or r.route.startswith("/v1/")
        return err.openai_body() if openai else err.kobold_body()

    # ------------------------------------------------------------------ running

    def bind(self) -> int:
        """Bind the listening socket; the port (the free one picked when port is 0)."""
        return self._listener().server_address[1]

    def _listener(self) -> Listener:
        """The listening socket, bound now if it is not yet."""
        if self.httpd is not None:
            return self.httpd
        try:
            self.httpd = Listener(self, self.host, self.port)
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
        return self.httpd

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "", "::"):
            host = "[::1]" if self.host == "::" else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        """Bind and serve in a background thread; returns the port."""
        httpd = self._listener()
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="softprompt-serve", daemon=True
        )
        self._thread.start()
        return self.port

    def serve_forever(self) -> None:
        """Bind and serve in this thread until ``close`` (or Ctrl-C)."""
        self._listener().serve_forever()

    def close(self) -> None:
        """Stop serving: abort the running generation and close the socket."""
        self.queue.close()
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
