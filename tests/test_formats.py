"""Soft prompt file formats: round trips, files made the way each original tool makes them,
and the safety rules (no code from a file ever runs, zip entries and sizes are checked)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from softprompt import SoftPrompt
from softprompt.errors import FormatError, ModelError
from softprompt.formats import FORMATS, detect, kobold, load_any, mkultra, save
from softprompt.formats import peft as peft_format


def rand_prompt(n=5, d=16, seed=0, **meta) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt(torch.randn(n, d, generator=g), {"name": "test prompt", **meta})


def kobold_zip(path, arr: np.ndarray, meta: dict | None = None, extra: dict | None = None):
    """A KoboldAI zip as mtj-softtuner writes it: LZMA tensor.npy, stored meta.json."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tensor.npy", buf.getvalue(), compress_type=zipfile.ZIP_LZMA)
        z.writestr(
            "meta.json", json.dumps(meta or {"name": "x", "description": "", "supported": []})
        )
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor as old mtj files stored bfloat16: raw 2-byte void (V2)."""
    return t.to(torch.bfloat16).view(torch.int16).numpy().view("V2")


class Evil:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class EvilSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ----------------------------------------------------------------------------- KoboldAI zip


def test_kobold_round_trip_keeps_meta(tmp_path):
    sp = rand_prompt(
        author="me", supported=["SmolLM2-135M-Instruct"], description="d", steps=7, extra={"a": [1]}
    )
    path = save(sp, tmp_path / "p.zip")
    back = load_any(path)
    assert back.meta["format"] == "kobold" and back.meta["file_dtype"] == "float32"
    assert torch.equal(back.tensor, sp.tensor)
    for k in ("name", "author", "supported", "description", "steps", "extra"):
        assert back.meta[k] == sp.meta[k]
    # the loader's own notes about the file are not written back
    save(back, tmp_path / "again.zip")
    with zipfile.ZipFile(tmp_path / "again.zip") as z:
        meta = json.loads(z.read("meta.json"))
    assert "format" not in meta and "file_dtype" not in meta and meta["steps"] == 7


def test_kobold_float16_on_request(tmp_path):
    sp = rand_prompt()
    save(sp, tmp_path / "h.zip", dtype="float16")
    with zipfile.ZipFile(tmp_path / "h.zip") as z:
        assert np.load(io.BytesIO(z.read("tensor.npy"))).dtype == np.float16
    back = load_any(tmp_path / "h.zip")
    assert back.meta["file_dtype"] == "float16" and back.tensor.dtype == torch.float32
    torch.testing.assert_close(back.tensor, sp.tensor.half().float())


def test_kobold_reads_old_bfloat16_v2(tmp_path):
    t = torch.randn(4, 8)
    kobold_zip(tmp_path / "old.zip", bf16_bits(t))
    back = load_any(tmp_path / "old.zip")
    assert back.meta["file_dtype"] == "bfloat16"
    assert torch.equal(back.tensor, t.to(torch.bfloat16).float())


@pytest.mark.parametrize("name", ["../evil.npy", "/abs/evil", "a/../../b", "C:/windows/x"])
def test_zip_with_unsafe_entry_is_refused(tmp_path, name):
    path = kobold_zip(tmp_path / "bad.zip", np.zeros((2, 4), np.float32), extra={name: b"x"})
    with pytest.raises(FormatError, match="unsafe path"):
        load_any(path)


def test_zip_bomb_is_refused_before_reading(tmp_path, monkeypatch):
    # limits lowered so the test stays small; the sizes come from the zip's directory
    monkeypatch.setattr(kobold, "MAX_TENSOR_BYTES", 1000)
    path = kobold_zip(
        tmp_path / "big.zip", np.zeros((100, 100), np.float32)
    )  # 40 KB unpacked, tiny packed
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile,
        "open",
        lambda self, n, *a, **k: opened.append(n) or real_open(self, n, *a, **k),
    )
    with pytest.raises(FormatError, match=r"big\.zip.*(unpack|bytes)"):
        load_any(path)
    assert opened == []  # refused from the directory, before any data was decompressed

    monkeypatch.setattr(kobold, "MAX_OTHER_BYTES", 1000)
    path = kobold_zip(
        tmp_path / "junk.zip", np.zeros((2, 4), np.float32), extra={"junk.bin": b"\0" * 2_000_000}
    )
    with pytest.raises(FormatError, match="unpacks to"):
        load_any(path)


def test_kobold_reads_only_the_expected_entries(tmp_path, monkeypatch):
    path = kobold_zip(
        tmp_path / "p.zip",
        np.ones((2, 4), np.float32),
        extra={"evil.pkl": pickle.dumps(Evil(tmp_path / "m")), "readme.txt": b"hi"},
    )
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *a, **k):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    assert load_any(path).n_tokens == 2
    assert set(opened) <= {"tensor.npy", "meta.json"}


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.array([[1.0, np.nan]], np.float32), "NaN or infinite"),
        (np.array([[1.0, np.inf]], np.float32), "NaN or infinite"),
        (np.zeros((1, 2, 3), np.float32), "2-D"),
        (np.zeros((3,), np.float32), "2-D"),
        (np.zeros((2, 3), np.int32), "dtype int32"),
        (np.zeros((0, 3), np.float32), "empty"),
    ],
)
def test_kobold_bad_tensors_are_clear_errors(tmp_path, arr, match):
    path = kobold_zip(tmp_path / "bad.zip", arr)
    with pytest.raises(FormatError, match=match) as e:
        load_any(path)
    assert "bad.zip" in str(e.value)


def test_kobold_never_unpickles_an_object_npy(tmp_path):
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array([Evil(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "obj.zip", "w") as z:
        z.writestr("tensor.npy", buf.getvalue())
    with pytest.raises(FormatError, match="tensor.npy has dtype object"):
        load_any(tmp_path / "obj.zip")
    assert not marker.exists()


def test_npy_header_promising_more_data_than_present(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), np.float32))
    data = buf.getvalue().replace(b"(4, 4)", b"(4000000, 4000)")  # ~64 GB claimed
    with zipfile.ZipFile(tmp_path / "lie.zip", "w") as z:
        z.writestr("tensor.npy", data)
    with pytest.raises(FormatError, match="promises"):
        load_any(tmp_path / "lie.zip")


def test_kobold_token_limit(tmp_path, caplog):
    big = SoftPrompt(torch.zeros(2048, 4))
    with pytest.raises(FormatError, match="at most 2047"):
        save(big, tmp_path / "big.zip")
    # a file made elsewhere still loads, with a warning: softprompt itself can use it
    kobold_zip(tmp_path / "made.zip", np.zeros((2048, 4), np.float32))
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        assert load_any(tmp_path / "made.zip").n_tokens == 2048
    assert "at most 2047" in caplog.text
    # float16 overflow would write inf: refused
    with pytest.raises(FormatError, match="infinite"):
        save(SoftPrompt(torch.full((2, 4), 1e6)), tmp_path / "h.zip", dtype="float16")


def test_truncated_and_unknown_files(tmp_path):
    good = save(rand_prompt(), tmp_path / "good.zip")
    data = good.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.zip.*(KoboldAI|truncated)"):
        load_any(tmp_path / "cut.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match=r"notes\.txt is not a soft prompt file.*\.zip"):
        load_any(tmp_path / "notes.txt")
    with pytest.raises(FormatError, match="does not exist"):
        load_any(tmp_path / "missing.zip")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(FormatError, match="empty.safetensors"):
        load_any(tmp_path / "empty.safetensors")
    (tmp_path / "cut.json").write_text('{"metadata": {}, "tensor": "gASV')
    with pytest.raises(FormatError, match="cut.json"):
        load_any(tmp_path / "cut.json")


def test_format_is_detected_from_content_not_extension(tmp_path):
    save(rand_prompt(), tmp_path / "a.zip")
    os.rename(tmp_path / "a.zip", tmp_path / "a.bin")
    assert detect(tmp_path / "a.bin") == "kobold"
    save(rand_prompt(), tmp_path / "b.safetensors")
    os.rename(tmp_path / "b.safetensors", tmp_path / "b.dat")
    assert detect(tmp_path / "b.dat") == "safetensors"
    np.savez_compressed(tmp_path / "c.npz", tensor=np.zeros((2, 3), np.float32), step=np.uint32(3))
    assert (
        detect(tmp_path / "c.npz") == "mtjsp"
    )  # an NPZ holds tensor.npy too, but it is no KoboldAI zip


# ----------------------------------------------------------------------------- native .safetensors


def test_native_round_trip(tmp_path):
    sp = rand_prompt(model="m", steps=3, val_loss=1.25, supported=["m"])
    back = load_any(save(sp, tmp_path / "p.safetensors"))
    assert torch.equal(back.tensor, sp.tensor)
    assert (
        back.meta["steps"] == 3
        and back.meta["val_loss"] == 1.25
        and back.meta["format"] == "safetensors"
    )


# ----------------------------------------------------------------------------- PEFT adapter


def test_peft_round_trip_and_config(tmp_path):
    sp = rand_prompt(supported=["SmolLM2-135M-Instruct"], steps=4)
    out = save(sp, tmp_path / "adapter")  # no extension: a PEFT folder
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["num_virtual_tokens"], cfg["token_dim"]) == (5, 16)
    assert cfg["prompt_tuning_init"] == "RANDOM" and cfg["num_transformer_submodules"] == 1
    assert cfg["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.metadata()["format"] == "pt"
        assert f.get_tensor("prompt_embeddings").dtype == torch.float32
    back = load_any(out)
    assert back.meta["format"] == "peft" and back.meta["steps"] == 4 and back.name == "test prompt"
    assert torch.equal(back.tensor, sp.tensor)
    # writing again replaces the adapter as a whole; no temporary folders are left
    save(rand_prompt(n=3, seed=1), out, "peft")
    assert load_any(out).n_tokens == 3
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_peft_refuses_to_overwrite_other_things(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FormatError, match="other files"):
        save(rand_prompt(), tmp_path / "mine", "peft")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FormatError, match="is a file"):
        save(rand_prompt(), tmp_path / "afile", "peft")


def test_peft_rejects_other_adapter_types(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FormatError, match="LORA adapter"):
        load_any(tmp_path / "lora")


def _peft_model(base, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt350", "gemma"])
def test_peft_loads_the_export_and_gives_softprompts_logits(tiny_models, tmp_path, arch):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from softprompt.soft_prompt import block_logits, prepend

    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    d = base.get_input_embeddings().embedding_dim
    sp = rand_prompt(n=4, d=d, seed=3)
    save(sp, tmp_path / "adapter", "peft")
    block = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        ours = block_logits(base, sp.tensor, block)  # (B, T, V): predictions of every block token
        ours_full = base(
            inputs_embeds=prepend(base, sp.tensor, block[:, :-1])
        ).logits  # (B, n + T - 1, V)
        pm = _peft_model(base, tmp_path / "adapter")
        theirs = pm(input_ids=block[:, :-1]).logits  # PEFT puts the prompt in front itself
    assert theirs.shape == ours_full.shape
    torch.testing.assert_close(theirs, ours_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs[:, -block.shape[1] :], ours, rtol=1e-5, atol=1e-5)


def test_reads_an_adapter_saved_by_peft(tiny_models, tmp_path):
    pytest.importorskip("peft")
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32)
    pm = get_peft_model(
        base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6)
    )
    pm.save_pretrained(tmp_path / "theirs")
    weights = pm.get_prompt_embedding_to_save("default")
    sp = load_any(tmp_path / "theirs")
    assert sp.meta["format"] == "peft" and sp.tensor.shape == (6, 32)
    torch.testing.assert_close(sp.tensor, weights.float())


# ----------------------------------------------------------------------------- .mtjsp


def test_mtjsp_npz_reads_tensor_and_step_without_unpickling_opt_state(tmp_path):
    marker = tmp_path / "opt_state_was_unpickled"
    t = torch.randn(6, 8)
    # as mtj-softtuner writes it: np.savez_compressed with an object-array (pickled) opt_state
    opt_state = np.empty(1, dtype=object)
    opt_state[0] = Evil(marker)
    with open(tmp_path / "ckpt.mtjsp", "wb") as fh:
        np.savez_compressed(
            fh,
            tensor=t.numpy(),
            opt_state=opt_state,
            step=np.uint32(150),
            loss=np.float32(2.5),
            last_loss=np.float32(2.4),
            grad_norm=np.float32(0.7),
            grad_norm_micro=np.float32(0.1),
        )
    sp = load_any(tmp_path / "ckpt.mtjsp")
    assert not marker.exists()
    assert sp.meta["format"] == "mtjsp" and sp.meta["step"] == 150 and sp.meta["loss"] == 2.5
    assert sp.name == "ckpt"
    assert torch.equal(sp.tensor, t)
    # the control: loading the way mtj-softtuner does (allow_pickle=True) runs the payload
    np.load(tmp_path / "ckpt.mtjsp", allow_pickle=True)["opt_state"]
    assert marker.exists()


def test_mtjsp_npz_old_bfloat16(tmp_path):
    t = torch.randn(3, 8)
    with open(tmp_path / "old.mtjsp", "wb") as fh:
        np.savez_compressed(fh, tensor=bf16_bits(t), step=np.uint32(50))
    sp = load_any(tmp_path / "old.mtjsp")
    assert sp.meta["file_dtype"] == "bfloat16" and torch.equal(
        sp.tensor, t.to(torch.bfloat16).float()
    )


@pytest.mark.parametrize("zip_format", [True, False])
def test_mtjsp_torch_variant(tmp_path, zip_format):
    # as KoboldAI's PyTorch tuner writes it: a torch.save dict (zip, or torch's older format)
    soft = torch.nn.Parameter(torch.randn(5, 8))
    opt = torch.optim.AdamW([soft])
    soft.sum().backward()
    opt.step()
    torch.save(
        {
            "tensor": soft.detach().half(),
            "opt_state": opt.state_dict(),
            "step": 12,
            "loss": 3.25,
            "grad_norm": torch.tensor(0.5),
        },
        tmp_path / "pt.mtjsp",
        _use_new_zipfile_serialization=zip_format,
    )
    sp = load_any(tmp_path / "pt.mtjsp")
    assert (
        sp.meta["variant"] == "torch.save dict"
        and sp.meta["step"] == 12
        and sp.meta["grad_norm"] == 0.5
    )
    assert sp.meta["file_dtype"] == "float16"
    torch.testing.assert_close(sp.tensor, soft.detach().half().float())


def test_mtjsp_torch_variant_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save(
        {"tensor": torch.zeros(2, 4), "opt_state": Evil(marker), "step": 1}, tmp_path / "evil.mtjsp"
    )
    with pytest.raises(
        FormatError, match=r"evil\.mtjsp.*holds code \(exec\), which softprompt never runs"
    ):
        load_any(tmp_path / "evil.mtjsp")
    assert not marker.exists()


# ----------------------------------------------------------------------------- mkultra .json


def mkultra_file(path, tensor, **metadata):
    """As mkultra writes it: base64(pickle.dumps(tensor, protocol=4)) in JSON."""
    meta = {"name": "mk", "uuid": "1234", "description": "from mkultra", "epoch": 3, **metadata}
    raw = pickle.dumps(tensor, protocol=4)
    path.write_text(json.dumps({"metadata": meta, "tensor": base64.b64encode(raw).decode("ascii")}))
    return raw


@pytest.mark.parametrize("shape, dtype", [((4, 8), torch.float32), ((1, 4, 8), torch.float16)])
def test_mkultra_reads_2d_and_batched(tmp_path, shape, dtype):
    t = torch.randn(*shape).to(dtype)
    mkultra_file(tmp_path / "mk.json", t, step=10, loss=1.5)
    sp = load_any(tmp_path / "mk.json")
    assert sp.meta["format"] == "mkultra" and sp.meta["epoch"] == 3 and sp.meta["step"] == 10
    assert sp.tensor.shape == (4, 8)
    torch.testing.assert_close(sp.tensor, t.reshape(4, 8).float())


def test_mkultra_parameter_and_cuda_pickle_load_on_cpu(tmp_path, monkeypatch):
    import torch.serialization

    t = torch.randn(3, 8)
    # A tensor pickled on a GPU machine names its storage location "cuda:0"; fake that here.
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        raw = mkultra_file(tmp_path / "gpu.json", torch.nn.Parameter(t.clone()))
    assert b"cuda:0" in raw
    sp = load_any(tmp_path / "gpu.json")
    assert sp.tensor.device.type == "cpu"
    assert torch.equal(sp.tensor, t)


@pytest.mark.parametrize("payload", [Evil, EvilSystem])
def test_mkultra_pickle_with_code_is_refused_and_does_not_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    raw = pickle.dumps(payload(marker), protocol=4)
    (tmp_path / "evil.json").write_text(
        json.dumps({"metadata": {"name": "x"}, "tensor": base64.b64encode(raw).decode()})
    )
    with pytest.raises(FormatError, match=r"evil\.json.*refusing.*(exec|system)"):
        load_any(tmp_path / "evil.json")
    assert not marker.exists()
    if payload is Evil:  # the control: a plain unpickler runs it
        pickle.loads(raw)
        assert marker.exists()


def test_mkultra_code_hidden_in_the_storage_bytes_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = io.BytesIO()
    torch.save(Evil(marker), blob, _use_new_zipfile_serialization=False)

    class FakeStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (blob.getvalue(),))

    raw = pickle.dumps(FakeStorage(), protocol=4)
    (tmp_path / "hidden.json").write_text(
        json.dumps({"metadata": {}, "tensor": base64.b64encode(raw).decode()})
    )
    with pytest.raises(FormatError, match=r"hidden\.json.*refusing"):
        load_any(tmp_path / "hidden.json")
    assert not marker.exists()


def test_mkultra_non_tensor_and_garbage(tmp_path):
    (tmp_path / "list.json").write_text(
        json.dumps({"metadata": {}, "tensor": base64.b64encode(pickle.dumps([1, 2])).decode()})
    )
    with pytest.raises(FormatError, match="not a tensor"):
        load_any(tmp_path / "list.json")
    (tmp_path / "b64.json").write_text(json.dumps({"metadata": {}, "tensor": "!!!not base64"}))
    with pytest.raises(FormatError, match="base64"):
        load_any(tmp_path / "b64.json")
    raw = pickle.dumps(torch.randn(2, 3), protocol=4)
    (tmp_path / "cut.json").write_text(
        json.dumps({"metadata": {}, "tensor": base64.b64encode(raw[:200]).decode()})
    )
    with pytest.raises(FormatError, match=r"cut\.json"):
        load_any(tmp_path / "cut.json")


def test_mkultra_restricted_unpickler_allows_only_tensor_rebuilding():
    assert set(mkultra.ALLOWED) == {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "_load_from_bytes"),
        ("collections", "OrderedDict"),
    }
    # the real torch.storage._load_from_bytes (torch.load without weights_only) is never used
    assert mkultra.ALLOWED[("torch.storage", "_load_from_bytes")] is mkultra._load_storage


# ----------------------------------------------------------------------------- registry


def test_registry_shape():
    assert set(FORMATS) == {"kobold", "safetensors", "peft", "mtjsp", "mkultra"}
    assert {n for n, m in FORMATS.items() if hasattr(m, "save")} == {
        "kobold",
        "safetensors",
        "peft",
    }
    for m in FORMATS.values():
        assert callable(m.detect) and callable(m.load)
    with pytest.raises(FormatError, match="cannot write format 'mkultra'"):
        save(rand_prompt(), "x.json", "mkultra")
    with pytest.raises(FormatError, match="cannot tell the format"):
        save(rand_prompt(), "x.txt")
    assert peft_format.NAME == "peft"


def test_every_format_module_is_a_format(tmp_path):
    """Each module of the registry has what softprompt.formats.Format declares (and mypy
    checks the types: FORMATS is a dict[str, Format]); WRITABLE says whether it has save,
    FOLDER whether it is a folder (then it has no extension); the helpers read them."""
    from softprompt.formats import Format, WritableFormat, listed, writable, writer

    for name, m in FORMATS.items():
        assert isinstance(m, Format), name
        assert m.NAME == name and m.WHAT and isinstance(m.EXTENSIONS, tuple)
        assert m.WRITABLE is hasattr(m, "save") is isinstance(m, WritableFormat), name
        assert m.FOLDER is (m.EXTENSIONS == ()), name
        assert all(e.startswith(".") and e == e.lower() for e in m.EXTENSIONS), name
    assert writable() == ("kobold", "peft", "safetensors")
    assert writer("peft") is peft_format
    with pytest.raises(FormatError, match="use one of kobold, peft, safetensors"):
        writer("mtjsp")
    save(rand_prompt(), tmp_path / "a.zip")
    save(rand_prompt(), tmp_path / "adapter")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    assert {p.name for p in tmp_path.iterdir() if listed(p)} == {"a.zip", "adapter"}


def test_init_from_width_mismatch_is_a_model_error(tiny_llama, tmp_path):
    from softprompt.train import load_init_from

    save(rand_prompt(d=tiny_llama.embed_dim + 1), tmp_path / "wide.zip")
    with pytest.raises(ModelError, match="wide.zip has width 33"):
        load_init_from(str(tmp_path / "wide.zip"), tiny_llama)
