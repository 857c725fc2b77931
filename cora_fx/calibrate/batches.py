"""Calibration batches: ``(inputs, labels)`` pairs, moved to the model's device, cycled if re-iterable."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from cora_fx.errors import CoRaError


def input_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """Floating dtype of the model's own parameters (the search's rank parameters excluded).

    CoRa branches compute in their input's dtype, so only the user's layers (BatchNorm, ...)
    fix the dtype the inputs need: float32 batches then work for a bfloat16 model.
    """
    for name, p in module.named_parameters():
        if p.is_floating_point() and not name.endswith(".adapter.rank"):
            return p.dtype
    return None


def split_batch(batch: Any, device: torch.device,
                dtype: Optional[torch.dtype] = None) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(inputs, labels)`` -> (input tensors on ``device``, floating ones cast to ``dtype``; labels on ``device``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CoRaError(f"each calibration batch must be an (inputs, labels) pair, got {type(batch).__name__}")
    inputs, labels = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise CoRaError("calibration inputs must be a tensor or a tuple of tensors")
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    cast = lambda t: t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)  # noqa: E731
    return tuple(cast(t) for t in inputs), move(labels)


class BatchCycle:
    """Cycles a re-iterable (list, DataLoader); a one-shot iterator ends when exhausted.

    ``position`` is the index of the last batch within its pass; ``repeats`` is True when every pass
    yields the same batches (a list or tuple), so results per position can be reused."""

    def __init__(self, batches: Iterable, caller: str = "search_ranks") -> None:
        self.batches = batches
        self.caller = caller
        self.iterator = iter(batches)
        self.one_shot = self.iterator is batches
        self.repeats = isinstance(batches, (list, tuple))
        self.seen = 0
        self.position = -1

    def next(self) -> Optional[Any]:
        """The next batch, or None when a one-shot iterator is exhausted."""
        for attempt in range(2):
            try:
                batch = next(self.iterator)
                self.seen += 1
                self.position += 1
                return batch
            except StopIteration:
                if self.seen == 0:
                    raise CoRaError(f"{self.caller}: the calibration batches are empty") from None
                if self.one_shot or attempt:
                    return None
                self.iterator = iter(self.batches)
                self.position = -1
        return None
