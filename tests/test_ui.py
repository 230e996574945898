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
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import raw_request

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


def texts(where: Path, name: str = "texts") -> Path:
    """A dataset folder with one text in it."""
    folder = where / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("It is a truth universally acknowledged.\n")
    return folder


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


def fill_form(page, dataset: str | None, model: str, **options: str | bool) -> None:
    """Type the options into the page's form (opening "More options" for the rest); a
    boolean ticks or clears the option's box."""
    if dataset is not None:
        page.fill("#opt-dataset", dataset)
    page.fill("#opt-model", model)
    page.click("details.more > summary")
    for name, value in {**TINY, **options}.items():
        sel = f"#opt-{name}"
        if page.eval_on_selector(sel, "e => e.tagName") == "SELECT":
            page.select_option(sel, value)
        elif isinstance(value, bool):
            page.set_checked(sel, value)
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
    assert opt["choices"] == ["schedulefree", "adamw", "adafactor"]
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


def test_the_learning_rate_takes_a_number_or_auto():
    assert "lr" not in ui.parse_options({"dataset": "d", "lr": "auto"})  # the default
    assert ui.parse_options({"dataset": "d", "lr": "0.1"})["lr"] == 0.1
    with pytest.raises(ConfigError, match="--lr must be a number or auto"):
        ui.parse_options({"dataset": "d", "lr": "fast"})
    opt = next(o for o in ui.option_list() if o["name"] == "lr")
    assert opt["kind"] == "float or auto" and opt["default"] == "auto"


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
    monkeypatch.setattr(server, "max_upload", 10)  # the upload limit
    status, data = call(server, "POST", "/api/upload?dataset=a&filename=c.txt", raw=b"x" * 100)
    assert status == 400 and "limit" in data["error"]
    datasets = call(server, "GET", "/api/datasets")[1]["datasets"]
    assert [d["files"] for d in datasets] == [["evil.txt"]]


