"""The run's plan is a pure function of the options and a few counts: tested here without a
model, a dataset or a device."""

from __future__ import annotations

import pytest

from softprompt.config import TrainConfig
from softprompt.errors import ConfigError, DataError, RunError
from softprompt.plan import (
    COMPILE_AFTER_S,
    block_size_for,
    check_blocks,
    decide_checkpointing,
    decide_compile,
    decide_lr,
    default_block_size,
    estimate_seconds,
    fit_global_batch,
    make_plan,
    resolved_config,
)


def cfg(**options) -> TrainConfig:
    return TrainConfig(**{"dataset": "data", "output": "out", **options})


def plan(config=None, **counts):
    args = dict(n_tokens=20, n_bos=0, block_size=256, n_train=100, n_val=5, batch_size=4)
    return make_plan(config or cfg(), **{**args, **counts})


def test_lr_auto_is_a_share_of_the_token_vectors_rms_to_two_figures():
    assert decide_lr(0.13554657995700836) == 0.03  # SmolLM2-135M's token vectors
    assert decide_lr(1.0291385650634766) == 0.23  # Gemma 3 270M's, scaled by sqrt(640)
    assert decide_lr(0.02) == 0.0044


def test_block_size_is_what_the_context_leaves_capped_by_device():
    assert default_block_size(2048, 20, "cpu") == 512
    assert default_block_size(8192, 21, "cuda") == 2048
    assert default_block_size(256, 21, "cpu") == 235  # 20 soft tokens and a BOS
    assert block_size_for(cfg(), 256, 20, 1, "cpu") == 235
    assert block_size_for(cfg(block_size=100), 256, 20, 1, "cpu") == 100


def test_block_size_errors_name_the_fix():
    with pytest.raises(
        ConfigError, match=r"--block-size 236 plus 20 soft tokens and the BOS .* 235"
    ):
        block_size_for(cfg(block_size=236), 256, 20, 1, "cpu")
    with pytest.raises(ConfigError, match="--tokens 256 must be less"):
        block_size_for(cfg(), 256, 256, 0, "cpu")


def test_steps_from_epochs_or_max_steps():
    p = plan(cfg(epochs=2.0))  # 100 blocks / 4 per step = 25 steps an epoch
    assert (p.batch_size, p.grad_accum, p.samples_per_step) == (4, 1, 4)
    assert p.steps_per_epoch == 25 and p.total_steps == 50 and p.start_step == 0
    assert plan(cfg(max_steps=7, epochs=2.0)).total_steps == 7
    assert plan(cfg(epochs=0.01)).total_steps == 1  # at least one step
    p = plan(cfg(grad_accum=2, epochs=1.0), world=2)
    assert p.samples_per_step == 16 and p.total_steps == 7 and p.tokens_per_step == 16 * 256
    assert p.positions == 4 * (20 + 0 + 256)


def test_batch_lowered_to_the_blocks_there_are():
    assert plan(n_train=3, batch_size=8).batch_size == 3
    with pytest.raises(ConfigError, match="--grad-accum 5 is more than the 3 training blocks"):
        plan(cfg(grad_accum=5), n_train=3)


def test_resume_starts_at_the_checkpoint_and_keeps_its_global_batch():
    ckpt = {"step": 10, "world_size": 2, "samples_per_step": 16}
    p = plan(cfg(max_steps=30), checkpoint=ckpt, world=1)  # 1 rank: accumulate 4 x 4
    assert (p.start_step, p.batch_size, p.grad_accum, p.samples_per_step) == (10, 4, 4, 16)
    with pytest.raises(RunError, match="already reached step 10 of 10"):
        plan(cfg(max_steps=10), checkpoint={"step": 10})
    with pytest.raises(RunError, match="already at step 12 of this run's 10"):
        plan(cfg(max_steps=10, init_from="x.mtjsp"), mtj_step=12)
    assert plan(cfg(max_steps=20), mtj_step=12).start_step == 12


def test_fit_global_batch():
    same = {"world_size": 2, "samples_per_step": 8}
    assert fit_global_batch(same, 4, 1, 2) == (4, 1)
    assert fit_global_batch({"world_size": 1, "samples_per_step": 8}, 4, 1, 2) == (4, 1)
    assert fit_global_batch({"world_size": 1, "samples_per_step": 12}, 4, 3, 2) == (2, 3)
    with pytest.raises(ConfigError, match="cannot split evenly"):
        fit_global_batch({"world_size": 1, "samples_per_step": 9}, 4, 2, 2)


def test_too_little_text_for_the_blocks():
    check_blocks(cfg(), 600, 256, 2)
    check_blocks(cfg(val_fraction=0.0), 300, 256, 1)
    with pytest.raises(DataError, match="fewer than 2 block"):
        check_blocks(cfg(), 300, 256, 1)


def test_decisions():
    assert decide_checkpointing(300, 1000) and not decide_checkpointing(200, 1000)
    assert decide_checkpointing(1, None)  # free memory unknown: the safe choice
    assert decide_compile(COMPILE_AFTER_S + 1, "cpu", spread=False)
    assert not decide_compile(COMPILE_AFTER_S - 1, "cpu", spread=False)
    assert not decide_compile(10_000, "cuda", spread=False)
    assert not decide_compile(10_000, "cpu", spread=True)


def test_estimate_counts_steps_and_validations():
    p = plan(cfg(max_steps=10, eval_every=5), n_val=8)  # 2 validation batches of 4
    # 10 steps of 3 s, and 2 + 10 // 5 = 4 validations of 2 batches at a third of a step
    assert estimate_seconds(p, 3.0) == pytest.approx(10 * 3 + 4 * 2 * 1.0)


def test_about_ten_validations_a_run_unless_given():
    assert plan(cfg(max_steps=300)).eval_every == 30
    assert plan(cfg(max_steps=4)).eval_every == 1
    assert plan(cfg(max_steps=300, eval_every=50)).eval_every == 50
    assert plan(cfg(max_steps=300, eval_every=0)).eval_every == 0


def test_resolved_config_records_the_decisions():
    p = plan(cfg(max_steps=3))
    r = resolved_config(cfg(max_steps=3, dataset="texts/bard"), p, True, False)
    assert (r.tokens, r.block_size, r.batch_size, r.grad_accum) == (20, 256, 4, 1)
    assert r.checkpointing is True and r.compile is False and r.name == "bard"
