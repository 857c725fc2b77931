"""8-bit activations: quantizer modules, where they go in the graph, and their calibration (docs/method.md s.14).

With ``CoRaConfig.activation.bits`` set, `prepare_cora` runs `InsertActivationQuantizers`: one per-tensor
`ActivationQuantizer` on every tensor an integer runtime keeps quantized (the inputs of quantized convs and
linears, the output of each conv / linear block after its BatchNorm and ReLU / ReLU6, and residual adds and
concats whose inputs are all quantized). `calibrate_activations` runs the float model over calibration
batches with torch.ao observers in the quantizers, then freezes their scale and zero point; from then on
the rounding, the rank search and the converted model see fake-quantized activations.
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from cora_fx.calibrate import distributed
from cora_fx.calibrate.batches import split_batch
from cora_fx.config import ActivationConfig, step_config
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.graph.passes import folded_copy
from cora_fx.quant.modules import FLOAT, CoRaConv2d, folded_modes
from cora_fx.quant.observers import quant_range as signed_range
from cora_fx.state import step_state

#: Quantizer states: pass-through (before calibration), observing (during it), fake-quantizing (after it).
IDLE, OBSERVE, QUANTIZE = "idle", "observe", "quantize"
#: The submodule of the prepared model that holds the quantizers, one per quantized tensor.
QUANTIZERS = "cora_activations"

_OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
              "histogram": HistogramObserver}
_CHAIN_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh
_CHAIN_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.hardtanh)
_JOINS = (operator.add, torch.add, torch.cat)


def quantized_decomposed() -> Any:
    """``torch.ops.quantized_decomposed`` (quantize_per_tensor / dequantize_per_tensor), registered on import."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


def quant_range(config: ActivationConfig) -> tuple[int, int]:
    """(quant_min, quant_max) of ``config``: 0..2^n-1 for uint8, -2^(n-1)..2^(n-1)-1 for int8."""
    bits = int(config.bits or 8)
    return (0, 2 ** bits - 1) if config.dtype == "uint8" else signed_range(bits)


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantizer of one activation with a torch.ao observer for its range.

    ``state``: `IDLE` (identity), `OBSERVE` (the observer records, the tensor passes unchanged) or
    `QUANTIZE` (``torch.fake_quantize_per_tensor_affine`` with the frozen ``scale`` / ``zero_point``:
    straight-through gradients inside the range, so the rank search differentiates through it).
    """

    def __init__(self, config: ActivationConfig) -> None:
        super().__init__()
        self.config = config
        self.quant_min, self.quant_max = quant_range(config)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.restart()
        self.state = IDLE
        self.enabled = True

    def restart(self) -> None:
        """A fresh torch.ao observer (no range seen yet)."""
        symmetric = self.config.dtype == "int8"
        self.observer = _OBSERVERS[self.config.observer](
            dtype=torch.qint8 if symmetric else torch.quint8,
            qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
            quant_min=self.quant_min, quant_max=self.quant_max).to(self.scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == OBSERVE:
            self.observer(x.detach().float())
            return x
        if self.state == QUANTIZE and self.enabled:
            return torch.fake_quantize_per_tensor_affine(x, self.scale.to(x.dtype), self.zero_point,
                                                         self.quant_min, self.quant_max)
        return x

    def freeze(self) -> None:
        """Take the observer's scale and zero point and start fake-quantizing."""
        scale, zero_point = self.observer.calculate_qparams()
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()).to(torch.int32))
        self.state = QUANTIZE

    def extra_repr(self) -> str:
        return f"state={self.state}, range={self.quant_min}..{self.quant_max}, scale={float(self.scale):.4g}"


def quantizers(gm: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in gm.modules() if isinstance(m, ActivationQuantizer)]


@contextmanager
def float_activations(gm: nn.Module) -> Iterator[None]:
    """Run ``gm``'s activation quantizers as identities (the float teacher); restored on exit."""
    found = quantizers(gm)
    before = [q.enabled for q in found]
    try:
        for q in found:
            q.enabled = False
        yield
    finally:
        for q, enabled in zip(found, before):
            q.enabled = enabled