def test_upload_takes_jsonl_examples_and_names_a_bad_line(server):
    good = b'{"prompt": "Q: 2+2?", "completion": " 4"}\n{"prompt": "Q: 3+3?", "completion": " 6"}\n'
    status, data = call(server, "POST", "/api/upload?dataset=qa&filename=train.jsonl", raw=good)
    assert status == 200 and data["file"] == "train.jsonl", data
    bad = b'{"prompt": "Q: 2+2?", "completion": " 4"}\n{"prompt": "Q"}\n'
    status, data = call(server, "POST", "/api/upload?dataset=qa&filename=bad.jsonl", raw=bad)
    assert status == 400 and 'bad.jsonl line 2 has no "completion"' in data["error"]
    datasets = call(server, "GET", "/api/datasets")[1]["datasets"]
    assert [d["files"] for d in datasets] == [["train.jsonl"]]


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
    fill_form(page, None, str(tiny_models["llama"]), max_steps="6", eval_every="2", report=False)
    shot(page, "1-form")
    page.click("#start")
    page.wait_for_selector("#runs li[data-status]")
    page.wait_for_function(
        "document.querySelector('#detail').dataset.status === 'finished'", timeout=120_000
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
        report=False,
        compile="off",  # a run this long would compile (twice: at the start and on resume)
    )
    page.click("#start")
    page.wait_for_function(
        "+document.querySelector('#chart').dataset.trainPoints > 3", timeout=120_000
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
        step = int(page.inner_text("#stat-step").split("/")[0])
        # what to do on the page, not train's command line
        assert page.inner_text("#run-message") == (
            f"Stopped at step {step} of 100000; Resume to continue"
        )
        assert page.is_visible("#resume")
        page.reload()
        page.wait_for_selector(f"#runs li[data-id='{run_id}'][data-status='stopped']")
        page.wait_for_function("document.querySelector('#detail').dataset.status === 'stopped'")
        shot(page, "4-stopped")

        # resume to a few steps further: at once the step shows its new total and an ETA
        # (the resumed process is still loading), then it finishes
        page.fill("#resume-steps", str(step + 3))
        page.click("#resume")
        page.wait_for_function(
            f"document.querySelector('#stat-step').textContent.endsWith(' / {step + 3}')",
            timeout=5_000,
        )
        assert page.inner_text("#stat-eta") not in ("", "–")
        page.wait_for_function(
            "document.querySelector('#detail').dataset.status === 'finished'", timeout=120_000
        )
        assert page.inner_text("#stat-step") == f"{step + 3} / {step + 3}"
        assert int(page.get_attribute("#chart", "data-train-points")) == step + 3

        # a finished run trains further with more steps (train --resume --max-steps N)
        assert page.is_visible("#resume") and page.inner_text("#resume") == "Train further"
        page.fill("#resume-steps", str(step + 5))
        page.click("#resume")
        page.wait_for_function(
            "document.querySelector('#detail').dataset.status === 'running'", timeout=5_000
        )
        page.wait_for_function(
            "document.querySelector('#detail').dataset.status === 'finished'", timeout=120_000
        )
        assert page.inner_text("#stat-step") == f"{step + 5} / {step + 5}"
        page.wait_for_function(
            f"+document.querySelector('#chart').dataset.trainPoints === {step + 5}"
        )
        shot(page, "4b-trained-further")
    finally:
        srv2.shutdown()
        srv2.server_close()
        _end_children(srv2.workspace)


def test_errors_are_shown_on_the_page(page, server, tiny_models, corpus, tmp_path):
    # a bad option: refused at once, under the form, and its field outlined
    fill_form(page, str(corpus), str(tiny_models["llama"]), lr="-1")
    page.click("#start")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "--lr must be more than 0" in page.inner_text("#form-error")
    assert page.get_attribute(".field[data-option='lr']", "class").split()[-1] == "invalid"
    # a model folder that does not exist: train's one-line error, on the failed run
    page.fill("#opt-lr", "")
    page.fill("#opt-model", str(tmp_path / "nowhere-model"))
    page.click("#start")
    page.wait_for_function(
        "document.querySelector('#detail').dataset.status === 'failed'", timeout=60_000
    )
    message = page.inner_text("#run-message")
    assert "nowhere-model does not exist" in message and "\n" not in message.strip()
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


def test_run_ids_are_plain_and_paths_absolute(server, tmp_path, monkeypatch, no_launch):
    monkeypatch.chdir(tmp_path)
    texts(tmp_path)
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


# ----------------------------------------------------------------------------- hostile input
# Issue 14: values that broke a run or the server, and links planted in the workspace. Runs
# are not launched here (a no-op _launch): what matters is what the server writes and answers.


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(ui.Workspace, "_launch", lambda self, folder, args: None)


def make_run(ws: ui.Workspace, run_id: str, job: str | None = None) -> Path:
    """A run folder as the server leaves it, written by hand."""
    folder = ws.runs / run_id
    (folder / ui.OUTPUT_DIR).mkdir(parents=True)
    job = job or json.dumps({"id": run_id, "name": run_id, "created": 1.0, "options": {}})
    (folder / ui.JOB_FILE).write_text(job)
    return folder


@pytest.mark.parametrize(
    "option, value, want",
    [
        ("weight_decay", "inf", "--weight-decay must be 0 or more"),
        ("max_grad_norm", "inf", "--max-grad-norm must be 0 (off) or more"),
        ("max_grad_norm", "-inf", "--max-grad-norm must be 0 (off) or more"),
        ("seed", str(2**70), "--seed must be"),
        ("dataset", "a\x00b", "--dataset holds a NUL character"),
        ("name", "\ud800", "--name is not valid Unicode text"),
    ],
)
def test_a_value_that_would_break_the_run_is_refused_before_anything_is_written(
    server, no_launch, option, value, want
):
    options = {"dataset": "texts", option: value}
    status, data = call(server, "POST", "/api/runs", {"options": options})
    assert status == 400 and want in data["error"], data
    assert list(server.workspace.runs.iterdir()) == []
    assert call(server, "GET", "/api/runs") == (200, {"runs": []})


def test_nan_and_infinity_are_not_json(server, no_launch):
    """Python's json takes NaN and Infinity, and reads 1e400 as an infinity: none is JSON."""
    for number in ("Infinity", "-Infinity", "NaN", "1e400"):
        raw = b'{"options": {"dataset": "texts", "weight_decay": %s}}' % number.encode()
        status, data = call(server, "POST", "/api/runs", raw=raw)
        assert status == 400 and number in data["error"], data
    assert list(server.workspace.runs.iterdir()) == []


def test_one_damaged_run_folder_does_not_hide_the_others(server):
    ws = server.workspace
    make_run(ws, "good")
    make_run(ws, "infinite", '{"name": "x", "options": {"weight_decay": Infinity}}')
    make_run(ws, "garbled", "{not json")
    make_run(ws, "array", "[1, 2]")
    make_run(ws, "types", '{"name": 3, "created": "yesterday", "pid": "x", "options": []}')
    bad_metrics = make_run(ws, "metrics")
    (bad_metrics / ui.OUTPUT_DIR / "metrics.jsonl").write_text(
        '{"loss": 1.0}\n{"step": "2", "loss": 1.0}\n{"step": 3, "loss": "x"}\n{"step": 4, "loss": 2.0}\n'
    )
    status, data = call(server, "GET", "/api/runs")
    assert status == 200, data
    runs = {r["id"]: r for r in data["runs"]}
    assert set(runs) == {"good", "infinite", "garbled", "array", "types", "metrics"}
    assert runs["good"]["status"] == "failed" and runs["metrics"]["step"] == 4
    for run_id in ("infinite", "garbled", "array", "types"):
        assert runs[run_id]["status"] == "damaged"
        assert f"{run_id}/job.json" in runs[run_id]["message"], runs[run_id]
        status, data = call(server, "GET", f"/api/runs/{run_id}")
        assert status == 400 and "job.json" in data["error"]
    assert call(server, "GET", "/api/runs/metrics")[0] == 200


def test_control_characters_are_saved_escaped_and_read_back_equal(server, no_launch, tmp_path):
    from softprompt.config import read_toml

    texts(tmp_path)
    nasty = "a\rb\x00c\x01d\x1be\x7ff\n\t"
    options = {
        "dataset": str(tmp_path / "texts"),
        "name": nasty,
        "description": nasty,
        "author": nasty,
        "model": "m\r\x01\x1b\x7f",
        "init_text": nasty,
    }
    status, run = call(server, "POST", "/api/runs", {"options": options})
    assert status == 201, run
    folder = server.workspace.runs / run["id"]
    saved = read_toml(folder / ui.RUN_CONFIG)
    assert saved == run["options"]
    assert saved["description"] == nasty and saved["model"] == options["model"]
    assert saved["name"] == nasty.strip()  # names are trimmed, as every option but the description


def test_bad_request_numbers_answer_400_not_500(server):
    head = b"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Softprompt: 1\r\n"
    for length in (b"\xb2", b"\xb9", b"-1", b"1_0", b""):  # \xb2 is "2" as a superscript
        answer = raw_request(server, head + b"Content-Length: " + length + b"\r\n\r\n{}")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"Content-Length" in answer
    status, data = call(server, "GET", "/api/runs/nope?since=%C2%B2")
    assert status == 404, data


def test_upload_names_too_long_for_the_file_system_are_shortened(server):
    long = urllib.parse.quote("😀" * 100)  # 100 characters, 400 bytes: over NAME_MAX
    status, data = call(
        server, "POST", f"/api/upload?dataset={long}&filename={long}.txt", raw=b"hello"
    )
    assert status == 200, data
    assert data["file"].endswith(".txt")  # the extension is not cut off
    assert len(data["name"].encode()) < 255 and len(data["file"].encode()) < 255
    assert (Path(data["path"]) / data["file"]).read_text() == "hello"


def test_paths_the_file_system_refuses_are_not_500(server, no_launch, tmp_path):
    texts(tmp_path)
    for key in ("model", "init_from", "init_text", "cache_dir"):
        options = {"dataset": str(tmp_path / "texts"), key: "x" * 300}
        if key == "init_text":
            options["init"] = "text"
        status, data = call(server, "POST", "/api/runs", {"options": options})
        assert status in (201, 400), (key, data)


def test_try_it_options_out_of_range_are_refused(tmp_path):
    gen = ui.Generator()
    for body, want in [
        ({"seed": 2**70}, "seed must be a whole number from 0 to"),
        ({"seed": -1}, "seed must be a whole number from 0 to"),
        ({"seed": "1e400"}, "seed must be a whole number"),
        ({"max_new_tokens": 0}, "max new tokens must be a whole number from 1 to 1000"),
        ({"temperature": "inf"}, "temperature must be a finite number"),
        ({"repetition_penalty": "nan"}, "repetition penalty must be a finite number"),
        ({"prompt": "a\ud800"}, "the prompt is not valid Unicode text"),
    ]:
        with pytest.raises(ConfigError, match=want):
            gen.compare(tmp_path, {"prompt": "Once", **body})


def test_idle_connections_are_closed_after_the_timeout(server):
    server.idle_timeout = 0.5
    t0 = time.monotonic()
    assert raw_request(server, b"") == b""  # connected, sent nothing
    half = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # headers never ended
    assert raw_request(server, half) == b""
    body = b"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Softprompt: 1\r\nContent-Length: 100\r\n\r\n{"
    assert raw_request(server, body) == b""  # a body that never arrives
    assert time.monotonic() - t0 < 5
    assert call(server, "GET", "/api/info")[0] == 200  # the server is still there


def test_links_planted_in_a_run_folder_are_not_followed(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    ws = server.workspace
    zipped = make_run(ws, "zipped")
    (zipped / ui.OUTPUT_DIR / "softprompt.safetensors").write_bytes(b"x")  # a finished run
    (zipped / ui.OUTPUT_DIR / "stolen.zip").symlink_to(secret)
    logged = make_run(ws, "logged")
    (logged / ui.LOG_FILE).symlink_to(secret)
    outside = tmp_path / "elsewhere"
    make_run(ws, "x")
    shutil.move(ws.runs / "x", outside)
    (ws.runs / "linked").symlink_to(outside)
    away = make_run(ws, "away")
    shutil.rmtree(away / ui.OUTPUT_DIR)
    (away / ui.OUTPUT_DIR).symlink_to(tmp_path)

    for run_id in ("zipped", "logged", "linked", "away"):
        for path in (f"/api/runs/{run_id}", f"/api/runs/{run_id}/download"):
            req = urllib.request.Request(server.url.rstrip("/") + path)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            body = e.value.read()
            assert e.value.code == 400 and b"the secret" not in body, (path, body)
            assert b"outside" in body
    runs = {r["id"]: r for r in call(server, "GET", "/api/runs")[1]["runs"]}
    assert {runs[r]["status"] for r in ("zipped", "logged", "linked", "away")} == {"damaged"}
    assert "the secret" not in json.dumps(runs)


def test_uploads_through_a_planted_link_are_refused(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (server.workspace.datasets / "planted").symlink_to(outside)
    status, data = call(server, "POST", "/api/upload?dataset=planted&filename=a.txt", raw=b"hi")
    assert status == 400 and "outside" in data["error"], data
    assert list(outside.iterdir()) == []
    names = [d["name"] for d in call(server, "GET", "/api/datasets")[1]["datasets"]]
    assert "planted" not in names


def test_names_that_are_not_utf8_are_listed_not_500(server):
    """A folder someone made with a name that is not UTF-8 (Python's surrogate escapes)."""
    os.mkdir(os.fsencode(server.workspace.datasets) + b"/caf\xe9")
    status, data = call(server, "GET", "/api/datasets")
    assert status == 200 and [d["name"] for d in data["datasets"]] == ["caf\udce9"], data


# ----------------------------------------------------------------------------- status.json
# The page launches train with --status-file and learns a run's state from that file, not from
# the wording of the log; runs started before it (no status.json) are read from the files.


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_with_status(ws: ui.Workspace, run_id: str, pid: int | None = None, **status) -> Path:
    """A run folder with a job.json and the status.json train would have left."""
    pid = pid or _dead_pid()
    job = {"id": run_id, "name": run_id, "created": 1.0, "options": {}, "pid": pid, "starts": []}
    folder = make_run(ws, run_id, json.dumps(job))
    full = {
        "phase": "training",
        "step": 0,
        "total_steps": None,
        "val_loss": None,
        "elapsed_s": 0.0,
        "message": "",
        "pid": pid,
        "updated": 1.0,
        **status,
    }
    (folder / ui.STATUS_FILE).write_text(json.dumps(full))
    return folder


def show_run(page, run_id: str, status: str) -> None:
    page.goto(f"{page.url.split('#')[0]}#run={run_id}")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function(f"document.querySelector('#detail').dataset.status === '{status}'")


def test_a_run_failing_before_its_output_folder_exists_shows_the_error_from_status_json(
    server, tiny_models, tmp_path
):
    options = {"dataset": str(texts(tmp_path)), "model": str(tmp_path / "nowhere"), **TINY}
    status, run = call(server, "POST", "/api/runs", {"options": options})
    assert status == 201, run
    folder = server.workspace.runs / run["id"]

    def ended():
        info = call(server, "GET", f"/api/runs/{run['id']}")[1]
        return info if info["status"] != "running" else None

    info = wait_for(ended)
    saved = json.loads((folder / ui.STATUS_FILE).read_text())
    assert saved["phase"] == "failed" and "nowhere does not exist" in saved["message"]
    assert not (folder / ui.OUTPUT_DIR).exists()
    assert (info["status"], info["phase"], info["message"]) == (
        "failed",
        "failed",
        saved["message"],
    )
    (folder / ui.LOG_FILE).write_text("")  # the log no longer says it: status.json does
    info = call(server, "GET", f"/api/runs/{run['id']}")[1]
    assert info["status"] == "failed" and info["message"] == saved["message"]


def test_a_stopped_run_says_what_to_do_on_the_page_not_a_command(page, server):
    how = (
        "stopped at step 2 of 4; checkpoint saved in /w/out; continue with: softprompt train "
        "--output /w/out --resume"
    )
    folder = run_with_status(
        server.workspace, "halted", phase="stopped", step=2, total_steps=4, message=how
    )
    (folder / ui.OUTPUT_DIR / "checkpoint.pt").write_bytes(b"x")
    info = call(server, "GET", "/api/runs/halted")[1]
    plain = "Stopped at step 2 of 4; Resume to continue"
    assert info["status"] == "stopped" and info["message"] == plain and info["can_resume"]
    assert (info["step"], info["total_steps"]) == (2, 4)
    show_run(page, "halted", "stopped")
    assert page.inner_text("#run-message") == plain
    assert page.is_visible("#resume") and page.inner_text("#stat-step") == "2 / 4"
    # no checkpoint: nothing to resume, and it says so
    (folder / ui.OUTPUT_DIR / "checkpoint.pt").unlink()
    info = call(server, "GET", "/api/runs/halted")[1]
    assert info["message"] == (
        "Stopped at step 2 of 4 before a checkpoint was saved; start a new run to train"
    )
    assert not info["can_resume"]


def test_elapsed_counts_every_segment_of_a_resumed_run(page, server):
    """metrics.jsonl's elapsed_s starts over at each resume; status.json's counts them all."""
    folder = run_with_status(
        server.workspace, "resumed", phase="done", step=6, total_steps=6, elapsed_s=100.0
    )
    out = folder / ui.OUTPUT_DIR
    (out / "softprompt.safetensors").write_bytes(b"x")
    segments = ((1, 30.0), (2, 60.0), (3, 90.0), (4, 3.0), (5, 6.0), (6, 10.0))
    lines = [{"step": s, "loss": 5.0, "elapsed_s": e} for s, e in segments]
    lines += [{"step": 0, "val_loss": 4.0}, {"step": 6, "val_loss": 3.25}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    info = call(server, "GET", "/api/runs/resumed")[1]
    assert info["status"] == "finished" and info["elapsed_s"] == 100.0
    show_run(page, "resumed", "finished")
    assert page.inner_text("#stat-elapsed") == "1 min 40 s"
    (folder / ui.STATUS_FILE).unlink()  # a run from before: this segment's time, as before
    assert call(server, "GET", "/api/runs/resumed")[1]["elapsed_s"] == 10.0


def test_a_running_run_shows_its_phase_and_latest_validation_loss(page, server):
    folder = server.workspace.runs / "live"
    # a process whose command line names the run's folder stands for train
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(folder)])
    try:
        run_with_status(
            server.workspace, "live", pid=proc.pid, step=7, total_steps=50, val_loss=2.5
        )
        info = call(server, "GET", "/api/runs/live")[1]
        assert (info["status"], info["phase"], info["val_loss"]) == ("running", "training", 2.5)
        assert (info["step"], info["total_steps"]) == (7, 50)
        show_run(page, "live", "running")
        assert page.inner_text("#run-message") == "training: latest validation loss 2.5000"
        assert (
            page.inner_text("#stat-step") == "7 / 50" and page.inner_text("#stat-val") == "2.5000"
        )
    finally:
        proc.kill()
        proc.wait()


def test_runs_started_before_status_json_are_read_from_the_log(server):
    job = {"id": "old", "name": "old", "created": 1.0, "options": {}, "pid": _dead_pid()}
    folder = make_run(server.workspace, "old", json.dumps(job))
    (folder / ui.LOG_FILE).write_text(
        "=== softprompt ui: 2025-01-01 00:00:00: train ...\n"
        "soft prompt: 20 tokens, init vocab; 40 steps of 2 x 1 blocks (...)\n"
        "softprompt: error: --dataset texts/ has no .txt files\n"
    )
    info = call(server, "GET", "/api/runs/old")[1]
    assert info["status"] == "failed" and info["message"] == "--dataset texts/ has no .txt files"
    assert info["total_steps"] == 40 and info["phase"] is None
    # a status.json an earlier start left (another pid) is not this start's: not read
    stale = {"phase": "done", "step": 3, "message": "", "pid": 1, "elapsed_s": 9.0}
    (folder / ui.STATUS_FILE).write_text(json.dumps(stale))
    again = call(server, "GET", "/api/runs/old")[1]
    assert again["status"] == "failed" and again["message"] == info["message"]


# ----------------------------------------------------------------------------- issue 16, item 13
# The page: the dataset checked at its field, runs and datasets deleted, a finished run trained
# further, plain labels with the main options open, and the smaller things a new user hit.


def shot_at(page, name: str, width: int) -> None:
    """A screenshot at ``width`` px (then back to the page's own width)."""
    if SHOTS:
        size = page.viewport_size
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(200)  # the chart redraws at its new width
        shot(page, name)
        page.set_viewport_size(size)


def finished_run(ws: ui.Workspace, run_id: str, steps: int = 40) -> Path:
    """A finished run written by hand (a soft prompt file, a checkpoint, a zip, metrics)."""
    folder = run_with_status(ws, run_id, phase="done", step=steps, total_steps=steps, val_loss=3.2)
    out = folder / ui.OUTPUT_DIR
    for name in ("softprompt.safetensors", "checkpoint.pt", f"{run_id}.zip"):
        (out / name).write_bytes(b"x")
    records = [{"step": 0, "val_loss": 4.5}]
    for s in range(1, steps + 1):
        records.append({"step": s, "loss": 4.6 - s * 0.03 + 0.1 * (s % 2), "elapsed_s": s * 2.0})
        if s % 10 == 0:
            records.append({"step": s, "val_loss": 4.5 - s * 0.03})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_the_dataset_is_checked_with_trains_own_reading(server, no_launch, tmp_path):
    def check(path, **flags):
        query = urllib.parse.urlencode({"path": str(path), **flags})
        status, data = call(server, "GET", f"/api/dataset-check?{query}")
        assert status == 200, data
        return data

    good = texts(tmp_path, "good")
    (good / "b.txt").write_text("Another text.\n")
    answer = check(good)
    assert answer["ok"] and answer["files"] == 2 and answer["message"].startswith("2 files, ")
    assert "does not exist" in check(tmp_path / "goood")["message"]
    (tmp_path / "empty").mkdir()
    assert not check(tmp_path / "empty")["ok"]
    assert "has no .txt files" in check(tmp_path / "empty")["message"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.pdf").write_bytes(b"%PDF")
    assert "1 .pdf" in check(docs)["message"]  # what is there, and what to do
    mixed = texts(tmp_path, "mixed")
    (mixed / "b.docx").write_bytes(b"PK")
    answer = check(mixed)  # what train skips is said, at any logging level
    assert answer["ok"] and "skipped 1 file" in answer["message"] and "1 .docx" in answer["message"]
    for odd in ("a\x00b", "x" * 300, "~nosuchuser/texts"):
        assert not check(odd)["ok"], odd
    binary = texts(tmp_path, "binary")
    (binary / "z.txt").write_bytes(b"\x00\x01")
    answer = check(binary)
    assert not answer["ok"] and "looks binary" in answer["message"]
    answer = check(binary, skip_bad_files="1")
    assert answer["ok"] and answer["files"] == 1 and "z.txt" in answer["message"]
    nested = tmp_path / "nested"
    texts(nested)
    assert "--recursive" in check(nested)["message"]
    assert check(nested, recursive="1")["ok"]
    assert not check("")["ok"]

    # Start refuses what the check refuses: a one-line 400, and no run folder
    for path in (tmp_path / "goood", tmp_path / "empty", binary):
        status, data = call(server, "POST", "/api/runs", {"options": {"dataset": str(path)}})
        assert status == 400 and "\n" not in data["error"] and "dataset" in data["error"], data
    assert list(server.workspace.runs.iterdir()) == []
    assert call(server, "POST", "/api/runs", {"options": {"dataset": str(good)}})[0] == 201


def test_the_dataset_field_says_what_is_wrong_before_a_run_exists(page, server, tmp_path):
    good = texts(tmp_path, "stories")
    page.type("#opt-dataset", str(tmp_path / "storeis"))  # a typo, typed: no Start, no blur
    page.wait_for_selector("#dataset-check.bad")
    assert "storeis does not exist" in page.inner_text("#dataset-check")
    assert page.get_attribute("#opt-dataset", "aria-invalid") == "true"
    shot(page, "6-dataset-typo")
    page.click("#start")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "no run was started" in page.inner_text("#form-error")
    assert call(server, "GET", "/api/runs")[1]["runs"] == []

    (tmp_path / "blank").mkdir()
    page.fill("#opt-dataset", str(tmp_path / "blank"))
    page.press("#opt-dataset", "Tab")  # leaving the field checks at once
    page.wait_for_function(
        "document.querySelector('#dataset-check').textContent.includes('no .txt')"
    )
    page.fill("#opt-dataset", str(good))
    page.wait_for_selector("#dataset-check.ok")
    assert page.inner_text("#dataset-check").endswith("1 file, 40 bytes of text")


def test_labels_are_plain_names_and_the_main_options_are_open(page, server):
    status, data = call(server, "GET", "/api/options")
    labels = {o["name"]: o["label"] for o in data["options"]}
    assert labels["max_steps"] == "Steps" and labels["lr"] == "Learning rate"
    assert not [name for name, label in labels.items() if "--" in label or "_" in label]
    for name in ("lr", "max_steps", "recursive"):
        label = page.text_content(f"label[for='opt-{name}']").strip()
        assert label == labels[name], label
        flag = "--" + name.replace("_", "-")
        assert flag in page.text_content(f".field[data-option='{name}'] .help")
    assert "--no-report" in page.text_content(".field[data-option='report'] .help")
    # as on the Colab form: name, description, author and the starter text, not under More
    for name in ("name", "description", "author", "init_text", "tokens", "epochs"):
        assert page.eval_on_selector(f"#opt-{name}", "e => !e.closest('details')"), name
        assert page.is_visible(f"#opt-{name}")
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 1500, height  # it opened 3,640 px tall, with More options open
    shot(page, "7-form")
    shot_at(page, "7-form-390", 390)


def test_the_starter_text_and_the_report_box_reach_the_run(page, server, no_launch, tmp_path):
    page.fill("#opt-dataset", str(texts(tmp_path)))
    page.fill("#opt-init_text", "Once upon a time")
    page.fill("#opt-author", "Jane")
    page.click("details.more > summary")
    assert page.is_checked("#opt-report")  # on by default: the box is ticked
    page.uncheck("#opt-report")
    page.click("#start")
    page.wait_for_selector("#detail:not([hidden])")
    (run,) = call(server, "GET", "/api/runs")[1]["runs"]
    options = call(server, "GET", f"/api/runs/{run['id']}")[1]["options"]
    assert options["init_text"] == "Once upon a time" and options["author"] == "Jane"
    assert options["report"] is False


def test_runs_and_datasets_are_deleted_inside_the_workspace(server, tmp_path):
    ws = server.workspace
    finished_run(ws, "done")
    status, data = call(server, "POST", "/api/runs/done/delete", {})
    assert (status, data) == (200, {"deleted": "done"}) and not (ws.runs / "done").exists()
    assert call(server, "POST", "/api/runs/done/delete", {})[0] == 404
    assert call(server, "POST", "/api/runs/..%2Fdatasets/delete", {})[0] == 404

    # a run that is running is refused
    folder = ws.runs / "live"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(folder)])
    try:
        run_with_status(ws, "live", pid=proc.pid, step=3, total_steps=9)
        status, data = call(server, "POST", "/api/runs/live/delete", {})
        assert status == 400 and "stop it" in data["error"] and folder.is_dir()
    finally:
        proc.kill()
        proc.wait()

    # links: the link goes, never what it leads to
    outside = tmp_path / "outside"
    make_run(ws, "x")
    shutil.move(ws.runs / "x", outside)
    (ws.runs / "linked").symlink_to(outside)
    planted = make_run(ws, "planted")
    (planted / ui.OUTPUT_DIR / "secret").symlink_to(outside)
    for run_id in ("linked", "planted"):
        assert call(server, "POST", f"/api/runs/{run_id}/delete", {})[0] == 200, run_id
    assert not os.path.lexists(ws.runs / "linked") and not planted.exists()
    assert (outside / ui.JOB_FILE).is_file()

    # datasets
    call(server, "POST", "/api/upload?dataset=austen&filename=a.txt", raw=b"hi")
    (ws.datasets / "away").symlink_to(outside)
    assert call(server, "POST", "/api/datasets/..%2Fruns/delete", {})[0] == 404
    assert call(server, "POST", "/api/datasets/nope/delete", {})[0] == 404
    assert call(server, "POST", "/api/datasets/away/delete", {})[0] == 200
    assert (outside / ui.JOB_FILE).is_file() and not os.path.lexists(ws.datasets / "away")
    used = ws.runs / "training"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(used)])
    try:
        run_with_status(ws, "training", pid=proc.pid)
        job = json.loads((used / ui.JOB_FILE).read_text())
        job["options"] = {"dataset": str(ws.datasets / "austen")}
        (used / ui.JOB_FILE).write_text(json.dumps(job))
        (listed,) = call(server, "GET", "/api/datasets")[1]["datasets"]
        assert listed["runs"] == ["training"]
        status, data = call(server, "POST", "/api/datasets/austen/delete", {})
        assert status == 400 and "training on this dataset" in data["error"]
    finally:
        proc.kill()
        proc.wait()
    assert call(server, "POST", "/api/datasets/austen/delete", {})[0] == 200
    assert call(server, "GET", "/api/datasets")[1]["datasets"] == []


