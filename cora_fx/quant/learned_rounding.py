"""A base weight's rounding as a learnable offset per code (docs/method.md section 17).

With u = W / scale + zp the unrounded position of each weight on its grid and c its current code (GPTQ's),
the learned code is ``clamp(round(t0 + v), qmin, qmax)`` with ``t0 = c + clamp(u - c, -0.499, 0.499)``:
at ``v = 0`` it is exactly c, a code GPTQ moved away from the nearest one starts just inside the rounding
boundary towards u, and ``v`` in [-0.5, 0.5] lets each code move at most one step. The gradient passes the
rounding straight through (signed gradient descent on rounding offsets: Cheng et al. 2023, "Optimize Weight
Rounding via Signed Gradient Descent"); the grid (scale, zero point, bits) never changes.
"""
from __future__ import annotations

import torch
from torch import nn

from cora_fx.quant.uniform import QuantizedWeight


class LearnedRounding:
    """The learnable rounding of one quantized weight; ``offset`` is the parameter (v above)."""

    def __init__(self, weight: torch.Tensor, qw: QuantizedWeight) -> None:
        self.qw = qw
        codes = qw.codes.to(torch.float32)
        position = weight.detach().to(torch.float32) / qw.scale + qw.zero_point
        self.start = codes + (position - codes).clamp(-0.499, 0.499)
        self.offset = nn.Parameter(torch.zeros_like(self.start))

    def codes_float(self) -> torch.Tensor:
        """The codes at the current offsets, rounded with a straight-through gradient (float)."""
        target = self.start + self.offset
        rounded = target + (torch.round(target) - target).detach()
        return rounded.clamp(self.qw.qmin, self.qw.qmax)

    def weight(self) -> torch.Tensor:
        """The dequantized weight at the current offsets: scale * (codes - zp)."""
        return (self.codes_float() - self.qw.zero_point) * self.qw.scale

    @torch.no_grad()
    def signed_step(self, step: float) -> None:
        """v <- clamp(v - step * sign(grad), -0.5, 0.5)."""
        if self.offset.grad is not None:
            self.offset.sub_(step * torch.sign(self.offset.grad)).clamp_(-0.5, 0.5)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The learned codes on the unchanged grid."""
        codes = self.codes_float().to(torch.int8)
        qw = self.qw
        return QuantizedWeight(codes, qw.scale, qw.zero_point, qw.bits, qw.clip_min, qw.clip_max)

    @torch.no_grad()
    def changed(self) -> int:
        """How many codes differ from the starting ones."""
        return int((self.codes_float().to(torch.int8) != self.qw.codes).sum())
