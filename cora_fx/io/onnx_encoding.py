"""Quantized weights written into an ONNX graph: integer initializers and the nodes that decode them.

`export_onnx` exports a model whose weights are named float initializers, then replaces each one by its
`EncodedWeight`: codes at their own width (UINT4 for 2..4-bit codes, UINT8 / INT8 for 8-bit ones), a zero
point and a per-channel scale, decoded in one of three `FORMS` (docs/method.md section 15):

- ``"kernel"``: Cast / Sub turn the codes into symmetric INT8 codes, then DequantizeLinear. Every input of
  the Cast / Sub is a constant, so onnxruntime folds them into an INT8 initializer when the session loads,
  and fuses DequantizeLinear -> Conv between activation Q/DQ pairs into QLinearConv (integer kernels from a
  4-bit file);
- ``"float"``: Cast / Sub / Mul compute ``(codes - zero_point) * scale``; folded into a float initializer at
  load, so a weight-only model runs at float speed;
- ``"dequantize"``: DequantizeLinear of the codes themselves (the QDQ form that runtimes reading 4-bit QDQ
  weights take; onnxruntime's CPU provider runs it on every inference).

A folded adapter's weight ([W]_n + fold(B o A), rounded to 8 bits for an integer runtime by
`cora_fx.quant.integer.requantize_int8`) is computed in the graph from the codes of [W]_n, A and B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from cora_fx.errors import CoRaError
from cora_fx.quant.integer import requantize_scale

#: How an `EncodedWeight` is decoded in the graph (module docstring).
FORMS = ("dequantize", "kernel", "float")


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX export needs the optional packages onnx and onnxscript: "
                          "pip install 'cora-fx[onnx]'") from err
    return onnx


@dataclass
class EncodedWeight:
    """Integer codes of one weight: ``w = scale * (codes - zero_point)`` per row, and how the graph decodes it."""

    codes: np.ndarray  # integer values, output channels first
    scale: np.ndarray  # float32, one per output channel (or a scalar); positive but in the "float" form
    zero_point: np.ndarray  # same dtype as codes, the shape of scale (or a scalar)
    onnx_type: int  # onnx.TensorProto data type of codes and zero point
    form: str = "dequantize"  # one of `FORMS`

    def broadcast(self, values: np.ndarray) -> np.ndarray:
        """Per-row ``values`` shaped to broadcast against the codes (a scalar stays a scalar)."""
        return values.reshape(-1, *[1] * (self.codes.ndim - 1)) if values.ndim else values


def _rows(t: torch.Tensor) -> np.ndarray:
    """A scale or zero point as one value per output channel (a scalar stays a scalar)."""
    return t.reshape(-1).numpy() if t.numel() > 1 else t.reshape(()).numpy()


def encode_codes(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor, form: str) -> EncodedWeight:
    """Integer codes with ``(codes - zero_point) * scale`` equal to the converted weight, decoded in ``form``.

    The unsigned field (0..15 or 0..255) is kept as UINT4 / UINT8, value for value; channels whose scale is
    negative (a folded BatchNorm with gamma < 0) are mirrored, so every stored scale is positive. In the
    ``"kernel"`` form an 8-bit weight is stored as symmetric INT8 (`symmetric_int8`).
    """
    onnx = require_onnx()
    top = 15 if float(codes.max()) <= 15 and float(zero_point.max()) <= 15 else 255
    if form == "kernel" and top == 255:
        return symmetric_int8(codes, zero_point, scale)
    onnx_type = onnx.TensorProto.UINT8 if top == 255 else onnx.TensorProto.UINT4
    scale_rows = _rows(scale).astype(np.float32)
    if form == "float":  # Mul takes a negative scale as it is; one zero point when all rows share it
        zero = _rows(zero_point)
        zero = zero.reshape(-1)[:1].reshape(()) if zero.ndim and (zero == zero.reshape(-1)[0]).all() else zero
        return EncodedWeight(codes.numpy().astype(np.uint8), scale_rows, zero.astype(np.uint8), onnx_type, form)
    flip = scale_rows < 0
    c = codes.numpy().astype(np.int32)
    z = np.broadcast_to(_rows(zero_point), scale_rows.shape).astype(np.int32).copy()
    if flip.any():
        mask = flip.reshape(-1, *[1] * (c.ndim - 1)) if flip.ndim else flip
        c = np.where(mask, top - c, c)
        z = np.where(flip, top - z, z)
        scale_rows = np.abs(scale_rows)
    return EncodedWeight(c.astype(np.uint8), scale_rows, z.astype(np.uint8), onnx_type, form)


def symmetric_int8(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor) -> EncodedWeight:
    """Per-output-channel INT8 codes, zero point 0, ``"kernel"`` form: ``codes - zero_point`` itself where it fits
    in 8 signed bits (exact: every 8-bit weight on a symmetric grid), else the weight re-quantized at 8 bits."""
    onnx = require_onnx()
    rows = codes.shape[0]
    shape = (-1, *[1] * (codes.dim() - 1))
    scale_rows = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(rows)
    zero_rows = torch.as_tensor(zero_point, dtype=torch.float32).reshape(-1).expand(rows)
    signed = (codes.float() - zero_rows.reshape(shape)) * scale_rows.sign().reshape(shape)
    if float(signed.min()) < -128 or float(signed.max()) > 127:
        return int8_encoding(signed * scale_rows.abs().reshape(shape))
    return EncodedWeight(signed.numpy().astype(np.int8), scale_rows.abs().numpy().astype(np.float32),
                         np.zeros(rows, np.int8), onnx.TensorProto.INT8, "kernel")


def int8_encoding(weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> EncodedWeight:
    """Symmetric per-output-channel INT8 codes of a float weight on the grid ``scale`` (one per row; exact for a
    weight `quant.integer.requantize_int8` put there), by default `quant.integer.requantize_scale`."""
    onnx = require_onnx()
    scale = (requantize_scale(weight) if scale is None else scale).reshape(-1).to(torch.float32)
    codes = torch.round(weight / scale.reshape(-1, *[1] * (weight.dim() - 1))).clamp(-127, 127)
    return EncodedWeight(codes.numpy().astype(np.int8), scale.numpy().astype(np.float32),
                         np.zeros(weight.shape[0], np.int8), onnx.TensorProto.INT8, "kernel")


def integer_tensor(values: np.ndarray, onnx_type: int, name: str) -> Any:
    """An initializer with raw data: INT8 / UINT8 one byte per value, UINT4 two values per byte (low first)."""
    onnx = require_onnx()
    if onnx_type != onnx.TensorProto.UINT4:
        return onnx.numpy_helper.from_array(values, name)
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(name, onnx_type, values.shape, packed.tobytes(), raw=True)


class _Builder:
    """Collects the initializers and nodes that decode weights; `flush` puts them at the top of a graph."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.inits: list = []
        self.nodes: list = []

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        from onnx import helper
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}.{op.lower()}", **attributes))
        return output

    def signed(self, name: str, enc: EncodedWeight, to: int) -> str:
        """``Cast(codes - zero_point, to)``: the stored codes as signed values (constant ops)."""
        from onnx import TensorProto
        self.inits += [integer_tensor(enc.codes, enc.onnx_type, f"{name}.codes"),
                       integer_tensor(enc.broadcast(enc.zero_point), enc.onnx_type, f"{name}.zero_point")]
        codes = self.node("Cast", [f"{name}.codes"], f"{name}.codes_int32", to=TensorProto.INT32)
        zero = self.node("Cast", [f"{name}.zero_point"], f"{name}.zero_point_int32", to=TensorProto.INT32)
        return self.node("Cast", [self.node("Sub", [codes, zero], f"{name}.centered")], f"{name}.signed", to=to)

    def dequantize(self, name: str, codes: str, scale: np.ndarray, zero_point: Optional[str], output: str) -> str:
        """DequantizeLinear of ``codes`` with a per-row (or scalar) ``scale``; no zero point means 0."""
        axis = {"axis": 0} if scale.ndim else {}
        inputs = [codes, self.constant(f"{name}.scale", scale), *([zero_point] if zero_point else [])]
        return self.node("DequantizeLinear", inputs, output, **axis)

    def weight(self, name: str, enc: EncodedWeight) -> None:
        """The nodes computing the float weight ``name`` from ``enc`` in its form."""
        from onnx import TensorProto
        if enc.form == "float":
            signed = self.signed(name, enc, TensorProto.FLOAT)
            self.node("Mul", [signed, self.constant(f"{name}.scale", enc.broadcast(enc.scale))], name)
        elif enc.form == "kernel" and enc.onnx_type != TensorProto.INT8:
            self.dequantize(name, self.signed(name, enc, TensorProto.INT8), enc.scale, None, name)
        elif enc.form == "kernel":
            self.inits.append(integer_tensor(enc.codes, enc.onnx_type, f"{name}.codes"))
            self.dequantize(name, f"{name}.codes", enc.scale, None, name)
        else:
            self.inits += [integer_tensor(enc.codes, enc.onnx_type, f"{name}.codes"),
                           integer_tensor(np.asarray(enc.zero_point), enc.onnx_type, f"{name}.zero_point")]
            self.dequantize(name, f"{name}.codes", enc.scale, f"{name}.zero_point", name)

    def flush(self) -> None:
        """Put the collected nodes (reading initializers only) first, which keeps the graph topologically sorted."""
        self.graph.initializer.extend(self.inits)
        rest = list(self.graph.node)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes + rest)


