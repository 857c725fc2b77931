"""The objective shared by the rank search and `finetune`: task loss, float teacher, frozen weights."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from cora_fx.calibrate.activations import float_activations
from cora_fx.calibrate.distillation import checked_once, distillation_loss, output_tensors
from cora_fx.config import CoRaConfig
from cora_fx.errors import CoRaError
from cora_fx.quant.modules import FLOAT, CoRaConv2d, folded_modes


def task_loss(cfg: CoRaConfig) -> Callable[[Any, Optional[Any], Any], torch.Tensor]:
    """The config's loss(output, float_output, labels): CE on labels, a label-free objective against the
    float model (`losses.distillation_loss`), or the user's callable."""
    if callable(cfg.search.loss):
        return cfg.search.loss
    if cfg.search.loss != "ce":
        return distillation_loss(cfg.search.loss, cfg.search.loss_dim)
    seen: dict[str, bool] = {}

    def check_labels(labels: torch.Tensor, classes: int) -> bool:
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= classes:
            raise CoRaError(f"labels out of range: the model has {classes} classes, got labels {low}..{high}")
        return True

    def ce(output: Any, float_output: Optional[Any], labels: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise CoRaError(f"loss='ce' needs a single logits tensor, the model returns {type(output).__name__}; "
                            "use a label-free loss ('kl', 'bce', 'mse') or a callable loss")
        if (not isinstance(labels, torch.Tensor)
                or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8)):
            raise CoRaError("loss='ce' needs integer class labels in every batch (or use loss='kl')")
        classes = output.shape[-1]
        if labels.numel():
            checked_once(seen, "labels", labels, lambda: check_labels(labels, classes))
        return F.cross_entropy(output, labels.long())
    return ce


def teacher_output(search_gm: fx.GraphModule, wrappers: Sequence[CoRaConv2d],
                   inputs: tuple[torch.Tensor, ...]) -> Any:
    """The float model's output: full-rank float residuals give back W exactly (Theorem 1)."""
    with folded_modes(wrappers, FLOAT), float_activations(search_gm), torch.no_grad():
        return search_gm(*inputs)


def batch_loss(gm: fx.GraphModule, wrappers: Sequence[CoRaConv2d], cfg: CoRaConfig,
               loss_fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], labels: Any, *, caller: str,
               index: int, teachers: Optional["TeacherCache"] = None, key: Any = None) -> torch.Tensor:
    """The task loss of ``gm`` on one batch; a model failure names the caller and the batch, not a conv.

    With ``teachers``, the float model's output is looked up under ``key`` (computed on first use)."""
    try:
        teacher = None
        if cfg.search.loss != "ce":
            compute = lambda: teacher_output(gm, wrappers, inputs)  # noqa: E731
            teacher = compute() if teachers is None else teachers.get(key, compute)
        output = gm(*inputs)
    except Exception as err:  # e.g. a batch of the wrong shape
        shapes = [tuple(t.shape) for t in inputs]
        raise CoRaError(f"{caller}: the model failed on calibration batch {index} "
                        f"(input shapes {shapes}): {type(err).__name__}: {err}") from err
    return loss_fn(output, teacher, labels)


class TeacherCache:
    """The float model's outputs per calibration position, computed once (docs/method.md section 3).

    The float model does not change during the search, so a list of batches cycled 5 times needs its
    outputs once, not 5 times. Outputs are kept until ``limit_bytes`` are held; later keys are computed
    every time. Only for batches that repeat exactly (a list, not a shuffling DataLoader): `enabled`.
    """

    def __init__(self, enabled: bool, limit_bytes: int = 1 << 29) -> None:
        self.enabled = enabled
        self.limit = limit_bytes
        self.held = 0
        self.outputs: dict[Any, Any] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        if not self.enabled or key is None:
            return compute()
        if key not in self.outputs:
            output = compute()
            size = sum(t.numel() * t.element_size() for _, t in output_tensors(output))
            if self.held + size > self.limit:
                return output
            self.held += size
            self.outputs[key] = output
        return self.outputs[key]


#: Losses that are means over the batch: split into micro-batches, weighted by size, they are unchanged.
SPLITTABLE_LOSSES = ("ce", "kl", "bce", "bce_logits")


#: Input values per micro-batch with ``search.micro_batch="auto"`` on a CPU: 8 ImageNet images at 224 px.
CPU_MICRO_BATCH_VALUES = 8 * 3 * 224 * 224


def micro_batches(inputs: tuple[torch.Tensor, ...], labels: Any, size: Union[int, str, None],
                  loss: Any) -> list[tuple[tuple[torch.Tensor, ...], Any, float]]:
    """``(inputs, labels, weight)`` chunks of at most ``size`` samples, weights summing to 1.

    The whole batch when ``size`` is None (or ``"auto"`` off the CPU), the loss is not a batch mean
    (``"mse"``, a callable) or the inputs do not share a batch dimension. Time per sample falls on CPUs
    whose caches a batch of 32 overflows (docs/method.md section 3)."""
    if size == "auto":
        on_cpu = bool(inputs) and inputs[0].device.type == "cpu" and inputs[0].dim() > 0
        size = max(1, CPU_MICRO_BATCH_VALUES * inputs[0].shape[0] // max(inputs[0].numel(), 1)) if on_cpu else None
    count = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    same = all(t.dim() and t.shape[0] == count for t in inputs)
    if size is None or not isinstance(loss, str) or loss not in SPLITTABLE_LOSSES or not same or count <= size:
        return [(inputs, labels, 1.0)]
    chunks = []
    for start in range(0, count, size):
        part = tuple(t[start:start + size] for t in inputs)
        label_part = labels[start:start + size] if isinstance(labels, torch.Tensor) and labels.dim() else labels
        chunks.append((part, label_part, part[0].shape[0] / count))
    return chunks


def channels_last(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """4-D floating inputs in channels-last memory format (faster CPU convolutions), others unchanged."""
    return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.is_floating_point() else t
                 for t in inputs)


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
