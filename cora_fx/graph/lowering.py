"""Convert side: plan each layer's stored weights, then lower the graph to tensors and ops.

`conversion_plan` (plain functions, no graph change) gives every CoRa layer its `LoweredLayer`:

1. A_r, B_r truncated at the layer's integer rank (docs/method.md section 3), or the fine-tuned
   A_r, B_r (`finetune`);
2. min-max quantized at ``adapter.bits`` (section 1).

Then these graph rewrites run in this order, by torch.fx's PassManager (`convert_cora`), each a `PassBase`
whose ``requires`` checks its precondition:

3. `FoldBatchNorm` (optional): an eval-mode BatchNorm2d right after a CoRa conv is folded into
   the per-channel scales of [W]_n and of B, and into the bias (exact: scales stay per channel).
4. `LowerToOps`: every CoRa branch becomes a slice of the model's packed
   words (`packing`; one buffer, ``cora_packed_words``), unpack + dequantize ops, and F.conv2d
   calls; the modules are removed. The adapter is either a parallel two-conv branch
   (docs/method.md s.2) or, with ``adapter_form="folded"``, added to the dequantized main weight
   as fold(B o A) (s.4), so the model runs one conv per layer. In a model for an integer runtime
   (``act_bits``) the folded weight is then rounded to a symmetric 8-bit grid per output channel
   (`quant.integer.requantize_int8`), the weight an integer kernel multiplies with (s.15).
5. `LowerActivationQuantizers`: each calibrated activation quantizer becomes a ``quantized_decomposed``
   quantize_per_tensor / dequantize_per_tensor pair on its frozen scale and zero point (docs/method.md s.14).
6. `EmulateIntegerKernels` (``act_bits`` only): each conv between 8-bit activations becomes
   `quant.integer.qlinear_conv2d`, the arithmetic of onnxruntime's QLinearConv (s.15).
7. `Cleanup`: dead code and unused submodules (observers, SVD factors) are deleted.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from cora_fx.calibrate.activations import QUANTIZE, ActivationQuantizer, quantized_decomposed
from cora_fx.errors import CoRaError
from cora_fx.graph.edits import module_calls, set_submodule
from cora_fx.graph.passes import merge_nodes
from cora_fx.quant.integer import integer_kernel_scale, requantize_divisor, requantize_scale
from cora_fx.quant.modules import ConvSpec, CoRaConv2d
from cora_fx.quant.packing import field_bits, pack_codes, unpack_words, word_shifts
from cora_fx.quant.uniform import QuantizedWeight, minmax_quantize

Weight = Union[QuantizedWeight, torch.Tensor]
INTEGER_KERNELS = "cora_integer_kernels"  # the submodule holding `EmulateIntegerKernels`' activation qparams
PACKED_WORDS = "cora_packed_words"  # the root buffer with every weight's packed words (`packing`)
PACKED_LAYOUT_META = "cora_fx_packed_layout"  # gm.meta: "<layer>.<weight>" -> (first word, words)


@dataclass
class LoweredLayer:
    """What one conv becomes: main weight, bias, conv spec, and adapter A/B (or none)."""

    main: QuantizedWeight
    bias: Optional[torch.Tensor]
    spec: ConvSpec
    adapter_a: Optional[Weight] = None
    adapter_b: Optional[Weight] = None


@dataclass
class ConversionPlan:
    """What the lowering passes write: layer name -> `LoweredLayer`, and the adapters' form."""

    adapter_form: str = "parallel"
    layers: dict[str, LoweredLayer] = field(default_factory=dict)
    integer_kernels: bool = False  # activations quantized: weights on INT8 grids (`quant.integer`)


