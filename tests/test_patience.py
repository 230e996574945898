"""--patience: early stopping on the validation loss, keeping the best soft prompt, with
exact resume of an interrupted run and of a stopped one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EXAMPLES, stop_after

from softprompt import train
from softprompt.checkpoint import TrainState
from softprompt.config import TrainConfig
from softprompt.errors import ConfigError, RunError
from softprompt.soft_prompt import init_tensor

RUN = dict(
    block_size=32,
    batch_size=2,
    max_steps=8,
    eval_every=1,
    save_every=4,
    val_fraction=0.3,
    progress=False,
    report=False,
    lr=0.3,
    warmup=0.0,
    patience=3,
    init="vocab",
)


@pytest.fixture
def drifting(tmp_path):
    """Training text (a repeated sentence) unlike the held-out text (the tail of a chapter,
    last in the seeded file order): the tiny model's validation loss only gets worse."""
    folder = tmp_path / "drifting"
    folder.mkdir()
    (folder / "a.txt").write_text("My dear Mr. Bennet, said his lady. " * 300, encoding="utf-8")
    shutil.copy(EXAMPLES / "chapter_01.txt", folder / "b.txt")
    return folder


def validations(folder) -> list[tuple[int, float]]:
    lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["val_loss"]) for r in map(json.loads, lines) if "val_loss" in r]


def test_patience_stops_early_and_keeps_the_best_soft_prompt(tiny_llama, drifting, tmp_path):
    out = tmp_path / "o"
    r = train(dataset=str(drifting), output=str(out), model=tiny_llama, **RUN)
    vals = validations(out)
    # step 0 was the best; steps 1 to 3 did not beat it: stopped after step 3 of 8
    assert [s for s, _ in vals] == [0, 1, 2, 3]
    assert all(loss > vals[0][1] for _, loss in vals[1:])
    assert r.steps == 3 and r.soft_prompt.meta["best_step"] == 0
    assert r.val_loss_after == vals[0][1] == r.soft_prompt.meta["val_loss"]
    start = init_tensor(tiny_llama.model, tiny_llama.tokenizer, "vocab", 20, seed=1729)
    assert torch.equal(r.soft_prompt.tensor, start)  # the best one, not the last
    assert (out / "softprompt.safetensors").exists()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["bad_validations"] == 3
    assert not torch.equal(checkpoint["soft_prompt"], start)  # the state where it stopped


def test_an_interrupted_run_with_patience_resumes_exactly(
    tiny_llama, drifting, tmp_path, monkeypatch
):
    from softprompt.train import Interrupted

    common = dict(dataset=str(drifting), model=tiny_llama, **RUN)
    full = train(output=str(tmp_path / "full"), **common)
    with monkeypatch.context() as m:
        stop_after(m.setattr, 2)
        with pytest.raises(Interrupted, match="stopped at step 2 of 8"):
            train(output=str(tmp_path / "part"), **common)
    resumed = train(output=str(tmp_path / "part"), resume=True, **common)
    assert resumed.steps == full.steps == 3
    assert torch.equal(resumed.soft_prompt.tensor, full.soft_prompt.tensor)
    assert validations(tmp_path / "part") == validations(tmp_path / "full")
    full_ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part_ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert torch.equal(full_ck["soft_prompt"], part_ck["soft_prompt"])


def test_a_stopped_run_resumes_only_with_more_patience(tiny_llama, drifting, tmp_path):
    common = dict(dataset=str(drifting), model=tiny_llama, **RUN)
    train(output=str(tmp_path / "o"), **common)
    with pytest.raises(RunError, match="stopped early at step 3.*--patience 0"):
        train(output=str(tmp_path / "o"), resume=True, **common)
    # with --patience 0 it trains on from where it stopped, exactly as a run never stopped
    more = train(output=str(tmp_path / "o"), resume=True, **{**common, "patience": 0})
    plain = train(output=str(tmp_path / "plain"), **{**common, "patience": 0})
    assert more.steps == plain.steps == 8
    assert torch.equal(more.soft_prompt.tensor, plain.soft_prompt.tensor)


def test_patience_counts_validations_that_do_not_beat_the_best():
    state = TrainState.create(
        TrainConfig(dataset="d", output="o", lr=0.03), torch.zeros(2, 3), torch.device("cpu"), 10
    )
    for step, (loss, bad) in enumerate([(3.0, 0), (2.0, 0), (2.5, 1), (2.0, 2), (1.9, 0)]):
        state.step = step
        state.soft.data.fill_(step)
        state.observe(loss)
        assert state.bad_validations == bad
    assert state.best_val == 1.9 and state.best_step == 4
    assert torch.equal(state.best_soft, torch.full((2, 3), 4.0))


def test_patience_is_off_by_default_and_needs_validations():
    assert TrainConfig().patience == 0
    with pytest.raises(ConfigError, match="--patience counts validations"):
        TrainConfig(dataset="d", output="o", patience=3, eval_every=0).validate()
    with pytest.raises(ConfigError, match="--patience must be 0"):
        TrainConfig(dataset="d", output="o", patience=-1).validate()
