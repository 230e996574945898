"""The small HTTP base that `softprompt serve` and `softprompt ui` share, on the standard
library's ``http.server`` (docs/architecture.md says why not a framework).

An ``App`` says what a server answers; a ``Listener`` binds it to a port and runs each
connection in a thread of its own:

    class Hello(App):
        def __init__(self):
            self.routes = Router()
            self.routes.add("GET", "/hello/{name}", lambda r: send_json(r, 200, r.params))

    listener = Listener(Hello(), "127.0.0.1", 0)   # serve_forever() in a thread of your own

What every request gets from here:

- **a route table**: ``(method, path) -> function of the request`` (the request handler, with
  ``.app``, ``.route``, ``.params``, ``.query``); a path may hold ``{name}`` segments. A path
  with no route is a 404, a method the path does not take a 405 naming those it does; HEAD
  is answered as GET, without the body.
- **JSON answers** (``send_json``), with the app's headers on every one of them.
- **body limits**: ``read_body`` reads a body whole, at most a limit (over it: refused, and
  the connection closed), and refuses a chunked body (411) or a bad Content-Length (400).
  ``loads`` is strict JSON: no NaN or Infinity, and nesting too deep for the parser is a
  ValueError (a 400), not a RecursionError.
- **one error boundary**: an ``HTTPError`` is the answer it names; what ``App.client_error``
  maps is the client's fault too; a client that hung up gets no answer; anything else is a
  bug: one line in the log (the traceback at debug level) and a 500 whose JSON holds that
  line, never a traceback.
- **idle timeouts**: a connection that sends nothing (or half a request, or stops reading
  an answer) for ``App.idle_timeout`` seconds is closed, so a stalled client holds no thread.
- **no Nagle delay**: answers and stream events leave at once (TCP_NODELAY).
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import traceback
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar, cast

log = logging.getLogger(__name__)

# what a client that hung up (or stopped sending) raises on its socket: no answer is owed
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class HTTPError(Exception):
    """An answer other than success: ``status`` and a ``detail`` object, either
    ``{"msg": ..., "type": ...}`` or a validation dict ``{field: [message, ...]}`` (what
    each app makes of it is its ``error_body``); ``headers`` go with the answer."""

    def __init__(self, status: int, detail: dict, headers: dict | None = None):
        super().__init__(detail.get("msg") or json.dumps(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}

    @property
    def message(self) -> str:
        """The detail as one line of text."""
        if "msg" in self.detail:
            return str(self.detail["msg"])
        return "; ".join(
            f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in self.detail.items()
        )

    # KoboldAI's and OpenAI's shapes of an error, kept here for those who called them on
    # serve's HTTPError (softprompt.serve.kobold and .openai use them)
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
    """``{"msg": msg, "type": kind}`` with ``status``."""
    return HTTPError(status, {"msg": msg, "type": kind}, headers)


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters of it."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


# --------------------------------------------------------------------------- routes

# a route takes the request of its own app (``Request[Server]``, ``Request[UIServer]``)
Route = Callable[[Any], None]


class Router:
    """The route table: ``add(method, path, fn)``; ``routes`` maps each ``(method, path)`` as
    it was added to its function. A ``{name}`` segment matches one path segment, given to
    the route, %-decoded, as ``request.params[name]``."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self._patterns: list[tuple[str, str, re.Pattern, Route]] = []

    def add(self, method: str, path: str, fn: Route) -> None:
        """Answer ``method path`` with ``fn``; the path ``*`` answers that method on every
        path that has no route for it (a CORS preflight)."""
        method = method.upper()
        self.routes[(method, path)] = fn
        if "{" in path:
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
            self._patterns.append((method, path, re.compile(regex + r"\Z"), fn))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.routes

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        fn = self.routes.get((method, path))
        if fn is not None and "{" not in path:
            return fn, {}
        for m, _, regex, fn in self._patterns:
            found = regex.match(path) if m == method else None
            if found:
                return fn, {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()}
        return None

    def allowed(self, path: str) -> list[str]:
        """The methods ``path`` has a route of its own for."""
        methods = {m for m in METHODS if self._match(m, path)}
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def find(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method path`` and its parameters; HTTPError 404 or 405."""
        found = self._match(method, path) or (method == "HEAD" and self._match("GET", path))
        if found:
            return found
        if (method, "*") in self.routes:
            return self.routes[(method, "*")], {}
        allowed = self.allowed(path)
        if allowed:
            also = [m for m in METHODS if (m, "*") in self.routes and m not in allowed]
            raise error(
                405,
                f"{method} is not allowed on {path}: use {', '.join(allowed)}",
                "method_not_allowed",
                {"Allow": ", ".join([*allowed, *also])},
            )
        raise error(404, f"no route {path}", "not_found")


# --------------------------------------------------------------------------- the app


class App:
    """What a server answers. Subclasses set ``routes`` and may change the rest."""

    routes: Router
    idle_timeout: float = 60.0  # seconds a connection may wait on the client
    server_version = "softprompt"
    log: logging.Logger = log

    def headers(self) -> dict[str, str]:
        """Headers sent on every answer."""
        return {}

    def dumps(self, obj: Any) -> bytes:
        """An answer's JSON (``\\u`` escapes: a name that is not UTF-8 still encodes)."""
        return json.dumps(obj, allow_nan=False, default=str).encode()

    def route_path(self, raw: str) -> str:
        """The path the route table is looked up with: the request's, without its query."""
        return urllib.parse.urlsplit(raw).path or "/"

    def before(self, request: Request) -> None:
        """Checks every request passes before its route (the API key, the Host); raise
        HTTPError to refuse it."""

    def client_error(self, e: Exception) -> HTTPError | None:
        """The answer for an exception that is the client's fault, not a bug (None: a bug)."""
        return None

    def error_body(self, request: Request, err: HTTPError) -> Any:
        """The JSON of an error answer."""
        return {"error": err.message}


AppT = TypeVar("AppT", bound=App)


class Request(BaseHTTPRequestHandler, Generic[AppT]):
    """One connection's handler; a route gets it as the request: ``app``, ``command`` (the
    method), ``route`` (the path looked up), ``params``, ``query``, ``headers``, and the
    helpers below. ``streaming`` is set once an event stream's headers are out (an error can
    then only end the stream)."""

    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: an answer's headers and body go out as two writes, and on a kept-alive
    # connection Nagle's algorithm held the second back until the client's delayed ACK,
    # 40 ms per request; a stream's events go out at once too
    disable_nagle_algorithm = True
    server: Listener
    route = "/"
    params: dict[str, str] = {}
    query: dict[str, str] = {}
    streaming = False
    body = b""  # the body, for the routes whose app's ``before`` reads it
    authorized = False  # whether the app's ``before`` found the request's key good
    _unread = False  # a body came that nobody read: the connection cannot go on

    @property
    def app(self) -> AppT:
        return cast(AppT, self.server.app)

    def setup(self) -> None:
        # every read and write of this connection waits at most this long
        self.timeout = self.app.idle_timeout  # type: ignore[misc]  # the base's class default
        super().setup()

    def version_string(self) -> str:
        return f"{self.app.server_version} {self.sys_version}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        self.app.log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """The standard library's own refusals (a malformed request line, too long a URL or
        header, an unknown method) as JSON too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        err = error(code, message or phrase, "bad_request")
        self._try(lambda: send_json(self, code, self.app.error_body(self, err), err.headers))

    def _dispatch(self) -> None:
        method = self.command
        self.streaming = False
        self.params, self.query = {}, {}
        length = self.headers.get("Content-Length", "").strip()
        self._unread = length not in ("", "0") or "Transfer-Encoding" in self.headers
        try:
            self.route = self.app.route_path(self.path)
            query = urllib.parse.urlsplit(self.path).query
            self.query = dict(urllib.parse.parse_qsl(query))
            self.app.before(self)
            fn, self.params = self.app.routes.find(method, self.route)
            fn(self)
        except Exception as e:
            self._fail(e)
        if self._unread:  # its body would be read as the next request
            self.close_connection = True

    def _fail(self, e: Exception) -> None:
        if isinstance(e, CLIENT_GONE):
            self.close_connection = True  # the client left, or stopped sending: no answer
            return
        err = e if isinstance(e, HTTPError) else self.app.client_error(e)
        if err is None:  # a bug: one line to the log, a 500 to the client
            where = traceback.extract_tb(e.__traceback__)[-1:]
            at = f" ({where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno})" if where else ""
            self.app.log.error(
                "internal error answering %s %s: %s%s", self.command, self.route, one_line(e), at
            )
            self.app.log.debug("the traceback", exc_info=e)
            self.close_connection = True
            err = error(500, f"internal error: {one_line(e)}", "server_error")
        if self.streaming:
            self.close_connection = True  # the stream's headers are out: it can only end
            return
        body = self.app.error_body(self, err)
        self._try(lambda: send_json(self, err.status, body, err.headers))

    def _try(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except OSError:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


class Listener(ThreadingHTTPServer):
    """``app`` served on ``host:port`` (port 0: a free one), each connection in a thread of
    its own. OSError when the address cannot be bound."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, app: App, host: str, port: int):
        self.app = app
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Request)


# --------------------------------------------------------------------------- answers


def send(request: Request, status: int, data: bytes, ctype: str, headers: dict | None = None):
    """Answer ``data`` with Content-Length and the app's headers (no body for HEAD)."""
    request.send_response(status)
    request.send_header("Content-Type", ctype)
    request.send_header("Content-Length", str(len(data)))
    for k, v in {**request.app.headers(), **(headers or {})}.items():
        request.send_header(k, v)
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(data)
    request.wfile.flush()


def send_json(request: Request, status: int, obj: Any, headers: dict | None = None) -> None:
    """Answer ``obj`` as JSON."""
    send(request, status, request.app.dumps(obj), "application/json; charset=utf-8", headers)


def start_event_stream(request: Request) -> None:
    """Send the headers of a server-sent event stream; the caller writes the events to
    ``request.wfile``. The connection closes at its end; from here on an error can only end
    the stream (``request.streaming``)."""
    request.send_response(200)
    headers = {
        **request.app.headers(),
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # a proxy in front must not hold the events back
        "Connection": "close",
    }
    for k, v in headers.items():
        request.send_header(k, v)
    request.end_headers()
    request.close_connection = True
    request.streaming = True
    request.wfile.flush()


# --------------------------------------------------------------------------- bodies


def whole_number(text: str) -> int | None:
    """A whole number written in ASCII digits (a Content-Length, a query's number), else
    None: ``int`` takes "+5", "1_0" and other scripts' digits ("²" passes ``isdigit``)."""
    return int(text) if re.fullmatch(r"[0-9]{1,20}", text.strip()) else None


def read_body(request: Request, limit: int, too_large: int = 413) -> bytes:
    """The request body, read whole, at most ``limit`` bytes. HTTPError ``too_large`` when it
    is larger (a body up to four times the limit is read and dropped so the client sees the
    answer rather than a reset; the connection is closed), 411 for a chunked body, 400 for a
    Content-Length that is not a number or a body that ends early."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        request.close_connection = True
        raise error(411, "send the body with a Content-Length", "bad_input")
    raw = request.headers.get("Content-Length")
    if raw is None:
        request._unread = False
        return b""
    length = whole_number(raw)
    if length is None:
        request.close_connection = True  # where its body ends is unknown
        raise error(400, f"bad Content-Length {raw!r}", "bad_input")
    if length > limit:
        request.close_connection = True
        left = length if length <= 4 * limit else 0
        while left > 0:
            chunk = request.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        raise error(
            too_large,
            f"the request body is {length:,} bytes, more than the limit of {limit:,}",
            "bad_input",
        )
    data = request.rfile.read(length) if length else b""
    request._unread = False
    if len(data) < length:
        request.close_connection = True
        raise error(400, "the request body ended early", "bad_input")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def loads(data: str | bytes, finite: bool = False) -> Any:
    """JSON as the standard has it: Python's json also takes NaN and Infinity (refused here)
    and, with ``finite``, 1e400 read as an infinity (refused too). ValueError (a
    UnicodeDecodeError for bytes that are not UTF-8) when it is not JSON, or is nested too
    deep for the parser."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(
            text, parse_constant=_no_constant, parse_float=_finite if finite else None
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None


__all__ = [
    "App",
    "HTTPError",
    "Listener",
    "Request",
    "Router",
    "error",
    "loads",
    "read_body",
    "send",
    "send_json",
    "start_event_stream",
    "whole_number",
]
