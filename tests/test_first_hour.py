"""What a new user meets in the first hour: files the dataset skips, too little text, limits
of the output formats checked before training, time and validation counted over every segment
of a resumed run, a loss curve that shows the trend, and shared files free of local paths."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, stop_after

from softprompt import SoftPrompt, load_model, train
from softprompt.data import find_text_files, read_text
from softprompt.errors import DataError
from softprompt.report import smoothing_window, trailing_mean

TINY = ["--block-size", 24, "--batch-size", 2, "--no-report", "--no-compile"]


# --- the dataset folder


def test_a_folder_of_documents_says_what_it_holds_and_what_to_do(tmp_path):
    (tmp_path / "a.docx").write_bytes(b"PK")
    (tmp_path / "b.docx").write_bytes(b"PK")
    (tmp_path / "c.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError) as e:
        find_text_files(tmp_path)
    msg = str(e.value)
    assert "it has 2 .docx, 1 .pdf" in msg and "save them as UTF-8 .txt" in msg
    assert "--recursive" not in msg


def test_recursive_is_suggested_only_when_sub_folders_hold_text(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="put the text to train on in .txt files") as e:
        find_text_files(tmp_path / "empty")
    assert "--recursive" not in str(e.value)
    (tmp_path / "book" / "part1").mkdir(parents=True)
    (tmp_path / "book" / "part1" / "ch1.txt").write_text("Chapter one.")
    with pytest.raises(DataError, match="its sub-folders have some: add --recursive"):
        find_text_files(tmp_path / "book")
    assert len(find_text_files(tmp_path / "book", recursive=True)[1]) == 1


def test_skipped_files_are_counted_by_extension(tmp_path, caplog):
    (tmp_path / "story.txt").write_text("Once upon a time.")
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "cover.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").write_text("x")
    with caplog.at_level(logging.INFO, logger="softprompt"):
        _, files = find_text_files(tmp_path)
    assert [f.name for f in files] == ["story.txt"]
    assert "skipped 2 files" in caplog.text and "(1 .md, 1 .png)" in caplog.text


def test_a_binary_file_error_names_skip_bad_files(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match="looks binary.*--skip-bad-files"):
        read_text(tmp_path / "x.txt")


def test_too_little_text_is_warned_about(tiny_llama, corpus, tmp_path, caplog):
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("It is a truth universally acknowledged. " * 40)
    options = dict(model=tiny_llama, block_size=24, batch_size=2, max_steps=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        train(dataset=str(small), output=str(tmp_path / "a"), report=False, **options)
    assert "warning: the dataset has only" in caplog.text and "megabytes" in caplog.text
    caplog.clear()
    plays = Path(__file__).parent / "data"
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        train(dataset=str(plays), output=str(tmp_path / "b"), report=False, **options)
    assert "the dataset has only" not in caplog.text


# --- limits of the output formats, before the first step


def test_more_tokens_than_a_kobold_zip_holds_is_refused_before_training(
    tiny_models, corpus, tmp_path, capsys
):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "train", "--dataset", corpus, "--output", out, "--model", tiny_models["gpt2"],
        "--tokens", 2100, *TINY,
    )  # fmt: skip
    assert_one_line_error(code, err, "--tokens 2100", "at most 2047", "--tokens 2047 or fewer")
    assert not out.exists()


# --- a resumed run


def test_time_and_validation_count_over_every_segment(
    tiny_models, corpus, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = ["train", "--dataset", corpus, "--output", out, "--model", tiny_models["gpt2"], *TINY]
    with monkeypatch.context() as m:
        stop_after(m.setattr, 3)
        code, _, _ = run_cli(capsys, *args, "--max-steps", 4, "--eval-every", 2)
    assert code == 130
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val_at_2 = next(r["val_loss"] for r in first if r.get("step") == 2 and "val_loss" in r)
    elapsed_3 = next(r["elapsed_s"] for r in first if r.get("step") == 3 and "loss" in r)
    lm = load_model(str(tiny_models["gpt2"]), device="cpu", dtype="float32")
    result = train(output=str(out), resume=True, model=lm, progress=True, report=True)
    err = capsys.readouterr().err
    # the bar shows the latest validation (step 2's), not the one before training
    assert f"val {val_at_2:.3f}" in err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed_4 = next(r["elapsed_s"] for r in records if r.get("step") == 4 and "loss" in r)
    assert elapsed_4 > elapsed_3  # counted on from the first segment, not from zero
    assert result.seconds > elapsed_3 and result.steps == 4
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"4 steps, {result.tokens_seen:,} tokens seen" in report


# --- the loss curve


def test_about_ten_validations_a_run_by_default(tiny_llama, corpus, tmp_path):
    result = train(
        dataset=str(corpus), output=str(tmp_path / "out"), model=tiny_llama, block_size=24,
        batch_size=2, max_steps=30, progress=False, report=False,
    )  # fmt: skip
    val_steps = [r["step"] for r in result.metrics if "val_loss" in r]
    assert val_steps == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert "eval-every" not in (tmp_path / "out" / "config.toml").read_text()  # decided anew


def test_the_training_curve_is_smoothed_over_a_tenth_of_the_run():
    assert [smoothing_window(n) for n in (4, 5, 30, 300)] == [1, 3, 3, 30]
    got = trailing_mean([1.0, 3.0, 5.0, 7.0], 2)
    np.testing.assert_allclose(got, [1.0, 2.0, 4.0, 6.0])
    noisy = 3.0 + np.random.default_rng(0).normal(0, 0.4, 300)
    assert trailing_mean(noisy, 30)[30:].std() < noisy.std() / 3


# --- files shared with others


def test_shared_files_name_the_model_without_local_paths(tiny_models, corpus, tmp_path):
    folder = tiny_models["llama"]
    lm = load_model(str(folder), device="cpu", dtype="float32")
    assert lm.model_id == "llama"  # a local folder with no hub id in its config: its name
    result = train(
        dataset=str(corpus), output=str(tmp_path / "out"), model=lm, block_size=24,
        batch_size=2, max_steps=1, progress=False, report=False,
    )  # fmt: skip
    base = str(folder.parent)
    with zipfile.ZipFile(result.files["kobold"]) as z:
        assert base not in z.read("meta.json").decode()
    meta = SoftPrompt.load(result.files["safetensors"]).meta
    assert base not in json.dumps(meta) and meta["model"] == "llama"
    result.soft_prompt.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "llama"


def test_a_folder_that_names_its_hub_id_is_recorded_by_it(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "my-copy"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "someone/tiny-llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder), device="cpu", dtype="float32").model_id == "someone/tiny-llama"
    config["_name_or_path"] = "/home/me/models/tiny"  # a path is never recorded
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder), device="cpu", dtype="float32").model_id == "my-copy"


# --- runs that can be moved, rerun and resumed from anywhere


def _train_args(corpus, out, model, *more):
    return ["train", "--dataset", corpus, "--output", out, "--model", model, *TINY, *more]


def test_a_run_resumes_from_another_folder_and_after_its_dataset_moved(
    tiny_models, corpus, tmp_path, capsys, monkeypatch
):
    import shutil

    from softprompt.config import read_toml

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(corpus, work / "texts")
    monkeypatch.chdir(work)
    model = tiny_models["gpt2"]
    code, _, err = run_cli(capsys, *_train_args("texts", "runs/a", model, "--max-steps", 2))
    assert code == 0, err
    saved = read_toml(work / "runs" / "a" / "config.toml")
    assert saved["dataset"] == str((work / "texts").resolve())  # absolute, not as typed
    assert "output" not in saved
    monkeypatch.chdir(tmp_path)  # elsewhere: only the folder is given
    code, _, err = run_cli(
        capsys, "train", "--output", work / "runs" / "a", "--resume", "--max-steps", 3
    )
    assert code == 0, err
    shutil.move(work / "texts", tmp_path / "moved")
    args = ["train", "--output", work / "runs" / "a", "--resume", "--max-steps", 4]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, str((work / "texts").resolve()), "--dataset NEW_PATH")
    code, _, err = run_cli(capsys, *args, "--dataset", tmp_path / "moved")
    assert code == 0, err  # the same text: the fingerprint matches
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("Other words entirely. " * 400)
    code, _, err = run_cli(
        capsys, "train", "--output", work / "runs" / "a", "--resume", "--max-steps", 5,
        "--dataset", tmp_path / "other",
    )  # fmt: skip
    assert_one_line_error(code, err, "changed since the checkpoint")


def test_a_rerun_from_config_decides_anew_a_resume_keeps_the_decisions(
    tiny_models, corpus, tmp_path, capsys
):
    from softprompt.config import read_toml

    out = tmp_path / "a"
    code, _, err = run_cli(
        capsys, "train", "--dataset", corpus, "--output", out, "--model", tiny_models["gpt2"],
        "--batch-size", "auto", "--max-steps", 2, "--no-report",
    )  # fmt: skip
    assert code == 0, err
    text = (out / "config.toml").read_text()
    asked, everything = read_toml(out / "config.toml"), read_toml(out / "config.toml", True)
    assert asked["batch_size"] == "auto" and everything["batch_size"] == 4
    assert "block_size" not in asked and everything["block_size"] > 0
    assert "compile" not in asked and everything["compile"] is False
    assert "[decided]" in text
    # a rerun: the file names no output folder, so it needs a new one, and decides again
    code, _, err = run_cli(capsys, "train", "--config", out / "config.toml")
    assert_one_line_error(code, err, "--output is required", "a rerun")
    code, _, err = run_cli(
        capsys, "train", "--config", out / "config.toml", "--output", tmp_path / "b"
    )
    assert code == 0, err
    assert "--batch-size auto: 4" in err and "--compile off" in err
    # a resume keeps them: no deciding again
    code, _, err = run_cli(capsys, "train", "--output", out, "--resume", "--max-steps", 3)
    assert code == 0, err
    assert "--batch-size auto" not in err and "--compile off" not in err


def test_copy_to_puts_the_zip_in_koboldais_folder(tiny_models, corpus, tmp_path, capsys):
    kobold = tmp_path / "koboldai" / "softprompts"
    args = _train_args(corpus, tmp_path / "a", tiny_models["gpt2"], "--max-steps", 1)
    code, _, err = run_cli(capsys, *args, "--name", "Bard", "--copy-to", tmp_path / "nowhere")
    assert_one_line_error(code, err, "--copy-to", "not an existing folder")
    assert not (tmp_path / "a").exists()
    kobold.mkdir(parents=True)
    code, _, err = run_cli(capsys, *args, "--name", "Bard", "--copy-to", kobold)
    assert code == 0, err
    assert (kobold / "Bard.zip").read_bytes() == (tmp_path / "a" / "Bard.zip").read_bytes()
    # extending the run replaces its own copy; another run of the same name needs --force
    code, _, err = run_cli(
        capsys, "train", "--output", tmp_path / "a", "--resume", "--max-steps", 2
    )
    assert code == 0, err
    assert (kobold / "Bard.zip").read_bytes() == (tmp_path / "a" / "Bard.zip").read_bytes()
    other = _train_args(corpus, tmp_path / "b", tiny_models["gpt2"], "--max-steps", 1)
    code, _, err = run_cli(capsys, *other, "--name", "Bard", "--copy-to", kobold)
    assert_one_line_error(code, err, "already holds a Bard.zip", "--force")
    assert not (tmp_path / "b").exists()
    # convert too
    code, out, err = run_cli(
        capsys, "convert", tmp_path / "a" / "Bard.zip", tmp_path / "c.zip", "--copy-to", kobold
    )
    assert code == 0, err and (kobold / "c.zip").is_file() and "copied to" in out
    code, _, err = run_cli(
        capsys, "convert", tmp_path / "a" / "Bard.zip", tmp_path / "c.zip", "--copy-to", kobold
    )
    assert_one_line_error(code, err, "already holds a c.zip", "--force")


def test_a_soft_prompt_for_another_model_says_so_on_a_line_of_its_own(
    tiny_models, tmp_path, capsys
):
    sp = SoftPrompt(np_tensor(7, 48), {"name": "big", "model": "someone/big-model"})
    sp.save(tmp_path / "big.zip")
    code, out, err = run_cli(
        capsys, "generate", "--model", tiny_models["gpt2"], "--softprompt", tmp_path / "big.zip",
        "--max-new-tokens", 4, "Hello",
    )  # fmt: skip
    assert out == ""  # nothing echoed before the error
    assert_one_line_error(code, err, "big.zip", "width 48", "(gpt2) are 32", "someone/big-model")


def np_tensor(n, d):
    import torch

    return torch.randn(n, d)


def test_a_closed_pipe_ends_quietly(tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    SoftPrompt(np_tensor(2000, 32), {"name": "x"}).save(tmp_path / "x.zip")  # pages of output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # far more than a pipe's buffer, so the writer is still writing when head has gone
    model = tiny_models["gpt2"]
    cmd = f"{sys.executable} -m softprompt inspect {tmp_path / 'x.zip'} --model {model} --top-k 20"
    cmd += " | head -1"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, env=env)
    assert proc.stdout.count(b"\n") == 1 and proc.returncode == 141
    assert b"error" not in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr
