"""`softprompt train --resume --init-from FILE.mtjsp`: continue an mtj-softtuner run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from softprompt import train
from softprompt.checkpoint import lr_schedule
from softprompt.errors import RunError

COMMON = dict(
    block_size=32,
    batch_size=2,
    eval_every=0,
    save_every=0,
    progress=False,
    lr=0.05,
    warmup=0.1,
    decay_to=0.1,  # a decaying rate: the step it picks up at shows in the rate
)


def write_mtjsp(path, tensor: torch.Tensor, step: int) -> None:
    """As mtj-softtuner writes it (np.savez_compressed), with a pickled opt_state object
    array that must never be read."""
    opt_state = np.empty(1, dtype=object)
    opt_state[0] = {"mu": [1.0, 2.0]}
    with open(path, "wb") as fh:
        np.savez_compressed(
            fh,
            tensor=tensor.numpy(),
            opt_state=opt_state,
            step=np.uint32(step),
            loss=np.float32(2.5),
        )


def test_resume_continues_an_mtj_run_at_its_step(tiny_llama, corpus, tmp_path, caplog, monkeypatch):
    torch.manual_seed(0)
    start = torch.randn(4, tiny_llama.embed_dim) * 0.02
    write_mtjsp(tmp_path / "run.mtjsp", start, step=3)
    seen: list[torch.Tensor] = []
    import softprompt.objective as t  # the training loop's loss: CrossEntropy's block_loss

    real_loss = t.block_loss

    def spy(model, soft, batch, **kw):  # the soft prompt the first step trains from
        if not seen:
            seen.append(soft.detach().clone())
        return real_loss(model, soft, batch, **kw)

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="softprompt"):
        m.setattr(t, "block_loss", spy)
        result = train(
            dataset=str(corpus),
            output=str(tmp_path / "out"),
            model=tiny_llama,
            init_from=str(tmp_path / "run.mtjsp"),
            resume=True,
            max_steps=6,
            **COMMON,
        )

    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [4, 5, 6]
    assert result.steps == 6
    assert steps[0]["lr"] == pytest.approx(0.05 * lr_schedule(6, COMMON["warmup"], 0.1)(3))
    # the data position starts at step x batch x grad_accum = 6 samples; step 4 adds 2 more
    assert steps[0]["tokens"] == (3 + 1) * 2 * 32
    # training started from the file's tensor, and moved away from it
    assert torch.equal(seen[0].cpu(), start)
    assert result.soft_prompt.tensor.shape == start.shape
    assert not torch.equal(result.soft_prompt.tensor, start)
    assert "optimizer starts fresh" in caplog.text

    # a later --resume continues from softprompt's own checkpoint, not the .mtjsp
    more = train(
        output=str(tmp_path / "out"), resume=True, max_steps=8, model=tiny_llama, progress=False
    )
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 6, 7, 8]
    assert more.steps == 8


def test_resume_from_an_mtj_run_past_max_steps_is_one_clear_error(tiny_llama, corpus, tmp_path):
    write_mtjsp(tmp_path / "done.mtjsp", torch.zeros(4, tiny_llama.embed_dim), step=6)
    with pytest.raises(RunError, match=r"done\.mtjsp.*step 6.*--max-steps") as e:
        train(
            dataset=str(corpus),
            output=str(tmp_path / "out"),
            model=tiny_llama,
            init_from=str(tmp_path / "done.mtjsp"),
            resume=True,
            max_steps=6,
            **COMMON,
        )
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_resume_needs_a_checkpoint_or_an_mtjsp(tiny_llama, corpus, tmp_path):
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        train(dataset=str(corpus), output=str(tmp_path / "a"), resume=True, model=tiny_llama)
    # a soft prompt that is not an .mtjsp has no step to continue from
    from softprompt import SoftPrompt

    SoftPrompt(torch.zeros(4, tiny_llama.embed_dim), {"name": "x"}).save(tmp_path / "x.zip")
    with pytest.raises(RunError, match="no checkpoint to resume from.*mtjsp"):
        train(
            dataset=str(corpus),
            output=str(tmp_path / "b"),
            resume=True,
            init_from=str(tmp_path / "x.zip"),
            model=tiny_llama,
        )


def test_init_from_mtjsp_without_resume_is_a_warm_start_from_step_0(tiny_llama, corpus, tmp_path):
    write_mtjsp(tmp_path / "run.mtjsp", torch.zeros(4, tiny_llama.embed_dim), step=3)
    result = train(
        dataset=str(corpus),
        output=str(tmp_path / "out"),
        model=tiny_llama,
        init_from=str(tmp_path / "run.mtjsp"),
        max_steps=2,
        **COMMON,
    )
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert result.steps == 2
