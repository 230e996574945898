"""`softprompt ui`: the JSON routes over plain HTTP, and the page itself in a real headless
Chromium (Debian's `chromium`, driven by Playwright): upload a corpus, train a tiny model, watch
the chart, generate side by side, download the zip; stop, reload, resume; a failing run.

Set SOFTPROMPT_UI_SHOTS=DIR to keep screenshots of the page in DIR.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from softprompt import ui
from softprompt.config import FIELDS
from softprompt.errors import ConfigError

SHOTS = os.environ.get("SOFTPROMPT_UI_SHOTS")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def server(tmp_path):
    """The ui server on a free port with a fresh workspace; its training processes are
    ended afterwards (they are detached, so nothing else would)."""
    srv = ui.make_server(tmp_path / "workspace", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    _end_children(srv.workspace)


def _end_children(ws: ui.Workspace) -> None:
    for proc in list(ws._children.values()):
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


def call(srv, method, path, body=None, raw=None, headers=None):
    """(status, JSON answer) of one request to the server."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=data, method=method)
    req.add_header("X-Softprompt", "1")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(fn, timeout=60.0, every=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {fn}")
        time.sleep(every)


TINY = {
    "block_size": "32",
    "batch_size": "2",
    "device": "cpu",
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium: Debian's package, never a downloaded one. Missing is a failure with
    the fix, not a skip: `make test` installs it (apt-get install chromium)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the UI tests need Playwright: pip install -e '.[dev]' (or `make test`)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "the UI tests need Debian's chromium: apt-get install chromium (`make test` does it "
            "as root)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(
        viewport={"width": 1400, "height": 1000}, accept_downloads=True, bypass_csp=True
    )  # the page's CSP forbids the eval that wait_for_function uses
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url)
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    context.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def fill_form(page, dataset: str | None, model: str, **options: str) -> None:
    """Type the options into the page's form (opening "More options" for the rest)."""
    if dataset is not None:
        page.fill("#opt-dataset", dataset)
    page.fill("#opt-model", model)
    page.click("details.more > summary")
    for name, value in {**TINY, **options}.items():
        sel = f"#opt-{name}"
        if page.eval_on_selector(sel, "e => e.tagName") == "SELECT":
            page.select_option(sel, value)
        elif value is True:
            page.check(sel)
        else:
            page.fill(sel, str(value))


def detail_status(page) -> str:
    return page.get_attribute("#detail", "data-status") or ""


# ----------------------------------------------------------------------------- JSON routes


def test_options_route_lists_every_train_option_with_default_and_help(server):
    status, data = call(server, "GET", "/api/options")
    assert status == 200
    names = {o["name"] for o in data["options"]}
    assert names == set(FIELDS) - ui.HIDDEN
    lr = next(o for o in data["options"] if o["name"] == "lr")
    assert lr["default"] == FIELDS["lr"].default and lr["help"] and lr["flag"] == "--lr"
    opt = next(o for o in data["options"] if o["name"] == "optimizer")
    assert opt["choices"] == ["adamw", "adafactor"]
    report = next(o for o in data["options"] if o["name"] == "report")
    assert report["flag"] == "--no-report" and report["invert"]


