"""The HTTP base that `serve` and `ui` share (softprompt/http.py): the route table, JSON
answers, body limits, the error boundary (a client's input is never a 500; a bug is a 500
with one line in the log and no traceback to the client), strict JSON, idle timeouts."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import pytest
from conftest import raw_request

from softprompt.errors import ConfigError
from softprompt.http import (
    App,
    Listener,
    Router,
    error,
    loads,
    read_body,
    send_json,
)

DEEP = b"[" * 100_000 + b"]" * 100_000


class Demo(App):
    """A small app: echo routes, one with a bug, one with the client's fault."""

    idle_timeout = 5.0

    def __init__(self):
        self.routes = Router()
        self.routes.add(
            "GET", "/hello/{name}", lambda r: send_json(r, 200, {"name": r.params["name"]})
        )
        self.routes.add("GET", "/q", lambda r: send_json(r, 200, r.query))
        self.routes.add("POST", "/echo", self.echo)
        self.routes.add("GET", "/bug", self.bug)
        self.routes.add("GET", "/fault", self.fault)

    def echo(self, r):
        body = read_body(r, 100)
        try:
            data = loads(body)
        except ValueError as e:
            raise error(400, f"not JSON: {e}", "bad_input") from None
        send_json(r, 200, data)

    def bug(self, r):
        {}["missing"]  # noqa: B018 - a bug

    def fault(self, r):
        raise ConfigError("the client's fault")

    def client_error(self, e):
        return error(400, str(e), "bad_input") if isinstance(e, ConfigError) else None


