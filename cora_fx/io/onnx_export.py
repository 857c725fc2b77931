"""`export_onnx`: a converted model as an ONNX file whose weights are integer initializers.

The converted graph computes each weight as ``scale * (unpack(words) - zero_point)``. For export, every such
chain becomes a named float constant, ``torch.onnx.export`` (the torch.export-based exporter) writes the
graph, and each constant is then replaced by its integer codes, per-channel scale and zero-point initializers
feeding a ``DequantizeLinear`` node. Activation quantizers (``act_bits``, lowered to torch's
``quantized_decomposed`` ops) are exported by torch as QuantizeLinear / DequantizeLinear pairs, which
onnxruntime fuses with the int8 weights into integer kernels (docs/method.md section 15).
``onnx`` and ``onnxruntime`` are the optional extra ``pip install cora-fx[onnx]``.
"""
from __future__ import annotations

import copy
import operator
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from cora_fx.errors import CoRaError
from cora_fx.state import CONVERTED, get_state

WEIGHT_FORMATS = ("auto", "codes", "int8")
CONSTANTS = "cora_onnx_constants"  # the export copy's submodule holding the weights as float buffers
aten = torch.ops.aten
# the converted graph's ops, and the same ops in a module `load` returns (torch.export's ATen graph)
_LAYERS = (F.conv2d, F.linear, aten.conv2d.default, aten.linear.default)
_MUL = (operator.mul, aten.mul.Tensor)
_SUB = (operator.sub, aten.sub.Tensor)


@dataclass
class EncodedWeight:
    """Integer codes of one weight for ``DequantizeLinear``: ``w = scale * (codes - zero_point)`` per row."""

    codes: np.ndarray  # integer values, output channels first
    scale: np.ndarray  # float32, one per output channel (or a scalar)
    zero_point: np.ndarray  # same dtype as codes, same shape as scale
    onnx_type: int  # onnx.TensorProto data type of codes and zero point


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX export needs the optional packages onnx and onnxscript: "
                          "pip install 'cora-fx[onnx]'") from err
    return onnx


