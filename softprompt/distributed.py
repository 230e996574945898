"""Data-parallel training on PyTorch's own distributed engine.

``torchrun --nproc-per-node N -m softprompt train ...`` starts N processes (ranks); each one
reads its own share of every batch, and the soft prompt's gradient is averaged across them
with one all-reduce per step, so all ranks keep identical soft prompts. Only rank 0 writes
files, logs and draws the progress bar. Backend: nccl on GPUs, gloo on CPUs.

With ``--shard-model`` the frozen model itself is split across the ranks with FSDP
(``fully_shard``): each decoder layer's weights are gathered just before it runs and freed
after, so a model bigger than one device fits on several.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Ranks:
    """The ranks torchrun (or a SLURM script that sets the same variables) describes."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers: launch with torchrun"
        ) from None
    return Ranks(rank, world, local) if world > 1 else Ranks()


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank on a machine takes its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if ranks.enabled and device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {ranks.rank} has LOCAL_RANK {ranks.local_rank} but this machine has "
                f"{torch.cuda.device_count()} GPUs: start at most that many processes per node"
            )
        return torch.device("cuda", ranks.local_rank)
    return device


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the ranks for the duration of a run (and leave afterwards, if this joined)."""
    import torch.distributed as dist

    if not ranks.enabled or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
        # free the group's C++ objects (and join gloo's threads) now, not at interpreter exit
        gc.collect()


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block first (filling caches: the token cache, a converted .gguf),
    the others after it, so they read what it wrote instead of racing to write it too."""
    if not ranks.main:
        barrier(ranks)
    yield
    if ranks.main:
        barrier(ranks)


def broadcast(ranks: Ranks, obj):
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint, which only rank 0 reads: on
    several nodes the output folder is rank 0's)."""
    if not ranks.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_step(ranks: Ranks, grad: torch.Tensor, loss: float, stop: bool) -> tuple[float, bool]:
    """Average the soft prompt's gradient (in place) and the loss across the ranks, and
    agree on stopping if any rank was asked to stop. One all-reduce for all three."""
    if not ranks.enabled:
        return loss, stop
    import torch.distributed as dist

    packed = torch.cat(
        [
            grad.reshape(-1).float(),
            torch.tensor([loss, float(stop)], dtype=torch.float32, device=grad.device),
        ]
    )
    dist.all_reduce(packed)
    grad.copy_(packed[: grad.numel()].view_as(grad) / ranks.world)
    return packed[-2].item() / ranks.world, packed[-1].item() > 0


def sum_across(ranks: Ranks, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not ranks.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def min_across(ranks: Ranks, value: float, device: torch.device) -> float:
    """The smallest ``value`` over the ranks."""
    if not ranks.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


def shard_model(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """Split the frozen ``model``'s weights across the ranks with FSDP: one unit per decoder
    layer, and the rest (embeddings, final norm, LM head, tied or not) in a root unit around
    a small wrapper that also does the soft prompt's concatenation, so the embedding weights
    are gathered when it runs. Returns the wrapper; ``soft_prompt.block_logits`` calls it."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ConfigError(
                f"--shard-model needs torch 2.4 or newer (this is {torch.__version__})"
            ) from None
    from .soft_prompt import PromptedModel
    from .speed import decoder_layers

    if not ranks.enabled:
        raise ConfigError(
            "--shard-model splits the model across processes: launch with "
            "torchrun --nproc-per-node N (N >= 2), or leave --shard-model out"
        )
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"--shard-model: no decoder layers found in {type(model).__name__}; "
            "train it without --shard-model"
        )
    for layer in layers:
        fully_shard(layer)
    wrapper = PromptedModel(model)
    fully_shard(wrapper)
    return wrapper
