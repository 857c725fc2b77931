"""Data-parallel calibration over `torch.distributed` (docs/method.md section 13).

When a default process group is initialised (``torchrun``; gloo on CPU, nccl on GPU), every data-aware
step reads the batches its own process was given, and the quantities that decide the result are
all-reduced: rank gradients and loss values (`search_ranks`), second moments (`calibrate_rounding`),
sensitivities (`allocate_bits`), per-channel means (`correct_batchnorm`) and gradients (`finetune`).
Every process then holds the same ranks, and the rounded weights are broadcast from rank 0 so the
converted models are bit-identical. Without a process group every function here is a no-op.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def active() -> bool:
    """True when a default process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if active() else 0


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that writes files and prints."""
    return rank() == 0


def init_from_environment(backend: str = "gloo") -> bool:
    """Initialise the default process group from ``torchrun``'s environment (``"gloo"`` on CPU, ``"nccl"`` for a
    model on GPUs); True if this call did (the caller then destroys it), False when there is nothing to do or a
    group already exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend)
    return True


def shard(batches: Sequence[T]) -> list[T]:
    """This process's share of a list of batches: every ``world_size()``-th one from ``rank()``.

    Process p of W gets batches p, p + W, p + 2W, ...; step t of a data-parallel step then sees the
    global batches tW .. tW + W - 1, which is what a single process sees when given those batches joined.
    """
    return list(batches)[rank()::world_size()]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place; returned for chaining."""
    if not active():
        return tensor
    device = _device()
    carrier = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
    if carrier is not tensor:
        tensor.copy_(carrier)
    return tensor


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over processes (e.g. how many batches every process has)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from process ``src`` to all others."""
    if not active():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.dtype == torch.bool:  # no collective backend moves bool tensors
                carrier = tensor.data.to(torch.uint8)
                dist.broadcast(carrier, src=src)
                tensor.data.copy_(carrier.bool())
            else:
                dist.broadcast(tensor.data, src=src)


def _device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Replace each ``.grad`` by its mean over processes (one collective for all of them)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    start = 0
    for p, g in zip(params, grads):
        p.grad = flat[start:start + g.numel()].view_as(g).clone()
        start += g.numel()


def shows_progress(progress: bool) -> bool:
    """Progress bars on rank 0 only, so ``torchrun`` prints one of each."""
    return progress and is_main_process()
