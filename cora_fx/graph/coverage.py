"""What stays float after `prepare_cora`: every weight matrix the prepared graph still computes with in float,
with the reason, and its share of the conv and linear accounting (docs/method.md s.3 and s.12).

A weight is any parameter with two or more dimensions larger than one (a per-channel scale of shape (C, 1, 1)
is not one). After the rewrites the quantized layers hold codes, so the
parameters of that shape left in the graph module are exactly the weights the model still uses in float:
convs inside leaf modules, transposed convs, recurrent layers, embeddings, weights computed from the inputs.
Each is reported under the name of the module (or parameter) that holds it; nothing is left out silently.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

from cora_fx.errors import CoRaFloatWeightsWarning
from cora_fx.graph.lifting import FLOAT_OPS, layer_call
from cora_fx.quant.modules import CONV, CONV1D, LINEAR, CoRaConv2d

OTHER = "other"
#: reasons that follow a config choice (``depthwise="float"``, ``quantize_linear=False``): reported, not warned
CHOSEN = ("depthwise='float'", "quantize_linear=False")
LINEAR_OFF = "nn.Linear left float (quantize_linear=False)"


@dataclass(frozen=True)
class FloatWeight:
    """One weight left float: its kind for the accounting (conv, conv1d, linear, other), size and stored bits."""

    kind: str
    params: int
    bits: int


def is_weight(param: torch.Tensor) -> bool:
    """A weight matrix or kernel: at least two dimensions larger than one."""
    return sum(size > 1 for size in param.shape) >= 2


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv1d):
        return CONV1D
    if isinstance(module, nn.modules.conv._ConvNd):
        return CONV
    return LINEAR if isinstance(module, nn.Linear) else OTHER


def _module_reason(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{name}: transposed convs are not supported; left float"
    if isinstance(module, nn.Conv3d):
        return f"{name}: 3-D convs are not supported; left float"
    if isinstance(module, nn.RNNBase):
        return f"{name}: recurrent layers are not quantized; left float"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{name}: embeddings are not quantized; left float"
    if isinstance(module, nn.MultiheadAttention):
        return f"{name}: attention computes with its weights inside the module; left float"
    return f"{name} is called as one opaque module; its weights are not quantized; left float"


def _call_reason(node: fx.Node) -> tuple[str, str]:
    """(kind, reason) of a weight read by ``node``, a call_function / call_method in the graph."""
    if node.target in FLOAT_OPS:
        kind, what = FLOAT_OPS[node.target]
        return kind, f"{what} is not quantized; left float"
    call = layer_call(node)
    if call is not None:
        return call.kind, f"the {call.kind} weight is computed from the inputs ({node.name}); left float"
    what = getattr(node.target, "__name__", str(node.target))
    return OTHER, f"read by {what} ({node.name}), which cora_fx does not quantize; left float"


def _weight_use(node: fx.Node) -> bool:
    """Whether ``node`` uses a tensor it reads as a layer's weight (a buffer read by plain arithmetic is not one)."""
    return node.op == "call_module" or node.target in FLOAT_OPS or layer_call(node) is not None


def _holder(name: str, skipped: Mapping[str, str]) -> Optional[str]:
    """The ``skipped`` key that already covers parameter ``name`` (itself or a module above it)."""
    for key in skipped:
        if name == key or name.startswith(key + "."):
            return key
    return None


def _kind_of_reads(users: list[fx.Node]) -> str:
    """The accounting kind of a weight read by get_attr: that of the first conv / linear op reading it."""
    kinds = [_call_reason(u)[0] for u in users if u.op in ("call_function", "call_method")]
    return next((k for k in kinds if k != OTHER), OTHER)


def float_weights(gm: fx.GraphModule, skipped: Mapping[str, str],
                  quantize_linear: bool = True) -> tuple[dict[str, str], dict[str, FloatWeight]]:
    """Reasons for every weight left float (``skipped`` plus those it lacks) and each one's accounting.

    Returns (reasons keyed by module or parameter name, weights keyed by parameter name)."""
    reasons = dict(skipped)
    weights: dict[str, FloatWeight] = {}
    inside = {id(m) for c in gm.modules() if isinstance(c, CoRaConv2d) for m in c.modules()}
    modules = dict(gm.named_modules())
    readers: dict[str, list[fx.Node]] = {}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), []).extend(node.users)
    tensors = list(gm.named_parameters()) + [(n, b) for n, b in gm.named_buffers()
                                             if any(_weight_use(u) for u in readers.get(n, []))]
    for name, param in tensors:
        path = name.rpartition(".")[0]
        if not param.is_floating_point() or not is_weight(param) or id(modules.get(path)) in inside:
            continue
        owner = _called_owner(called, name)
        kind = _module_kind(modules[path]) if path in modules else OTHER
        if kind == OTHER and owner is None:
            kind = _kind_of_reads(readers.get(name, []))
        key = _holder(name, reasons)
        if key is None:
            key, reason = _reason(gm, name, owner, readers.get(name, []), quantize_linear)
            reasons[key] = reason
        weights[name] = FloatWeight(kind, param.numel(), param.element_size() * 8)
    return reasons, weights


def _called_owner(called: set[str], name: str) -> Optional[str]:
    """The innermost module called as a whole (its name in ``called``) that holds parameter ``name``."""
    parts = name.split(".")[:-1]
    for end in range(len(parts), 0, -1):
        path = ".".join(parts[:end])
        if path in called:
            return path
    return None


def _reason(gm: fx.GraphModule, name: str, owner: Optional[str], users: list[fx.Node],
            quantize_linear: bool) -> tuple[str, str]:
    if owner is not None:
        module = gm.get_submodule(owner)
        if isinstance(module, nn.Linear) and not quantize_linear:
            return owner, LINEAR_OFF
        return owner, _module_reason(module)
    for user in users:
        if user.op in ("call_function", "call_method"):
            return name, _call_reason(user)[1]
        if user.op == "call_module":
            module = gm.get_submodule(str(user.target))
            return name, f"an input of {type(module).__name__} '{user.target}', called as one module; left float"
    return name, "not used by any op cora_fx quantizes; left float"


def warn_float(model_name: str, reasons: Mapping[str, str], stacklevel: int = 3) -> None:
    """One `CoRaFloatWeightsWarning` naming the float weights the config did not choose to keep float."""
    surprising = [n for n, why in reasons.items() if not any(c in why for c in CHOSEN)]
    if surprising:
        shown = ", ".join(surprising[:8]) + (", ..." if len(surprising) > 8 else "")
        warnings.warn(f"prepare_cora: {len(surprising)} weight-bearing layer(s) of {model_name} stay float: {shown}; "
                      "summary(prepared).skipped gives each reason", CoRaFloatWeightsWarning, stacklevel=stacklevel)


def unreported_weights(quantized: fx.GraphModule, model: nn.Module) -> list[str]:
    """Weight parameters (`is_weight`) of the float ``model`` that ``quantized`` (prepared or converted) neither
    quantized nor lists in ``summary().skipped``: empty whenever `prepare_cora` kept its promise (the zoo sweep and
    the tests check it). Buffers are left out: a buffer is a weight only where an op uses it as one (an ONNX
    initializer read by MatMul), which `float_weights` checks in the graph itself."""
    from cora_fx.io.summary import summary

    report = summary(quantized)
    covered = [layer.name for layer in report.layers] + list(report.skipped)
    return [name for name, p in model.named_parameters()
            if is_weight(p) and not any(name == k or name.startswith(k + ".") for k in covered)]
