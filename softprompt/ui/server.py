"""The page's server: the static page in ``softprompt/web/`` and its JSON API, as a route
table (``ROUTES``) on the shared HTTP base (``softprompt.http``).

It binds 127.0.0.1 by default, answers only requests whose Host is that address, and
requires a custom header on every POST, so other web sites open in the browser cannot drive
it. Errors are ``{"error": "one line"}``: 400 for what the user can fix, 404 for no such run.
"""

from __future__ import annotations

import importlib
import logging
import mimetypes
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, SoftPromptError
from ..http import (
    App,
    HTTPError,
    Listener,
    Request,
    Router,
    error,
    loads,
    read_body,
    send,
    send_json,
    whole_number,
)
from .options import GROUPS, option_list
from .tryit import Generator
from .workspace import NoSuchDataset, NoSuchRun, Workspace, default_workdir

log = logging.getLogger("softprompt.ui")

WEB = Path(__file__).resolve().parent.parent / "web"
DEFAULT_PORT = 8765
MAX_UPLOAD = 64 << 20  # bytes per uploaded file
MAX_JSON = 1 << 20  # bytes per JSON request body
IDLE_TIMEOUT = 60.0  # seconds a connection may wait for the client before it is closed
HEADER = "X-Softprompt"  # every POST carries it: a cross-site form cannot set it

UIRequest = Request["UIServer"]  # a route's request: its ``app`` is the UIServer


def json_body(r: UIRequest) -> dict:
    """The POST body (read by ``UIServer.before``) as a JSON object; ConfigError if not."""
    try:
        data = loads(r.body or b"{}", finite=True)
    except ValueError as e:
        raise ConfigError(f"the request body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError("the request body must be a JSON object")
    return data


def answer(r: UIRequest, data: Any, status: int = 200) -> None:
    send_json(r, status, data)


# --------------------------------------------------------------------------- routes


def static(name: str):
    def route(r: UIRequest) -> None:
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        csp = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}
        send(r, 200, (WEB / name).read_bytes(), ctype, csp)

    return route


def info(r: UIRequest) -> None:
    srv = r.app
    ws = srv.workspace
    answer(
        r,
        {
            "workdir": str(ws.root),
            "datasets_dir": str(ws.datasets),
            "version": srv.version,
            "max_upload": srv.max_upload,
            "pid": os.getpid(),
        },
    )


def options(r: UIRequest) -> None:
    answer(r, {"options": option_list(), "groups": list(GROUPS)})


def datasets(r: UIRequest) -> None:
    answer(r, {"datasets": r.app.workspace.list_datasets()})


def check_dataset(r: UIRequest) -> None:
    q = r.query
    flags = {k: q.get(k, "") in ("1", "true", "on") for k in ("recursive", "skip_bad_files")}
    answer(r, r.app.workspace.check_dataset(q.get("path", ""), **flags))


def delete_dataset(r: UIRequest) -> None:
    answer(r, r.app.workspace.delete_dataset(r.params["name"]))


def upload(r: UIRequest) -> None:
    ws, q = r.app.workspace, r.query
    answer(r, ws.upload(q.get("dataset", ""), q.get("filename", ""), r.body))


def runs(r: UIRequest) -> None:
    answer(r, {"runs": r.app.workspace.list_runs()})


def start_run(r: UIRequest) -> None:
    body = json_body(r)
    answer(r, r.app.workspace.start(body.get("options", body)), 201)


def run_status(r: UIRequest) -> None:
    since = whole_number(r.query.get("since", "0")) or 0
    answer(r, r.app.workspace.status(r.params["run"], since))


def stop_run(r: UIRequest) -> None:
    answer(r, r.app.workspace.stop(r.params["run"]))


def resume_run(r: UIRequest) -> None:
    steps = json_body(r).get("max_steps")
    number = whole_number(str(steps)) if steps not in (None, "") else None
    if steps not in (None, "") and number is None:
        raise ConfigError("Steps (--max-steps) must be a whole number")
    steps = number
    answer(r, r.app.workspace.resume(r.params["run"], steps))


def delete_run(r: UIRequest) -> None:
    answer(r, r.app.workspace.delete_run(r.params["run"]))


def try_run(r: UIRequest) -> None:
    srv = r.app
    body = json_body(r)
    run_id = r.params["run"]
    folder = srv.workspace.run_dir(run_id)
    if not srv.workspace.status(run_id, summary=True)["can_generate"]:
        raise ConfigError("this run has no finished soft prompt to try yet")
    answer(r, srv.generator.compare(folder, body))


def download(r: UIRequest) -> None:
    zp = r.app.workspace.zip_path(r.params["run"])
    quoted = urllib.parse.quote(zp.name)
    ascii_name = zp.name.encode("ascii", "replace").decode().replace('"', "_")
    disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"
    send(r, 200, zp.read_bytes(), "application/zip", {"Content-Disposition": disposition})