def test_the_page_deletes_a_run_and_a_dataset_after_asking(page, server):
    finished_run(server.workspace, "old")
    call(server, "POST", "/api/upload?dataset=austen&filename=a.txt", raw=b"hi")
    show_run(page, "old", "finished")
    asked: list[str] = []

    def answer(dialog, accept):
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda d: answer(d, False))
    page.click("#delete-run")
    page.wait_for_timeout(300)
    assert (server.workspace.runs / "old").is_dir()  # not without a yes
    page.once("dialog", lambda d: answer(d, True))
    page.click("#delete-run")
    page.wait_for_selector("#detail", state="hidden")
    assert not (server.workspace.runs / "old").exists()
    assert "old" in asked[0] and "cannot be undone" in asked[0]
    # the list is refreshed after the detail closes: wait for it, do not race it
    page.wait_for_selector("#runs-empty", state="visible")

    page.wait_for_selector("#datasets li[data-name='austen']")
    page.once("dialog", lambda d: answer(d, True))
    page.click("#datasets li[data-name='austen'] button.danger")
    page.wait_for_selector("#datasets li", state="detached")
    assert not (server.workspace.datasets / "austen").exists()


def test_a_finished_run_is_trained_further_with_more_steps(server, no_launch):
    finished_run(server.workspace, "done", steps=40)
    info = call(server, "GET", "/api/runs/done")[1]
    assert info["status"] == "finished" and info["can_resume"]
    for body in ({}, {"max_steps": "40"}, {"max_steps": 12}):
        status, data = call(server, "POST", "/api/runs/done/resume", body)
        assert status == 400 and "above 40" in data["error"], data
    for bad in ("many", "1.5", True, -3):
        status, data = call(server, "POST", "/api/runs/done/resume", {"max_steps": bad})
        assert status == 400 and "Steps (--max-steps) must be a whole number" in data["error"]
    launched = []
    server.workspace._launch = lambda folder, args: launched.append(args)
    assert call(server, "POST", "/api/runs/done/resume", {"max_steps": "80"})[0] == 200
    assert launched == [["--resume", "--max-steps", "80"]]


