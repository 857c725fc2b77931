"""The sensitivities both planners share (docs/method.md section 8): how much the label-free objective grows
when one layer alone takes other weights, measured on the first calibration batches with the float model's
weights swapped one layer at a time."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from cora_fx.calibrate import distributed
from cora_fx.calibrate.batches import input_dtype, split_batch
from cora_fx.calibrate.distillation import distillation_loss
from cora_fx.config import CoRaConfig
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.graph.capture import CAPTURE_OPTIONS

#: Calibration batches that measure each layer's sensitivity in `allocate_bits`. One batch's KL growth is
#: noisy (a standard deviation of a third of its mean on MobileNetV2) and can rank layers wrongly;
#: `benchmarks/allocation_noise.py` measures that noise. Each batch costs two forward passes per
#: candidate layer.
ALLOCATION_BATCHES = 4


class Sensitivity:
    """How far the model's outputs are from the float ones on each batch: the config's label-free
    objective (KL for ``loss="ce"``; a callable loss gets ``labels=None``), with the fixed arguments."""

    def __init__(self, config: CoRaConfig, fixed: dict[str, Any]) -> None:
        loss = config.search.loss
        self.loss = loss if callable(loss) else distillation_loss("kl" if loss == "ce" else loss,
                                                                  config.search.loss_dim)
        self.fixed = fixed

    def outputs(self, model: nn.Module, inputs: list[tuple[torch.Tensor, ...]]) -> list[Any]:
        with torch.no_grad():
            return [model(*x, **self.fixed) for x in inputs]

    def __call__(self, model: nn.Module, inputs: list[tuple[torch.Tensor, ...]], reference: list[Any]) -> list[float]:
        losses = [self.loss(out, ref, None).detach().reshape(()) for out, ref in zip(self.outputs(model, inputs),
                                                                                      reference)]
        return torch.stack(losses).cpu().tolist()  # one read-back per model, not one per batch


def check_arguments(caller: str, model: nn.Module, target_bits: Any, max_batches: Any,
                    capture_options: dict) -> None:
    """The checks `allocate_bits` and `allocate_jointly` share, each error naming ``caller`` and the argument."""
    if not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1:
        raise ValueError(f"{caller}: max_batches={max_batches!r} must be an integer >= 1")
    if not isinstance(target_bits, (int, float)) or isinstance(target_bits, bool) or not target_bits > 0:
        raise ValueError(f"{caller}: target_bits={target_bits!r} must be a positive number")
    unknown = set(capture_options) - CAPTURE_OPTIONS
    if unknown:
        raise TypeError(f"{caller}: unexpected argument(s) {sorted(unknown)}; "
                        f"tracing options are {sorted(CAPTURE_OPTIONS)}")


def first_inputs(model: nn.Module, batches: Iterable, max_batches: int, caller: str) -> list:
    """The inputs of the first ``max_batches`` calibration batches, on the model's device and dtype; a clear
    error naming ``caller`` when there are none (on any process)."""
    device, dtype = model_device(model), input_dtype(model)
    inputs = []
    for batch in batches:
        inputs.append(split_batch(batch, device, dtype)[0])
        if len(inputs) == max_batches:
            break
    if not distributed.all_reduce_min(len(inputs)):
        raise CoRaError(f"{caller}: the calibration batches are empty"
                        + (" on at least one process" if distributed.active() else ""))
    return inputs


def mean_growth(per_batch: dict[str, tuple[list[float], list[float]]]) -> dict[str, float]:
    """Per layer, the mean over every process's batches of (loss demoted - loss kept)."""
    sums = torch.tensor([[sum(kept), sum(demoted), len(kept)] for kept, demoted in per_batch.values()],
                        dtype=torch.float64).reshape(-1, 3)
    distributed.all_reduce_sum(sums)
    return {name: float((row[1] - row[0]) / row[2]) for name, row in zip(per_batch, sums)}


def swapped_losses(reference_model: nn.Module, names: Iterable[str],
                   weights: Callable[[str, Any], list[torch.Tensor]], inputs: list, reference: list[Any],
                   sensitivity: Sensitivity, progress: bool, desc: str) -> dict[str, list[list[float]]]:
    """Per layer, the objective on each batch with each of ``weights(name, conv)`` in place of the conv's weight
    of ``reference_model`` (the weights are built first, from the float weight; it is put back after)."""
    out = {}
    for name in tqdm(names, desc=desc, disable=not progress, leave=False):
        parameter = float_weight(reference_model, name)
        original = parameter.data
        values = []
        for weight in weights(name, _AsConv(original)):
            # a Conv1d, Linear or functional weight is quantized as a conv's: same values, other shape
            parameter.data = weight.to(original.dtype).reshape(original.shape)
            values.append(sensitivity(reference_model, inputs, reference))
        parameter.data = original
        out[name] = values
    return out


def float_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The float weight of layer ``name``: its module's ``weight``, or the parameter itself (functional layers)."""
    try:
        return model.get_submodule(name).weight
    except AttributeError:
        return model.get_parameter(name)


class _AsConv:
    """What the ``weights`` callbacks read of a layer: its float weight as a Conv2d's (a Conv1d's gains a unit
    dimension, docs/method.md s.12)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.unsqueeze(2) if weight.dim() == 3 else weight
