"""The objective shared by the rank search and `finetune`: task loss, float teacher, frozen weights."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from .config import CoRaConfig
from .losses import distillation_loss
from .modules import FLOAT, CoRaConv2d, QuantLinear, folded_modes
from .state import CoRaError


def task_loss(cfg: CoRaConfig) -> Callable[[Any, Optional[Any], Any], torch.Tensor]:
    """The config's loss(output, float_output, labels): CE on labels, a label-free objective against the
    float model (`losses.distillation_loss`), or the user's callable."""
    if callable(cfg.search.loss):
        return cfg.search.loss
    if cfg.search.loss != "ce":
        return distillation_loss(cfg.search.loss, cfg.search.loss_dim)

    def ce(output: Any, float_output: Optional[Any], labels: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise CoRaError(f"loss='ce' needs a single logits tensor, the model returns {type(output).__name__}; "
                            "use a label-free loss ('kl', 'bce', 'mse') or a callable loss")
        if (not isinstance(labels, torch.Tensor)
                or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8)):
            raise CoRaError("loss='ce' needs integer class labels in every batch (or use loss='kl')")
        classes = output.shape[-1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise CoRaError(f"labels out of range: the model has {classes} classes, "
                            f"got labels {int(labels.min())}..{int(labels.max())}")
        return F.cross_entropy(output, labels.long())
    return ce


def teacher_output(search_gm: fx.GraphModule, wrappers: Sequence[CoRaConv2d], linears: Sequence[QuantLinear],
                   inputs: tuple[torch.Tensor, ...]) -> Any:
    """The float model's output: full-rank float residuals give back W exactly (Theorem 1)."""
    with folded_modes(wrappers, linears, FLOAT), torch.no_grad():
        return search_gm(*inputs)


def batch_loss(gm: fx.GraphModule, wrappers: Sequence[CoRaConv2d], linears: Sequence[QuantLinear], cfg: CoRaConfig,
               loss_fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], labels: Any, *, caller: str,
               index: int) -> torch.Tensor:
    """The task loss of ``gm`` on one batch; a model failure names the caller and the batch, not a conv."""
    try:
        teacher = teacher_output(gm, wrappers, linears, inputs) if cfg.search.loss != "ce" else None
        output = gm(*inputs)
    except Exception as err:  # e.g. a batch of the wrong shape
        shapes = [tuple(t.shape) for t in inputs]
        raise CoRaError(f"{caller}: the model failed on calibration batch {index} "
                        f"(input shapes {shapes}): {type(err).__name__}: {err}") from err
    return loss_fn(output, teacher, labels)


@contextmanager
def frozen_weights(prepared: fx.GraphModule) -> Iterator[None]:
    """Every parameter of ``prepared`` without gradient and the model in eval mode; both restored on exit."""
    grad_flags = {p: p.requires_grad for p in prepared.parameters()}
    was_training = prepared.training
    try:
        for p in grad_flags:
            p.requires_grad_(False)
        prepared.eval()
        yield
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        prepared.train(was_training)
