"""status.json: what a running `softprompt train --status-file F` tells a program that watches
it, at each phase and at its end, without anyone reading the log's wording."""

from __future__ import annotations

import json
import math

import torch
from conftest import run_cli, stop_after

from softprompt.runfiles import StatusFile, read_status

TINY = ["--block-size", 24, "--batch-size", 2, "--no-progress", "--no-report", "--no-compile"]


def _args(corpus, out, model):
    return ["train", "--dataset", corpus, "--output", out, "--model", model, *TINY]


def test_a_finished_run_says_done(tiny_models, corpus, tmp_path, capsys):
    status = tmp_path / "status.json"
    args = _args(corpus, tmp_path / "out", tiny_models["gpt2"])
    code, _, err = run_cli(capsys, *args, "--max-steps", 3, "--status-file", status)
    assert code == 0, err
    got = read_status(status)
    assert got["phase"] == "done" and got["step"] == 3 and got["total_steps"] == 3
    assert got["message"] == "" and got["val_loss"] > 0 and got["elapsed_s"] > 0


def test_a_bad_option_or_dataset_says_failed_with_the_error_line(
    tiny_models, corpus, tmp_path, capsys
):
    for bad in (["--lr", "-1"], ["--dataset", tmp_path / "nowhere"]):
        status = tmp_path / f"status_{bad[0][2:]}.json"
        args = _args(corpus, tmp_path / "out", tiny_models["gpt2"])
        code, _, err = run_cli(capsys, *args, *bad, "--status-file", status)
        assert code == 2
        got = read_status(status)
        assert got["phase"] == "failed"
        assert err.strip().splitlines()[-1] == f"softprompt: error: {got['message']}"
    assert not (tmp_path / "out").exists()


def test_a_stopped_run_says_how_to_go_on_and_time_adds_up_over_segments(
    tiny_models, corpus, tmp_path, capsys, monkeypatch
):
    status, out = tmp_path / "status.json", tmp_path / "out"
    args = _args(corpus, out, tiny_models["gpt2"])
    with monkeypatch.context() as m:
        stop_after(m.setattr, 2)
        code, _, _ = run_cli(capsys, *args, "--max-steps", 4, "--status-file", status)
    assert code == 130
    got = read_status(status)
    assert got["phase"] == "stopped" and got["step"] == 2 and "--resume" in got["message"]
    first = torch.load(out / "checkpoint.pt", weights_only=True)["elapsed_s"]
    assert first > 0 and got["elapsed_s"] > 0
    code, _, err = run_cli(capsys, *args, "--max-steps", 4, "--resume", "--status-file", status)
    assert code == 0, err
    done = read_status(status)
    assert done["phase"] == "done" and done["step"] == 4
    total = torch.load(out / "checkpoint.pt", weights_only=True)["elapsed_s"]
    assert total > first and done["elapsed_s"] >= first


def test_status_file_writes_phases_at_once_and_steps_at_most_every_second(tmp_path):
    path = tmp_path / "s.json"
    status = StatusFile(path, every=3600)
    status.update(step=1)  # the first write
    assert read_status(path)["step"] == 1
    status.update(step=2)  # within the interval, same phase: not written yet
    assert read_status(path)["step"] == 1
    status.update(phase="training")  # a new phase: written at once
    assert read_status(path)["step"] == 2
    status.update(val_loss=math.nan, force=True)  # JSON has no NaN: null
    assert json.loads(path.read_text())["val_loss"] is None
    StatusFile(None).update(phase="done", force=True)  # no path: nothing, no error


def test_damaged_status_reads_as_none(tmp_path):
    path = tmp_path / "s.json"
    for text in ("", "{", "[]", '{"phase": "flying"}', "[" * 100_000):
        path.write_text(text)
        assert read_status(path) is None
    assert read_status(tmp_path / "missing.json") is None