@pytest.fixture
def records():
    """The log records of softprompt's loggers, whatever earlier CLI tests did to their
    level and propagation."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = got.append
    logger = logging.getLogger("softprompt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def demo():
    listener = Listener(Demo(), "127.0.0.1", 0)
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    yield listener
    listener.shutdown()
    listener.server_close()


def request(listener, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", listener.server_address[1], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.headers), json.loads(data) if data else None
    finally:
        conn.close()


def test_route_table_params_404_405_and_head(demo):
    assert request(demo, "GET", "/hello/a%20b")[2] == {"name": "a b"}
    assert request(demo, "GET", "/q?x=1&y=%C3%A9")[2] == {"x": "1", "y": "é"}
    status, _, body = request(demo, "GET", "/nowhere")
    assert status == 404 and body == {"error": "no route /nowhere"}
    status, headers, body = request(demo, "GET", "/echo")
    assert status == 405 and headers["Allow"] == "POST" and "use POST" in body["error"]
    status, headers, body = request(demo, "HEAD", "/hello/x")
    assert status == 200 and body is None and int(headers["Content-Length"]) > 0
    router = Router()
    router.add("OPTIONS", "*", print)
    assert router.find("OPTIONS", "/any/path") == (print, {})
    assert ("OPTIONS", "*") in router and ("GET", "/x") not in router


def test_a_bug_is_a_500_with_one_log_line_and_no_traceback(demo, records):
    status, _, body = request(demo, "GET", "/bug")
    assert status == 500
    assert body == {"error": "internal error: KeyError: 'missing'"}
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    line = errors[0].getMessage()
    assert "\n" not in line and "GET /bug" in line and "KeyError" in line and "test_http.py" in line
    debug = [r for r in records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug  # the traceback, for --debug
    assert request(demo, "GET", "/hello/x")[0] == 200  # still serving


def test_the_clients_fault_is_a_4xx_and_not_logged_as_an_error(demo, records):
    status, _, body = request(demo, "GET", "/fault")
    assert status == 400 and body == {"error": "the client's fault"}
    assert not [r for r in records if r.levelno >= logging.ERROR]


def test_strict_json_and_deep_nesting_are_400_not_500(demo):
    assert loads(b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}
    for bad in (b"[NaN]", b"[Infinity]", b"\xff\xfe{}", DEEP):
        with pytest.raises(ValueError):
            loads(bad)
    with pytest.raises(ValueError, match="too large"):
        loads(b"[1e400]", finite=True)
    assert loads(b"[1e400]") == [float("inf")]  # KoboldAI's fields then say "Not a valid number"
    with pytest.raises(ValueError, match="nested too deeply"):
        loads(DEEP)
    status, _, body = request(demo, "POST", "/echo", b"[NaN]")
    assert status == 400 and "NaN" in body["error"]


def test_body_limits(demo):
    status, _, body = request(demo, "POST", "/echo", b"x" * 101)
    assert status == 413 and "limit of 100" in body["error"]
    chunked = raw_request(
        demo,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 411 ")
    for length in (b"-1", b"1_0", b"\xb2", b"+2"):
        got = raw_request(
            demo, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}"
        )
        assert got.startswith(b"HTTP/1.1 400 "), got
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"].startswith("bad Content-Length")


def test_an_unread_body_closes_the_connection(demo):
    """A route that leaves the body unread: the body must not be read as the next request."""
    got = raw_request(demo, b"GET /hello/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 1  # then closed


def test_the_standard_librarys_refusals_are_json(demo):
    got = raw_request(demo, b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 414 "), got[:100]
    assert "error" in json.loads(got.split(b"\r\n\r\n", 1)[1])
    got = raw_request(demo, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 501 " in got.split(b"\r\n", 1)[0]
    assert "error" in json.loads(got.split(b"\r\n\r\n", 1)[1])


def test_idle_connections_are_closed(demo):
    demo.app.idle_timeout = 0.5
    t0 = time.monotonic()
    assert raw_request(demo, b"") == b""
    assert raw_request(demo, b"GET /hello/x HTTP/1.1\r\nHost: x\r\n") == b""
    assert (
        raw_request(demo, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{") == b""
    )
    assert time.monotonic() - t0 < 5
    assert request(demo, "GET", "/hello/x")[0] == 200


# ----------------------------------------------------------------------------- serve


def test_serve_closes_idle_connections_too(tiny_llama):
    from softprompt.serve import Server

    with Server(tiny_llama, port=0) as srv:
        assert srv.idle_timeout == 120
        srv.idle_timeout = 0.5
        t0 = time.monotonic()
        assert raw_request(srv.httpd, b"") == b""
        assert (
            raw_request(srv.httpd, b"POST /api/v1/generate HTTP/1.1\r\nContent-Length: 9\r\n\r\n{")
            == b""
        )
        assert time.monotonic() - t0 < 5
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/api/v1/model")
        assert conn.getresponse().status == 200
        conn.close()


def test_serve_answers_deep_json_and_a_bug_in_its_shapes(tiny_llama, records, monkeypatch):
    from softprompt.serve import Server

    with Server(tiny_llama, port=0) as srv:

        def post(path, body):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = resp.status, json.loads(resp.read())
            conn.close()
            return answer

        status, body = post("/api/v1/generate", DEEP)
        assert status == 400 and body["detail"]["type"] == "bad_input"
        assert "nested too deeply" in body["detail"]["msg"]
        status, body = post("/v1/completions", DEEP)
        assert status == 400 and body["error"]["type"] == "bad_input"

        def broken(*args, **kwargs):
            raise RuntimeError("a bug\non two lines")

        monkeypatch.setattr(srv, "prepare", broken)
        status, body = post("/api/v1/generate", b'{"prompt": "x", "max_length": 2}')
        assert status == 500
        assert body == {
            "detail": {"msg": "internal error: RuntimeError: a bug", "type": "server_error"}
        }
        [record] = [r for r in records if r.levelno >= logging.ERROR]
        assert "\n" not in record.getMessage() and record.exc_info is None
        status, body = post("/v1/completions", b'{"prompt": "x", "max_tokens": 2}')
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "Traceback" not in json.dumps(body)


def test_ui_answers_deep_json_with_400(tmp_path):
    from softprompt import ui

    srv = ui.make_server(tmp_path / "ws", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        conn.request("POST", "/api/runs", body=DEEP, headers={"X-Softprompt": "1"})
        resp = conn.getresponse()
        assert resp.status == 400
        assert "nested too deeply" in json.loads(resp.read())["error"]
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
