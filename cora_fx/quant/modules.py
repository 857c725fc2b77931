"""Modules of a prepared model: the quantized main conv, the low-rank adapter, their container.

`prepare_cora` puts a `CoRaConv2d` container at each rewritten conv's qualified name; the
prepared graph calls its two children in parallel and adds them (docs/method.md section 2):

    main    = <name>.quantized(x)      # conv(x, [W]_n) + bias
    adapter = <name>.adapter(x)        # conv(conv(x, A_r), B_r), hard integer rank r
    out     = main + adapter

Calling the container itself runs the folded single-conv form of docs/method.md section 4,
conv(x, [W]_n + fold(B o A)), which the rank search uses. nn.Conv1d and nn.Linear layers reach
here as nn.Conv2d layers (`lifting`); ``CoRaConv2d.kind`` remembers which they were.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from cora_fx.quant.residual import ResidualFactors, fold_two_conv, nbk_mask
from cora_fx.quant.uniform import QuantizedWeight, minmax_quantize

#: What a `CoRaConv2d` stands for: a Conv2d, a Conv1d run as a (k, 1) Conv2d, a Linear run as a 1x1 Conv2d.
CONV, CONV1D, LINEAR = "conv", "conv1d", "linear"
CONV_KINDS = (CONV, CONV1D)


@dataclass(frozen=True)
class ConvSpec:
    """Everything of an nn.Conv2d call but its weights: shared by main conv and adapter A."""

    stride: tuple[int, int]
    padding: Union[str, tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    reversed_padding: tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvSpec":
        return cls(
            tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.dilation), conv.groups, conv.padding_mode,
            tuple(getattr(conv, "_reversed_padding_repeated_twice", ())),
        )

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """conv2d of x exactly as the original layer computes it (padding mode included)."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def store_quantized(module: nn.Module, prefix: str, qw: QuantizedWeight) -> None:
    """Register ``qw``'s codes, scale and zero point as buffers ``<prefix>_codes`` etc."""
    module.register_buffer(f"{prefix}_codes", qw.codes)
    module.register_buffer(f"{prefix}_scale", qw.scale)
    module.register_buffer(f"{prefix}_zero_point", qw.zero_point)


def load_quantized(module: nn.Module, prefix: str, bits: int) -> QuantizedWeight:
    codes = getattr(module, f"{prefix}_codes")
    scale = getattr(module, f"{prefix}_scale")
    zero_point = getattr(module, f"{prefix}_zero_point")
    return QuantizedWeight(codes, scale, zero_point, bits, scale.new_tensor(0.0), scale.new_tensor(0.0))