def test_right_after_resume_the_step_has_its_total_and_an_eta(page, server):
    """Until the resumed process has read its plan (seconds of loading), the total is the
    --max-steps asked for and the ETA the earlier segments' pace."""
    folder = server.workspace.runs / "again"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(folder)])
    try:
        earlier = {"phase": "stopped", "step": 12, "total_steps": 50, "elapsed_s": 60.0}
        run_with_status(server.workspace, "again", pid=proc.pid, phase="starting", step=0)
        job = json.loads((folder / ui.JOB_FILE).read_text())
        job["starts"] = [{"time": 1.0, "args": ["--resume", "--max-steps", "80"]}]
        job["earlier"] = earlier
        (folder / ui.JOB_FILE).write_text(json.dumps(job))
        info = call(server, "GET", "/api/runs/again")[1]
        assert (info["status"], info["step"], info["total_steps"]) == ("running", 12, 80)
        assert info["eta_s"] == pytest.approx((80 - 12) * 60.0 / 12)
        assert info["elapsed_s"] == 60.0 and info["options"]["max_steps"] == 80
        show_run(page, "again", "running")
        assert page.inner_text("#stat-step") == "12 / 80"
        assert page.inner_text("#stat-eta") == "5 min 40 s"
    finally:
        proc.kill()
        proc.wait()


