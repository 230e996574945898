"""A run killed with SIGKILL at a random step resumes to the same soft prompt, bit for bit,
as a run that was never interrupted; SIGTERM saves a checkpoint before exiting."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from softprompt import SoftPrompt, load_model, train

STEPS = 60


def cli_args(corpus, out, model):
    return [
        sys.executable,
        "-m",
        "softprompt",
        "train",
        "--dataset",
        str(corpus),
        "--output",
        str(out),
        "--model",
        str(model),
        "--max-steps",
        str(STEPS),
        "--save-every",
        "1",
        "--eval-every",
        "10",
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-progress",
        # compiled and plain steps round differently: a run left to decide --compile by its
        # step time could decide otherwise on a loaded machine than the run it is compared to
        "--no-compile",
    ]


def steps_logged(out) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"loss"' in line)


def run_until(args, out, step: int, sig: int, env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while steps_logged(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_kill_9_at_a_random_step_then_resume_is_bit_exact(tiny_models, corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    model_dir = tiny_models["gpt_neox"]
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    full = train(
        dataset=str(corpus),
        output=str(tmp_path / "full"),
        model=lm,
        max_steps=STEPS,
        save_every=1,
        eval_every=10,
        block_size=32,
        batch_size=2,
        grad_accum=2,
        lr=0.05,
        progress=False,
        compile=False,
    )

    out = tmp_path / "killed"
    kill_at = random.Random().randint(2, STEPS - 10)
    killed = run_until(cli_args(corpus, out, model_dir), out, kill_at, signal.SIGKILL, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "softprompt.safetensors").exists()  # no finished-looking output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["step"] < STEPS

    resumed = subprocess.run(
        cli_args(corpus, out, model_dir) + ["--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    got = SoftPrompt.load(out / "softprompt.safetensors").tensor
    assert torch.equal(got, full.soft_prompt.tensor), (
        f"killed at step {kill_at}, checkpoint {ckpt['step']}"
    )
    steps = [
        json.loads(x)["step"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_models, corpus, tmp_path):
    out = tmp_path / "term"
    args = cli_args(corpus, out, tiny_models["llama"])
    args[args.index("--save-every") + 1] = "1000"  # only the signal makes it save before the end
    done = run_until(args, out, 3, signal.SIGTERM, dict(os.environ))
    assert done.returncode == 130, done.stderr
    assert "checkpoint saved" in done.stderr and "--resume" in done.stderr
    assert "Traceback" not in done.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 3 <= ckpt["step"] < STEPS
