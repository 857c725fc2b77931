"""`export_onnx`: a converted model as an ONNX file whose weights are integer initializers.

The converted graph computes each weight as ``scale * (unpack(words) - zero_point)``. For export, every such
chain becomes a named float constant, ``torch.onnx.export`` (the torch.export-based exporter) writes the
graph, and each constant is then replaced by its codes at their own width and the nodes that decode them
(`onnx_encoding`). Activation quantizers (``act_bits``, lowered to torch's ``quantized_decomposed`` ops) are
exported by torch as QuantizeLinear / DequantizeLinear pairs, which onnxruntime fuses with the weights into
integer kernels (docs/method.md section 15). ``onnx`` and ``onnxruntime`` are the optional extra
``pip install cora-fx[onnx]``.
"""
from __future__ import annotations

import copy
import itertools
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from cora_fx.calibrate.activations import quantized_decomposed
from cora_fx.devices import host_copy
from cora_fx.errors import CoRaError
from cora_fx.graph.capture import dynamic_shapes
from cora_fx.io.onnx_encoding import (
    EncodedWeight,
    dedupe_initializers,
    encode_codes,
    encode_initializers,
    fold_constant_casts,
    quantize_gemm_biases,
    require_onnx,
    int8_encoding,
    symmetric_int8,
)
from cora_fx.state import CONVERTED, get_state

#: ``"compact"`` (what ``"auto"`` means): each weight at its own width, decoded by constant ops onnxruntime folds at
#: load (integer kernels with ``act_bits``, float weights without); ``"codes"``: DequantizeLinear of the codes on
#: every run (QDQ for runtimes that read 4-bit QDQ weights); ``"int8"``: INT8 initializers (runtimes without 4-bit
#: tensors).
WEIGHT_FORMATS = ("auto", "compact", "codes", "int8")
CONSTANTS = "cora_onnx_constants"  # the export copy's submodule holding the weights as float buffers
aten = torch.ops.aten
# the converted graph's ops, and the same ops in a module `load` returns (torch.export's ATen graph)
QLINEAR_CONV = torch.ops.cora_fx.qlinear_conv2d.default  # `quant.integer`: an integer conv, weight at index 3
_LAYERS = (F.conv2d, F.linear, aten.conv2d.default, aten.linear.default, QLINEAR_CONV)
_MUL = (operator.mul, aten.mul.Tensor)
_SUB = (operator.sub, aten.sub.Tensor)
REQUANTIZE_INT8 = torch.ops.cora_fx.requantize_int8.default  # `quant.integer`: a weight rounded to 8 bits


def export_onnx(model: fx.GraphModule, example_inputs: tuple, path: Union[str, Path], *, weights: str = "auto",
                opset: int = 21, dynamic_batch: bool = True, dynamic_size: bool = False,
                debug_info: bool = False) -> Path:
    """Write the converted ``model`` as an ONNX file at ``path`` (``model`` is not changed).

    Args:
        model: a `convert_cora` result, or the module `load` returned for a saved one.
        example_inputs: a tuple of example inputs, as for ``torch.export.export``.
        path: the ``.onnx`` file to write; written whole or not at all.
        weights: ``"auto"`` / ``"compact"``: every quantized weight stored at its own width (4-bit codes as
            UINT4, 3- and 2-bit codes in 4-bit containers, 8-bit as INT8 / UINT8), turned by constant ops that
            onnxruntime folds when the session loads into the INT8 weight of an integer kernel (a model with
            ``act_bits``: QLinearConv) or into a float weight (weight-only: float speed); a folded adapter is
            computed from the codes of [W]_n, A and B and rounded to 8 bits as in torch (docs/method.md s.15).
            ``"codes"``: DequantizeLinear of each weight's own codes, run on every inference (the QDQ layout for
            runtimes that read 4-bit QDQ weights themselves). ``"int8"``: every quantized weight as one INT8
            per-channel tensor (runtimes without 4-bit tensors; twice the bytes of ``"compact"``).
        opset: the ONNX opset, at least 21 (4-bit tensors).
        dynamic_batch: the first dimension of every input is a symbolic batch size.
        dynamic_size: the dimensions after the second of every input (an image's height and width) are symbolic
            too, for a model that runs at several input sizes; a model that fixes one of them is refused with a
            `CoRaError` naming ``dynamic_size``, never written with a fixed shape.
        debug_info: keep what torch.onnx records for debugging: each node's source module, FX node and stack
            trace, and the shapes of intermediate values (about a quarter of a 4-bit MobileNetV2 file).
    Returns:
        ``path`` as a `pathlib.Path`; the file passes ``onnx.checker.check_model``.
    """
    onnx = require_onnx()
    fmt = _check_arguments(model, example_inputs, weights, opset)
    model, example_inputs = host_copy(model, example_inputs)  # the file's tensors are read from the host
    gm, table = weights_as_constants(model, example_inputs, fmt)
    # a weight computed in the graph (a folded adapter) must not be constant-folded by the exporter
    computed = any(n.op == "call_function" and n.target in _LAYERS and (_weight_arg(n) or n).op != "get_attr"
                   for n in gm.graph.nodes)
    inputs, shapes = dynamic_shapes(example_inputs, dynamic_batch, dynamic_size)
    proto = _torch_export(gm, inputs, opset, shapes, optimize=not computed)
    _check_dynamic(proto, dynamic_batch, dynamic_size)
    fold_constant_casts(proto)
    encode_initializers(proto, table)
    if fmt != "codes":
        quantize_gemm_biases(proto, table)
    proto = _tidy(proto)
    dedupe_initializers(proto.graph)
    if not debug_info:
        strip_debug_info(proto)
    onnx.checker.check_model(proto, full_check=True)
    return _write(proto, Path(path))