def test_generate_stays_off_while_it_generates(page, server, monkeypatch):
    """The status poll (every 3 s for a finished run) used to turn the button back on."""
    finished_run(server.workspace, "done")
    release = threading.Event()

    def slow(folder, body):
        release.wait(60)  # until the test has watched the button past two polls
        return {
            "prompt": body["prompt"],
            "with": " A",
            "without": " B",
            "seed": 0,
            "model": "m",
            "seconds": 4.5,
        }

    monkeypatch.setattr(server.generator, "compare", slow)
    show_run(page, "done", "finished")
    page.fill("#prompt", "Once")
    assert page.is_enabled("#generate")
    page.click("#generate")
    for _ in range(7):  # past two polls
        page.wait_for_timeout(500)
        assert page.is_disabled("#generate")
    release.set()
    page.wait_for_selector("#out-with .continuation")
    assert page.is_enabled("#generate") and page.text_content("#out-without .continuation") == " B"


def test_a_partly_bad_upload_says_what_became_of_each_file(page, server, tmp_path):
    files = {
        "one.txt": b"good text\n",
        "notes.md": b"# not .txt\n",
        "latin1.txt": b"caf\xe9\n",
        "two.txt": b"more good text\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    page.fill("#upload-name", "mixed")
    page.set_input_files("#upload-files", [str(tmp_path / n) for n in files])
    page.wait_for_function("document.querySelectorAll('#upload-results li').length === 4")
    lines = page.locator("#upload-results li").all_inner_texts()
    assert lines[0] == "one.txt: uploaded" and lines[3] == "two.txt: uploaded"
    assert lines[1].startswith("notes.md: refused: only .txt files")
    assert lines[2].startswith("latin1.txt: refused: ") and "UTF-8" in lines[2]
    assert "2 of 4 file(s) uploaded" in page.inner_text("#upload-status")
    assert page.input_value("#opt-dataset").endswith("mixed")
    assert sorted(p.name for p in (server.workspace.datasets / "mixed").iterdir()) == [
        "one.txt",
        "two.txt",
    ]
    page.wait_for_selector("#dataset-check.ok")
    shot(page, "8-upload")


def test_the_chart_is_readable_at_390_px_and_the_icon_is_served(browser, server):
    finished_run(server.workspace, "done")
    status = urllib.request.urlopen(server.url + "favicon.ico", timeout=10)
    assert status.status == 200 and status.headers["Content-Type"] == "image/svg+xml"
    assert status.read().startswith(b"<svg")
    context = browser.new_context(viewport={"width": 390, "height": 844}, bypass_csp=True)
    try:
        pg = context.new_page()
        problems: list[str] = []
        pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: problems.append(str(e)))
        pg.goto(f"{server.url}#run=done")
        pg.wait_for_selector("body[data-ready='1']")
        pg.wait_for_function("document.querySelector('#detail').dataset.status === 'finished'")
        pg.wait_for_timeout(500)  # the browser asks for the icon
        assert problems == []  # no 404 for /favicon.ico
        # the chart's text, as drawn on the screen: 12 px, not a 720 px drawing shrunk
        sizes = pg.eval_on_selector_all(
            "#chart text",
            "ns => ns.map(n => parseFloat(getComputedStyle(n).fontSize) * "
            "n.ownerSVGElement.getBoundingClientRect().width / "
            "n.ownerSVGElement.viewBox.baseVal.width)",
        )
        assert sizes and min(sizes) >= 11.5, sizes
        assert pg.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
        shot(pg, "9-finished-390")
    finally:
        context.close()
