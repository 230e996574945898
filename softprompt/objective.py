"""What training minimises, chosen once in ``train.setup``: the loop calls the objective per
batch and validation asks it for its sums, so a new objective is one class here.

An objective is called as ``objective(net, soft, batch, lead=..., mask=...)`` -> the batch's
mean loss (a scalar, differentiable with respect to ``soft``; ``mask``: the batch's label
mask, ``data.BatchSampler.batch_with_mask``), and ``objective.sums(net, soft, rows,
batch_size, device, lead=..., n_batches=..., filler=...)`` -> {"loss": summed nats,
"tokens": count, ...} over held-out rows (``data.Rows``; more summed parts may follow:
distillation adds "kl" and "ce"); ``prepare(train_blocks, batch_size)`` runs once before the
first step, on the training rows' text blocks.

- ``CrossEntropy``: the data's labels (``loss.block_loss``; an example's completion), the
  default;
- ``Distillation``: KL to the model with a written prompt in front, mixed with the
  cross-entropy (``distil.py``; ``--teacher-prompt``, ``--distill-weight``); text blocks
  only (``train`` refuses a dataset holding examples with --teacher-prompt).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np
import torch

from .data import Rows
from .distil import Teacher, distil_loss
from .loss import block_loss, loss_sums
from .soft_prompt import lead_length, n_predicted

log = logging.getLogger(__name__)


class Objective(Protocol):
    def __call__(
        self,
        net: torch.nn.Module,
        soft: torch.Tensor,
        batch: torch.Tensor,
        lead: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def sums(
        self,
        net: torch.nn.Module,
        soft: torch.Tensor,
        blocks: np.ndarray | Rows,
        batch_size: int,
        device: torch.device,
        *,
        lead: torch.Tensor | None = None,
        n_batches: int = 0,
        filler: np.ndarray | Rows | None = None,
    ) -> dict[str, float]: ...

    def prepare(self, train_blocks: np.ndarray, batch_size: int) -> None: ...


class CrossEntropy:
    """The cross-entropy of the data's labels: every token of a text block, an example's
    completion (``mask``). Its sums take ``data.Rows`` (``loss.loss_sums``), so held-out
    examples are scored on their completions."""

    name = "cross-entropy"

    def __call__(self, net, soft, batch, lead=None, mask=None) -> torch.Tensor:
        return block_loss(net, soft, batch, lead=lead, mask=mask)

    def sums(
        self, net, soft, blocks, batch_size, device, *, lead=None, n_batches=0, filler=None
    ) -> dict[str, float]:
        total, count = loss_sums(
            net, soft, blocks, batch_size, device, lead=lead, n_batches=n_batches, filler=filler
        )
        return {"loss": total, "tokens": count}

    def prepare(self, train_blocks: np.ndarray, batch_size: int) -> None:
        pass


class Distillation:
    """``weight`` x KL(teacher || student) + (1 - ``weight``) x cross-entropy per token,
    against ``teacher``: the model with the written prompt in front. With ``store_train``
    the teacher's states for every training block are computed once before the first step
    and reused (worth it when blocks are seen more than once, and they fit); the held-out
    blocks' are kept at their first validation, always."""

    name = "distillation"

    def __init__(self, teacher: Teacher, weight: float, store_train: bool = False):
        self.teacher, self.weight, self.store_train = teacher, weight, store_train

    def __call__(self, net, soft, batch, lead=None, mask=None) -> torch.Tensor:
        if mask is not None:  # train refuses examples with --teacher-prompt
            raise ValueError("distillation works on text blocks only, not on examples")
        states = self.teacher.states(batch)
        return distil_loss(net, soft, batch, states, self.weight, lead).loss.mean()

    @torch.no_grad()
    def sums(
        self, net, soft, blocks, batch_size, device, *, lead=None, n_batches=0, filler=None
    ) -> dict[str, float]:
        blocks, filler = _text_blocks(blocks), _text_blocks(filler)
        if isinstance(blocks, np.ndarray):
            blocks = torch.from_numpy(np.ascontiguousarray(blocks))
        out = {"loss": 0.0, "tokens": 0, "kl": 0.0, "ce": 0.0}
        for b in range(max(n_batches, math.ceil(len(blocks) / batch_size))):
            part = blocks[b * batch_size : (b + 1) * batch_size]
            batch = (part if len(part) else torch.as_tensor(filler)).to(device)
            rows = distil_loss(
                net, soft, batch, self.teacher.states(batch, keep=True), self.weight, lead
            )
            if len(part):
                out["loss"] += rows.loss.double().sum().item()
                out["kl"] += rows.kl.double().sum().item()
                out["ce"] += rows.ce.double().sum().item()
                out["tokens"] += len(part) * n_predicted(
                    soft.shape[0] + lead_length(lead), batch.shape[1]
                )
        return out

    def prepare(self, train_blocks: np.ndarray, batch_size: int) -> None:
        if self.store_train:
            self.teacher.store(train_blocks, batch_size)


def _text_blocks(rows):
    """The text blocks of ``rows`` (``data.Rows``: ones without examples), else ``rows``."""
    if not isinstance(rows, Rows):
        return rows
    if rows.ids:
        raise ValueError("distillation works on text blocks only, not on examples")
    return rows.blocks
