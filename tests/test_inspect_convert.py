"""`softprompt convert`, `softprompt inspect` and `softprompt train --init-from`."""

from __future__ import annotations

import base64
import json
import pickle

import numpy as np
import pytest
import torch

from softprompt import SoftPrompt
from softprompt.cli import main
from softprompt.describe import describe_prompt
from softprompt.formats import load_any, save
from softprompt.soft_prompt import embed_ids


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("softprompt: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def prompt(n=4, d=16, seed=0) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt(
        torch.randn(n, d, generator=g), {"name": "orig", "author": "a", "supported": ["m"]}
    )


# ----------------------------------------------------------------------------- convert


def test_convert_through_every_writable_format(tmp_path, capsys):
    sp = prompt()
    save(sp, tmp_path / "a.zip")
    steps = [("a.zip", "b"), ("b", "c.safetensors"), ("c.safetensors", "d.zip")]
    for src, dst in steps:
        code, out, err = run(capsys, "convert", tmp_path / src, tmp_path / dst)
        assert code == 0, err
    assert (
        "peft:"
        in run(capsys, "convert", tmp_path / "d.zip", tmp_path / "e", "--name", "Renamed")[1]
    )
    for name, fmt in [
        ("b", "peft"),
        ("c.safetensors", "safetensors"),
        ("d.zip", "kobold"),
        ("e", "peft"),
    ]:
        back = load_any(tmp_path / name)
        assert back.meta["format"] == fmt
        assert torch.equal(back.tensor, sp.tensor), name
        assert back.meta["author"] == "a" and back.meta["supported"] == ["m"]
    assert load_any(tmp_path / "d.zip").name == "orig"
    assert load_any(tmp_path / "e").name == "Renamed"