def encode_initializers(proto: Any, table: dict[str, EncodedWeight]) -> None:
    """Replace each float initializer named in ``table`` by its codes and the nodes decoding them."""
    graph = proto.graph
    found = {init.name: init for init in graph.initializer if init.name in table}
    missing = sorted(set(table) - set(found))
    if missing:
        raise CoRaError(f"export_onnx: the exported graph lost the weight constants {missing[:3]}; "
                        "this torch.onnx version folded them into other constants")
    build = _Builder(graph)
    for name, init in found.items():
        graph.initializer.remove(init)
        build.weight(name, table[name])
    build.flush()


def dedupe_initializers(graph: Any) -> int:
    """Let initializers with the same type, shape and bytes be one (a scale the graph reads twice, say);
    returns how many were dropped."""
    from onnx import numpy_helper
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        renamed[init.name] = first.setdefault(key, init.name)
    dropped = {name for name, kept in renamed.items() if name != kept}
    if dropped:
        kept_inits = [init for init in graph.initializer if init.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        for node in graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
    return len(dropped)


def _constant_node_value(node: Any) -> Optional[np.ndarray]:
    """The value of a Constant node (any of its value attributes but sparse and string ones), else None."""
    from onnx import TensorProto, helper, numpy_helper
    if node.op_type != "Constant" or len(node.attribute) != 1:
        return None
    value = helper.get_attribute_value(node.attribute[0])
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    kind = kinds.get(node.attribute[0].name)
    return None if kind is None else np.asarray(value, kind)


def _constant(graph: Any, name: str) -> Optional[np.ndarray]:
    """The value of ``name`` when it is an initializer or a Constant node's output, else None."""
    from onnx import numpy_helper
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return next((v for n in graph.node if n.output[0] == name if (v := _constant_node_value(n)) is not None), None)


def quantize_gemm_biases(proto: Any, table: dict[str, EncodedWeight]) -> None:
    """Give each Gemm between a quantized input and an INT8 weight an int32 bias (docs/method.md section 15).

    onnxruntime fuses DequantizeLinear -> Gemm into its integer QGemm only when the bias is int32, dequantized
    with scale = input scale x weight scale and zero point 0; the bias is rounded on that grid.
    """
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = [name for node in graph.node for name in node.input]
    build = _Builder(graph)
    for node in graph.node:
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        weight = table.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 2 else None
        if weight is None or weight.form != "kernel" or not transposed:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear" or node.input[2] in producers:
            continue
        input_scale, bias = _constant(graph, source.input[1]), _constant(graph, node.input[2])
        if input_scale is None or input_scale.size != 1 or bias is None:
            continue
        scale = np.broadcast_to(float(input_scale) * weight.scale, bias.shape).astype(np.float32)
        name = node.input[2]
        codes = build.constant(f"{name}.codes", np.round(bias / scale).astype(np.int32))
        node.input[2] = build.dequantize(name, codes, scale, None, f"{name}.dequantized")
        if readers.count(name) == 1:
            graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
    build.flush()


def fold_constant_casts(proto: Any) -> int:
    """Replace each ``CastLike(constant, x)`` by the constant in ``x``'s element type; returns how many.

    torch.onnx writes one for every scalar of the graph (a ReLU6's bounds, say) when its optimizer is off, which
    it is while a folded adapter's weight is computed in the graph. onnxruntime cannot fold them (``x`` is not
    constant), and a Clip with such bounds keeps Conv -> Clip -> QuantizeLinear out of QLinearConv.
    """
    from onnx import helper, numpy_helper, shape_inference
    graph = proto.graph
    typed = shape_inference.infer_shapes(proto).graph.value_info
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *typed, *graph.input)}
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    values.update({n.output[0]: v for n in graph.node if (v := _constant_node_value(n)) is not None})
    folded = 0
    for index, node in enumerate(graph.node):
        target = types.get(node.input[1]) if node.op_type == "CastLike" else None
        if target and node.input[0] in values:
            value = values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(target))
            graph.node[index].CopyFrom(helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                                        value=numpy_helper.from_array(value, node.output[0])))
            folded += 1
    return folded
