"""n-bit uniform quantization of a weight on the grid of an observer's range (docs/method.md section 1).

scale = (beta - alpha) / (2^n - 1), codes q = clamp(round(W / scale) + zp), [W]_n = scale * (q - zp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.ao.quantization.observer import UniformQuantizationObserverBase

from cora_fx.quant.observers import quant_range


@dataclass
class QuantizedWeight:
    """Integer codes of a weight with their affine parameters (docs/method.md section 1).

    ``codes`` are signed (``int8``) in ``[qmin, qmax]``; ``scale`` and ``zero_point`` are
    float32 and broadcast against the weight (shape ``()`` per tensor, ``(m, 1, ...)`` per
    channel). ``clip_min``/``clip_max`` is the observer's range.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    clip_min: torch.Tensor
    clip_max: torch.Tensor

    @property
    def qmin(self) -> int:
        return quant_range(self.bits)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits)[1]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)

    def rescaled(self, factor: torch.Tensor) -> "QuantizedWeight":
        """The same codes with the scale times a per-output-channel ``factor`` (a per-tensor
        scale becomes per channel); the dequantized weight is multiplied row by row."""
        scale = self.scale * factor.reshape(-1, *[1] * (self.codes.dim() - 1)).to(self.scale)
        zero_point = self.zero_point if self.zero_point.dim() else self.zero_point.reshape(())
        return QuantizedWeight(self.codes, scale, zero_point, self.bits, self.clip_min, self.clip_max)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """[W]_n = scale * (q - zp), in float32. The converted graph emits the same two ops."""
    return (codes.to(torch.float32) - zero_point) * scale


def quantize_weight(weight: torch.Tensor, observer: UniformQuantizationObserverBase, bits: int) -> QuantizedWeight:
    """Quantize ``weight`` on the n-bit grid of the range the observer reports."""
    w = weight.detach().to(torch.float32)
    observer.to(w.device)  # its range buffers beside the weight: no copy to the host and back
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    scale = scale.detach().to(torch.float32)
    zero_point = zero_point.detach().to(torch.float32)
    per_channel = getattr(observer, "qscheme", None) in (torch.per_channel_affine, torch.per_channel_symmetric)
    if per_channel or scale.numel() > 1:
        view = (-1,) + (1,) * (w.dim() - 1)
        scale, zero_point = scale.reshape(view), zero_point.reshape(view)
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    qmin, qmax = quant_range(bits)
    codes = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax).to(torch.int8)
    lo, hi = _observed_range(observer, w)
    return QuantizedWeight(codes, scale, zero_point, bits, lo, hi)


def _observed_range(observer: Any, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = getattr(observer, "min_val", None)
    hi = getattr(observer, "max_val", None)
    if not isinstance(lo, torch.Tensor) or not isinstance(hi, torch.Tensor):
        return w.min(), w.max()
    return lo.detach().float().clone(), hi.detach().float().clone()


def minmax_quantize(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """Per-tensor min-max quantization (the adapters' scheme, docs/method.md section 1).

    The scale and zero point of torch.ao's ``MinMaxObserver`` (per-tensor affine), computed in tensor ops on the
    weight's device: the observer reads them back to the host (``float(scale)``), which would stall a GPU on
    every fine-tuning step (`fake_quantize`)."""
    w = weight.detach().to(torch.float32)
    qmin, qmax = quant_range(bits)
    lo, hi = torch.aminmax(w)
    scale = ((hi.clamp_min(0) - lo.clamp_max(0)) / float(qmax - qmin)).clamp_min(torch.finfo(torch.float32).eps)
    zero_point = (qmin - torch.round(lo.clamp_max(0) / scale)).clamp(qmin, qmax)
    codes = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax).to(torch.int8)
    return QuantizedWeight(codes, scale, zero_point, bits, lo.clone(), hi.clone())