def test_convert_read_only_formats(tmp_path, capsys):
    t = torch.randn(3, 16)
    with open(tmp_path / "ck.mtjsp", "wb") as fh:
        np.savez_compressed(
            fh, tensor=t.numpy(), step=np.uint32(9), opt_state=np.array([None], dtype=object)
        )
    raw = pickle.dumps(t.clone(), protocol=4)
    (tmp_path / "mk.json").write_text(
        json.dumps(
            {"metadata": {"name": "mk", "epoch": 1}, "tensor": base64.b64encode(raw).decode()}
        )
    )
    assert run(capsys, "convert", tmp_path / "ck.mtjsp", tmp_path / "ck.zip", "--fp16")[0] == 0
    assert (
        run(
            capsys,
            "convert",
            tmp_path / "mk.json",
            tmp_path / "mk_adapter",
            "--to",
            "peft",
            "--base-model",
            "HuggingFaceTB/SmolLM2-135M",
        )[0]
        == 0
    )
    ck = load_any(tmp_path / "ck.zip")
    assert ck.meta["file_dtype"] == "float16" and ck.meta["step"] == 9 and ck.name == "ck"
    torch.testing.assert_close(ck.tensor, t.half().float())
    mk = load_any(tmp_path / "mk_adapter")
    assert torch.equal(mk.tensor, t) and mk.name == "mk"
    cfg = json.loads((tmp_path / "mk_adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"


def test_convert_errors_are_one_line(tmp_path, capsys):
    save(prompt(), tmp_path / "a.zip")
    one_line_error(
        *run(capsys, "convert", tmp_path / "nope.zip", tmp_path / "b.zip")[::2],
        "nope.zip",
        "does not exist",
    )
    one_line_error(
        *run(capsys, "convert", tmp_path / "a.zip", tmp_path / "b.json")[::2],
        "cannot tell the format",
    )
    one_line_error(
        *run(capsys, "convert", tmp_path / "a.zip", tmp_path / "b.zip", "--to", "mkultra")[::2],
        "invalid choice",
    )
    one_line_error(
        *run(capsys, "convert", tmp_path / "a.zip", tmp_path / "b.safetensors", "--fp16")[::2],
        "--fp16",
    )
    big = SoftPrompt(torch.zeros(2100, 8))
    save(big, tmp_path / "big.safetensors")
    one_line_error(
        *run(capsys, "convert", tmp_path / "big.safetensors", tmp_path / "big.zip")[::2],
        "at most 2047",
    )
    assert not (tmp_path / "big.zip").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- inspect


def test_inspect_without_a_model(tmp_path, capsys):
    sp = prompt(n=12)
    save(sp, tmp_path / "p.zip", dtype="float16")
    code, out, err = run(capsys, "inspect", tmp_path / "p.zip")
    assert code == 0, err
    assert "format:  kobold" in out and "name:    orig" in out and "author: a" in out
    assert "12 tokens x 16 (float16 in the file)" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "p.zip", "--json")
    info = json.loads(out)
    assert (
        info["format"] == "kobold"
        and info["n_tokens"] == 12
        and info["dim"] == 16
        and info["dtype"] == "float16"
    )
    expected = sp.tensor.half().float().norm(dim=1)
    np.testing.assert_allclose(info["norms"], expected.numpy(), atol=1e-3)
    assert "model" not in info and "format" not in info["meta"]


def test_inspect_with_a_model_finds_the_tokens_a_prompt_was_made_of(
    tiny_models, tiny_llama, tmp_path, capsys
):
    ids = [57, 101, 230]
    vectors = embed_ids(tiny_llama.model, torch.tensor(ids))
    save(
        SoftPrompt(vectors + 0.001 * torch.randn_like(vectors), {"name": "words"}),
        tmp_path / "w.safetensors",
    )
    code, out, err = run(
        capsys,
        "inspect",
        tmp_path / "w.safetensors",
        "--model",
        tiny_models["llama"],
        "--json",
        "--top-k",
        3,
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["model"]["fits"] and info["model"]["embed_dim"] == 32
    assert [row[0]["id"] for row in info["nearest"]] == ids
    assert all(row[0]["cosine"] > 0.99 and len(row) == 3 for row in info["nearest"])
    assert info["nearest"][0][0]["token"] == tiny_llama.tokenizer.decode([57])
    code, out, err = run(
        capsys, "inspect", tmp_path / "w.safetensors", "--model", tiny_models["llama"]
    )
    assert code == 0 and "fits yes" in out and "nearest vocabulary tokens" in out


def test_inspect_reports_a_width_that_does_not_fit(tiny_models, tmp_path, capsys):
    save(prompt(d=32), tmp_path / "p.zip")
    code, out, err = run(capsys, "inspect", tmp_path / "p.zip", "--model", tiny_models["opt350"])
    assert code == 0, err
    assert "fits NO" in out and "warning: width 32 does not match" in out and "16 wide" in out


def test_inspect_uses_the_embedding_output_space(tiny_models):
    """Gemma scales its embeddings by sqrt(d) inside the module: the table compared with is
    what the module outputs, so a soft token equal to a scaled token vector matches itself."""
    from softprompt import load_model

    lm = load_model(str(tiny_models["gemma"]), device="cpu", dtype="float32")
    vec = embed_ids(lm.model, torch.tensor([42]))
    info = describe_prompt(SoftPrompt(vec, {"name": "g"}), lm, top_k=1)
    assert info["nearest"][0][0]["id"] == 42
    assert abs(info["norms"][0] - float(vec.norm())) < 1e-3


def test_inspect_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    one_line_error(
        *run(capsys, "inspect", tmp_path / "x.txt")[::2], "x.txt", "not a soft prompt file", ".zip"
    )
    one_line_error(*run(capsys, "inspect", tmp_path / "x.txt", "--top-k", "0")[::2], "--top-k")


# ----------------------------------------------------------------------------- train --init-from


def test_train_init_from_any_format_warm_starts(tiny_models, tiny_llama, corpus, tmp_path, capsys):
    from softprompt import train

    start = SoftPrompt(torch.randn(7, tiny_llama.embed_dim) * 0.05, {"name": "start"})
    save(start, tmp_path / "start", "peft")
    result = train(
        dataset=str(corpus),
        output=str(tmp_path / "o"),
        model=tiny_llama,
        init_from=str(tmp_path / "start"),
        block_size=32,
        batch_size=2,
        max_steps=1,
        eval_every=0,
        progress=False,
        lr=1e-9,
    )
    assert result.soft_prompt.n_tokens == 7
    torch.testing.assert_close(result.soft_prompt.tensor, start.tensor, atol=1e-6, rtol=0)
    assert (
        result.soft_prompt.meta["init"] == "file"
        and result.soft_prompt.meta["init_from"] == "start"
    )
    # the flag exists on the command line, and a mismatch of --tokens is named
    code, out, err = run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        tmp_path / "o2",
        "--model",
        tiny_models["llama"],
        "--init-from",
        tmp_path / "start",
        "--tokens",
        3,
        "--max-steps",
        1,
        "--block-size",
        32,
        "--no-progress",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )
    assert code == 2 and "--tokens 3 does not match the 7 tokens of --init-from" in err


def test_train_init_from_a_prompt_for_another_model(tiny_models, corpus, tmp_path, capsys):
    save(prompt(d=16), tmp_path / "narrow.zip")
    code, out, err = run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        tmp_path / "o",
        "--model",
        tiny_models["llama"],
        "--init-from",
        tmp_path / "narrow.zip",
        "--max-steps",
        1,
        "--block-size",
        32,
        "--no-progress",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )
    assert code == 2
    assert "--init-from" in err and "narrow.zip has width 16" in err and "32 wide" in err


@pytest.mark.parametrize("fmt", ["kobold", "safetensors"])
def test_train_init_from_cli_runs(tiny_models, corpus, tmp_path, capsys, fmt):
    path = tmp_path / ("s.zip" if fmt == "kobold" else "s.safetensors")
    save(prompt(n=3, d=32), path)
    code, out, err = run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        tmp_path / "o",
        "--model",
        tiny_models["llama"],
        "--init-from",
        path,
        "--max-steps",
        1,
        "--block-size",
        32,
        "--batch-size",
        2,
        "--no-progress",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )
    assert code == 0, err
    assert load_any(next((tmp_path / "o").glob("*.zip"))).n_tokens == 3