def _is_chain(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _CHAIN_MODULES)
    if node.op == "call_function":
        return node.target in _CHAIN_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _block_end(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Follow a layer's output through its BatchNorm and activation (one user each)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_chain(user, gm) or user.args[0] is not node:
            break
        node = user
    return node


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target is torch.cat else node.args
    return [a for a in args if isinstance(a, fx.Node)] if isinstance(args, (list, tuple)) else []


class InsertActivationQuantizers:
    """Put an `ActivationQuantizer` on every tensor an integer runtime keeps quantized (module docstring)."""

    def __init__(self, config: ActivationConfig) -> None:
        self.config = config

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        layers, inputs = self._layers(gm)
        marked: list[fx.Node] = []
        for node in gm.graph.nodes:
            if node in layers:
                end = _block_end(node, gm)
                if any(u.op != "output" for u in end.users) and end not in marked:
                    marked.append(end)
            elif node.op == "call_function" and node.target in _JOINS and not node.meta.get("cora_role"):
                joined = _tensor_inputs(node)
                if joined and all(a in marked for a in joined):
                    marked.append(node)
        marked += [x for x in dict.fromkeys(inputs) if x not in marked]
        holder = nn.Module()
        gm.add_submodule(QUANTIZERS, holder)
        device = model_device(gm)
        for node in marked:
            holder.add_module(node.name, ActivationQuantizer(self.config).to(device))
            with gm.graph.inserting_after(node):
                quantized = gm.graph.call_module(f"{QUANTIZERS}.{node.name}", (node,))
            quantized.meta.update(node.meta, cora_role="activation")
            node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
        return PassResult(gm, bool(marked))

    @staticmethod
    def _layers(gm: fx.GraphModule) -> tuple[set[fx.Node], list[fx.Node]]:
        """The nodes whose value is a quantized layer's output, and those layers' input nodes."""
        outputs: set[fx.Node] = set()
        inputs: list[fx.Node] = []
        for node in gm.graph.nodes:
            role = node.meta.get("cora_role")
            if role == "merge":
                outputs.add(node)
            if role == "main" and isinstance(node.args[0], fx.Node):
                inputs.append(node.args[0])
        return outputs, inputs


def calibrate_activations(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True,
                          **overrides: Any) -> int:
    """Observe every activation quantizer on the float model's activations, then freeze their ranges.

    Reads ``activation.batches`` batches (``act_batches=`` overrides it for this call, `step_config`). Under
    `torch.distributed` each process observes its own batches and the ranks' frozen scales and zero points are
    rank 0's (broadcast), so every process fake-quantizes identically. Returns the number of quantizers calibrated.
    """
    state = step_state(prepared, "calibrate_activations")
    found = quantizers(prepared)
    if not found:
        raise CoRaError("calibrate_activations: the model has no activation quantizers; prepare it with "
                        "CoRaConfig(act_bits=8) (activation.bits) to quantize activations")
    count = step_config(state.config, "calibrate_activations", overrides).activation.batches
    folded = folded_copy(prepared)
    wrappers = [m for m in folded.modules() if isinstance(m, CoRaConv2d)]
    device = model_device(prepared)
    was_training = prepared.training
    folded.eval()
    seen = 0
    for q in found:
        q.restart()
        q.state = OBSERVE
    try:
        with folded_modes(wrappers, FLOAT), torch.no_grad():
            for batch in tqdm(batches, total=count, desc="cora activation ranges", leave=False,
                              disable=not distributed.shows_progress(progress)):
                if seen >= count:
                    break
                folded(*split_batch(batch, device)[0])
                seen += 1
    finally:
        prepared.train(was_training)
        for q in found:
            q.state = IDLE
    if not distributed.all_reduce_min(seen):
        raise CoRaError("calibrate_activations: the calibration batches are empty"
                        + (" on at least one process" if distributed.active() else ""))
    for q in found:
        q.freeze()
        distributed.broadcast_state(q)
    return len(found)

