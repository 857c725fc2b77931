"""Every weight-bearing call of a captured graph as a layer module cora_fx can quantize (docs/method.md s.12).

Symbolic tracing goes through a user's ``nn.Conv2d`` subclass with its own ``forward`` (a "same"-padding conv,
a weight-standardized conv) and through functional calls, so the graph holds ``F.conv2d(x, <get_attr>, ...)``
where a plain layer would be one module call. Each pass here is a small `PassResult` rewrite:

- `LiftFunctionalLayers`: a conv1d / conv2d / linear call (``torch.nn.functional``, ``torch`` or aten) whose
  weight is a parameter of the model, or is computed from parameters alone (weight standardization,
  masks), becomes a call of a plain ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` holding that weight
  (computed ones are evaluated once, here). The layer takes the name of the module that owned the weight.
- `Conv1dAsConv2d`: an ``nn.Conv1d`` call becomes ``unsqueeze(-1)``, an ``nn.Conv2d`` with a (k, 1)
  kernel, ``squeeze(-1)``: the same values (a 1-D conv is a 2-D conv over a unit dimension, and Theorem 1
  holds for it), quantized with rounding and adapters like any Conv2d.
- `LinearAsConv2d`: an ``nn.Linear`` on ``(..., in)`` becomes a 1x1 ``nn.Conv2d`` on ``(rows, in, 1, 1)``,
  so GPTQ and the adapters (a Linear is a 1x1 conv) apply to it unchanged.

The original kind is kept in ``node.meta["cora_kind"]`` ("conv", "conv1d", "linear") for the accounting.
Calls whose weight depends on the inputs stay float; `float_weights` lists them with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from cora_fx.graph.edits import module_calls, plain, set_submodule
from cora_fx.quant.modules import CONV, CONV1D, LINEAR

KIND_META = "cora_kind"

_aten = torch.ops.aten
_CONV2D = {F.conv2d, _aten.conv2d.default, _aten.conv2d.padding}
_CONV1D = {F.conv1d, _aten.conv1d.default, _aten.conv1d.padding}
_LINEAR = {F.linear, _aten.linear.default}
#: ``x @ W`` with a constant (in, out) matrix W: a Linear layer of weight W.T (ONNX MatMul, hand-written layers)
_MATMUL = {torch.matmul, operator.matmul, torch.mm, _aten.matmul.default, _aten.mm.default}
#: ops whose second argument is a weight cora_fx quantizes when it is constant
WEIGHT_OPS = _CONV2D | _CONV1D | _LINEAR | _MATMUL
_TRANSPOSED = (CONV, "a transposed convolution")
#: ops with a weight that cora_fx never quantizes: (kind in the accounting, what the op is)
FLOAT_OPS = {
    F.conv3d: (CONV, "a 3-D convolution"), F.conv_transpose1d: _TRANSPOSED, F.conv_transpose2d: _TRANSPOSED,
    F.conv_transpose3d: _TRANSPOSED, _aten.conv_transpose1d.default: _TRANSPOSED,
    _aten.conv_transpose2d.input: _TRANSPOSED, _aten.conv3d.default: (CONV, "a 3-D convolution"),
    _aten.convolution.default: (CONV, "an aten convolution"), F.embedding: ("other", "an embedding"),
    _aten.embedding.default: ("other", "an embedding"), F.bilinear: ("other", "a bilinear layer"),
}


@dataclass(frozen=True)
class LayerCall:
    """A weight-bearing call read from the graph: which op, the weight and bias nodes, the conv settings."""

    kind: str
    weight: fx.Node
    bias: Optional[fx.Node]
    transposed: bool = False  # x @ W: the Linear's weight is W.T
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1


def layer_call(node: fx.Node) -> Optional[LayerCall]:
    """The `LayerCall` of a conv1d / conv2d / linear call_function node, else None."""
    if node.op != "call_function" or node.target not in WEIGHT_OPS or len(node.args) < 2:
        return None
    if node.target in _MATMUL:
        x, weight = node.args[:2]
        if (not isinstance(weight, fx.Node) or not isinstance(x, fx.Node) or constant_producers(weight) is None
                or constant_producers(x)):
            return None  # a product of two activations (attention) holds no weight
        return LayerCall(LINEAR, weight, None, transposed=True)
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    if not isinstance(values.get("weight"), fx.Node):
        return None
    kind = LINEAR if node.target in _LINEAR else CONV1D if node.target in _CONV1D else CONV
    settings = {k: values[k] for k in ("stride", "padding", "dilation", "groups") if values.get(k) is not None}
    bias = values.get("bias")
    if bias is not None and not isinstance(bias, fx.Node):
        return None
    return LayerCall(kind, values["weight"], bias, **settings)


def constant_producers(node: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes computing ``node`` when it depends on get_attr nodes alone (in graph order), else None."""
    seen: dict[fx.Node, None] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        if current.op not in ("get_attr", "call_function", "call_method", "call_module"):
            return None
        seen[current] = None
        pending += current.all_input_nodes
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def evaluate(gm: fx.GraphModule, producers: list[fx.Node]) -> torch.Tensor:
    """The value of ``producers[-1]``, computed by a graph that holds only ``producers``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in producers:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[producers[-1]])
    with torch.no_grad():
        return fx.GraphModule(gm, graph)().detach()


def _pair(value: Any, dims: int) -> Any:
    if isinstance(value, str):
        return value
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * dims
    return values * dims if len(values) == 1 else values


def build_module(call: LayerCall, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[nn.Module]:
    """A plain nn.Conv1d / nn.Conv2d / nn.Linear computing ``call`` with these tensors (None: shapes do not fit)."""
    dims = {CONV: 4, CONV1D: 3, LINEAR: 2}[call.kind]
    if call.transposed and weight.dim() == 2:
        weight = weight.detach().t().contiguous()
    if weight.dim() != dims or any(isinstance(v, fx.Node) for v in (call.stride, call.padding, call.dilation,
                                                                        call.groups)):
        return None
    if call.kind == LINEAR:
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        cls = nn.Conv2d if call.kind == CONV else nn.Conv1d
        spatial = dims - 2
        module = cls(weight.shape[1] * call.groups, weight.shape[0], tuple(weight.shape[2:]),
                     stride=_pair(call.stride, spatial), padding=_pair(call.padding, spatial),
                     dilation=_pair(call.dilation, spatial), groups=call.groups, bias=bias is not None,
                     device="meta")
    module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return module


def _inside(path: str, prefixes: set[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


class LiftFunctionalLayers:
    """Turn conv1d / conv2d / linear calls on constant weights into plain layer modules (see module docstring).

    ``leaves`` (qualified names) stay as they are. Calls whose weight depends on the inputs are recorded in
    ``skipped`` (name of the weight's owner -> reason); they stay float.
    """

    def __init__(self, leaves: set[str] = frozenset()) -> None:
        self.leaves = set(leaves)
        self.skipped: dict[str, str] = {}

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        lifted: dict[str, str] = {}  # weight's source target -> layer name
        consumed: set[str] = set()  # the tensors the lifted weights were read or computed from
        for node in list(gm.graph.nodes):
            call = layer_call(node)
            if call is None:
                continue
            producers = constant_producers(call.weight)
            bias_producers = constant_producers(call.bias) if call.bias is not None else []
            if producers is None or bias_producers is None:
                self._skip_dynamic(call, node)
                continue
            sources = [str(n.target) for n in producers if n.op == "get_attr"]
            source = sources[0] if sources else call.weight.name
            if _inside(source.rpartition(".")[0], self.leaves):
                continue
            key = source if len(producers) == 1 else call.weight.name  # a computed weight is its own layer
            name = lifted.get(key)
            if name is None:
                name = self._lift(gm, call, producers, bias_producers, source)
                if name is None:
                    continue
                lifted[key] = name
                consumed |= {str(n.target) for n in producers + bias_producers if n.op == "get_attr"}
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (_input(node),))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        if lifted:
            gm.graph.eliminate_dead_code()
            _drop_unread(gm, consumed)
            gm.recompile()
        return PassResult(gm, bool(lifted))

    def _lift(self, gm: fx.GraphModule, call: LayerCall, producers: list[fx.Node], bias_producers: list[fx.Node],
              source: str) -> Optional[str]:
        weight = evaluate(gm, producers) if len(producers) > 1 else _tensor(gm, source)
        bias = None
        if call.bias is not None:
            bias = evaluate(gm, bias_producers) if len(bias_producers) > 1 else _tensor(gm, str(call.bias.target))
        module = build_module(call, weight, bias)
        if module is None:
            self.skipped[source] = f"{call.kind} call with a {weight.dim()}-D weight or computed settings; left float"
            return None
        consumed = {str(n.target) for n in producers + bias_producers if n.op == "get_attr"}
        return _place(gm, source, module, consumed, set(producers + bias_producers))

    def _skip_dynamic(self, call: LayerCall, node: fx.Node) -> None:
        sources = [str(n.target) for n in _ancestors(call.weight) if n.op == "get_attr"]
        where = sources[0] if sources else node.name
        self.skipped[where] = (f"the {call.kind} weight computed in forward depends on the inputs "
                               f"({node.name}); left float")


def _input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs["input"]


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if current not in seen:
            seen[current] = None
            pending += current.all_input_nodes
    return list(seen)


def _owner_of(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, name = _owner_of(gm, target)
    return getattr(owner, name)


def _place(gm: fx.GraphModule, source: str, module: nn.Module, consumed: set[str], producers: set[fx.Node]) -> str:
    """Install ``module`` and return its name: the owner of ``<owner>.weight`` when that owner is a traced-through
    container (an nn.Conv2d subclass, a user layer), keeping its other children and tensors; else the weight's own
    name (``block.w``), or a fresh one beside it when the weight is also read elsewhere (tied weights)."""
    path, _, attr = source.rpartition(".")
    owner = gm.get_submodule(path) if path else None
    if attr == "weight" and owner is not None and type(owner) is nn.Module and _carry(owner, module, consumed, path):
        parent, name = _owner_of(gm, path)
        setattr(parent, name, module)
        return path
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == source]
    tied = any(set(r.users) - producers and not all(layer_call(u) for u in r.users) for r in readers)
    name = source
    if tied or not _exists(gm, source) or not isinstance(_tensor(gm, source), torch.Tensor):
        index = 1
        while _exists(gm, f"{source}_{index}"):
            index += 1
        name = f"{source}_{index}"
    else:
        delattr(*_owner_of(gm, source))
    parent, leaf = _owner_of(gm, name)
    parent.add_module(leaf, module)
    return name


def _carry(owner: nn.Module, module: nn.Module, consumed: set[str], path: str) -> bool:
    """Move ``owner``'s children and tensors (but the ``consumed`` weight and bias) onto ``module``; False, moving
    nothing, when a name would clash with the layer's own attributes."""
    children = dict(owner.named_children())
    tensors = {n: t for n, t in list(owner._parameters.items()) + list(owner._buffers.items())
               if f"{path}.{n}" not in consumed and t is not None}
    if any(hasattr(module, n) for n in list(children) + list(tensors)):
        return False
    for n, child in children.items():
        module.add_module(n, child)
    for n, t in tensors.items():
        if isinstance(t, nn.Parameter):
            module.register_parameter(n, t)
        else:
            module.register_buffer(n, t)
    return True


def _drop_unread(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the tensors in ``targets`` that no node reads any more (the raw weights a computed one came from),
    when they sit in the graph module's own containers (never in a user's module)."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - read:
        if _exists(gm, target):
            owner, name = _owner_of(gm, target)
            if (owner is gm or type(owner) is nn.Module) and isinstance(getattr(owner, name), torch.Tensor):
                delattr(owner, name)


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        owner, name = _owner_of(gm, target)
    except AttributeError:
        return False
    return hasattr(owner, name)


class _AsConv2d:
    """Replace each call of a plain ``layer`` module by the nn.Conv2d that computes it (`_convert`), wrapped in the
    reshapes of `_rewire`; ``leaves`` (qualified names) stay as they are."""

    layer: type = nn.Module
    method = "forward"  # the method a subclass must not override to count as plain
    kind = CONV

    def __init__(self, leaves: set[str] = frozenset()) -> None:
        self.leaves = set(leaves)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        done: set[str] = set()
        for node, module in module_calls(gm, self.layer):
            name = str(node.target)
            if name not in done:
                if name in self.leaves or not plain(module, self.layer, self.method):
                    continue
                set_submodule(gm, name, self._convert(module))
                done.add(name)
            with gm.graph.inserting_before(node):
                out, result = self._rewire(gm.graph, node, name, gm.get_submodule(name))
            out.meta.update(node.meta, **{KIND_META: self.kind})
            node.replace_all_uses_with(result)
            gm.graph.erase_node(node)
        return PassResult(gm, bool(done))

    def _convert(self, module: nn.Module) -> nn.Conv2d:
        raise NotImplementedError

    def _rewire(self, g: fx.Graph, node: fx.Node, name: str, conv: nn.Conv2d) -> tuple[fx.Node, fx.Node]:
        """(the conv's call node, the node that gives the layer's original output)."""
        raise NotImplementedError


class Conv1dAsConv2d(_AsConv2d):
    """``nn.Conv1d`` calls -> unsqueeze(-1), nn.Conv2d with a (k, 1) kernel, squeeze(-1) (same values)."""

    layer, method, kind = nn.Conv1d, "_conv_forward", CONV1D

    def _convert(self, module: nn.Module) -> nn.Conv2d:
        return as_conv2d(module)

    def _rewire(self, g: fx.Graph, node: fx.Node, name: str, conv: nn.Conv2d) -> tuple[fx.Node, fx.Node]:
        out = g.call_module(name, (g.call_method("unsqueeze", (node.args[0], -1)),))
        return out, g.call_method("squeeze", (out, -1))


def as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The nn.Conv2d over (N, C, L, 1) that computes ``conv`` (weight viewed as (out, in/g, k, 1))."""
    padding = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], 0)
    wide = nn.Conv2d(conv.in_channels, conv.out_channels, (conv.kernel_size[0], 1), stride=(conv.stride[0], 1),
                     padding=padding, dilation=(conv.dilation[0], 1), groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode, device="meta")
    wide.weight = nn.Parameter(conv.weight.detach().unsqueeze(-1), requires_grad=False)
    if conv.bias is not None:
        wide.bias = conv.bias
    wide.train(conv.training)
    return wide


class LinearAsConv2d(_AsConv2d):
    """``nn.Linear`` calls on (..., in) -> reshape to (rows, in, 1, 1), a 1x1 nn.Conv2d, reshape back."""

    layer, kind = nn.Linear, LINEAR

    def _convert(self, module: nn.Module) -> nn.Conv2d:
        return pointwise_conv(module)

    def _rewire(self, g: fx.Graph, node: fx.Node, name: str, conv: nn.Conv2d) -> tuple[fx.Node, fx.Node]:
        (x,) = node.args
        lead = g.call_function(operator.getitem, (g.call_function(getattr, (x, "shape")), slice(None, -1)))
        out = g.call_module(name, (g.call_method("reshape", (x, -1, conv.in_channels, 1, 1)),))
        shape = g.call_function(operator.add, (lead, (conv.out_channels,)))
        return out, g.call_method("reshape", (out, shape))


def pointwise_conv(linear: nn.Linear) -> nn.Conv2d:
    """The 1x1 nn.Conv2d over (rows, in, 1, 1) that computes ``linear``."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None, device="meta")
    conv.weight = nn.Parameter(linear.weight.detach()[:, :, None, None], requires_grad=False)
    if linear.bias is not None:
        conv.bias = linear.bias
    conv.train(linear.training)
    return conv
