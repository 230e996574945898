"""`softprompt serve` as the real clients use it: request bodies copied from KoboldAI Lite
(v339) and SillyTavern (1.12.6, its code's defaults) replayed against a real server, what an
API key protects, the samplers they send really applied, the README's route table, and the
hostile inputs of issue 14 (a genkey's text, lone surrogates, tiny temperatures, non-ASCII
keys, clients that hang up)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import shutil
import socket
import threading
import time

import pytest
from conftest import ROOT
from test_serve import PROMPT, call, kobold, lite_events

from softprompt import load_model
from softprompt.errors import ConfigError
from softprompt.generate import generate
from softprompt.sampling import KOBOLDCPP_ORDER, SamplingOptions
from softprompt.serve import Server, normalize_path, parse_kobold

generate_mod = importlib.import_module("softprompt.generate")
KEY = {"Authorization": "Bearer sekrit"}
STORY = "\n### Instruction:\nWrite the next scene.\n### Response:\n"

# KoboldAI Lite v339, KoboldCpp mode, its defaults (captured: /work/shared/reference/clients.md)
LITE_BODY = {
    "n": 1,
    "max_context_length": 6144,
    "max_length": 768,
    "rep_pen": 1.05,
    "temperature": 0.75,
    "top_p": 0.92,
    "top_k": 100,
    "top_a": 0,
    "typical": 1,
    "tfs": 1,
    "rep_pen_range": 360,
    "rep_pen_slope": 0.7,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "memory": "",
    "trim_stop": True,
    "genkey": "KCPP1234",
    "min_p": 0,
    "dynatemp_range": 0,
    "dynatemp_exponent": 1,
    "smoothing_factor": 0,
    "nsigma": 0,
    "banned_tokens": [],
    "render_special": False,
    "logprobs": False,
    "presence_penalty": 0,
    "logit_bias": {},
    "stop_sequence": ["### Instruction:", "### Response:"],
    "use_default_badwordsids": False,
    "bypass_eos": False,
    "prompt": STORY,
}
LITE_OPTIONS = SamplingOptions(
    max_new_tokens=768,
    temperature=0.75,
    top_p=0.92,
    top_k=100,
    repetition_penalty=1.05,
    repetition_penalty_range=360,
    repetition_penalty_slope=0.7,
    sampler_order=KOBOLDCPP_ORDER,
)

# SillyTavern, Text Completion > KoboldCpp: getTextGenGenerationData (textgen-settings.js)
# with the first-run settings (default/content/settings.json), as text-completions.js
# forwards it to /v1/completions
ST_TEXT_BODY = {
    "prompt": STORY,
    "max_new_tokens": 350,
    "max_tokens": 350,
    "temperature": 0.5,
    "top_p": 0.9,
    "typical_p": 1,
    "typical": 1,
    "sampler_seed": -1,
    "min_p": 0,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "top_k": 0,
    "skew": 0,
    "min_tokens": 0,
    "add_bos_token": True,
    "smoothing_factor": 0,
    "smoothing_curve": 1,
    "dry_allowed_length": 2,
    "dry_multiplier": 0,
    "dry_base": 1.75,
    "dry_sequence_breakers": ["\n", ":", '"', "*"],
    "dry_penalty_last_n": 0,
    "max_tokens_second": 0,
    "stopping_strings": ["\nUser:"],
    "stop": ["\nUser:"],
    "truncation_length": 8192,
    "ban_eos_token": False,
    "skip_special_tokens": True,
    "top_a": 0,
    "tfs": 1,
    "mirostat_mode": 0,
    "mirostat_tau": 5,
    "mirostat_eta": 0.1,
    "custom_token_bans": "",
    "banned_strings": [],
    "api_type": "koboldcpp",
    "api_server": "http://127.0.0.1:5001",
    "legacy_api": False,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "xtc_threshold": 0.1,
    "xtc_probability": 0,
    "rep_pen": 1.1,
    "rep_pen_range": 0,
    "repetition_penalty_range": 0,
    "seed": -1,
    "guidance_scale": 1,
    "negative_prompt": "",
    "grammar_string": "",
    "repeat_penalty": 1.1,
    "tfs_z": 1,
    "repeat_last_n": 0,
    "n_predict": 350,
    "num_predict": 350,
    "num_ctx": 8192,
    "mirostat": 0,
    "ignore_eos": False,
    "rep_pen_slope": 1,
    "grammar": "",
    "stream": False,
}
ST_TEXT_OPTIONS = SamplingOptions(
    max_new_tokens=350,
    temperature=0.5,
    top_p=0.9,
    repetition_penalty=1.1,
    sampler_order=KOBOLDCPP_ORDER,
)

# SillyTavern, KoboldAI Classic: kobold.js's request from getKoboldGenerationData
# (kai-settings.js) with the first-run kai_settings (seed -1: no sampler_seed)
ST_CLASSIC_BODY = {
    "prompt": STORY,
    "use_story": False,
    "use_memory": False,
    "use_authors_note": False,
    "use_world_info": False,
    "max_context_length": 8192,
    "max_length": 350,
    "rep_pen": 1.1,
    "rep_pen_range": 600,
    "rep_pen_slope": 0,
    "temperature": 1,
    "tfs": 1,
    "top_a": 0,
    "top_k": 0,
    "top_p": 0.95,
    "min_p": 0,
    "typical": 1,
    "sampler_order": [6, 0, 1, 2, 3, 4, 5],
    "singleline": False,
    "use_default_badwordsids": False,
    "mirostat": 0,
    "mirostat_eta": 0.1,
    "mirostat_tau": 5,
    "grammar": "",
    "stop_sequence": ["\nUser:"],
}


@pytest.fixture(scope="module")
def long_lm(tiny_models, tmp_path_factory):
    """The tiny Llama with an 8192-token context (rotary positions: same weights), so the
    requests real clients send fit as they do on a real model."""
    folder = tmp_path_factory.mktemp("long_llama")
    for f in tiny_models["llama"].iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    return load_model(str(folder), device="cpu", dtype="float32")


@pytest.fixture
def keyed(long_lm):
    with Server(long_lm, port=0, api_key="sekrit") as srv:
        yield srv


@pytest.fixture
def slow_tokens(monkeypatch):
    """Each token takes 50 ms, so a generation of 200 takes 10 s unless something stops it."""
    real = generate_mod.stream_ids

    def slow(*args, **kwargs):
        for t in real(*args, **kwargs):
            time.sleep(0.05)
            yield t

    monkeypatch.setattr(generate_mod, "stream_ids", slow)


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _send_raw(srv, path, body, headers=None) -> socket.socket:
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


# ------------------------------------------------------------------------ real sessions


def test_lite_session_with_a_key(keyed, long_lm):
    """Lite connects (the key on every call but /sdapi/v1/sd-models), streams its default
    request of 768 new tokens, and the samplers it sends are the ones applied."""
    lm = keyed.lm
    want = {
        "/api/v1/model": {"result": lm.name},
        "/api/v1/info/version": {"result": "1.2.6"},
        "/api/v1/config/max_context_length": {"value": 8192},
        "/api/extra/true_max_context_length": {"value": 8192},
        "/api/extra/preloadstory": {},
    }
    for path, body in want.items():
        ans = call(keyed, "GET", path, headers=KEY)
        assert (ans.status, ans.json()) == (200, body), path
    version = call(keyed, "GET", "/api/extra/version", headers=KEY).json()
    assert version["result"] == "KoboldCpp" and version["protected"] is True
    sd = call(keyed, "GET", "/sdapi/v1/sd-models")  # Lite sends no key here
    assert (sd.status, sd.json()) == (200, [])

    ans = call(keyed, "POST", "/api/extra/generate/stream", LITE_BODY, headers=KEY)
    assert ans.status == 200, ans.text
    events = lite_events(ans.text)
    assert events[-1]["finish_reason"] in ("length", "stop")

    seeded = {**LITE_BODY, "sampler_seed": 5}
    got = kobold(keyed, seeded, headers=KEY)
    options = dataclasses.replace(LITE_OPTIONS, seed=5)
    assert got["text"] == generate(lm, STORY, None, options, stop=LITE_BODY["stop_sequence"])


def test_sillytavern_text_completion_with_a_key(keyed):
    lm = keyed.lm
    models = call(keyed, "GET", "/v1/models", headers=KEY)
    assert models.status == 200 and models.json()["data"][0]["id"] == lm.name
    count = call(keyed, "POST", "/api/extra/tokencount", {"prompt": STORY}, headers=KEY).json()
    assert count["value"] == len(count["ids"]) > 0
    ans = call(keyed, "POST", "/v1/completions", ST_TEXT_BODY, headers=KEY)
    assert ans.status == 200, ans.text
    assert ans.json()["choices"][0]["finish_reason"] in ("length", "stop")

    seeded = {**ST_TEXT_BODY, "seed": 9}
    got = call(keyed, "POST", "/v1/completions", seeded, headers=KEY).json()["choices"][0]
    options = dataclasses.replace(ST_TEXT_OPTIONS, seed=9)
    assert got["text"] == generate(lm, STORY, None, options, stop=["\nUser:"])


def test_sillytavern_kobold_classic(long_lm):
    """KoboldAI Classic sends no key at all: it works on a server without one; with one it
    connects (what KoboldCpp leaves open) but cannot generate."""
    with Server(long_lm, port=0) as srv:
        for path in ("/api/v1/info/version", "/api/extra/version", "/api/v1/model"):
            assert call(srv, "GET", path).status == 200
        got = kobold(srv, ST_CLASSIC_BODY)
        assert got["finish_reason"] in ("length", "stop")
        # its six-sampler lists of older presets get repetition penalty first, as in United
        order = parse_kobold({"prompt": "x", "sampler_order": [0, 1, 2, 3, 4, 5]})
        assert order.options.sampler_order == (6, 0, 1, 2, 3, 4, 5)
    with Server(long_lm, port=0, api_key="sekrit") as srv:
        assert call(srv, "GET", "/api/v1/info/version").json() == {"result": "1.2.6"}
        assert call(srv, "GET", "/api/v1/model").json() == {"result": "softprompt/protected-model"}
        assert call(srv, "POST", "/api/v1/generate", ST_CLASSIC_BODY).status == 401
        assert call(srv, "POST", "/api/extra/tokencount", {"prompt": "x"}).status == 401


def test_what_the_key_protects(keyed):
    for method, path, body in (
        ("GET", "/api/v1/config/soft_prompts_list", None),
        ("GET", "/api/v1/config/soft_prompt", None),
        ("PUT", "/api/v1/config/soft_prompt", {"value": ""}),
        ("POST", "/api/extra/generate/stream", {"prompt": "x"}),
        ("POST", "/api/extra/generate/check", {"genkey": "KCPP1234"}),
        ("GET", "/api/extra/generate/check", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("POST", "/api/extra/abort", None),
        ("POST", "/api/extra/abort", {"genkey": "KCPP1234"}),  # nothing runs with it
    ):
        ans = call(keyed, method, path, body)
        assert ans.status == 401, (method, path)
    for path in ("/api/v1/config/max_length", "/api/extra/true_max_context_length"):
        assert call(keyed, "GET", path).status == 200


def test_abort_without_the_key_needs_the_running_genkey(keyed, slow_tokens):
    body = {"prompt": STORY, "max_length": 200, "use_default_badwordsids": True}
    out = {}
    worker = threading.Thread(
        target=lambda: out.update(kobold(keyed, {**body, "genkey": "KCPP4321"}, headers=KEY))
    )
    worker.start()
    try:
        _wait(keyed.busy)
        for abort in (None, {"genkey": "KCPP0000"}):
            assert call(keyed, "POST", "/api/extra/abort", abort).status == 401
        ans = call(keyed, "POST", "/api/extra/abort", {"genkey": "KCPP4321"})
        assert ans.json() == {"success": "true", "done": "true"}
    finally:
        worker.join(30)
    assert out["finish_reason"] == "stop"


def test_sillytavern_stop_button_with_a_key(keyed, slow_tokens):
    """SillyTavern's stop sends /api/extra/abort with no key and no body (401), then drops
    its request: the server notices the hang-up and frees the slot."""
    body = {**ST_TEXT_BODY, "max_tokens": 200, "ban_eos_token": True, "stop": []}
    sock = _send_raw(keyed, "/v1/completions", body, KEY)
    try:
        _wait(keyed.busy)
        assert call(keyed, "POST", "/api/extra/abort", raw=b"").status == 401
    finally:
        sock.close()
    start = time.monotonic()
    _wait(lambda: not keyed.busy(), timeout=5)
    assert time.monotonic() - start < 3  # 200 tokens take 10 s
    ans = call(keyed, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers=KEY)
    assert ans.status == 200


def test_readme_lists_only_routes_that_answer(server):
    """Every route in the README's table of what the clients use is served."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serving to KoboldAI clients", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15
    for row in rows:
        cell = row.split("|")[1]
        for method, path in re.findall(r"`(GET|POST|PUT) (/[^` ]*)`", cell):
            assert (method, normalize_path(path)) in server.routes, (method, path)