class QuantizedWeightMixin:
    """Holds [W]_n as codes + affine parameters and the dequantized float32 copy.

    ``channel_factor`` (buffer, ``None`` unless `finetune` trained one) multiplies the scales
    per output channel; ``tuning_factor`` is the trainable one while `finetune` runs, ``learning_weight`` the
    weight of the rounding being learned while `reconstruct` runs (neither is registered). ``weight``
    stays the untouched [W]_n, so [W]_n + residual is still the float W (the teacher).
    """

    weight: torch.Tensor
    channel_factor: Optional[torch.Tensor]
    tuning_factor: Optional[torch.Tensor] = None
    learning_weight: Optional[Callable[[], torch.Tensor]] = None

    def _init_quantized(self, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> None:
        self.set_quantized(qw)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Store new codes / scale / zero point and the dequantized [W]_n (drops a channel factor)."""
        self.bits = qw.bits
        store_quantized(self, "weight", qw)  # type: ignore[arg-type]
        self.register_buffer("weight", qw.dequantize())  # type: ignore[attr-defined]
        self.register_buffer("channel_factor", None)  # type: ignore[attr-defined]

    def quantized_weight(self) -> QuantizedWeight:
        return load_quantized(self, "weight", self.bits)  # type: ignore[arg-type]

    def effective_weight(self) -> torch.Tensor:
        """[W]_n (or, while `reconstruct` learns its rounding, ``learning_weight()``) with the scales times the
        channel factor being tuned or kept (if any)."""
        weight = self.weight if self.learning_weight is None else self.learning_weight()
        factor = self.tuning_factor if self.tuning_factor is not None else self.channel_factor
        if factor is None:
            return weight
        return weight * factor.reshape(-1, *[1] * (weight.dim() - 1))

    def deployed_weight(self) -> QuantizedWeight:
        """The codes and affine parameters `convert_cora` stores (channel factor folded into the scale)."""
        qw = self.quantized_weight()
        return qw if self.channel_factor is None else qw.rescaled(self.channel_factor)


class QuantConv2d(QuantizedWeightMixin, nn.Module):
    """Main branch: conv(x, [W]_n) + bias, with the observer that chose the clipping range."""

    def __init__(self, conv: nn.Conv2d, qw: QuantizedWeight, observer: nn.Module) -> None:
        super().__init__()
        self.spec = ConvSpec.of(conv)
        self._init_quantized(qw, conv.bias)
        self.weight_observer = observer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        return self.spec.conv(x, self.effective_weight().to(x.dtype), None if bias is None else bias.to(x.dtype))


#: Adapter policies: searched rank, fixed full rank (depthwise "residual"), or no adapter.
SEARCH, FIXED, OFF = "search", "fixed", "off"


class LowRankAdapter(nn.Module):
    """Adapter branch conv(conv(x, A_r), B_r) built from the residual's SVD (Theorem 1).

    ``rank`` is the soft normalized rank r_l / R_l optimized by the search; ``hard_rank``
    the integer rank used by the two-conv forward and by `convert_cora`. The hard A and B
    are cached already quantized to ``adapter_bits`` (min-max, docs/method.md section 1).
    """

    hard_rank: torch.Tensor
    tuned_a: Optional[torch.Tensor]
    tuned_b: Optional[torch.Tensor]

    def __init__(
        self, factors: ResidualFactors, spec: ConvSpec, adapter_bits: Optional[int], policy: str,
        init_rank: float,
    ) -> None:
        super().__init__()
        self.factors = factors
        self.spec = spec
        self.adapter_bits = adapter_bits
        self.policy = OFF if factors.is_zero() else policy
        self.rank = nn.Parameter(torch.tensor(float(init_rank)), requires_grad=False)
        self.register_buffer("hard_rank", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("tuned_a", None)
        self.register_buffer("tuned_b", None)
        initial = {SEARCH: math.ceil(init_rank * self.max_rank), FIXED: self.max_rank, OFF: 0}[self.policy]
        self.set_hard_rank(min(max(initial, 0), self.max_rank))

    @property
    def max_rank(self) -> int:
        return self.factors.max_rank

    @property
    def cached_rank(self) -> int:
        """The hard rank, read from the cached A's shape (g*r rows): no device-to-host copy in a forward pass."""
        return self.weight_a.shape[0] // self.spec.groups

    def set_factors(self, factors: ResidualFactors) -> None:
        """Replace the residual's factors (e.g. after data-aware rounding); keeps the hard rank."""
        self.factors = factors
        if factors.is_zero():
            self.policy = OFF
        self.set_hard_rank(0 if self.policy == OFF else min(int(self.hard_rank), self.max_rank))

    @property
    def searchable(self) -> bool:
        return self.policy == SEARCH

    def parameter_count(self, rank: Optional[int] = None) -> int:
        """Adapter parameters at ``rank`` (default: the hard rank): rank * (m + n*k1*k2)."""
        return (int(self.hard_rank) if rank is None else rank) * self.factors.params_per_rank

    def set_hard_rank(self, rank: int) -> None:
        """Fix the integer rank and cache the (quantized) A_r, B_r weights (drops tuned ones)."""
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 0..{self.max_rank}")
        self.hard_rank.fill_(rank)
        self.tuned_a = self.tuned_b = None
        self._cache(*self.factors.adapter_weights(rank))

    def set_tuned(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Replace A_r, B_r at the current hard rank by fine-tuned float weights (`finetune`)."""
        if a.shape != self.weight_a.shape or b.shape != self.weight_b.shape:
            raise ValueError(f"tuned adapter shapes {tuple(a.shape)}, {tuple(b.shape)} "
                             f"do not match rank {int(self.hard_rank)}")
        self.tuned_a, self.tuned_b = a.detach().clone(), b.detach().clone()
        self._cache(self.tuned_a, self.tuned_b)

    def float_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float A_r, B_r at the hard rank: the fine-tuned ones if any, else the SVD's."""
        if self.tuned_a is not None and self.tuned_b is not None:
            return self.tuned_a, self.tuned_b
        return self.factors.adapter_weights(int(self.hard_rank))

    def _cache(self, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = int(self.hard_rank)
        if self.adapter_bits is not None and rank > 0:
            qa, qb = minmax_quantize(a, self.adapter_bits), minmax_quantize(b, self.adapter_bits)
            store_quantized(self, "a", qa)
            store_quantized(self, "b", qb)
            a, b = qa.dequantize(), qb.dequantize()
        self.register_buffer("weight_a", a.detach().clone())
        self.register_buffer("weight_b", b.detach().clone())

    def quantized_factors(self) -> tuple[QuantizedWeight, QuantizedWeight]:
        bits = self.adapter_bits
        assert bits is not None
        return load_quantized(self, "a", bits), load_quantized(self, "b", bits)

    #: NBK order k; set from the config by prepare and by each search.
    nbk_order: float = 4.0

    def soft_mask(self) -> torch.Tensor:
        """NBK Phi at the continuous rank r = rank * R (docs/method.md section 3)."""
        return nbk_mask(self.rank * self.max_rank, self.max_rank, self.nbk_order)

    def two_conv(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hidden = self.spec.conv(x, a.to(x.dtype))
        return F.conv2d(hidden, b.to(x.dtype), None, 1, 0, 1, self.spec.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached_rank == 0:
            return x.new_zeros(())
        return self.two_conv(x, self.weight_a, self.weight_b)

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The soft adapter in two-conv form (equals the folded form, property 4).

        Adapters outside the search (fixed / off) use their hard weights, as the folded form does.
        """
        if not self.searchable:
            return self(x)
        a, b = self.factors.adapter_weights(self.max_rank, self.soft_mask())
        return self.two_conv(x, a, b)

    def extra_repr(self) -> str:
        return f"policy={self.policy}, rank={int(self.hard_rank)}/{self.max_rank}, adapter_bits={self.adapter_bits}"


#: Folded-forward modes of `CoRaConv2d`.
SOFT, HARD, FLOAT, TUNE = "soft", "hard", "float", "tune"


def fake_quantize(weight: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """Min-max quantize-dequantize with a straight-through gradient (``bits=None``: identity)."""
    if bits is None:
        return weight
    return weight + (minmax_quantize(weight.detach(), bits).dequantize() - weight).detach()


class CoRaConv2d(nn.Module):
    """Container of one rewritten conv; calling it runs the folded single-conv form.

    ``mode``: ``"soft"`` (NBK-thresholded adapter, the search), ``"hard"`` (integer-rank
    adapter), ``"float"`` (full-rank float residual: the original float conv, the teacher),
    ``"tune"`` (`finetune`: trainable ``tuned`` = (A, B) fake-quantized, scaled [W]_n).
    """

    def __init__(self, quantized: QuantConv2d, adapter: LowRankAdapter, kind: str = CONV) -> None:
        super().__init__()
        self.quantized = quantized
        self.adapter = adapter
        self.kind = kind
        self.mode = SOFT
        self.tuned: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def folded_weight(self) -> torch.Tensor:
        adapter = self.adapter
        if self.mode == TUNE:
            weight = self.quantized.effective_weight()
            if self.tuned is None:
                return weight
            a, b = (fake_quantize(t, adapter.adapter_bits) for t in self.tuned)
            return weight + fold_two_conv(a, b, adapter.spec.groups)
        if self.mode == FLOAT:
            delta = adapter.factors.folded_delta(torch.ones_like(adapter.factors.S[0]))
        elif self.mode == HARD or not adapter.searchable:
            if adapter.cached_rank == 0:
                return self.quantized.effective_weight()
            delta = fold_two_conv(adapter.weight_a, adapter.weight_b, adapter.spec.groups)
        else:
            delta = adapter.factors.folded_delta(adapter.soft_mask())
        if self.mode == FLOAT:
            return self.quantized.weight + delta  # [W]_n + full residual = W exactly
        return self.quantized.effective_weight() + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.quantized.bias
        weight = self.folded_weight().to(x.dtype)
        return self.quantized.spec.conv(x, weight, None if bias is None else bias.to(x.dtype))


class ConvBatchNorm(nn.Module):
    """A folded `CoRaConv2d` and the eval-mode BatchNorm2d after it as one conv (the search's copy only).

    conv(x, W) followed by BN is conv(x, W * s) + (b - mu) * s + beta with s = gamma / sqrt(var + eps): exact,
    and the BatchNorm's forward and backward disappear from every search step (docs/method.md section 4).
    """

    def __init__(self, conv: CoRaConv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.weight is not None:
            scale = scale * bn.weight
            shift = shift * bn.weight + bn.bias
        bias = conv.quantized.bias
        if bias is not None:
            shift = shift + bias * scale
        weight = conv.folded_weight() * scale.reshape(-1, 1, 1, 1)
        return conv.quantized.spec.conv(x, weight.to(x.dtype), shift.to(x.dtype))


@contextmanager
def folded_modes(wrappers: Sequence[CoRaConv2d], mode: str) -> Iterator[None]:
    """Run folded wrappers in ``mode``; the previous modes come back on exit."""
    modes = [w.mode for w in wrappers]
    try:
        for w in wrappers:
            w.mode = mode
        yield
    finally:
        for w, previous in zip(wrappers, modes):
            w.mode = previous
