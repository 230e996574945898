"""Data-parallel and sharded training with torchrun: 2 CPU processes on gloo against 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, assert_one_line_error, run_cli

from softprompt.formats import native

HERE = Path(__file__).resolve().parent


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=HERE.parent,
    )


def common(tiny_models, corpus) -> list[str]:
    return [
        "--dataset", corpus, "--model", tiny_models["llama"], "--device", "cpu",
        "--dtype", "float32", "--tokens", 4, "--block-size", 32, "--max-steps", 4,
        "--lr", 0.05, "--seed", 5, "--eval-every", 2, "--no-progress", "--no-report",
    ]  # fmt: skip


def soft(folder: Path) -> torch.Tensor:
    return native.load(folder / "softprompt.safetensors").tensor


def losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """One process with a batch of 4: the run the distributed ones must reproduce."""
    corpus = tmp_path_factory.mktemp("data")

    for p in sorted(EXAMPLES.glob("*.txt"))[:3]:
        (corpus / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path_factory.mktemp("ref") / "one"
    r = subprocess.run(
        [sys.executable, "-m", "softprompt", "train", "--output", out, "--batch-size", "4"]
        + [str(a) for a in common(tiny_models, corpus)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return corpus, out


def test_two_ranks_equal_one_rank_with_the_same_global_batch(tiny_models, reference, tmp_path):
    corpus, one = reference
    out = tmp_path / "two"
    r = torchrun("-m", "softprompt", "train", "--output", out, "--batch-size", 2,
                 *common(tiny_models, corpus))  # fmt: skip
    assert r.returncode == 0, r.stderr
    torch.testing.assert_close(soft(out), soft(one), rtol=1e-4, atol=1e-5)
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)
    # only rank 0 speaks and writes: one summary line, the usual files
    assert r.stderr.count("dataset: ") == 1 and r.stderr.count("step 4/4") == 1, r.stderr
    assert r.stdout.count("soft prompt: ") == 1, r.stdout
    assert "2 ranks x 2 x 1 blocks" in r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in one.iterdir() if not p.name.startswith(".")
    )


def test_a_two_rank_checkpoint_resumes_on_one_rank(tiny_models, reference, tmp_path):
    corpus, one = reference
    out = tmp_path / "run"
    options = {
        "dataset": str(corpus), "model": str(tiny_models["llama"]), "output": str(out),
        "device": "cpu", "dtype": "float32", "tokens": 4, "block_size": 32, "max_steps": 4,
        "lr": 0.05, "seed": 5, "eval_every": 2, "progress": False, "report": False,
        "batch_size": 2,
    }  # fmt: skip
    r = torchrun(HERE / "dist_worker.py", json.dumps(options), 2)  # stops after step 2
    assert r.returncode != 0, r.stderr
    for rank in (0, 1):  # every rank stopped after the same step
        assert f"rank {rank}: stopped at step 2 of 4; checkpoint saved" in r.stderr, r.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["step"], state["world_size"], state["samples_per_step"]) == (2, 2, 4)
    assert not (out / "softprompt.safetensors").exists()

    r = subprocess.run(
        [sys.executable, "-m", "softprompt", "train", "--output", out, "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "resuming a 2-rank run on 1 rank: per-rank batch 2, accumulation 2" in r.stderr
    torch.testing.assert_close(soft(out), soft(one), rtol=1e-4, atol=1e-5)
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)


def test_shard_model_with_fsdp_matches_the_unsharded_run(tiny_models, reference, tmp_path):
    corpus, one = reference
    out = tmp_path / "sharded"
    r = torchrun("-m", "softprompt", "train", "--output", out, "--batch-size", 2, "--shard-model",
                 *common(tiny_models, corpus))  # fmt: skip
    assert r.returncode == 0, r.stderr
    torch.testing.assert_close(soft(out), soft(one), rtol=1e-4, atol=1e-5)


def test_device_map_auto_places_the_model_and_trains_the_same(
    capsys, tiny_models, reference, tmp_path
):
    corpus, one = reference  # on a machine without GPUs, accelerate places it all on the CPU
    code, _, err = run_cli(capsys, "train", "--output", tmp_path / "o", "--device-map", "auto",
                           "--batch-size", 4, *common(tiny_models, corpus))  # fmt: skip
    assert code == 0, err
    torch.testing.assert_close(soft(tmp_path / "o"), soft(one), rtol=1e-4, atol=1e-5)


def test_shard_model_without_torchrun_is_a_clear_error(capsys, tiny_models, corpus, tmp_path):
    code, _, err = run_cli(capsys, "train", "--output", tmp_path / "o", "--shard-model",
                           *common(tiny_models, corpus))  # fmt: skip
    assert_one_line_error(code, err, "--shard-model", "torchrun --nproc-per-node")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
@pytest.mark.parametrize("flag", ["--load-in-8bit", "--load-in-4bit"])
def test_quantized_loading_without_cuda_is_a_clear_error(
    capsys, tiny_models, corpus, tmp_path, flag
):
    code, _, err = run_cli(capsys, "train", "--output", tmp_path / "o", flag,
                           *common(tiny_models, corpus))  # fmt: skip
    assert_one_line_error(code, err, flag, "CUDA")
    assert not (tmp_path / "o").exists()


def test_conflicting_scaling_options_are_refused(capsys, tiny_models, corpus, tmp_path):
    code, _, err = run_cli(capsys, "train", "--output", tmp_path / "o", "--shard-model",
                           "--device-map", "auto", "--load-in-4bit", "--load-in-8bit",
                           *common(tiny_models, corpus))  # fmt: skip
    assert_one_line_error(code, err, "exclude each other", "--device-map")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU and bitsandbytes (run on a GPU machine: pytest -m gpu)",
)
def test_four_bit_model_trains_on_cuda(capsys, tiny_models, corpus, tmp_path):
    pytest.importorskip("bitsandbytes", reason="pip install 'softprompt[quantize]'")
    args = common(tiny_models, corpus)
    args[args.index("--device") + 1], args[args.index("--dtype") + 1] = "cuda", "bfloat16"
    code, _, err = run_cli(capsys, "train", "--output", tmp_path / "o", "--load-in-4bit", *args)
    assert code == 0, err
    assert soft(tmp_path / "o").shape == (4, 32)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)"
)
def test_batch_size_auto_on_cuda_picks_the_largest_that_fits(capsys, tiny_models, corpus, tmp_path):
    from softprompt.config import read_toml

    args = common(tiny_models, corpus)
    args[args.index("--device") + 1] = "cuda"
    code, _, err = run_cli(
        capsys, "train", "--output", tmp_path / "o", "--batch-size", "auto", *args
    )
    assert code == 0, err
    assert "--batch-size auto:" in err and "the largest that fits" in err
    chosen = read_toml(tmp_path / "o" / "config.toml", decided=True)["batch_size"]
    assert chosen == 64  # a tiny model: the search's starting size fits at once


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs for nccl (run on a multi-GPU machine: pytest -m gpu)",
)
def test_two_gpu_ranks_on_nccl_equal_one_rank(tiny_models, reference, tmp_path):
    corpus, one = reference
    out = tmp_path / "two"
    args = common(tiny_models, corpus)
    args[args.index("--device") + 1] = "cuda"
    r = torchrun("-m", "softprompt", "train", "--output", out, "--batch-size", 2, *args)
    assert r.returncode == 0, r.stderr
    torch.testing.assert_close(soft(out), soft(one), rtol=1e-3, atol=1e-4)
