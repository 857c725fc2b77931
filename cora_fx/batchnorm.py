"""BatchNorm statistics correction after quantization (a cora_fx extension, off by default).

Quantization shifts the mean and scale of every conv's output, so the float model's BatchNorm
running statistics no longer normalize it. `correct_batchnorm` measures, on calibration images,
the per-channel mean and variance of each BatchNorm input in the float model (full-rank float
residuals, Theorem 1) and in the quantized model (hard ranks), and moves the running statistics
by the difference: mean += mu_q - mu_f, var *= var_q / var_f. Measuring both on the same images
keeps the float model's 1.2M-image statistics and cancels the calibration set's sampling noise.
A few rounds propagate upstream corrections to downstream layers.
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from .batches import model_device, split_batch
from .modules import FLOAT, HARD, CoRaConv2d, QuantLinear, folded_modes
from .passes import FoldAdaptersForSearch, run_passes
from .state import PREPARED, CoRaError, get_state


class _Moments:
    """Per-channel running sums of a BatchNorm's input."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Optional[torch.Tensor] = None
        self.squares: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        s, s2 = x.sum(dim=dims), (x * x).sum(dim=dims)
        self.total = s if self.total is None else self.total + s
        self.squares = s2 if self.squares is None else self.squares + s2
        self.count += x.numel() // x.shape[1]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean * mean).clamp_min(0)


def _measure(gm: fx.GraphModule, bns: dict[str, nn.modules.batchnorm._BatchNorm], inputs: list[tuple]) -> dict[str, tuple]:
    moments = {name: _Moments() for name in bns}
    handles = [bn.register_forward_pre_hook(moments[name]) for name, bn in bns.items()]
    try:
        with torch.no_grad():
            for args in inputs:
                gm(*args)
    finally:
        for h in handles:
            h.remove()
    return {name: m.mean_var() for name, m in moments.items() if m.count}


def correct_batchnorm(prepared: fx.GraphModule, batches: Iterable, *, max_batches: int = 16, rounds: int = 2) -> int:
    """Correct the BatchNorm running statistics of ``prepared`` for its quantized weights.

    Uses the first ``max_batches`` ``(inputs, labels)`` batches; returns how many BatchNorm
    layers were corrected. Call it after the ranks are final (`search_ranks` does, when
    ``CoRaConfig.bn_correction`` is set); `convert_cora` keeps the corrected statistics.
    """
    get_state(prepared, PREPARED, "prepared")
    device = model_device(prepared)
    inputs = []
    for batch in batches:
        if len(inputs) >= max_batches:
            break
        inputs.append(split_batch(batch, device)[0])
    if not inputs:
        raise CoRaError("correct_batchnorm: the calibration batches are empty")
    bns = {n: m for n, m in prepared.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None}
    if not bns:
        return 0
    folded = run_passes(fx.GraphModule(prepared, copy.deepcopy(prepared.graph)), [FoldAdaptersForSearch()])
    wrappers = [m for m in folded.modules() if isinstance(m, CoRaConv2d)]
    linears = [m for m in prepared.modules() if isinstance(m, QuantLinear)]
    was_training = prepared.training
    folded.eval()
    try:
        with folded_modes(wrappers, linears, FLOAT):
            reference = _measure(folded, bns, inputs)
        original = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in bns.items()}
        for _ in range(rounds):
            with folded_modes(wrappers, linears, HARD):
                quantized = _measure(folded, bns, inputs)
            with torch.no_grad():
                for name, bn in bns.items():
                    if name not in reference or name not in quantized:
                        continue
                    (mu_f, var_f), (mu_q, var_q) = reference[name], quantized[name]
                    mean0, var0 = original[name]
                    ratio = torch.where(var_f > 1e-12, var_q / var_f.clamp_min(1e-12), torch.ones_like(var_f))
                    bn.running_mean.copy_((mean0.double() + mu_q - mu_f).to(bn.running_mean.dtype))
                    bn.running_var.copy_((var0.double() * ratio).to(bn.running_var.dtype))
    finally:
        prepared.train(was_training)
    return len(reference)
