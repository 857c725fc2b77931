"""The integer convolution of onnxruntime's QLinearConv, computed in torch (docs/method.md section 15).

A converted model for an integer runtime (``act_bits=8``) runs each conv whose input and output are 8-bit
activations as `qlinear_conv2d`: int32 accumulation of ``(x_q - z_x) * w_q``, the bias rounded on the
``s_x * s_w`` grid, requantization ``round(acc * (s_x * s_w) / s_y) + z_y`` with saturation. These are the
float32 operations of onnxruntime's kernel, so torch and the exported file compute the same codes, where
the fake-quantized float conv differs from them in a few values in ten thousand, and those differences
grow layer after layer. `export_onnx` writes the op as DequantizeLinear -> Conv -> QuantizeLinear, which
onnxruntime fuses into QLinearConv.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: The registered op (``torch.ops.cora_fx.qlinear_conv2d.default``), for graph matching and the ONNX export.
OP_NAME = "cora_fx::qlinear_conv2d"


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


@torch.library.custom_op(OP_NAME, mutates_args=())
def qlinear_conv2d(x_codes: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor, bias: Optional[torch.Tensor], y_scale: torch.Tensor,
                   y_zero_point: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                   groups: int) -> torch.Tensor:
    """8-bit codes of ``conv2d(dequantize(x_codes), weight, bias)`` as an integer kernel computes them.

    ``weight`` is on the symmetric per-output-channel grid ``weight_scale`` (its codes are
    ``round(weight / weight_scale)``); ``x_codes`` and the result are uint8 / int8 codes with per-tensor
    scale and zero point.
    """
    x = x_codes.to(torch.float32) - x_zero_point.to(torch.float32)
    w_scale = weight_scale.reshape(-1).to(torch.float32)
    codes = torch.round(weight.to(torch.float32) / w_scale.reshape(-1, 1, 1, 1))
    acc = F.conv2d(x, codes, None, stride, padding, dilation, groups)
    acc_scale = x_scale.to(torch.float32) * w_scale
    if bias is not None:
        acc = acc + _per_channel(torch.round(bias.to(torch.float32) / acc_scale))
    y = torch.round(acc * _per_channel(acc_scale / y_scale.to(torch.float32))) + y_zero_point.to(torch.float32)
    info = torch.iinfo(y_zero_point.dtype)
    return torch.clamp(y, info.min, info.max).to(y_zero_point.dtype)


@qlinear_conv2d.register_fake
def _(x_codes: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, weight: torch.Tensor,
      weight_scale: torch.Tensor, bias: Optional[torch.Tensor], y_scale: torch.Tensor, y_zero_point: torch.Tensor,
      stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    out = F.conv2d(torch.empty_like(x_codes, dtype=torch.float32), weight.to(torch.float32), None, stride, padding,
                   dilation, groups)
    return torch.empty_like(out, dtype=y_zero_point.dtype)


def integer_kernel_scale(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-output-channel scale of the symmetric INT8 codes of ``scale * (codes - zero_point)``, or None when
    ``codes - zero_point`` does not fit in 8 signed bits (the weight would be re-rounded for an integer kernel)."""
    centered = codes.to(torch.float32) - zero_point.to(torch.float32)
    if float(centered.min()) < -128 or float(centered.max()) > 127:
        return None
    return scale.detach().to(torch.float32).abs().reshape(-1).expand(codes.shape[0]).clone()


@torch.library.custom_op("cora_fx::requantize_int8", mutates_args=())
def requantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * clamp(round(weight / scale), -127, 127)``: a weight on the symmetric 8-bit grid ``scale`` (one per
    output channel), the weight an integer kernel multiplies with. `export_onnx` writes the codes as INT8 computed
    by constant ops and a DequantizeLinear, which onnxruntime folds and fuses into QLinearConv."""
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


@requantize_int8.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(weight)


def requantize_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale of the symmetric 8-bit grid of ``weight``: max |w| of each row maps to 127."""
    rows = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
    scale = (rows / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return scale.reshape(-1, *[1] * (weight.dim() - 1)).to(torch.float32)


def requantize_divisor(weight: torch.Tensor, base_scale: torch.Tensor) -> torch.Tensor:
    """Per-output-channel integers k (uint8, 1..127) such that the 8-bit grid ``|base_scale| / k`` holds
    ``weight`` within 127 steps: the base grid's points stay exact on it (docs/method.md section 15)."""
    rows = weight.shape[0]
    base = base_scale.detach().to(torch.float32).abs().reshape(-1).expand(rows)
    peak = weight.detach().to(torch.float32).reshape(rows, -1).abs().amax(dim=1)
    k = torch.floor(127 * base / peak).nan_to_num(127.0).clamp(1, 127)
    k = torch.where((peak / (base / k) > 127) & (k > 1), k - 1, k)  # the float division of the graph, not exact math
    return k.to(torch.uint8).reshape(-1, *[1] * (weight.dim() - 1))