@pytest.fixture(scope="module")
def server(long_lm):
    srv = Server(long_lm, port=0, queue_size=1)
    srv.start()
    yield srv
    srv.close()


# ------------------------------------------------------------------------ samplers applied


@pytest.mark.parametrize(
    "cut", [{"min_p": 1.0}, {"top_a": 1e6}, {"tfs": 0}, {"top_k": 1}, {"top_p": 1e-6}]
)
def test_samplers_that_keep_one_token_give_the_greedy_text(server, cut):
    """With a hot temperature last (KoboldCpp's order, as clients send it), a sampler that
    keeps only the likeliest token must give the greedy text: proof it is applied."""
    body = {
        "prompt": PROMPT,
        "max_length": 24,
        "rep_pen": 1.0,
        "use_default_badwordsids": True,
        "sampler_order": list(KOBOLDCPP_ORDER),
    }
    greedy = kobold(server, {**body, "temperature": 0})["text"]
    hot = kobold(server, {**body, "temperature": 5.0, "sampler_seed": 1, **cut})["text"]
    assert hot == greedy


def test_bad_sampler_values_name_their_field(server):
    ans = call(
        server,
        "POST",
        "/api/v1/generate",
        {"prompt": "x", "min_p": 2, "sampler_order": [0, 0, 1, 2, 3, 4, 5], "tfs": -1},
    )
    assert ans.status == 422
    assert set(ans.json()["detail"]) == {"min_p", "sampler_order", "tfs"}
    ans = call(server, "POST", "/v1/completions", {"prompt": "x", "repetition_penalty": 0.5})
    assert ans.status == 400 and ans.json()["error"]["param"] == "repetition_penalty"


