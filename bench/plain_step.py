"""The optimizer step the layout benches share: softprompt's own (clip to 1.0, one
optimizer and schedule step), after ``loss.backward()``; a non-finite loss ends the bench."""

from __future__ import annotations

import math

import torch


def update(soft: torch.Tensor, opt, sched, loss: torch.Tensor, name: str, step: int) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_([soft], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if not math.isfinite(loss.item()):
        raise SystemExit(f"{name}: diverged at step {step + 1}")
