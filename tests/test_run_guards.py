"""The guards around a training run: free disk space, a diverging loss, and a resume that
would mix a checkpoint with another model."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch
from conftest import assert_one_line_error
from conftest import run_cli as run

from softprompt import train
from softprompt.checkpoint import load_checkpoint, space_needed
from softprompt.errors import RunError
from softprompt.fileio import format_bytes

train_module = train  # the module, callable as the function

TINY = [
    "--block-size",
    "32",
    "--batch-size",
    "2",
    "--no-progress",
    "--no-report",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]
TINY_OPTIONS = dict(block_size=32, batch_size=2, progress=False, report=False)


# ----------------------------------------------------------------------------- free disk space


def test_too_little_free_disk_is_refused_before_anything_is_written(
    tiny_llama, corpus, tmp_path, monkeypatch
):
    Usage = collections.namedtuple("Usage", "total used free")
    seen = []

    def tiny_disk(path):
        seen.append(path)
        return Usage(10_000_000, 9_990_000, 10_000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    out = tmp_path / "new" / "out"
    with pytest.raises(RunError) as e:
        train(dataset=str(corpus), output=str(out), model=tiny_llama, max_steps=1, **TINY_OPTIONS)
    msg = str(e.value)
    need = space_needed(20, tiny_llama.embed_dim)
    assert str(out) in msg and "9.8 KB free" in msg
    assert format_bytes(need) in msg and "choose another folder" in msg
    assert seen == [tmp_path]  # the nearest folder that exists
    assert not (tmp_path / "new").exists()


def test_enough_free_disk_passes(tiny_llama, corpus, tmp_path, monkeypatch):
    need = space_needed(20, tiny_llama.embed_dim)
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(need * 2, need, need))
    result = train(
        dataset=str(corpus),
        output=str(tmp_path / "out"),
        model=tiny_llama,
        max_steps=1,
        **TINY_OPTIONS,
    )
    assert result.steps == 1


def test_space_needed_and_format_bytes():
    # 20 tokens x 576 wide (SmolLM2-135M): 4 copies x 3 (AdamW) x 46 KB + 1 MB
    assert space_needed(20, 576) == 4 * 3 * 20 * 576 * 4 + (1 << 20)
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(1536) == "1.5 KB"
    assert format_bytes(3 << 20) == "3.0 MB"
    assert format_bytes(5 << 30) == "5.0 GB"


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    tiny_models, corpus, tmp_path, capsys, monkeypatch
):
    real = train_module.block_loss
    calls = {"train": 0}

    def loss_goes_nan_at_step_3(model, soft, batch, **kw):
        loss = real(model, soft, batch, **kw)
        if kw.get("reduction", "mean") != "mean":  # validation: untouched
            return loss
        calls["train"] += 1  # call 1 is the setup check, then one call per step
        return loss * float("nan") if calls["train"] >= 4 else loss

    monkeypatch.setattr(train_module, "block_loss", loss_goes_nan_at_step_3)
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        out,
        "--model",
        tiny_models["llama"],
        "--max-steps",
        10,
        "--save-every",
        1,
        "--lr",
        0.5,
        *TINY,
    )
    assert_one_line_error(code, err, "diverged at step 3", "--lr", "lower", "0.5")
    assert "checkpoint of step 2" in err
    assert load_checkpoint(out)["step"] == 2
    assert not (out / "softprompt.safetensors").exists()
    assert not list(out.glob("*.zip"))


def test_a_nan_loss_before_training_writes_nothing(tiny_llama, corpus, tmp_path, monkeypatch):
    def nan_init(model, tokenizer, init, n_tokens, *args, **kwargs):
        return torch.full((n_tokens, model.get_input_embeddings().embedding_dim), float("nan"))

    monkeypatch.setattr(train_module, "init_tensor", nan_init)
    with pytest.raises(RunError, match="not finite on the first batch.*--dtype float32"):
        train(
            dataset=str(corpus),
            output=str(tmp_path / "out"),
            model=tiny_llama,
            max_steps=3,
            **TINY_OPTIONS,
        )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_a_changed_model(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--dataset", corpus, "--output", out, *TINY]
    assert run(capsys, *args, "--model", tiny_models["llama"], "--max-steps", 1)[0] == 0
    before = load_checkpoint(out)["soft_prompt"]
    other = tiny_models["mistral"]  # same width, so only the model's identity differs
    code, _, err = run(capsys, *args, "--model", other, "--max-steps", 2, "--resume")
    assert_one_line_error(code, err, "--resume", "trained on", "--model", "--force")
    assert str(tiny_models["llama"].resolve()) in err
    assert torch.equal(load_checkpoint(out)["soft_prompt"], before)  # nothing touched
    code, _, err = run(capsys, *args, "--model", other, "--max-steps", 2, "--resume", "--force")
    assert code == 0, err
    assert load_checkpoint(out)["step"] == 2