def lowered_layer(layer: CoRaConv2d, adapter_bits: Optional[int]) -> LoweredLayer:
    """One layer's stored weights: the final main codes, A_r and B_r at the hard rank, min-max quantized at
    ``adapter_bits`` (float with None)."""
    quantized = layer.quantized
    lowered = LoweredLayer(quantized.deployed_weight(), quantized.bias, quantized.spec)
    if int(layer.adapter.hard_rank) > 0:
        a, b = layer.adapter.float_weights()
        if adapter_bits is not None:
            a, b = minmax_quantize(a, adapter_bits), minmax_quantize(b, adapter_bits)
        lowered.adapter_a, lowered.adapter_b = a, b
    return lowered


def conversion_plan(gm: fx.GraphModule, adapter_bits: Optional[int], adapter_form: str,
                    integer_kernels: bool = False) -> ConversionPlan:
    """The `LoweredLayer` of every CoRa branch of a prepared graph (the graph is not changed)."""
    layers = {name: lowered_layer(gm.get_submodule(name), adapter_bits) for name, *_ in merge_nodes(gm)}
    return ConversionPlan(adapter_form, layers, integer_kernels)


class _PlannedPass(PassBase):
    """A lowering pass that reads a `ConversionPlan`: it requires a plan entry for every CoRa branch."""

    def __init__(self, plan: ConversionPlan) -> None:
        self.plan = plan

    def requires(self, graph_module: fx.GraphModule) -> None:
        missing = [name for name, *_ in merge_nodes(graph_module) if name not in self.plan.layers]
        if missing:
            raise CoRaError(f"{type(self).__name__}: no conversion plan for {missing}; build it with "
                            f"conversion_plan after the ranks are final")


def _scaled(weight: Weight, factor: torch.Tensor) -> Weight:
    """``weight`` times a per-output-channel ``factor`` (exact for quantized weights: the scale absorbs it)."""
    if isinstance(weight, torch.Tensor):
        return weight * factor.reshape(-1, *[1] * (weight.dim() - 1))
    return weight.rescaled(factor)


