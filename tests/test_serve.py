"""`softprompt serve`: a real server on a loopback port, real HTTP requests replaying what
KoboldAI clients do (KoboldAI Lite, SillyTavern): connect, generate, stream
(parsed with KoboldAI Lite's rule), abort mid-stream, switch soft prompts, the OpenAI-style
routes, the busy queue, the API key, and bad requests."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, assert_one_line_error, run_cli

import softprompt.generate as generate_mod
from softprompt import SoftPrompt
from softprompt.formats import save
from softprompt.generate import generate
from softprompt.serve import Server

PROMPT = "It is a truth universally acknowledged, that a single man"
SOFT_NAMES = ["alpha.zip", "beta.safetensors", "wrong.zip"]
# KoboldAI Lite's rule for the KoboldCpp stream: one `event:` line, one `data:` line of
# one-line JSON, a blank line; repeated, with nothing else in between.
LITE_EVENT = re.compile(r"event: (.*)\ndata: (.*)(?:\r?\n){2}")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("softprompts")
    gen = torch.Generator().manual_seed(1)
    dim = tiny_llama.embed_dim
    save(
        SoftPrompt(torch.randn(8, dim, generator=gen) * 3, {"name": "alpha"}),
        folder / SOFT_NAMES[0],
    )
    save(
        SoftPrompt(torch.randn(6, dim, generator=gen) * 3, {"name": "beta"}), folder / SOFT_NAMES[1]
    )
    save(SoftPrompt(torch.randn(4, dim // 2, generator=gen), {"name": "w"}), folder / SOFT_NAMES[2])
    (folder / "notes.txt").write_text("not a soft prompt\n")
    save(SoftPrompt(torch.randn(3, dim, generator=gen)), folder / ".hidden.zip")
    return folder


@pytest.fixture(scope="module")
def server(tiny_llama, sp_dir):
    srv = Server(tiny_llama, sp_dir, port=0, queue_size=1)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def fresh(server):
    """The shared server with no soft prompt selected, before and after the test."""
    server.selected = ""
    yield server
    server.selected = ""


class Answer:
    def __init__(self, resp: http.client.HTTPResponse, body: bytes):
        self.status = resp.status
        self.headers = resp.headers
        self.text = body.decode("utf-8")

    def json(self):
        return json.loads(self.text)


def call(srv, method, path, body=None, *, raw=None, headers=None, timeout=60) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        return Answer(resp, resp.read())
    finally:
        conn.close()


def kobold(srv, body, **kw) -> dict:
    ans = call(srv, "POST", "/api/v1/generate", body, **kw)
    assert ans.status == 200, ans.text
    [result] = ans.json()["results"]
    return result


def lite_events(raw: str) -> list[dict]:
    """Parse a stream the way KoboldAI Lite does; every byte must belong to an event."""
    events, rest = [], raw
    while rest:
        m = LITE_EVENT.match(rest)
        assert m, f"not an event: {rest[:200]!r}"
        assert m[1] == "message"
        events.append(json.loads(m[2]))
        rest = rest[m.end() :]
    return events


def load(sp_dir, name):
    return SoftPrompt.load(sp_dir / name)


# ------------------------------------------------------------------------------ connecting


def test_connect_routes(server):
    """What KoboldAI Lite and SillyTavern ask for on connect, with CORS on every answer."""
    lm = server.lm
    expected = {
        "/api/v1/model": {"result": lm.name},
        "/api/v1/info/version": {"result": "1.2.6"},
        "/api/v1/config/max_context_length": {"value": lm.context_length},
        "/api/extra/true_max_context_length": {"value": lm.context_length},
        "/api/v1/config/max_length": {"value": 80},
        "/api/v1/config/soft_prompt": {"value": ""},
        "/api/v1/config/soft_prompts_list": {"values": [{"value": n} for n in SOFT_NAMES]},
        "/api/latest/model/": {"result": lm.name},  # /api/latest and trailing slashes
        "/api/v1/model?x=1": {"result": lm.name},
    }
    for path, want in expected.items():
        ans = call(server, "GET", path)
        assert ans.status == 200, (path, ans.text)
        assert ans.json() == want, path
        assert ans.headers["Access-Control-Allow-Origin"] == "*"
        assert ans.headers["Content-Type"].startswith("application/json")
    version = call(server, "GET", "/api/extra/version").json()
    assert version["result"] == "KoboldCpp"
    assert tuple(int(x) for x in version["version"].split(".")) >= (1, 49)
    assert version["protected"] is False


# ------------------------------------------------------------------------------ generating


@pytest.mark.parametrize("name", ["", "alpha.zip", "beta.safetensors"])
def test_generate_is_the_library_with_the_soft_prompt(fresh, sp_dir, name):
    """Greedy and seeded sampling give exactly softprompt.generate's text with that soft
    prompt: the soft prompt really is applied, and the sampling fields map one to one."""
    lm, sp = fresh.lm, load(sp_dir, name) if name else None
    greedy = kobold(
        fresh, {"prompt": PROMPT, "max_length": 24, "temperature": 0, "soft_prompt": name}
    )
    want = generate(lm, PROMPT, sp, max_new_tokens=24, temperature=0)
    assert greedy["text"] == want and want
    assert greedy["finish_reason"] in ("length", "stop")
    sampled = kobold(
        fresh,
        {
            "prompt": PROMPT,
            "max_length": 16,
            "temperature": 0.9,
            "top_p": 0.9,
            "top_k": 40,
            "rep_pen": 1.2,
            "sampler_seed": 7,
            "soft_prompt": name,
            "use_story": False,  # clients send keys the server does not know: ignored
            "min_p": 0.1,
        },
    )
    assert sampled["text"] == generate(
        lm,
        PROMPT,
        sp,
        max_new_tokens=16,
        temperature=0.9,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.2,
        seed=7,
    )


def test_soft_prompts_change_the_text_and_n_samples(fresh):
    texts = {
        name: kobold(
            fresh, {"prompt": PROMPT, "max_length": 20, "temperature": 0, "soft_prompt": name}
        )["text"]
        for name in ("", "alpha.zip", "beta.safetensors")
    }
    assert len(set(texts.values())) == 3, texts
    ans = call(
        fresh,
        "POST",
        "/api/v1/generate",
        {"prompt": PROMPT, "max_length": 8, "temperature": 1.0, "sampler_seed": 3, "n": 3},
    )
    results = ans.json()["results"]
    assert len(results) == 3 and len({r["text"] for r in results}) > 1


def test_server_selection_and_per_request_choice(fresh, sp_dir):
    """PUT /config/soft_prompt chooses for requests that name none; a request's own
    `soft_prompt` wins for that request only; "" is none."""
    body = {"prompt": PROMPT, "max_length": 20, "temperature": 0}
    none = kobold(fresh, body)["text"]
    alpha = kobold(fresh, {**body, "soft_prompt": "alpha.zip"})["text"]
    assert alpha != none

    ans = call(fresh, "PUT", "/api/v1/config/soft_prompt", {"value": "alpha.zip"})
    assert ans.status == 200 and ans.json() == {}
    assert call(fresh, "GET", "/api/v1/config/soft_prompt").json() == {"value": "alpha.zip"}
    assert kobold(fresh, body)["text"] == alpha
    assert kobold(fresh, {**body, "soft_prompt": ""})["text"] == none
    beta = kobold(fresh, {**body, "soft_prompt": "beta.safetensors"})["text"]
    assert beta == generate(
        fresh.lm, PROMPT, load(sp_dir, "beta.safetensors"), max_new_tokens=20, temperature=0
    )
    assert call(fresh, "GET", "/api/v1/config/soft_prompt").json() == {"value": "alpha.zip"}

    for bad in ("nope.zip", "../alpha.zip", "notes.txt", 5):
        ans = call(fresh, "PUT", "/api/v1/config/soft_prompt", {"value": bad})
        assert ans.status == 422, bad
        assert "value" in ans.json()["detail"], ans.text
    assert call(fresh, "PUT", "/api/v1/config/soft_prompt", {"value": "nope.zip"}).json() == {
        "detail": {"value": ["Must be a valid soft prompt name."]}
    }
    wrong = call(fresh, "PUT", "/api/v1/config/soft_prompt", {"value": "wrong.zip"})
    assert wrong.status == 422 and "wide" in wrong.json()["detail"]["value"][0]
    assert call(fresh, "GET", "/api/v1/config/soft_prompt").json() == {"value": "alpha.zip"}

    assert call(fresh, "PUT", "/api/v1/config/soft_prompt", {"value": ""}).status == 200
    assert kobold(fresh, body)["text"] == none


def test_stop_sequence_memory_and_context(fresh):
    body = {"prompt": PROMPT, "max_length": 30, "temperature": 0}
    full = kobold(fresh, body)["text"]
    stop = full[8:11]
    cut = kobold(fresh, {**body, "stop_sequence": [stop, "never appears"]})
    assert cut == {"text": full[: full.index(stop)], "finish_reason": "stop"}

    with_memory = kobold(fresh, {**body, "memory": "Chapter one. Mr. Darcy said:"})["text"]
    assert with_memory != full
    # a small context cuts the prompt from the left but still answers
    small = kobold(fresh, {**body, "max_context_length": 40, "max_length": 10})
    assert small["text"]
    ans = call(
        fresh, "POST", "/api/v1/generate", {**body, "max_context_length": 20, "max_length": 20}
    )
    assert ans.status == 422 and "max_length" in ans.json()["detail"]


def test_tokencount(fresh):
    ids = fresh.lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ans = call(fresh, "POST", "/api/extra/tokencount", {"prompt": PROMPT})
    assert ans.status == 200 and ans.json() == {"value": len(ids), "ids": ids}
    assert call(fresh, "POST", "/api/extra/tokencount", {"prompt": ""}).json() == {
        "value": 0,
        "ids": [],
    }
    missing = call(fresh, "POST", "/api/extra/tokencount", {})
    assert missing.status == 422
    assert missing.json() == {"detail": {"prompt": ["Missing data for required field."]}}


# ------------------------------------------------------------------------------ streaming


def test_stream_parses_with_lites_rule_and_matches(fresh):
    body = {"prompt": PROMPT, "max_length": 30, "temperature": 0, "soft_prompt": "alpha.zip"}
    ans = call(fresh, "POST", "/api/extra/generate/stream", body)
    assert ans.status == 200
    assert ans.headers["Content-Type"] == "text/event-stream"
    assert ans.headers["Cache-Control"] == "no-cache"
    assert ans.headers["Access-Control-Allow-Origin"] == "*"
    assert "\r" not in ans.text and "[DONE]" not in ans.text
    events = lite_events(ans.text)
    assert len(events) >= 2
    assert all(e["finish_reason"] == "null" for e in events[:-1])
    assert events[-1]["finish_reason"] in ("length", "stop")
    assert all(set(e) == {"token", "finish_reason"} for e in events)
    full = kobold(fresh, body)
    assert "".join(e["token"] for e in events) == full["text"]
    assert events[-1]["finish_reason"] == full["finish_reason"]


@pytest.fixture
def slow_tokens(monkeypatch):
    """Each token takes 20 ms, so a generation is still running when the test acts."""
    real = generate_mod.stream_ids

    def slow(*args, **kwargs):
        for t in real(*args, **kwargs):
            time.sleep(0.02)
            yield t

    monkeypatch.setattr(generate_mod, "stream_ids", slow)


def _open_stream(srv, body, path="/api/extra/generate/stream"):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _read_event(resp) -> dict:
    lines = [resp.readline().decode() for _ in range(3)]
    assert lines[0] == "event: message\n" and lines[2] == "\n", lines
    assert lines[1].startswith("data: ")
    return json.loads(lines[1][len("data: ") :])


def test_abort_mid_stream(fresh, slow_tokens):
    """Lite's and SillyTavern's stop button: /api/extra/abort from another connection ends
    the running stream early, with finish_reason "stop"."""
    body = {"prompt": PROMPT, "max_length": 200, "temperature": 0, "use_default_badwordsids": True}
    conn, resp = _open_stream(fresh, body)
    try:
        assert resp.status == 200
        first = [_read_event(resp) for _ in range(3)]
        assert all(e["finish_reason"] == "null" for e in first)
        partial = call(fresh, "GET", "/api/extra/generate/check").json()["results"][0]["text"]
        assert partial.startswith("".join(e["token"] for e in first))
        ans = call(fresh, "POST", "/api/extra/abort", raw=b"")
        assert ans.json() == {"success": "true", "done": "true"}
        events = lite_events(resp.read().decode())
    finally:
        conn.close()
    assert events[-1]["finish_reason"] == "stop"
    assert len(first) + len(events) < 100
    # nothing is running now: abort says so, and the next request runs normally
    assert call(fresh, "POST", "/api/extra/abort", {"genkey": "x"}).json()["success"] == "false"
    assert kobold(fresh, {"prompt": PROMPT, "max_length": 5, "temperature": 0})["text"]


def test_abort_by_genkey_and_non_streamed(fresh, slow_tokens):
    body = {
        "prompt": PROMPT,
        "max_length": 200,
        "temperature": 0,
        "use_default_badwordsids": True,
        "genkey": "KCPP1234",
    }
    out = {}
    worker = threading.Thread(target=lambda: out.update(kobold(fresh, body)))
    worker.start()
    try:
        _wait(lambda: fresh.busy())
        time.sleep(0.1)
        assert (
            call(fresh, "POST", "/api/extra/abort", {"genkey": "other"}).json()["success"]
            == "false"
        )
        assert (
            call(fresh, "POST", "/api/extra/abort", {"genkey": "KCPP1234"}).json()["success"]
            == "true"
        )
    finally:
        worker.join(30)
    assert out["finish_reason"] == "stop"
    assert 0 < len(fresh.lm.tokenizer(out["text"], add_special_tokens=False)["input_ids"]) < 150


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_client_hanging_up_stops_the_generation(fresh, slow_tokens):
    body = json.dumps(
        {"prompt": PROMPT, "max_length": 200, "temperature": 0, "use_default_badwordsids": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", fresh.port), timeout=30) as sock:
        sock.sendall(
            b"POST /api/extra/generate/stream HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"event: message" not in got:
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
    _wait(lambda: not fresh.busy(), timeout=10)  # far less than 200 x 20 ms


# ------------------------------------------------------------------------------ busy


class Gate:
    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()

    def set(self):
        self.opened.set()


@pytest.fixture
def gate(monkeypatch):
    """Generation yields two tokens, then waits until the test opens the gate."""
    real = generate_mod.stream_ids
    g = Gate()

    def gated(*args, **kwargs):
        for i, t in enumerate(real(*args, **kwargs)):
            if i == 2 and not g.opened.is_set():
                g.reached.set()
                assert g.opened.wait(30)
            yield t

    monkeypatch.setattr(generate_mod, "stream_ids", gated)
    yield g
    g.set()


def test_one_generation_at_a_time_then_503(fresh, gate):
    """queue_size=1: one runs, one waits its turn, the next is told 503 at once (KoboldAI's
    shape; OpenAI's on /v1); other routes still answer meanwhile."""
    body = {"prompt": PROMPT, "max_length": 10, "temperature": 0, "use_default_badwordsids": True}
    conn, resp = _open_stream(fresh, body)
    waiting: dict = {}
    try:
        assert resp.status == 200
        assert gate.reached.wait(30)  # A is generating, held at its third token
        worker = threading.Thread(target=lambda: waiting.update(kobold(fresh, body)))
        worker.start()
        _wait(lambda: fresh.pending == 2)  # B waits in the queue
        busy = call(fresh, "POST", "/api/v1/generate", body)
        assert busy.status == 503
        assert busy.json() == {
            "detail": {
                "msg": "Server is busy; please try again later.",
                "type": "service_unavailable",
            }
        }
        busy = call(fresh, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert busy.status == 503 and busy.json()["error"]["type"] == "service_unavailable"
        assert call(fresh, "GET", "/api/v1/model").status == 200
        assert call(fresh, "POST", "/api/extra/tokencount", {"prompt": "hi"}).status == 200
        assert waiting == {}
        gate.set()
        rest = lite_events(resp.read().decode())
        worker.join(30)
    finally:
        gate.set()
        conn.close()
    assert rest[-1]["finish_reason"] == "length"
    assert waiting["finish_reason"] == "length" and waiting["text"]
    _wait(lambda: fresh.pending == 0)
    assert kobold(fresh, body)["text"] == waiting["text"]


# ------------------------------------------------------------------------------ OpenAI


def test_openai_models_and_completions(fresh, sp_dir):
    models = call(fresh, "GET", "/v1/models").json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert ids == [fresh.lm.name, *SOFT_NAMES]
    assert all(
        m["object"] == "model" and "created" in m and "owned_by" in m for m in models["data"]
    )

    body = {"model": "alpha.zip", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    ans = call(fresh, "POST", "/v1/completions", body)
    assert ans.status == 200, ans.text
    out = ans.json()
    assert out["object"] == "text_completion" and out["model"] == "alpha.zip"
    assert out["id"] and isinstance(out["created"], int)
    [choice] = out["choices"]
    want = generate(fresh.lm, PROMPT, load(sp_dir, "alpha.zip"), max_new_tokens=12, temperature=0)
    assert choice["text"] == want and choice["index"] == 0
    usage = out["usage"]
    n_prompt = len(fresh.lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert usage["prompt_tokens"] == n_prompt
    assert usage["total_tokens"] == n_prompt + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12

    # a model name that is no soft prompt: the server's selection (none here)
    other = call(fresh, "POST", "/v1/completions", {**body, "model": "gpt-3.5-turbo-instruct"})
    none = generate(fresh.lm, PROMPT, None, max_new_tokens=12, temperature=0)
    assert other.json()["choices"][0]["text"] == none != want
    # stop as a single string
    stop = want[4:7]
    cut = call(fresh, "POST", "/v1/completions", {**body, "stop": stop}).json()["choices"][0]
    assert cut["text"] == want[: want.index(stop)] and cut["finish_reason"] == "stop"

    # streamed: data chunks, then [DONE]; the pieces add up to the same text
    streamed = call(fresh, "POST", "/v1/completions", {**body, "stream": True})
    assert streamed.headers["Content-Type"] == "text/event-stream"
    chunks = streamed.text.split("\n\n")
    assert chunks[-2:] == ["data: [DONE]", ""]
    parsed = [json.loads(c[len("data: ") :]) for c in chunks[:-2]]
    assert all(c.startswith("data: ") for c in chunks[:-2])
    assert "".join(p["choices"][0]["text"] for p in parsed) == want
    assert parsed[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert all(p["choices"][0]["finish_reason"] is None for p in parsed[:-1])


def test_openai_errors(fresh):
    for body, param in (
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": PROMPT, "soft_prompt": "../alpha.zip"}, "soft_prompt"),
    ):
        ans = call(fresh, "POST", "/v1/completions", body)
        assert ans.status == 400, (body, ans.text)
        err = ans.json()["error"]
        assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    bad = call(fresh, "POST", "/v1/completions", raw=b"{nope")
    assert bad.status == 400 and bad.json()["error"]["type"] == "bad_input"


# ------------------------------------------------------------------------------ security


def test_api_key_and_cors_preflight(tiny_llama, sp_dir):
    with Server(tiny_llama, sp_dir, port=0, api_key="sekrit") as srv:
        # the browser's preflight carries no key and must pass
        pre = call(
            srv,
            "OPTIONS",
            "/api/v1/generate",
            headers={
                "Origin": "https://lite.koboldai.net",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status == 200
        assert pre.headers["Access-Control-Allow-Origin"] == "*"
        assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            ans = call(srv, "GET", "/api/v1/config/soft_prompts_list", headers=headers)
            assert ans.status == 401
            assert ans.json()["detail"]["type"] == "unauthorized"
            assert ans.headers["WWW-Authenticate"] == "Bearer"
            assert ans.headers["Access-Control-Allow-Origin"] == "*"
        assert call(srv, "GET", "/v1/models").json()["error"]["type"] == "unauthorized"
        assert call(srv, "POST", "/api/v1/generate", {"prompt": "x"}).status == 401
        assert call(srv, "GET", "/nothing/here").status == 401  # no route probing either
        key = {"Authorization": "Bearer sekrit"}
        assert call(srv, "GET", "/api/v1/config/soft_prompts_list", headers=key).status == 200
        assert call(srv, "GET", "/api/extra/version", headers=key).json()["protected"] is True
        out = kobold(srv, {"prompt": PROMPT, "max_length": 4, "temperature": 0}, headers=key)
        assert out["text"]


def test_softprompt_path_without_folder(tiny_llama, sp_dir):
    """Without a folder, --softprompt may be a path: its folder becomes the folder."""
    srv = Server(tiny_llama, None, str(sp_dir / "beta.safetensors"), port=0)
    assert srv.selected == "beta.safetensors"
    assert srv.list_soft_prompts() == SOFT_NAMES
    assert Server(tiny_llama).list_soft_prompts() == []


def test_binds_loopback_by_default(tiny_llama):
    srv = Server(tiny_llama, port=0)
    try:
        srv.bind()
        assert srv.httpd.server_address[0] == "127.0.0.1"
        assert srv.url == f"http://127.0.0.1:{srv.port}"
    finally:
        srv.close()


def test_bad_json_body_limits_and_routes(fresh):
    bad = call(fresh, "POST", "/api/v1/generate", raw=b'{"prompt": "x",')
    assert bad.status == 400
    assert bad.json()["detail"]["type"] == "bad_input" and bad.json()["detail"]["msg"]
    nan = call(fresh, "POST", "/api/v1/generate", raw=b'{"prompt": "x", "temperature": NaN}')
    assert nan.status == 400
    assert call(fresh, "POST", "/api/v1/generate", raw=b"\xff\xfe").status == 400
    assert call(fresh, "POST", "/api/v1/generate", raw=b"").status == 400
    not_object = call(fresh, "POST", "/api/v1/generate", ["prompt"])
    assert not_object.status == 422
    assert not_object.json() == {"detail": {"_schema": ["Invalid input type."]}}

    # a body over the limit is refused from its Content-Length, without reading it
    conn = http.client.HTTPConnection("127.0.0.1", fresh.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/v1/generate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert json.loads(resp.read())["detail"]["type"] == "bad_input"
    finally:
        conn.close()
    small = Server(fresh.lm, port=0, max_body_bytes=1000)
    with small:
        big = call(small, "POST", "/api/v1/generate", {"prompt": "x" * 2000})
        assert big.status == 413
        assert (
            call(small, "POST", "/api/v1/generate", {"prompt": "x", "max_length": 2}).status == 200
        )

    assert call(fresh, "GET", "/api/v1/nothing").status == 404
    assert call(fresh, "GET", "/api/v1/nothing").json()["detail"]["type"] == "not_found"
    wrong_method = call(fresh, "GET", "/api/v1/generate")
    assert wrong_method.status == 405 and "POST" in wrong_method.headers["Allow"]


def test_out_of_range_values_get_422_naming_each_field(fresh):
    ans = call(
        fresh,
        "POST",
        "/api/v1/generate",
        {
            "prompt": PROMPT,
            "max_length": 0,
            "max_context_length": 0,
            "temperature": -0.5,
            "top_p": 1.5,
            "top_k": -1,
            "typical": 2,
            "tfs": 3,
            "top_a": -1,
            "rep_pen": 0.5,
            "rep_pen_range": -4,
            "n": 6,
            "sampler_order": [0, 1, 9],
            "sampler_seed": "abc",
            "stop_sequence": "not a list",
            "use_default_badwordsids": "yes",
        },
    )
    assert ans.status == 422
    detail = ans.json()["detail"]
    assert set(detail) == {
        "max_length",
        "max_context_length",
        "temperature",
        "top_p",
        "top_k",
        "typical",
        "tfs",
        "top_a",
        "rep_pen",
        "rep_pen_range",
        "n",
        "sampler_order",
        "sampler_seed",
        "stop_sequence",
        "use_default_badwordsids",
    }
    assert all(
        isinstance(v, list) and v and all(isinstance(m, str) for m in v) for v in detail.values()
    )
    huge = call(fresh, "POST", "/api/v1/generate", {"prompt": "x", "temperature": 10**400})
    assert huge.status == 422, huge.json()  # too large for a float: not a number, not a 500
    assert huge.json()["detail"] == {"temperature": ["Not a valid number."]}
    too_long = call(fresh, "POST", "/api/v1/generate", {"prompt": "x", "max_length": 10**6})
    assert too_long.status == 422
    assert too_long.json() == {
        "detail": {
            "max_length": [
                "1000000 new tokens plus 0 soft prompt tokens leave no room for the prompt in a "
                "context of 256 tokens: ask for at most 255."
            ]
        }
    }
    missing = call(fresh, "POST", "/api/v1/generate", {"max_length": 4})
    assert missing.json() == {"detail": {"prompt": ["Missing data for required field."]}}
    assert call(fresh, "POST", "/api/v1/generate", {"prompt": 5}).status == 422


@pytest.mark.parametrize(
    "name",
    [
        "nope.zip",
        "../alpha.zip",
        f"{'..'}/{'..'}/etc/passwd",
        "/etc/passwd",
        "sub/alpha.zip",
        "..",
        ".hidden.zip",
        "notes.txt",
        "alpha.zip\0",
    ],
)
def test_unknown_and_path_soft_prompt_names(fresh, name):
    ans = call(
        fresh, "POST", "/api/v1/generate", {"prompt": "x", "max_length": 2, "soft_prompt": name}
    )
    assert ans.status == 422
    assert ans.json() == {"detail": {"soft_prompt": ["Must be a valid soft prompt name."]}}


def test_wrong_width_soft_prompt(fresh):
    ans = call(
        fresh,
        "POST",
        "/api/v1/generate",
        {"prompt": "x", "max_length": 2, "soft_prompt": "wrong.zip"},
    )
    assert ans.status == 422
    [msg] = ans.json()["detail"]["soft_prompt"]
    assert "width 16" in msg and "32" in msg


# ------------------------------------------------------------------------------ the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_starts_answers_and_stops_on_ctrl_c(tiny_models, sp_dir, tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "softprompt",
            "serve",
            "--model",
            str(tiny_models["llama"]),
            "--softprompts",
            str(sp_dir),
            "--softprompt",
            "alpha.zip",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/v1/config/soft_prompt")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"value": "alpha.zip"}
        conn.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert "Traceback" not in proc.stderr.read()


def test_cli_serve_errors(tiny_models, sp_dir, tmp_path, capsys):
    model = str(tiny_models["llama"])
    base = ("serve", "--model", model, "--device", "cpu", "--dtype", "float32")
    code, _, err = run_cli(capsys, *base, "--softprompts", tmp_path / "missing")
    assert_one_line_error(code, err, "--softprompts", "no such folder")
    code, _, err = run_cli(
        capsys, *base, "--softprompts", sp_dir, "--softprompt", "nope.zip", "--port", 0
    )
    assert_one_line_error(code, err, "nope.zip", "alpha.zip")
    code, _, err = run_cli(capsys, *base, "--softprompts", sp_dir, "--softprompt", "../x.zip")
    assert_one_line_error(code, err, "../x.zip", "not a path")
    code, _, err = run_cli(
        capsys, *base, "--softprompts", sp_dir, "--softprompt", "wrong.zip", "--port", 0
    )
    assert_one_line_error(code, err, "wrong.zip", "width")
    code, _, err = run_cli(capsys, *base, "--port", 70000)
    assert_one_line_error(code, err, "--port")
    code, _, err = run_cli(capsys, *base, "--queue", -1)
    assert_one_line_error(code, err, "--queue")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, *base, "--port", port)
        assert_one_line_error(code, err, str(port), "in use")
