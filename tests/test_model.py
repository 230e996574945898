"""Model loading: device and dtype choice, paths, hub ids, and what is not a causal LM."""

from __future__ import annotations

import pytest
import torch

import softprompt.model as m
from softprompt.errors import ModelError


def test_device_choice(monkeypatch):
    assert m.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert m.pick_device("auto").type in ("cpu", "mps")
    with pytest.raises(ModelError, match="no CUDA GPU.*--device cpu"):
        m.pick_device("cuda")
    with pytest.raises(ModelError, match="not a device"):
        m.pick_device("potato")


def test_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(m, "cpu_has_fast_bf16", lambda: True)
    assert m.pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(m, "cpu_has_fast_bf16", lambda: False)
    assert m.pick_dtype("auto", cpu) == torch.float32
    assert m.pick_dtype("float16", cpu) == torch.float16
    with pytest.raises(ModelError, match="--dtype"):
        m.pick_dtype("int3", cpu)


def test_loads_in_the_asked_dtype_frozen(tiny_models):
    lm = m.load_model(str(tiny_models["qwen2"]), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training
    assert lm.name == "qwen2" and lm.context_length == 256


def test_path_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        m.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match="not a .gguf file"):
        m.load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        m.load_model(str(tmp_path / "folder"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ModelError, match="broken.gguf"):
        m.load_model(str(tmp_path / "broken.gguf"))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_id_without_network_is_a_clear_error(monkeypatch, how):
    """Offline (told, or the hub's host does not resolve), a hub id not in the cache is one
    line saying so at once, not after transformers' retries."""
    import huggingface_hub.constants

    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    assert not m.hub_reachable()
    with pytest.raises(ModelError) as err:
        m.load_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert msg.startswith("model no-such-org/no-such-model is not in this machine's Hugging Face")
    assert "cannot be reached" in msg and "\n" not in msg


def test_gguf_names():
    from pathlib import Path

    assert m._short_name("x", Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert m._short_name("x", Path("llama-7b.Q8_0.gguf")) == "llama-7b"
    assert m._short_name("gpt2", None) == "gpt2"
