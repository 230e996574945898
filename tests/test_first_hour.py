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