def test_max_length_limit(long_lm):
    with Server(long_lm, port=0, max_length_limit=100) as srv:
        ans = call(srv, "POST", "/api/v1/generate", {"prompt": "x", "max_length": 101})
        assert ans.json() == {
            "detail": {
                "max_length": ["Must be greater than or equal to 1 and less than or equal to 100."]
            }
        }
        ans = call(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 101})
        assert ans.status == 400 and ans.json()["error"]["param"] == "max_tokens"
        assert kobold(srv, {"prompt": "x", "max_length": 100, "temperature": 0})["text"]
    with pytest.raises(ConfigError, match="max-length-limit"):
        Server(long_lm, port=0, max_length_limit=0)


# ------------------------------------------------------------------------ issue 14, 6-10


def test_check_answers_only_its_own_genkey(server, slow_tokens):
    body = {"prompt": PROMPT, "max_length": 200, "temperature": 0, "use_default_badwordsids": True}
    out = {}
    worker = threading.Thread(target=lambda: out.update(kobold(server, {**body, "genkey": "A1"})))
    worker.start()
    check = "/api/extra/generate/check"
    try:
        _wait(lambda: server.text_so_far("A1"))
        for probe in ({"genkey": "B2"}, {}, None):
            got = call(server, "POST", check, probe).json()
            assert got == {"results": [{"text": ""}]}, probe
        assert call(server, "GET", check).json() == {"results": [{"text": ""}]}
        mine = call(server, "POST", check, {"genkey": "A1"}).json()["results"][0]["text"]
        assert mine
        call(server, "POST", "/api/extra/abort", {"genkey": "A1"})
    finally:
        worker.join(30)
    # after the end, the same client may still recover its text (Lite does), no one else
    assert call(server, "POST", check, {"genkey": "A1"}).json()["results"][0]["text"] == out["text"]
    assert call(server, "GET", check).json()["results"][0]["text"] == ""


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/api/v1/generate", {"prompt": "ok \ud800"}, "prompt"),
        ("/api/v1/generate", {"prompt": "ok", "memory": "\udfff"}, "memory"),
        ("/api/extra/generate/stream", {"prompt": "\ud83d"}, "prompt"),
        ("/api/v1/generate", {"prompt": "ok", "stop_sequence": ["\ud800"]}, "stop_sequence"),
        ("/api/extra/tokencount", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["\ud800"]}, "prompt"),
    ],
)
def test_lone_surrogates_are_named_not_500(server, path, body, field):
    ans = call(server, "POST", path, raw=json.dumps(body).encode())  # JSON escapes them
    if path.startswith("/v1/"):
        assert ans.status == 400 and ans.json()["error"]["param"] == field, ans.text
    else:
        assert ans.status == 422, ans.text
        assert list(ans.json()["detail"]) == [field]
        assert "surrogate" in ans.json()["detail"][field][0]


@pytest.mark.parametrize("t", [1e-300, 5e-324])
def test_tiny_temperature_is_greedy_in_serve(server, t):
    body = {"prompt": PROMPT, "max_length": 12}
    greedy = kobold(server, {**body, "temperature": 0})["text"]
    assert kobold(server, {**body, "temperature": t})["text"] == greedy
    ans = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "temperature": t})
    assert ans.status == 200, ans.text


@pytest.mark.parametrize("key", ["clé", "kéy", "two words", "tab\tkey", "\u2603"])
def test_api_key_must_be_sendable(long_lm, key):
    with pytest.raises(ConfigError, match="--api-key"):
        Server(long_lm, port=0, api_key=key)


@pytest.mark.parametrize(
    "path, body",
    [
        (
            "/api/v1/generate",
            {"prompt": PROMPT, "max_length": 200, "use_default_badwordsids": True},
        ),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 200, "ban_eos_token": True}),
    ],
)
def test_hanging_up_on_a_non_streamed_request_frees_the_slot(server, slow_tokens, path, body):
    sock = _send_raw(server, path, body)
    _wait(server.busy)
    time.sleep(0.2)
    sock.close()
    start = time.monotonic()
    _wait(lambda: not server.busy(), timeout=5)
    assert time.monotonic() - start < 3  # 200 tokens take 10 s
    assert kobold(server, {"prompt": "x", "max_length": 2})["text"] is not None


def test_cli_serve_refuses_a_key_no_client_can_send(tiny_models, capsys):
    from conftest import assert_one_line_error, run_cli

    base = ("serve", "--model", tiny_models["llama"], "--port", 0)
    code, _, err = run_cli(capsys, *base, "--api-key", "clé")
    assert_one_line_error(code, err, "--api-key", "ASCII")
    code, _, err = run_cli(capsys, *base, "--max-length-limit", 0)
    assert_one_line_error(code, err, "--max-length-limit")