def _tidy(proto: Any) -> Any:
    """onnxscript's optimizer (the exporter's) with constant folding limited to scalars and shapes: it drops the
    exporter's shape arithmetic and never folds a weight's decoding ops (that would store the weight wide)."""
    import onnxscript.optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnxscript.optimizer.optimize(proto, input_size_limit=1, output_size_limit=16)


def _check_arguments(model: Any, example_inputs: Any, weights: str, opset: Any) -> str:
    """The weight format ``weights`` names, after checking every argument (nothing is written before)."""
    _check_converted(model)
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"export_onnx: weights={weights!r} must be one of {WEIGHT_FORMATS}")
    if not isinstance(opset, int) or opset < 21:
        raise ValueError(f"export_onnx: opset={opset!r} must be an integer >= 21 (4-bit tensors need opset 21)")
    if not isinstance(example_inputs, tuple):
        raise TypeError("export_onnx: example_inputs must be a tuple of inputs, e.g. (x,)")
    return "compact" if weights == "auto" else weights


def _write(proto: Any, path: Path) -> Path:
    """Save ``proto`` at ``path`` through a temporary file beside it: a failed write leaves no partial file."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        onnx.save(proto, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _check_dynamic(proto: Any, batch: bool, size: bool) -> None:
    """Refuse a file whose inputs lost the symbolic sizes asked for (a fixed shape is never written silently)."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        wanted = ([0] if batch and dims else []) + (list(range(2, len(dims))) if size else [])
        fixed = [d for d in wanted if not dims[d].dim_param]
        if fixed:
            argument = "dynamic_size" if any(d >= 2 for d in fixed) else "dynamic_batch"
            shape = [d.dim_param or d.dim_value for d in dims]
            raise CoRaError(f"export_onnx: {argument}=True, but input '{value.name}' was exported with the fixed shape "
                            f"{shape}: the model fixes that size (a module `load` returned keeps the sizes it was "
                            f"saved with: save it with save(..., dynamic_size=True), or export the converted model), "
                            f"or pass {argument}=False")


