"""Clipping ranges of weights from torch.ao observers (docs/method.md section 1).

The range [alpha, beta] of a weight comes from a torch.ao observer built with
``dtype=torch.int8`` and the n-bit ``quant_min = -2^(n-1)``, ``quant_max = 2^(n-1) - 1``; the
observer's own ``calculate_qparams`` gives scale and zero point, so any torch.ao observer
(MinMax, MovingAverage, Histogram, ...) can supply the range.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch.ao.quantization.observer import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    UniformQuantizationObserverBase,
)

from cora_fx.config import QuantConfig


class _WeightRangeObserver(UniformQuantizationObserverBase):
    """Shared plumbing: a per-tensor or per-channel (``ch_axis``) range in ``min_val``/``max_val``."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(
        self,
        ch_axis: Optional[int] = None,
        dtype: torch.dtype = torch.int8,
        qscheme: Optional[torch.qscheme] = None,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        eps: float = torch.finfo(torch.float32).eps,
        **kwargs: Any,
    ) -> None:
        if qscheme is None:
            qscheme = torch.per_tensor_affine if ch_axis is None else torch.per_channel_affine
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, eps=eps, **kwargs)
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The observed tensor as (channels, -1) rows; one row per tensor without ``ch_axis``."""
        if self.ch_axis is None:
            return x.reshape(1, -1)
        return x.transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val, self.max_val = (lo, hi) if self.ch_axis is not None else (lo[0], hi[0])

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self._calculate_qparams(self.min_val, self.max_val)


class NormalObserver(_WeightRangeObserver):
    """Range mu - k*sigma .. mu + k*sigma of the observed tensor (the paper's "normal" clipping),
    intersected with the tensor's own [min, max] unless ``within_minmax=False`` (the paper's formula).

    With ``ch_axis`` set, mu, sigma, min and max are taken per slice along that axis (per channel).
    A range wider than the weights spends grid levels on values that never occur (docs/method.md
    section 1).
    """

    def __init__(self, k: float = 4.0, ch_axis: Optional[int] = None, within_minmax: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(ch_axis=ch_axis, **kwargs)
        self.k = float(k)
        self.within_minmax = within_minmax

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        flat = self.rows(x_orig.detach().float())
        mu, sigma = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
        lo, hi = mu - self.k * sigma, mu + self.k * sigma
        if self.within_minmax:
            lo, hi = torch.maximum(lo, flat.min(dim=1).values), torch.minimum(hi, flat.max(dim=1).values)
        self.set_range(lo, hi)
        return x_orig

    def extra_repr(self) -> str:
        return (f"k={self.k}, ch_axis={self.ch_axis}, within_minmax={self.within_minmax}, "
                f"min_val={self.min_val}, max_val={self.max_val}")


class MSEObserver(_WeightRangeObserver):
    """Clipping range that minimizes the weight's squared rounding error (per tensor or per channel).

    Tries ``grid`` shrink ratios of the min-max range in [``min_ratio``, 1] and keeps, per channel,
    the one whose quantized weight is closest to the float weight (a cora_fx extension; the
    paper uses normal or min-max clipping).
    """

    def __init__(self, ch_axis: Optional[int] = None, grid: int = 64, min_ratio: float = 0.2, **kwargs: Any) -> None:
        super().__init__(ch_axis=ch_axis, **kwargs)
        self.grid = grid
        self.min_ratio = min_ratio

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        flat = self.rows(x_orig.detach().float())
        lo, hi = flat.min(dim=1).values.clamp(max=0), flat.max(dim=1).values.clamp(min=0)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(self.min_ratio, 1.0, self.grid).tolist():
            lo_r, hi_r = lo * ratio, hi * ratio
            scale = ((hi_r - lo_r) / float(self.quant_max - self.quant_min)).clamp(min=self.eps)
            zero_point = (self.quant_min - torch.round(lo_r / scale)).clamp(self.quant_min, self.quant_max)
            q = torch.clamp(torch.round(flat / scale[:, None]) + zero_point[:, None], self.quant_min, self.quant_max)
            err = ((q - zero_point[:, None]) * scale[:, None] - flat).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo_r, best_lo), torch.where(better, hi_r, best_hi)
        self.set_range(best_lo, best_hi)
        return x_orig


def quant_range(bits: int) -> tuple[int, int]:
    """Signed n-bit code range used with ``dtype=torch.int8`` observers."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


ObserverSpec = Union[str, Callable[..., Any]]


def make_observer(
    clipping: ObserverSpec, bits: int, per_channel: bool, k: float = 4.0, symmetric: bool = False
) -> UniformQuantizationObserverBase:
    """Build the torch.ao observer that supplies the clipping range of one weight tensor.

    ``clipping`` is ``"normal"``, ``"normal_paper"``, ``"minmax"``, ``"mse"`` or a torch.ao observer class / factory
    (e.g. ``HistogramObserver`` or ``MinMaxObserver.with_args(eps=1e-6)``); a factory is
    called with ``dtype=torch.int8``, the n-bit ``quant_min``/``quant_max`` and the affine (with
    ``symmetric``: the symmetric, zero point 0) qscheme of the granularity (per-channel observers must accept
    ``ch_axis=0``).
    """
    qmin, qmax = quant_range(bits)
    if symmetric:
        qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    else:
        qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    kwargs: dict[str, Any] = dict(dtype=torch.int8, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    if clipping in ("normal", "normal_paper"):
        return NormalObserver(k=k, ch_axis=0 if per_channel else None, within_minmax=clipping == "normal", **kwargs)
    if clipping == "mse":
        return MSEObserver(ch_axis=0 if per_channel else None, **kwargs)
    if clipping == "minmax":
        cls = PerChannelMinMaxObserver if per_channel else MinMaxObserver
        return cls(**kwargs) if not per_channel else cls(ch_axis=0, **kwargs)
    try:
        observer = clipping(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"CoRaConfig.clipping={clipping!r} could not be built as a torch.ao observer "
            f"with {kwargs}: {err}"
        ) from err
    if not hasattr(observer, "calculate_qparams"):
        raise ValueError(f"CoRaConfig.clipping={clipping!r} did not build a torch.ao observer")
    return observer


def main_observer(quant: QuantConfig, bits: int) -> UniformQuantizationObserverBase:
    """The observer of a main weight at ``bits``: the config's clipping, granularity and 8-bit symmetry."""
    return make_observer(quant.clipping, bits, quant.per_channel, quant.k, quant.symmetric_at(bits))