def test_posts_need_the_header_and_the_local_host(server):
    req = urllib.request.Request(server.url + "api/runs", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403
    status, data = call(server, "GET", "/api/runs", headers={"Host": "evil.example:80"})
    assert status == 403


def test_bad_options_are_refused_with_one_line_before_anything_starts(server):
    status, data = call(server, "POST", "/api/runs", {"options": {"dataset": "x", "lr": "-1"}})
    assert status == 400 and "--lr must be more than 0" in data["error"]
    status, data = call(server, "POST", "/api/runs", {"options": {"dataset": "x", "tokens": "a"}})
    assert status == 400 and "--tokens must be a int" in data["error"]
    status, data = call(server, "POST", "/api/runs", {"options": {"output": "/etc"}})
    assert status == 400 and "unknown option" in data["error"]
    status, data = call(server, "POST", "/api/runs", {"options": {}})
    assert status == 400 and "--dataset is required" in data["error"]
    assert call(server, "GET", "/api/runs")[1]["runs"] == []
    assert call(server, "GET", "/api/runs/nope")[0] == 404
    assert call(server, "GET", "/api/runs/..%2F..%2Fetc")[0] == 404


def test_batch_size_takes_a_number_or_auto_as_on_the_command_line():
    assert ui.parse_options({"dataset": "d", "batch_size": "auto"})["batch_size"] == "auto"
    assert ui.parse_options({"dataset": "d", "batch_size": "8"})["batch_size"] == 8
    with pytest.raises(ConfigError, match="--batch-size must be a number or auto"):
        ui.parse_options({"dataset": "d", "batch_size": "many"})
    opt = next(o for o in ui.option_list() if o["name"] == "batch_size")
    assert opt["kind"] == "int or auto"  # a text box on the page, not a number box


@pytest.mark.parametrize("name", ["compile", "checkpointing"])
def test_options_the_run_decides_are_auto_on_or_off(name):
    """--compile and --checkpointing left unset are decided by the run: the page offers
    auto (nothing sent), on or off, as the command line has no flag, --X or --no-X."""
    opt = next(o for o in ui.option_list() if o["name"] == name)
    assert opt["kind"] == "bool or auto" and opt["choices"] == ["on", "off"]
    assert opt["default"] is None
    assert ui.parse_options({"dataset": "d", name: "on"})[name] is True
    assert ui.parse_options({"dataset": "d", name: "off"})[name] is False
    assert name not in ui.parse_options({"dataset": "d", name: ""})
    with pytest.raises(ConfigError, match=f"--{name} must be on or off"):
        ui.parse_options({"dataset": "d", name: "maybe"})


def test_upload_sanitises_names_and_checks_text(server, monkeypatch):
    status, data = call(
        server, "POST", "/api/upload?dataset=../my+texts&filename=../../evil.txt", raw=b"hello"
    )
    assert status == 200, data
    folder = Path(data["path"])
    assert folder.parent == server.workspace.datasets and data["file"] == "evil.txt"
    assert (folder / "evil.txt").read_text() == "hello"
    status, data = call(server, "POST", "/api/upload?dataset=a&filename=x.exe", raw=b"hi")
    assert status == 400 and "only .txt" in data["error"]
    status, data = call(server, "POST", "/api/upload?dataset=a&filename=b.txt", raw=b"\xff\xfe\x00")
    assert status == 400 and "not UTF-8" in data["error"]
    monkeypatch.setattr(ui, "MAX_UPLOAD", 10)
    status, data = call(server, "POST", "/api/upload?dataset=a&filename=c.txt", raw=b"x" * 100)
    assert status == 400 and "limit" in data["error"]
    datasets = call(server, "GET", "/api/datasets")[1]["datasets"]
    assert [d["files"] for d in datasets] == [["evil.txt"]]


def test_progress_and_eta_from_metrics():
    records = [{"step": 0, "val_loss": 5.0}] + [
        {"step": s, "loss": 6.0 - s / 10, "tokens_per_s": 100.0, "elapsed_s": s * 2.0}
        for s in range(1, 6)
    ]
    lines = ["soft prompt: 20 tokens, init vocab; 20 steps of 2 x 1 blocks (...)"]
    info = ui.progress(records, lines, running=True)
    assert info["step"] == 5 and info["total_steps"] == 20 and info["val_loss"] == 5.0
    assert info["eta_s"] == pytest.approx(15 * 2.0)
    # after a resume elapsed_s starts over: the rate comes from this invocation's steps
    records += [
        {"step": 6, "loss": 5.0, "elapsed_s": 1.0},
        {"step": 7, "loss": 5.0, "elapsed_s": 2.0},
    ]
    assert ui.progress(records, lines, running=True)["eta_s"] == pytest.approx(13 * 1.0)
    assert ui.progress(records, lines, running=False)["eta_s"] is None


def test_the_command_line_refuses_a_taken_port(server, capsys):
    from conftest import assert_one_line_error, run_cli

    port = server.server_address[1]
    logger = logging.getLogger("softprompt")
    handlers = logger.handlers[:]
    try:
        code, out, err = run_cli(capsys, "ui", "--port", port, "--no-browser", "--workdir", "w")
    finally:
        logger.handlers[:] = handlers  # main() set one up on capsys's stream
    assert_one_line_error(code, err, f"127.0.0.1:{port}", "--port 0")


# ----------------------------------------------------------------------------- the page


def test_train_watch_generate_download(page, server, tiny_models, corpus, tmp_path):
    # upload the corpus through the page: it lands in the workspace and fills in --dataset
    page.fill("#upload-name", "austen")
    page.set_input_files("#upload-files", sorted(str(p) for p in corpus.glob("*.txt")))
    page.wait_for_function("document.querySelector('#opt-dataset').value.endsWith('austen')")
    assert Path(page.input_value("#opt-dataset")) == server.workspace.datasets / "austen"
    assert "3 file(s)" in page.inner_text("#upload-status")
    fill_form(page, None, str(tiny_models["llama"]), max_steps="6", eval_every="2", report=True)
    shot(page, "1-form")
    page.click("#start")
    page.wait_for_selector("#runs li[data-status]")
    page.wait_for_function(
        "document.querySelector('#detail').dataset.status === 'finished'", timeout=60_000
    )
    page.wait_for_function("+document.querySelector('#chart').dataset.trainPoints === 6")
    assert int(page.get_attribute("#chart", "data-val-points")) == 4  # steps 0, 2, 4, 6
    assert page.inner_text("#stat-step") == "6 / 6"
    assert "validation loss" in page.inner_text("#run-message")
    assert page.locator("#chart polyline.train").count() == 1

    page.fill("#prompt", "It is a truth universally acknowledged")
    page.fill("#gen-max", "20")
    page.click("#generate")
    page.wait_for_selector("#out-without .continuation", timeout=30_000)
    with_text = page.inner_text("#out-with .continuation")
    without_text = page.inner_text("#out-without .continuation")
    assert with_text or without_text
    assert page.inner_text("#out-with .prompt") == "It is a truth universally acknowledged"
    shot(page, "2-finished")

    with page.expect_download() as info:
        page.click("#download")
    target = tmp_path / "downloaded.zip"
    info.value.save_as(target)
    assert info.value.suggested_filename == "austen.zip"
    from softprompt.formats import load_any

    sp = load_any(target)
    assert sp.name == "austen" and sp.n_tokens == 20 and sp.meta["steps"] == 6


def test_stop_reload_resume(page, server, tiny_models, corpus):
    fill_form(
        page,
        str(corpus),
        str(tiny_models["llama"]),
        max_steps="100000",
        eval_every="50",
        report=True,
    )
    page.click("#start")
    page.wait_for_function(
        "+document.querySelector('#chart').dataset.trainPoints > 3", timeout=60_000
    )
    run_id = page.get_attribute("#detail", "data-id")

    # the page closed and `softprompt ui` started again: the run goes on, and is shown
    srv2 = ui.make_server(server.workspace.root, port=0)
    threading.Thread(target=srv2.serve_forever, daemon=True).start()
    try:
        page.goto(srv2.url)
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector(f"#runs li[data-id='{run_id}'][data-status='running']")
        page.wait_for_function("document.querySelector('#detail').dataset.status === 'running'")
        seen = int(page.get_attribute("#chart", "data-train-points"))
        page.wait_for_function(
            f"+document.querySelector('#chart').dataset.trainPoints > {seen}", timeout=30_000
        )
        assert page.inner_text("#stat-eta") not in ("", "–")
        shot(page, "3-running")

        # stop: SIGTERM from a server that did not start the process; train checkpoints
        page.click("#stop")
        page.wait_for_function(
            "document.querySelector('#detail').dataset.status === 'stopped'", timeout=60_000
        )
        assert "stopped at step" in page.inner_text("#run-message")
        assert page.is_visible("#resume")
        page.reload()
        page.wait_for_selector(f"#runs li[data-id='{run_id}'][data-status='stopped']")
        page.wait_for_function("document.querySelector('#detail').dataset.status === 'stopped'")
        shot(page, "4-stopped")

        # resume to a few steps further: it finishes
        step = int(page.inner_text("#stat-step").split("/")[0])
        page.fill("#resume-steps", str(step + 3))
        page.click("#resume")
        page.wait_for_function(
            "document.querySelector('#detail').dataset.status === 'finished'", timeout=60_000
        )
        assert page.inner_text("#stat-step") == f"{step + 3} / {step + 3}"
        assert int(page.get_attribute("#chart", "data-train-points")) == step + 3
    finally:
        srv2.shutdown()
        srv2.server_close()
        _end_children(srv2.workspace)


def test_errors_are_shown_on_the_page(page, server, tiny_models, tmp_path):
    # a bad option: refused at once, under the form
    fill_form(page, str(tmp_path / "nowhere"), str(tiny_models["llama"]), lr="-1")
    page.click("#start")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "--lr must be more than 0" in page.inner_text("#form-error")
    # a dataset folder that does not exist: train's one-line error, on the failed run
    page.fill("#opt-lr", "")
    page.click("#start")
    page.wait_for_function(
        "document.querySelector('#detail').dataset.status === 'failed'", timeout=60_000
    )
    message = page.inner_text("#run-message")
    assert "nowhere does not exist" in message and "\n" not in message.strip()
    assert page.is_hidden("#resume-box") and page.is_disabled("#generate")
    shot(page, "5-failed")


def test_metrics_are_read_incrementally_and_again_when_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = ui.MetricsReader()
    assert reader.read(path) == []
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n{"step": 3')
    assert reader.read(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}]
    with path.open("a") as fh:
        fh.write(', "loss": 1.5}\n')
    assert [r["step"] for r in reader.read(path)] == [1, 2, 3]
    replacement = tmp_path / "new"
    replacement.write_text('{"step": 1, "loss": 9.0}\n')
    replacement.replace(path)  # a resume trims the file: a new one under the same name
    assert reader.read(path) == [{"step": 1, "loss": 9.0}]


def test_run_ids_are_plain_and_paths_absolute(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    status, run = call(
        server,
        "POST",
        "/api/runs",
        {"options": {"dataset": "texts", "name": "Émile / ü", "model": "nowhere-model"}},
    )
    assert status == 201, run
    assert run["id"].endswith("-mile"), run["id"]
    assert run["dataset"] == str(tmp_path / "texts")
    assert run["model"] == "nowhere-model"  # not a path here: left as a hub id
    assert call(server, "GET", f"/api/runs/{run['id']}")[0] == 200
    wait_for(lambda: call(server, "GET", f"/api/runs/{run['id']}")[1]["status"] != "running")