def export_onnx(model: fx.GraphModule, example_inputs: tuple, path: Union[str, Path], *, weights: str = "auto",
                opset: int = 21, dynamic_batch: bool = True, dynamic_size: bool = False,
                debug_info: bool = False) -> Path:
    """Write the converted ``model`` as an ONNX file at ``path`` (``model`` is not changed).

    Args:
        model: a `convert_cora` result, or the module `load` returned for a saved one.
        example_inputs: a tuple of example inputs, as for ``torch.export.export``.
        path: the ``.onnx`` file to write.
        weights: ``"codes"``: each quantized weight as its own codes (UINT4 when they fit in 4 bits, else
            UINT8) with a DequantizeLinear node; a folded adapter is computed in the graph from the codes of
            [W]_n, A and B, as in torch. ``"int8"``: every quantized conv / linear weight as one INT8
            per-channel tensor (a folded weight re-quantized at 8 bits), the layout onnxruntime runs with
            integer kernels when activations are quantized too. ``"auto"``: ``"int8"`` for a model with
            activation quantizers (``act_bits``), ``"codes"`` otherwise.
        opset: the ONNX opset, at least 21 (4-bit tensors).
        dynamic_batch: the first dimension of every input is a symbolic batch size.
        dynamic_size: the dimensions after the second of every input (an image's height and width) are symbolic
            too, for a model that runs at several input sizes.
        debug_info: keep what torch.onnx records for debugging: each node's source module, FX node and stack
            trace, and the shapes of intermediate values (about a quarter of a 4-bit MobileNetV2 file).
    Returns:
        ``path`` as a `pathlib.Path`; the file passes ``onnx.checker.check_model``.
    """
    act_bits = _activation_bits(model)
    onnx = require_onnx()
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"export_onnx: weights={weights!r} must be one of {WEIGHT_FORMATS}")
    if not isinstance(opset, int) or opset < 21:
        raise ValueError(f"export_onnx: opset={opset!r} must be an integer >= 21 (4-bit tensors need opset 21)")
    if not isinstance(example_inputs, tuple):
        raise TypeError("export_onnx: example_inputs must be a tuple of inputs, e.g. (x,)")
    if weights == "auto":
        weights = "int8" if act_bits is not None else "codes"
    gm, table = weights_as_constants(model, example_inputs, integer_kernels=weights == "int8")
    # a weight computed in the graph (a folded adapter kept as codes) must not be constant-folded by the exporter
    computed = any(n.op == "call_function" and n.target in _LAYERS and (_weight_arg(n) or n).op != "get_attr"
                   for n in gm.graph.nodes)
    proto = _torch_export(gm, example_inputs, opset, _dynamic_shapes(example_inputs, dynamic_batch, dynamic_size),
                          optimize=not computed)
    encode_initializers(proto, table)
    if weights == "int8":
        quantize_gemm_biases(proto, table)
    if not debug_info:
        strip_debug_info(proto)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def strip_debug_info(proto: Any) -> None:
    """Drop the nodes' metadata and doc strings and the graph's intermediate shapes (none of them is run)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


def _activation_bits(model: Any) -> Optional[int]:
    """``config.activation.bits`` of a converted model, or of a module `load` returned (read from its saved
    config as data: nothing it names is imported)."""
    from cora_fx.io.serialization import SUMMARY_META_KEY

    saved = getattr(model, "meta", {}).get(SUMMARY_META_KEY) if isinstance(model, fx.GraphModule) else None
    if saved is not None:
        return (saved.config.get("activation") or {}).get("bits")
    return get_state(model, CONVERTED, "model").config.activation.bits


def _dynamic_shapes(example_inputs: tuple, batch: bool, size: bool) -> Optional[tuple]:
    """``torch.export`` dynamic shapes: a shared symbolic batch, and per-input symbolic sizes after dim 1."""
    if not (batch or size):
        return None
    shapes: list[Optional[dict]] = []
    for index, x in enumerate(example_inputs):
        dims: dict[int, Any] = {}
        if isinstance(x, torch.Tensor) and x.dim():
            if batch:
                dims[0] = torch.export.Dim("batch", min=1)
            for d in range(2, x.dim()) if size else ():
                dims[d] = torch.export.Dim(f"input{index}_dim{d}", min=2)
        shapes.append(dims or None)
    return tuple(shapes)


def _torch_export(gm: fx.GraphModule, example_inputs: tuple, opset: int, shapes: Optional[tuple],
                  optimize: bool = True) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, example_inputs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, verbose=False, report=False, optimize=optimize)
    except ImportError as err:
        raise ImportError(f"export_onnx: {err}; pip install 'cora-fx[onnx]'") from err
    except Exception as err:
        ops = sorted(set(re.findall(r"(?:aten|torch\.ops)\.[A-Za-z0-9_.:]+", str(err))))
        named = f" (ops: {', '.join(ops[:5])})" if ops else ""
        raise CoRaError(f"export_onnx: torch.onnx could not export the model{named}: the op has no ONNX form; "
                        f"keep that part out of the exported model or register an ONNX translation for it. "
                        f"torch.onnx said: {str(err).strip().splitlines()[0][:300]}") from err
    return program.model_proto


def _weight_arg(node: fx.Node) -> Optional[fx.Node]:
    """The node computing a conv / linear call's weight."""
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return w if isinstance(w, fx.Node) else None


