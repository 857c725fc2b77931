"""Label-free objectives: how far the quantized model's outputs are from the float model's
(docs/method.md section 7).

Each objective takes the model's output and the float model's output on the same batch, as a
tensor or as a tuple / list / namedtuple / dict / dataclass of tensors, and sums its value over the
floating-point tensors of that structure (other entries, e.g. integer indices, are ignored):

- ``"kl"``: KL(float || quantized) of the distributions along ``dim``. Outputs that already are
  distributions (non-negative, summing to 1 along ``dim``) are taken as probabilities, anything else
  as logits (softmax). Summed along ``dim``, averaged over every other position.
- ``"bce"``: binary KL of independent sigmoid probabilities (values in [0, 1]); ``"bce_logits"``
  the same from logits. Summed over the non-batch elements, averaged over the batch.
- ``"mse"``: squared error divided by the float output's mean square (scale-free), for raw outputs
  such as regressions, embeddings or feature maps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from cora_fx.errors import CoRaError

OBJECTIVES = ("kl", "bce", "bce_logits", "mse")
_EPS = 1e-7
Objective = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


def output_tensors(output: Any, path: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """The floating-point tensors of an output structure, with a path naming each."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield path, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from output_tensors(value, f"{path}[{key!r}]")
    elif isinstance(output, (tuple, list)):
        for index, value in enumerate(output):
            yield from output_tensors(value, f"{path}[{index}]")
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for item in dataclasses.fields(output):
            yield from output_tensors(getattr(output, item.name), f"{path}.{item.name}")


def paired_outputs(output: Any, reference: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(path, output tensor, float tensor) for each tensor; the two structures must match."""
    mine, theirs = list(output_tensors(output)), list(output_tensors(reference))
    if [p for p, _ in mine] != [p for p, _ in theirs] or not mine:
        raise CoRaError(f"the model's outputs {[p for p, _ in mine]} do not match the float model's "
                        f"{[p for p, _ in theirs]} (a label-free loss needs floating-point tensor outputs)")
    pairs = []
    for (path, out), (_, ref) in zip(mine, theirs):
        if out.shape != ref.shape:
            raise CoRaError(f"{path}: shape {tuple(out.shape)} differs from the float model's {tuple(ref.shape)}")
        pairs.append((path, out.float(), ref.float()))
    return pairs


def checked_once(seen: dict[str, Any], path: str, ref: torch.Tensor, check: Callable[[], Any]) -> Any:
    """``check()`` (a validation that reads values back) for every batch on the CPU, and once per output
    ``path`` elsewhere: reading a GPU tensor back on every search step would stall the GPU each time."""
    if ref.device.type == "cpu" or path not in seen:
        seen[path] = check()
    return seen[path]


def softmax_kl(dim: int) -> Objective:
    """KL(float || quantized) of the distributions along ``dim`` (logits or probabilities)."""
    seen: dict[str, bool] = {}

    def is_distribution(ref: torch.Tensor, path: str) -> bool:
        if _is_probability(ref) and not _is_distribution(ref):
            raise CoRaError(f"loss='kl' over dim {dim} of {path}: its values lie in [0, 1] but do not sum to 1 along "
                            "that dimension (independent sigmoid probabilities?); use loss='bce' for those, or set "
                            "search.loss_dim to the dimension that holds the distribution")
        return _is_distribution(ref)

    def kl(out: torch.Tensor, ref: torch.Tensor, path: str) -> torch.Tensor:
        if not -ref.dim() <= dim < ref.dim() or ref.shape[dim] < 2:
            size = "no such dimension" if not -ref.dim() <= dim < ref.dim() else "one value per distribution"
            raise CoRaError(f"loss='kl' over dim {dim} of {path} with shape {tuple(ref.shape)}: {size}. "
                            "Set search.loss_dim to the class dimension, or use loss='bce' (sigmoid "
                            "probabilities), 'bce_logits' or 'mse' (raw values)")
        out, ref = out.movedim(dim, -1).flatten(0, -2), ref.movedim(dim, -1).flatten(0, -2)
        if checked_once(seen, path, ref, lambda: is_distribution(ref, path)):
            log_q, log_p = out.clamp_min(_EPS).log(), ref.clamp_min(_EPS).log()
        else:
            log_q, log_p = F.log_softmax(out, -1), F.log_softmax(ref, -1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl


def _is_probability(ref: torch.Tensor) -> bool:
    return bool(ref.min() >= 0) and bool(ref.max() <= 1)


def _is_distribution(ref: torch.Tensor) -> bool:
    return bool(ref.min() >= 0) and bool(((ref.sum(-1) - 1).abs() < 1e-3).all())


def binary_kl(logits: bool) -> Objective:
    """Binary KL(float || quantized) of independent Bernoulli outputs, batch mean."""
    seen: dict[str, bool] = {}

    def check_probabilities(ref: torch.Tensor, path: str) -> bool:
        low, high = float(ref.min()), float(ref.max())
        if low < 0 or high > 1:
            raise CoRaError(f"loss='bce' needs probabilities in [0, 1]; {path} has values in "
                            f"[{low:.3g}, {high:.3g}]: use loss='bce_logits' for logits of independent "
                            "labels, 'kl' for class logits or 'mse' for raw values")
        return True

    def bce(out: torch.Tensor, ref: torch.Tensor, path: str) -> torch.Tensor:
        if logits:
            log_q, log_1q = F.logsigmoid(out), F.logsigmoid(-out)
            p = torch.sigmoid(ref)
        else:
            checked_once(seen, path, ref, lambda: check_probabilities(ref, path))
            q = out.clamp(_EPS, 1 - _EPS)
            log_q, log_1q = q.log(), (1 - q).log()
            p = ref
        p = p.clamp(_EPS, 1 - _EPS)
        kl = p * (p.log() - log_q) + (1 - p) * ((1 - p).log() - log_1q)
        return kl.sum() / max(kl.shape[0], 1) if kl.dim() else kl
    return bce


def relative_mse(out: torch.Tensor, ref: torch.Tensor, path: str) -> torch.Tensor:
    """Mean squared error over the float output's mean square (scale-free)."""
    return (out - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)


def distillation_loss(name: str, dim: int = 1) -> Callable[[Any, Optional[Any], Any], torch.Tensor]:
    """``loss(output, float_output, labels)`` for objective ``name``, summed over the output's tensors."""
    objectives: dict[str, Objective] = {"kl": softmax_kl(dim), "bce": binary_kl(False),
                                        "bce_logits": binary_kl(True), "mse": relative_mse}
    if name not in objectives:
        raise ValueError(f"unknown objective {name!r}; label-free objectives are {OBJECTIVES}")
    objective = objectives[name]

    def loss(output: Any, float_output: Optional[Any], labels: Any = None) -> torch.Tensor:
        if float_output is None:
            raise CoRaError(f"loss={name!r} needs the float model's output")
        pairs = paired_outputs(output, float_output)
        return torch.stack([objective(out, ref, path) for path, out, ref in pairs]).sum()
    return loss