# the page's icon: a soft prompt's tokens before the text, in the page's blue
ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="7" fill="#1d2330"/>'
    b'<rect x="5" y="9" width="5" height="14" rx="2" fill="#2f6fdb"/>'
    b'<rect x="12" y="9" width="5" height="14" rx="2" fill="#2f6fdb" opacity=".7"/>'
    b'<rect x="20" y="12" width="8" height="2.5" rx="1" fill="#fff"/>'
    b'<rect x="20" y="17.5" width="6" height="2.5" rx="1" fill="#fff"/></svg>'
)


def favicon(r: UIRequest) -> None:
    send(r, 200, ICON, "image/svg+xml", {"Cache-Control": "max-age=86400"})


ROUTES = [
    ("GET", "/", static("index.html")),
    ("GET", "/app.js", static("app.js")),
    ("GET", "/style.css", static("style.css")),
    ("GET", "/favicon.ico", favicon),
    ("GET", "/api/info", info),
    ("GET", "/api/options", options),
    ("GET", "/api/datasets", datasets),
    ("GET", "/api/dataset-check", check_dataset),
    ("POST", "/api/datasets/{name}/delete", delete_dataset),
    ("POST", "/api/upload", upload),
    ("GET", "/api/runs", runs),
    ("POST", "/api/runs", start_run),
    ("GET", "/api/runs/{run}", run_status),
    ("POST", "/api/runs/{run}/stop", stop_run),
    ("POST", "/api/runs/{run}/resume", resume_run),
    ("POST", "/api/runs/{run}/delete", delete_run),
    ("POST", "/api/runs/{run}/generate", try_run),
    ("GET", "/api/runs/{run}/download", download),
]


# --------------------------------------------------------------------------- the server


class UIServer(Listener, App):
    """The page's server over ``workspace``, bound to ``host:port`` (call ``serve_forever``).
    ``idle_timeout`` and ``max_upload`` may be changed before or while it serves."""

    server_version = "softprompt-ui"
    log = log

    def __init__(self, workspace: Workspace, host: str, port: int):
        self.workspace = workspace
        self.generator = Generator()
        self.version = __version__
        self.idle_timeout = IDLE_TIMEOUT
        self.max_upload = MAX_UPLOAD
        self.allowed_hosts: set[str] | None = (
            None
            if host in ("", "0.0.0.0", "::")
            else {"127.0.0.1", "localhost", "::1", host.lower()}
        )
        self.routes = Router()
        for method, path, fn in ROUTES:
            self.routes.add(method, path, fn)
        super().__init__(self, host, port)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def headers(self) -> dict[str, str]:
        return {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    def _host_ok(self, r: UIRequest) -> bool:
        """Only requests addressed to the bound host: a web page that rebinds its own name
        to 127.0.0.1 still sends its own name. (Bound to every address, any host goes.)"""
        if self.allowed_hosts is None:
            return True
        host = (r.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        return host in self.allowed_hosts

    def before(self, r: UIRequest) -> None:
        """The Host, the POST header, and a POST's body, read whole (the connection is kept
        alive, so nothing of it may be left for the next request)."""
        r.body = b""
        if not self._host_ok(r):
            r.close_connection = True
            raise error(403, "unexpected Host header", "forbidden")
        if r.command == "POST":
            if r.headers.get(HEADER) != "1":
                r.close_connection = True  # its body is never read
                raise error(403, f"POST requests need the header {HEADER}: 1", "forbidden")
            limit = self.max_upload if r.route == "/api/upload" else MAX_JSON
            r.body = read_body(r, limit, too_large=400)

    def client_error(self, e: Exception) -> HTTPError | None:
        if isinstance(e, NoSuchRun):
            return error(404, "no such run", "not_found")
        if isinstance(e, NoSuchDataset):
            return error(404, "no such dataset", "not_found")
        if isinstance(e, SoftPromptError):
            return error(400, str(e), "bad_input")
        return None

    def error_body(self, r: UIRequest, err: HTTPError) -> Any:
        return {"error": " ".join(err.message.split())}


def make_server(
    workdir: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> UIServer:
    """The page's server, bound but not yet serving (call ``serve_forever``). Port 0 picks a
    free one (see ``.url``). Raises ConfigError if the port is taken or the folder unusable."""
    ws = Workspace(workdir or default_workdir())
    try:
        server = UIServer(ws, host, port)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): pass --port 0 for a free port"
        ) from None
    # the dataset check reads with softprompt.data, which loads torch (seconds): load it now,
    # so that the first check answers as the user types
    threading.Thread(target=importlib.import_module, args=("softprompt.data",), daemon=True).start()
    return server