def _dequantize_parts(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(codes as float, zero point, scale) when ``node`` is ``(codes.to(float32) - zero_point) * scale``."""
    if node.op != "call_function" or node.target not in _MUL:
        return None
    sub, scale = node.args
    if not (isinstance(sub, fx.Node) and sub.op == "call_function" and sub.target in _SUB):
        return None
    codes, zero_point = sub.args
    if not (isinstance(scale, fx.Node) and scale.op == "get_attr" and isinstance(zero_point, fx.Node)
            and zero_point.op == "get_attr" and isinstance(codes, fx.Node)):
        return None
    return codes, zero_point, scale


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


def weights_as_constants(model: fx.GraphModule, example_inputs: tuple,
                         integer_kernels: bool) -> tuple[fx.GraphModule, dict[str, EncodedWeight]]:
    """A copy of ``model`` whose weights are named float buffers, and the integer form of each buffer.

    With ``integer_kernels`` a weight computed from several stored tensors (a folded adapter) becomes one
    buffer first; the dequantize chains left in the graph become one buffer each.
    """
    gm = copy.deepcopy(model)  # its own submodules: the rewrites below leave the user's model as it was
    for node in list(gm.graph.nodes):  # the export is float32 throughout: casts of weights to the input's type go
        if (node.op, node.target) in (("call_method", "type_as"), ("call_function", aten.type_as.default)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    chains = {n: p for n in gm.graph.nodes if (p := _dequantize_parts(n)) is not None}
    computed = [w for n in gm.graph.nodes if n.op == "call_function" and n.target in _LAYERS
                if (w := _weight_arg(n)) is not None and w.op != "get_attr" and w not in chains]
    wanted = set(chains) | {p for parts in chains.values() for p in parts} | set(computed)
    interpreter = _Values(gm, wanted)
    with torch.no_grad():
        interpreter.run(*example_inputs)
    holder = torch.nn.Module()
    gm.add_submodule(CONSTANTS, holder)
    table: dict[str, EncodedWeight] = {}

    def to_constant(node: fx.Node, encoded: EncodedWeight) -> None:
        name = f"w{len(table)}"
        holder.register_buffer(name, interpreter.values[node])
        table[f"{CONSTANTS}.{name}"] = encoded
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(f"{CONSTANTS}.{name}"))

    for node in computed if integer_kernels else []:
        to_constant(node, requantize_int8(interpreter.values[node]))
    gm.graph.eliminate_dead_code()
    live = set(gm.graph.nodes)
    for node, parts in chains.items():
        if node in live:
            codes, zero_point, scale = (interpreter.values[p] for p in parts)
            to_constant(node, encode_codes(codes, zero_point, scale, integer_kernels))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, table


def _rows(t: torch.Tensor) -> np.ndarray:
    """A scale or zero point as one value per output channel (a scalar stays a scalar)."""
    return t.reshape(-1).numpy() if t.numel() > 1 else t.reshape(()).numpy()


def encode_codes(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 integer_kernels: bool) -> EncodedWeight:
    """Integer codes with ``(codes - zero_point) * scale`` equal to the converted weight.

    The unsigned field (0..15 or 0..255) is kept as UINT4 / UINT8, value for value. For integer kernels
    the weight is stored as symmetric INT8 with zero point 0 (the layout onnxruntime's s8 convolution
    kernels take): ``codes - zero_point`` itself where it fits in [-128, 127] (every weight narrower than 8
    bits, and 8-bit weights on a symmetric grid: exact), else re-quantized at 8 bits. Channels whose scale
    is negative (a folded BatchNorm with gamma < 0) are mirrored, so every stored scale is positive.
    """
    onnx = require_onnx()
    if integer_kernels:
        return _symmetric_int8(codes, zero_point, scale)
    top = 15 if float(codes.max()) <= 15 and float(zero_point.max()) <= 15 else 255
    scale_rows = _rows(scale).astype(np.float32)
    flip = scale_rows < 0
    c = codes.numpy().astype(np.int32)
    z = np.broadcast_to(_rows(zero_point), scale_rows.shape).astype(np.int32).copy()
    if flip.any():
        mask = flip.reshape(-1, *[1] * (c.ndim - 1)) if flip.ndim else flip
        c = np.where(mask, top - c, c)
        z = np.where(flip, top - z, z)
        scale_rows = np.abs(scale_rows)
    onnx_type = onnx.TensorProto.UINT8 if top == 255 else onnx.TensorProto.UINT4
    return EncodedWeight(c.astype(np.uint8), scale_rows, z.astype(np.uint8), onnx_type)


def _symmetric_int8(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor) -> EncodedWeight:
    """Per-output-channel INT8 codes, zero point 0: exact when ``codes - zero_point`` fits in 8 signed bits."""
    onnx = require_onnx()
    rows = codes.shape[0]
    shape = (-1, *[1] * (codes.dim() - 1))
    scale_rows = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(rows)
    zero_rows = torch.as_tensor(zero_point, dtype=torch.float32).reshape(-1).expand(rows)
    signed = (codes.float() - zero_rows.reshape(shape)) * scale_rows.sign().reshape(shape)
    if float(signed.min()) < -128 or float(signed.max()) > 127:
        return requantize_int8(signed * scale_rows.abs().reshape(shape))
    return EncodedWeight(signed.numpy().astype(np.int8), scale_rows.abs().numpy().astype(np.float32),
                         np.zeros(rows, np.int8), onnx.TensorProto.INT8)


def requantize_int8(weight: torch.Tensor) -> EncodedWeight:
    """Symmetric per-output-channel INT8 codes of a weight: max |w| of each row maps to 127."""
    onnx = require_onnx()
    rows = weight.reshape(weight.shape[0], -1)
    scale = (rows.abs().amax(dim=1) / 127).clamp_min(1e-12)
    codes = torch.round(weight / scale.reshape(-1, *[1] * (weight.dim() - 1))).clamp(-127, 127)
    return EncodedWeight(codes.numpy().astype(np.int8), scale.numpy().astype(np.float32),
                         np.zeros(weight.shape[0], np.int8), onnx.TensorProto.INT8)


def _integer_tensor(values: np.ndarray, onnx_type: int, name: str) -> Any:
    """An initializer with raw data: INT8 / UINT8 one byte per value, UINT4 two values per byte (low first)."""
    onnx = require_onnx()
    if onnx_type != onnx.TensorProto.UINT4:
        return onnx.numpy_helper.from_array(values, name)
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(name, onnx_type, values.shape, packed.tobytes(), raw=True)


def encode_initializers(proto: Any, table: dict[str, EncodedWeight]) -> None:
    """Replace each float initializer named in ``table`` by codes, scale and zero point + DequantizeLinear."""
    require_onnx()
    from onnx import helper, numpy_helper
    graph = proto.graph
    found = {init.name: init for init in graph.initializer if init.name in table}
    missing = sorted(set(table) - set(found))
    if missing:
        raise CoRaError(f"export_onnx: the exported graph lost the weight constants {missing[:3]}; "
                        "this torch.onnx version folded them into other constants")
    nodes = []
    for name, init in found.items():
        enc = table[name]
        graph.initializer.remove(init)
        codes = _integer_tensor(enc.codes, enc.onnx_type, f"{name}.codes")
        zero = _integer_tensor(np.asarray(enc.zero_point), enc.onnx_type, f"{name}.zero_point")
        graph.initializer.extend([codes, zero, numpy_helper.from_array(enc.scale, f"{name}.scale")])
        axis = {"axis": 0} if enc.scale.ndim else {}
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.codes", f"{name}.scale", f"{name}.zero_point"],
                                      [name], name=f"{name}.dequantize", **axis))
    _prepend(graph, nodes)


def _prepend(graph: Any, nodes: list) -> None:
    """Put ``nodes`` (reading initializers only) first in ``graph``, which keeps it topologically sorted."""
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)


def _constant(graph: Any, name: str) -> Optional[np.ndarray]:
    """The value of ``name`` when it is an initializer or a Constant node's output, else None."""
    from onnx import numpy_helper
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def quantize_gemm_biases(proto: Any, table: dict[str, EncodedWeight]) -> None:
    """Give each Gemm between a quantized input and an INT8 weight an int32 bias (docs/method.md section 15).

    onnxruntime fuses DequantizeLinear -> Gemm into its integer QGemm only when the bias is int32, dequantized
    with scale = input scale x weight scale and zero point 0; the bias is rounded on that grid.
    """
    from onnx import helper, numpy_helper
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = [name for node in graph.node for name in node.input]
    added = []
    for node in graph.node:
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[1] not in table or not transposed:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear" or node.input[2] in producers:
            continue
        input_scale, bias = _constant(graph, source.input[1]), _constant(graph, node.input[2])
        if input_scale is None or input_scale.size != 1 or bias is None:
            continue
        scale = np.broadcast_to(float(input_scale) * table[node.input[1]].scale, bias.shape).astype(np.float32)
        name = node.input[2]
        graph.initializer.extend([numpy_helper.from_array(np.round(bias / scale).astype(np.int32), f"{name}.codes"),
                                  numpy_helper.from_array(scale, f"{name}.scale"),
                                  numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{name}.zero_point")])
        added.append(helper.make_node("DequantizeLinear", [f"{name}.codes", f"{name}.scale", f"{name}.zero_point"],
                                      [f"{name}.dequantized"], name=f"{name}.dequantize", axis=0))
        node.input[2] = f"{name}.dequantized"
        if readers.count(name) == 1:
            graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
    _prepend(graph, added)