class FoldBatchNorm(_PlannedPass):
    """Fold eval-mode BatchNorm2d layers that directly follow a CoRa conv into it."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for name, _, _, merged in merge_nodes(gm):
            users = list(merged.users)
            if len(users) != 1 or users[0].op != "call_module":
                continue
            bn = gm.get_submodule(str(users[0].target))
            if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None:
                continue
            lowered = self.plan.layers[name]
            with torch.no_grad():
                factor = ((bn.weight if bn.weight is not None else torch.ones_like(bn.running_var))
                          / torch.sqrt(bn.running_var + bn.eps))
                shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
                bias = lowered.bias if lowered.bias is not None else torch.zeros_like(bn.running_mean)
                lowered.bias = ((bias - bn.running_mean) * factor + shift).detach().float()
                factor = factor.detach().float()
            lowered.main = _scaled(lowered.main, factor)  # type: ignore[assignment]
            if lowered.adapter_b is not None:
                lowered.adapter_b = _scaled(lowered.adapter_b, factor)
            users[0].replace_all_uses_with(merged)
            gm.graph.erase_node(users[0])
            modified = True
        return PassResult(gm, modified)


class _Emitter:
    """Inserts the unpack / dequantize nodes for stored weights into a graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.chunks: list[torch.Tensor] = []
        self.layout: dict[str, tuple[int, int]] = {}
        self.layout_end = 0
        self.words_node: Optional[fx.Node] = None
        self.tracer = fx.proxy.GraphAppendingTracer(gm.graph)

    def all_words(self) -> fx.Node:
        """``cora_packed_words.view(float32)``, emitted once at the top of the graph."""
        if self.words_node is None:
            self.gm.register_buffer(PACKED_WORDS, torch.empty(0, dtype=torch.uint8))  # filled by `finish`
            first = next(n for n in self.graph.nodes if n.op != "placeholder")
            with self.graph.inserting_before(first):
                self.words_node = self.graph.call_method("view", (self.graph.get_attr(PACKED_WORDS), torch.float32))
        return self.words_node

    def finish(self) -> None:
        """Register the packed words buffer and record where each weight's words start."""
        if self.chunks:
            self.gm.register_buffer(PACKED_WORDS, torch.cat(self.chunks))
            self.gm.meta[PACKED_LAYOUT_META] = dict(self.layout)

    def attr(self, owner: nn.Module, path: str, name: str, value: torch.Tensor) -> fx.Node:
        owner.register_buffer(name, value)
        return self.graph.get_attr(f"{path}.{name}" if path else name)

    def shifts(self, bits: int) -> fx.Node:
        """The `packing.word_shifts` of ``bits``: one buffer per field width, at the graph's root."""
        name = f"cora_word_shifts_{field_bits(bits)}"
        if name not in self.gm._buffers:
            self.gm.register_buffer(name, word_shifts(bits))
        return self.graph.get_attr(name)

    def weight(self, owner: nn.Module, path: str, prefix: str, weight: Weight) -> fx.Node:
        """Nodes computing the float weight: scale * (unpack(packed) - zero_point)."""
        g = self.graph
        if isinstance(weight, torch.Tensor):
            return self.attr(owner, path, prefix, weight.detach().to(torch.float32).clone())
        shape = tuple(weight.codes.shape)
        unsigned = (weight.codes.to(torch.int32) - weight.qmin).to(torch.uint8)
        packed = pack_codes(unsigned, weight.bits)
        start = self.layout_end
        count = packed.numel() // 4
        self.chunks.append(packed.reshape(-1))
        self.layout_end += count
        self.layout[f"{path}.{prefix}" if path else prefix] = (start, count)
        words = g.call_function(operator.getitem, (self.all_words(), slice(start, start + count)))
        words = g.call_method("view", (words, (packed.shape[0], packed.shape[1] // 4)))
        proxy = lambda node: fx.Proxy(node, self.tracer)  # noqa: E731
        codes = unpack_words(proxy(words), proxy(self.shifts(weight.bits)), weight.bits, shape).node
        w = g.call_method("to", (codes, torch.float32))
        # float32, not uint8: integers <= 255 stay exact under half/bfloat16, and a float load is the fast one
        zp = self.attr(owner, path, f"{prefix}_zero_point", (weight.zero_point - weight.qmin).to(torch.float32))
        scale = self.attr(owner, path, f"{prefix}_scale", weight.scale.clone())
        return g.call_function(operator.mul, (g.call_function(operator.sub, (w, zp)), scale))

    def requantized(self, owner: nn.Module, path: str, w: fx.Node, value: torch.Tensor,
                    base_scale: Optional[fx.Node] = None) -> fx.Node:
        """``requantize_int8`` of the weight ``w`` (whose value is ``value``) on its symmetric 8-bit grid: the base
        grid ``|base_scale|`` divided by an integer per row (`requantize_divisor`) when there is one, so the
        quantized main weight stays exact, else max |w| / 127 per row (docs/method.md s.15)."""
        g = self.graph
        if base_scale is None:
            scale = self.attr(owner, path, "weight_requant_scale", requantize_scale(value))
        else:
            divisor = self.attr(owner, path, "weight_requant_divisor",
                                requantize_divisor(value, self.gm.get_buffer(str(base_scale.target))))
            divisor = g.call_method("to", (divisor, torch.float32))
            scale = g.call_function(operator.truediv, (g.call_function(torch.abs, (base_scale,)), divisor))
        return g.call_function(torch.ops.cora_fx.requantize_int8.default, (w, scale))

    def folded_adapter(self, owner: nn.Module, path: str, lowered: LoweredLayer, groups: int) -> fx.Node:
        """Nodes computing fold(B o A) (`residual.fold_two_conv`) from the stored A and B."""
        assert lowered.adapter_a is not None and lowered.adapter_b is not None
        g = self.graph
        a_shape = tuple(_shape(lowered.adapter_a))
        m = _shape(lowered.adapter_b)[0]
        rank = a_shape[0] // groups
        a = g.call_method("reshape", (self.weight(owner, path, "adapter_a", lowered.adapter_a), (groups, rank, -1)))
        b = g.call_method("reshape", (self.weight(owner, path, "adapter_b", lowered.adapter_b),
                                      (groups, m // groups, rank)))
        return g.call_method("reshape", (g.call_function(torch.bmm, (b, a)), (m, *a_shape[1:])))


def _shape(weight: Weight) -> torch.Size:
    return weight.shape if isinstance(weight, torch.Tensor) else weight.codes.shape


def _value(weight: Weight) -> torch.Tensor:
    return weight.detach().float() if isinstance(weight, torch.Tensor) else weight.dequantize()


def folded_value(lowered: LoweredLayer, groups: int) -> torch.Tensor:
    """[W]_n + fold(B o A) of a layer with an adapter, in float (docs/method.md s.4)."""
    assert lowered.adapter_a is not None and lowered.adapter_b is not None
    a, b = _value(lowered.adapter_a), _value(lowered.adapter_b)
    m, rank = b.shape[0], a.shape[0] // groups
    fold = torch.bmm(b.reshape(groups, m // groups, rank), a.reshape(groups, rank, -1))
    return _value(lowered.main) + fold.reshape(m, *a.shape[1:])


#: F.conv2d node meta: the buffer holding the per-channel scale of the weight's symmetric INT8 codes, set when
#: the model is for an integer runtime and the weight has such codes (`EmulateIntegerKernels` reads it).
KERNEL_SCALE_META = "cora_kernel_scale"


class LowerToOps(_PlannedPass):
    """Replace CoRa branches by plain tensor ops on stored codes."""

    def _main_weight(self, emit: _Emitter, owner: nn.Module, name: str, lowered: LoweredLayer,
                     folded: bool) -> tuple[fx.Node, Optional[str]]:
        """The node computing the conv's weight (with the folded adapter, if any) and, for an integer runtime,
        the buffer of its INT8 codes' per-channel scale (None when it has none)."""
        g = self.graph_module.graph
        w = emit.weight(owner, name, "weight", lowered.main)
        if folded:
            base_scale = w.args[1]  # the dequantize chain's scale
            w = g.call_function(operator.add, (w, emit.folded_adapter(owner, name, lowered, lowered.spec.groups)))
            if self.plan.integer_kernels:
                return emit.requantized(owner, name, w, folded_value(lowered, lowered.spec.groups), base_scale), None
            return w, None
        if not self.plan.integer_kernels:
            return w, None
        main = lowered.main
        scale = integer_kernel_scale(main.codes, main.zero_point, main.scale)
        if scale is None:  # codes - zero point beyond 8 signed bits: an integer kernel needs the weight re-rounded
            return emit.requantized(owner, name, w, main.dequantize()), None
        owner.register_buffer("weight_kernel_scale", scale)
        return w, f"{name}.weight_kernel_scale"

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.graph_module = gm
        emit = _Emitter(gm)
        g = gm.graph
        for name, main, adapter, merged in merge_nodes(gm):
            lowered = self.plan.layers[name]
            owner = nn.Module()
            set_submodule(gm, name, owner)
            (x,) = main.args
            with g.inserting_before(merged):
                spec = lowered.spec
                if spec.padding_mode != "zeros":
                    x = g.call_function(F.pad, (x, spec.reversed_padding), {"mode": spec.padding_mode})
                    padding: object = 0
                else:
                    padding = spec.padding
                has_adapter = lowered.adapter_a is not None and lowered.adapter_b is not None
                folded = has_adapter and self.plan.adapter_form == "folded"
                w, kernel_scale = self._main_weight(emit, owner, name, lowered, folded)
                w = g.call_method("type_as", (w, x))
                bias = None
                if lowered.bias is not None:
                    bias = g.call_method("type_as", (emit.attr(owner, name, "bias", lowered.bias.detach().clone()), x))
                out = g.call_function(F.conv2d, (x, w, bias, spec.stride, padding, spec.dilation, spec.groups))
                if kernel_scale is not None and not (has_adapter and not folded):
                    out.meta[KERNEL_SCALE_META] = kernel_scale
                if has_adapter and not folded:
                    a = g.call_method("type_as", (emit.weight(owner, name, "adapter_a", lowered.adapter_a), x))
                    hidden = g.call_function(F.conv2d, (x, a, None, spec.stride, padding, spec.dilation, spec.groups))
                    b = g.call_method("type_as", (emit.weight(owner, name, "adapter_b", lowered.adapter_b), x))
                    out = g.call_function(operator.add,
                                          (out, g.call_function(F.conv2d, (hidden, b, None, 1, 0, 1, spec.groups))))
            merged.replace_all_uses_with(out)
            for node in (merged, adapter, main):
                g.erase_node(node)
        emit.finish()
        return PassResult(gm, True)


class LowerActivationQuantizers(PassBase):
    """Replace each `ActivationQuantizer` call by quantize + dequantize with its frozen constants.

    The ``quantized_decomposed`` ops of torch's PT2 quantization export with a symbolic batch size and become
    ONNX QuantizeLinear / DequantizeLinear (`export_onnx`). Requires every quantizer calibrated.
    """

    def requires(self, graph_module: fx.GraphModule) -> None:
        for node, quantizer in module_calls(graph_module, ActivationQuantizer):
            if quantizer.state != QUANTIZE:
                raise CoRaError(f"activation quantizer '{node.target}' has no calibrated range; run "
                                "calibrate_activations (or run_pipeline) before convert_cora")

    def call(self, gm: fx.GraphModule) -> PassResult:
        ops = quantized_decomposed()
        g = gm.graph
        found = list(module_calls(gm, ActivationQuantizer))
        for node, quantizer in found:
            qparams = (float(quantizer.scale), int(quantizer.zero_point), quantizer.quant_min, quantizer.quant_max,
                       torch.uint8 if quantizer.quant_min >= 0 else torch.int8)
            with g.inserting_before(node):
                codes = g.call_function(ops.quantize_per_tensor.default, (node.args[0], *qparams))
                out = g.call_function(ops.dequantize_per_tensor.default, (codes, *qparams))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            g.erase_node(node)
        return PassResult(gm, bool(found))


#: Activation functions whose clipping an 8-bit output range can make redundant: (low, high) of each.
_CLIPS = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0)}


def _clip_bounds(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[float, float]]:
    """(low, high) when ``node`` is a ReLU / ReLU6 / Hardtanh on its first argument, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.ReLU):
            return 0.0, math.inf
        return (float(module.min_val), float(module.max_val)) if isinstance(module, nn.Hardtanh) else None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, math.inf
    if node.op == "call_function" and node.target is F.hardtanh:
        bounds = (*node.args[1:3], *[node.kwargs[k] for k in ("min_val", "max_val") if k in node.kwargs])
        return (float(bounds[0]), float(bounds[1])) if len(bounds) == 2 else (-1.0, 1.0)
    return _CLIPS.get(node.target) if node.op == "call_function" else None


def _full_range(args: tuple) -> bool:
    """Whether quantize / dequantize arguments (.., quant_min, quant_max, dtype) span their 8-bit dtype."""
    info = torch.iinfo(args[5])
    return args[5] in (torch.uint8, torch.int8) and (args[3], args[4]) == (info.min, info.max)


def _kernel_scale(conv: fx.Node) -> Union[fx.Node, str, None]:
    """The per-channel scale of a conv weight's INT8 codes: the scale node of its ``requantize_int8``, the buffer
    named by `KERNEL_SCALE_META`, or None (a float weight, or a model not for an integer runtime)."""
    weight = conv.args[1]
    while isinstance(weight, fx.Node) and weight.op == "call_method" and weight.target == "type_as":
        weight = weight.args[0]
    if isinstance(weight, fx.Node) and weight.target is torch.ops.cora_fx.requantize_int8.default:
        return weight.args[1]
    return conv.meta.get(KERNEL_SCALE_META)


class EmulateIntegerKernels(PassBase):
    """Run each conv between 8-bit activations as onnxruntime's QLinearConv computes it (`qlinear_conv2d`).

    A conv qualifies when it has INT8 weight codes (`KERNEL_SCALE_META`), reads ``dequantize(quantize(x))``, and
    its output reaches one 8-bit ``quantize`` through at most ReLU / ReLU6 layers that the output range makes
    redundant (onnxruntime drops them too). The quantize's uses read the op's codes instead.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        holder = nn.Module()
        gm.add_submodule(INTEGER_KERNELS, holder)
        replaced = 0
        for conv in list(gm.graph.nodes):  # in order: a conv's input codes may be the op an earlier one became
            matched = self._match(gm, conv)
            if matched is not None:
                self._replace(gm, holder, conv, *matched)
                replaced += 1
        return PassResult(gm, replaced > 0)

    @staticmethod
    def _match(gm: fx.GraphModule, conv: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
        """(input quantize node, output quantize node) of a qualifying conv, else None."""
        ops = quantized_decomposed()
        if conv.op != "call_function" or conv.target is not F.conv2d or _kernel_scale(conv) is None:
            return None
        source = conv.args[0]
        quantized = (isinstance(source, fx.Node) and source.target is ops.dequantize_per_tensor.default
                     and isinstance(source.args[0], fx.Node) and _full_range(source.args))
        if isinstance(conv.args[4], str) or not quantized:
            return None
        node, low, high = conv, -math.inf, math.inf
        while len(node.users) == 1 and (bounds := _clip_bounds(gm, next(iter(node.users)))) is not None:
            node, low, high = next(iter(node.users)), max(low, bounds[0]), min(high, bounds[1])
        end = next(iter(node.users)) if len(node.users) == 1 else None
        if end is None or end.target is not ops.quantize_per_tensor.default or not _full_range(end.args):
            return None
        scale, zero = float(end.args[1]), int(end.args[2])
        redundant = low <= scale * (end.args[3] - zero) and high >= scale * (end.args[4] - zero)
        return (source.args[0], end) if redundant else None

    @staticmethod
    def _replace(gm: fx.GraphModule, holder: nn.Module, conv: fx.Node, codes: fx.Node, end: fx.Node) -> None:
        source = conv.args[0]
        g = gm.graph
        qparams = {"x_scale": torch.tensor(float(source.args[1])),
                   "x_zero_point": torch.tensor(int(source.args[2]), dtype=source.args[5]),
                   "y_scale": torch.tensor(float(end.args[1])),
                   "y_zero_point": torch.tensor(int(end.args[2]), dtype=end.args[5])}
        with g.inserting_before(end):
            nodes = {}
            for key, value in qparams.items():
                holder.register_buffer(f"{conv.name}_{key}", value)
                nodes[key] = g.get_attr(f"{INTEGER_KERNELS}.{conv.name}_{key}")
            kernel_scale = _kernel_scale(conv)
            if isinstance(kernel_scale, str):
                kernel_scale = g.get_attr(kernel_scale)
            _, weight, bias, stride, padding, dilation, groups = conv.args
            out = g.call_function(torch.ops.cora_fx.qlinear_conv2d.default, (
                codes, nodes["x_scale"], nodes["x_zero_point"], weight, kernel_scale, bias, nodes["y_scale"],
                nodes["y_zero_point"], list(stride), list(padding), list(dilation), groups))
        end.replace_all_uses_with(out)
        g.erase_node(end)


class Cleanup(PassBase):
    """Drop dead nodes and the modules nothing calls any more (observers, SVD factors)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        return PassResult(gm, True)