def strip_debug_info(proto: Any) -> None:
    """Drop the nodes' metadata, doc strings and names and the graph's intermediate shapes (none of them is run),
    and give the intermediate values and initializers short names (`short_names`)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
    del proto.graph.value_info[:]
    short_names(proto.graph)


def short_names(graph: Any) -> None:
    """Rename every value but the graph's inputs and outputs to a short name (a 4-bit file is a tenth names else).

    A graph with subgraphs (If, Loop, Scan), whose bodies may read outer names, keeps its names.
    """
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    kept = {v.name for v in (*graph.input, *graph.output)} | {""}
    names: dict[str, str] = {}
    fresh = (name for i in itertools.count() if (name := np.base_repr(i, 36).lower()) not in kept)

    def short(name: str) -> str:
        if name not in kept and name not in names:
            names[name] = next(fresh)
        return names.get(name, name)

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]


def _check_converted(model: Any) -> None:
    """Raise unless ``model`` is a converted model or a module `load` returned (whose saved summary it carries)."""
    from cora_fx.io.serialization import SUMMARY_META_KEY

    if not (isinstance(model, fx.GraphModule) and SUMMARY_META_KEY in model.meta):
        get_state(model, CONVERTED, "model")


def _torch_export(gm: fx.GraphModule, example_inputs: tuple, opset: int, shapes: Optional[tuple],
                  optimize: bool = True) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, example_inputs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, verbose=False, report=False, optimize=optimize,
                                        custom_translation_table={QLINEAR_CONV: _qlinear_conv_onnx,
                                                                  REQUANTIZE_INT8: _requantize_int8_onnx})
    except ImportError as err:
        raise ImportError(f"export_onnx: {err}; pip install 'cora-fx[onnx]'") from err
    except Exception as err:
        if shapes is not None and _violates_constraints(err):
            raise CoRaError("export_onnx: the model cannot run with the symbolic input sizes asked for "
                            "(dynamic_batch / dynamic_size): it fixes them or computes shapes from them that "
                            "torch.export cannot keep symbolic; pass dynamic_size=False (and "
                            f"dynamic_batch=False) or make the model size-generic. torch.export said: "
                            f"{str(err).strip().splitlines()[0][:300]}") from err
        ops = sorted(set(re.findall(r"(?:aten|torch\.ops)\.[A-Za-z0-9_.:]+", str(err))))
        named = f" (ops: {', '.join(ops[:5])})" if ops else ""
        raise CoRaError(f"export_onnx: torch.onnx could not export the model{named}: the op has no ONNX form; "
                        f"keep that part out of the exported model or register an ONNX translation for it. "
                        f"torch.onnx said: {str(err).strip().splitlines()[0][:300]}") from err
    return program.model_proto


def _qlinear_conv_onnx(x_codes: Any, x_scale: Any, x_zero_point: Any, weight: Any, weight_scale: Any, bias: Any,
                       y_scale: Any, y_zero_point: Any, stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> Any:
    """`quant.integer.qlinear_conv2d` as DequantizeLinear -> Conv -> QuantizeLinear, which onnxruntime fuses into
    QLinearConv with the same arithmetic (``weight_scale`` is the scale of the weight's DequantizeLinear)."""
    from onnxscript import opset21 as op

    x = op.DequantizeLinear(x_codes, x_scale, x_zero_point)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    y = op.Conv(*inputs, strides=stride, pads=[*padding, *padding], dilations=dilation, group=groups)
    return op.QuantizeLinear(y, y_scale, y_zero_point)


def _requantize_int8_onnx(weight: Any, scale: Any) -> Any:
    """`quant.integer.requantize_int8` as constant ops giving INT8 codes, then DequantizeLinear per output channel:
    onnxruntime folds the constant ops at load and fuses the DequantizeLinear into an integer kernel."""
    from onnx import TensorProto
    from onnxscript import opset21 as op

    low, high = op.Constant(value_float=-127.0), op.Constant(value_float=127.0)
    codes = op.Cast(op.Clip(op.Round(op.Div(weight, scale)), low, high), to=TensorProto.INT8)
    return op.DequantizeLinear(codes, op.Reshape(scale, op.Constant(value_ints=[-1])), axis=0)


def _violates_constraints(err: BaseException) -> bool:
    """Whether ``err`` or an error it was raised from says that the model fixes a dim asked to be dynamic."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if any(text in str(seen) for text in ("Constraints violated", "inferred a static shape", "cannot be solved")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _weight_arg(node: fx.Node) -> Optional[fx.Node]:
    """The node computing a conv / linear call's weight."""
    index = 3 if node.target is QLINEAR_CONV else 1
    w = node.args[index] if len(node.args) > index else node.kwargs.get("weight")
    return w if isinstance(w, fx.Node) else None


def _calls(node: Any, targets: tuple) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _dequantize_parts(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(codes as float, zero point, scale) when ``node`` is ``(codes.to(float32) - zero_point) * scale``."""
    if not _calls(node, _MUL):
        return None
    sub, scale = node.args
    if not _calls(sub, _SUB):
        return None
    codes, zero_point = sub.args
    if not (isinstance(scale, fx.Node) and scale.op == "get_attr" and isinstance(zero_point, fx.Node)
            and zero_point.op == "get_attr" and isinstance(codes, fx.Node)):
        return None
    return codes, zero_point, scale


def _quantized_input(layer: fx.Node) -> bool:
    """Whether a conv / linear call reads a dequantized activation (onnxruntime then runs an integer kernel)."""
    dequantize = quantized_decomposed().dequantize_per_tensor.default
    return layer.target is QLINEAR_CONV or _calls(layer.args[0], (dequantize,))


class _Values(fx.Interpreter):
    """Runs the graph once and keeps the values of the nodes asked for."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out.detach().float().clone()
        return out


def _drop_casts(gm: fx.GraphModule) -> None:
    """The export is float32 throughout: casts of weights to the input's type and dtype asserts go."""
    for node in list(gm.graph.nodes):
        if (node.op, node.target) in (("call_method", "type_as"), ("call_function", aten.type_as.default)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)


class _Constants:
    """The export copy's weights as named float buffers (``cora_onnx_constants.*``), with their encodings."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, torch.Tensor]) -> None:
        self.gm = gm
        self.values = values
        self.holder = torch.nn.Module()
        gm.add_submodule(CONSTANTS, self.holder)
        self.table: dict[str, EncodedWeight] = {}

    def encoded(self, node: fx.Node, encoded: EncodedWeight) -> None:
        """``node`` becomes a float constant that `encode_initializers` replaces by ``encoded``."""
        name = f"w{len(self.table)}"
        self.holder.register_buffer(name, self.values[node])
        with self.gm.graph.inserting_before(node):
            node.replace_all_uses_with(self.gm.graph.get_attr(f"{CONSTANTS}.{name}"))
        self.table[f"{CONSTANTS}.{name}"] = encoded


def weights_as_constants(model: fx.GraphModule, example_inputs: tuple, fmt: str
                         ) -> tuple[fx.GraphModule, dict[str, EncodedWeight]]:
    """A copy of ``model`` whose weights are named float buffers, and the encoding of each.

    ``fmt`` is a `WEIGHT_FORMATS` name. Each dequantize chain becomes one buffer, encoded in the form its use
    needs (`onnx_encoding.FORMS`); with ``"int8"`` a weight computed from several stored tensors (a folded
    adapter) becomes one INT8 buffer, else its computation stays in the graph (`requantize_int8` included).
    """
    gm = copy.deepcopy(model)  # its own submodules: the rewrites below leave the user's model as it was
    _drop_casts(gm)
    chains = {n: p for n in gm.graph.nodes if (p := _dequantize_parts(n)) is not None}
    layers = {w: n for n in gm.graph.nodes if _calls(n, _LAYERS) if (w := _weight_arg(n)) is not None}
    computed = [w for w in layers if w.op != "get_attr" and w not in chains]
    grids = {w: w.args[1] for w in computed if _calls(w, (REQUANTIZE_INT8,))}  # weights already on an 8-bit grid
    wanted = set(chains) | {p for parts in chains.values() for p in parts} | set(computed) | set(grids.values())
    interpreter = _Values(gm, wanted)
    with torch.no_grad():
        interpreter.run(*example_inputs)
    constants = _Constants(gm, interpreter.values)
    for node in computed if fmt == "int8" else []:
        scale = interpreter.values[grids[node]] if node in grids else None
        constants.encoded(node, int8_encoding(interpreter.values[node], scale))
    gm.graph.eliminate_dead_code()
    live = set(gm.graph.nodes)
    for node, parts in chains.items():
        if node in live:
            codes, zero_point, scale = (interpreter.values[p] for p in parts)
            encoded = (symmetric_int8(codes, zero_point, scale) if fmt == "int8"
                       else encode_codes(codes, zero_point, scale, _form(fmt, node, layers)))
            constants.encoded(node, encoded)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, constants.table


def _form(fmt: str, chain: fx.Node, layers: dict[fx.Node, fx.Node]) -> str:
    """How a dequantize chain is decoded (`onnx_encoding.FORMS`) in the weight format ``fmt``."""
    if fmt == "codes":
        return "dequantize"
    return "kernel" if chain in layers and _quantized_input(layers[chain]) else "float"
