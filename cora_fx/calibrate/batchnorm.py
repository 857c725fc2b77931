"""BatchNorm statistics correction after quantization (a cora_fx extension, off by default).

Quantization biases every conv's output (its rounding errors do not average out per channel),
so the float model's BatchNorm running means no longer center it. `correct_batchnorm` measures,
on calibration images, the per-channel mean of each BatchNorm input in the float model (full-rank
float residuals, Theorem 1) and in the quantized model (hard ranks), and moves the running mean
by the difference (bias correction in the sense of Nagel et al., 2019). Measuring both on the
same images keeps the float model's statistics and cancels the calibration set's sampling noise.
The variance is deliberately left alone: the extra variance of a quantized conv is rounding
noise, and dividing it out would shrink the signal too (measured: it ruins MobileNetV2).
The correction is applied while the quantized model runs (a pre-hook per BatchNorm), so every
layer is corrected given the already corrected layers upstream.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from cora_fx.config import step_config
from cora_fx.calibrate import distributed
from cora_fx.calibrate.activations import float_activations
from cora_fx.calibrate.batches import split_batch
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.graph.passes import folded_copy
from cora_fx.quant.modules import FLOAT, HARD, CoRaConv2d, folded_modes
from cora_fx.state import step_state


def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of a BatchNorm input, over this batch on every process (section 13)."""
    dims = [d for d in range(x.dim()) if d != 1]
    total = x.detach().to(torch.float64).sum(dim=dims)
    count = torch.tensor([x.numel() // max(x.shape[1], 1)], dtype=torch.float64, device=x.device)
    packed = distributed.all_reduce_sum(torch.cat([total, count]))
    return packed[:-1] / packed[-1]


def correct_batchnorm(prepared: fx.GraphModule, batches: Iterable, **overrides: Any) -> int:
    """Correct the BatchNorm running statistics of ``prepared`` for its quantized weights.

    Uses the first ``refine.bn_correction`` ``(inputs, labels)`` batches (``bn_correction=`` overrides it for
    this call, `step_config`; under `torch.distributed`, of each process, the means of each step all-reduced);
    returns how many BatchNorm layers were corrected. Call
    it after the ranks are final (`run_pipeline` does, when ``refine.bn_correction`` is set); `convert_cora`
    keeps the corrected statistics.
    """
    cfg = step_config(step_state(prepared, "correct_batchnorm").config, "correct_batchnorm", overrides)
    max_batches = cfg.refine.bn_correction
    if max_batches == 0:
        raise CoRaError("correct_batchnorm: refine.bn_correction is 0 (no batches); pass bn_correction=16, or set "
                        "it in the config")
    device = model_device(prepared)
    inputs = []
    for batch in batches:
        if len(inputs) >= max_batches:
            break
        inputs.append(split_batch(batch, device)[0])
    inputs = inputs[:distributed.all_reduce_min(len(inputs))]  # every process runs as many batches
    if not inputs:
        raise CoRaError("correct_batchnorm: the calibration batches are empty")
    bns = {n: m for n, m in prepared.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None}
    if not bns:
        return 0
    folded = folded_copy(prepared)
    wrappers = [m for m in folded.modules() if isinstance(m, CoRaConv2d)]
    original = {n: bn.running_mean.detach().clone() for n, bn in bns.items()}
    shift = {n: torch.zeros_like(bn.running_mean, dtype=torch.float64) for n, bn in bns.items()}
    float_means: dict[str, torch.Tensor] = {}
    seen = [0]

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            float_means[name] = _batch_mean(args[0])
        return hook

    def correct(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            # running average over batches of mu_q - mu_f, applied before this BN runs, so the
            # layers downstream already see the corrected upstream (sequential consistency)
            k = seen[0]
            shift[name] = (shift[name] * k + _batch_mean(args[0]) - float_means[name]) / (k + 1)
            module.running_mean.copy_((original[name].double() + shift[name]).to(module.running_mean.dtype))
        return hook

    was_training = prepared.training
    folded.eval()
    try:
        with torch.no_grad():
            for args in inputs:
                handles = [bn.register_forward_pre_hook(record(n)) for n, bn in bns.items()]
                corrected = {n: bn.running_mean.clone() for n, bn in bns.items()}
                try:
                    for n, bn in bns.items():  # the float reference runs with the float statistics
                        bn.running_mean.copy_(original[n])
                    with folded_modes(wrappers, FLOAT), float_activations(folded):
                        folded(*args)
                finally:
                    for h in handles:
                        h.remove()
                    for n, bn in bns.items():
                        bn.running_mean.copy_(corrected[n])
                handles = [bn.register_forward_pre_hook(correct(n)) for n, bn in bns.items() if n in float_means]
                try:
                    with folded_modes(wrappers, HARD):
                        folded(*args)
                finally:
                    for h in handles:
                        h.remove()
                seen[0] += 1
    finally:
        prepared.train(was_training)
    return len(float_means)
