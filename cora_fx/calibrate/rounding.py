"""Data-aware base rounding and residual factorization (cora_fx extensions, off by default).

The paper rounds to nearest and factors the residual in weight space. The paper's own future
work is to reclaim the residual of a better rounding; with calibration data cora_fx can:

- ``rounding.method="gptq"``: round W with GPTQ (Frantar et al., 2022): columns of the unfolded weight are
  quantized one at a time on the observer's grid, and each rounding error is spread over the
  not-yet-quantized columns through the inverse of H = X X^T (X: the conv's unfolded inputs),
  so the conv's *output* error is minimized rather than the weight error.
- ``adapter.svd="activation"``: factor the residual so the adapter minimizes the output error
  ||(dW - B A) X||_F: with H = L L^T, SVD(dW L) = U S V^T, B = U S^1/2, A = S^1/2 V^T L^-1.
  Theorem 1 still holds at full rank; the NBK search works on these singular values unchanged.

Both need H per conv (per group), collected by `collect_input_moments` from the float model;
``rounding.inputs="quantized"`` adds a second pass with H from the once-rounded model (heuristic-rank
adapters), so each layer is rounded for the inputs it will see deployed (sequential GPTQ, in two
passes instead of one pass per layer).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from cora_fx.calibrate import distributed
from cora_fx.calibrate.batches import split_batch
from cora_fx.config import CoRaConfig, step_config
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.graph.passes import folded_copy
from cora_fx.prepare import adapters, set_ranks
from cora_fx.quant.modules import FLOAT, HARD, OFF, ConvSpec, CoRaConv2d, folded_modes
from cora_fx.quant.observers import quant_range
from cora_fx.quant.residual import ResidualFactors
from cora_fx.quant.uniform import QuantizedWeight
from cora_fx.state import get_state, step_state


def im2col(x: torch.Tensor, spec: ConvSpec, kernel: tuple[int, int]) -> torch.Tensor:
    """(B, n, H, W) -> (B, n*k1*k2, L): the columns the conv multiplies, in weight order."""
    if kernel == (1, 1) and spec.stride == (1, 1) and spec.padding in ((0, 0), "valid", "same"):
        return x.reshape(x.shape[0], x.shape[1], -1)  # a pointwise conv multiplies the pixels themselves
    padding = spec.padding
    if spec.padding_mode != "zeros":
        x = F.pad(x, spec.reversed_padding, mode=spec.padding_mode)
        padding = (0, 0)
    elif padding == "same":
        pads = []
        for d, k in zip(reversed(spec.dilation), reversed(kernel)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    return F.unfold(x, kernel, dilation=spec.dilation, padding=padding, stride=spec.stride)


class SecondMoment:
    """H = E[x x^T] of a conv's unfolded inputs, per group, as diagonal blocks over whole input
    channels: ``blocks[i]`` (g, d_i, d_i) covers weight columns ``bounds[i]``. One block is the exact
    H; more (fan-in above ``rounding.max_block``) drop the correlations between blocks (section 5)."""

    def __init__(self, blocks: list[torch.Tensor], bounds: list[tuple[int, int]]) -> None:
        self.blocks = blocks
        self.bounds = bounds

    @property
    def exact(self) -> bool:
        return len(self.blocks) == 1


class _InputMoments:
    """Accumulates the blocks of H_g = sum X_g X_g^T over a conv's inputs, one channel slice at a time so
    the unfolded inputs never exceed ``_COLUMN_BYTES``. The exact H is kept in float64; blocks of a wider
    layer in float32, which halves the largest memory cost (they are damped and factored in float64)."""

    def __init__(self, layer: CoRaConv2d, max_block: int) -> None:
        self.spec = layer.quantized.spec
        _, n_per_group, k1, k2 = layer.adapter.factors.weight_shape
        self.kernel = (k1, k2)
        self.groups = self.spec.groups
        step = max(1, max_block // (k1 * k2))
        self.channels = [(c, min(c + step, n_per_group)) for c in range(0, n_per_group, step)]
        self.h: list[torch.Tensor | None] = [None] * len(self.channels)
        self.dtype = torch.float64 if len(self.channels) == 1 else torch.float32
        self.count = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0].detach()
        b, n, height, width = x.shape
        grouped = x.reshape(b, self.groups, n // self.groups, height, width)
        for i, (c0, c1) in enumerate(self.channels):
            part = grouped[:, :, c0:c1].reshape(b, self.groups * (c1 - c0), height, width)
            per_image = part[:1].numel() * self.kernel[0] * self.kernel[1] * 4
            for chunk in part.split(max(1, _COLUMN_BYTES // max(per_image, 1))):
                cols = im2col(chunk.to(torch.float32), self.spec, self.kernel)
                d = cols.shape[1] // self.groups
                h = torch.zeros(self.groups, d, d, device=cols.device)
                for image in cols:  # one product per image: no copy of the columns (a view for 1x1 convs)
                    image = image.reshape(self.groups, -1, image.shape[-1])
                    h.baddbmm_(image, image.mT)
                self.h[i] = h.to(self.dtype) if self.h[i] is None else self.h[i].add_(h)
                if i == 0:
                    self.count += cols.shape[0] * cols.shape[-1]

    def moment(self) -> SecondMoment:
        """E[x x^T] over every process's inputs (sums and counts all-reduced, section 13)."""
        for h in self.h:
            distributed.all_reduce_sum(h)
        self.count = int(distributed.all_reduce_sum(torch.tensor([self.count], dtype=torch.int64)))
        k = self.kernel[0] * self.kernel[1]
        bounds = [(c0 * k, c1 * k) for c0, c1 in self.channels]
        return SecondMoment([h / max(self.count, 1) for h in self.h], bounds)


#: Upper bound of the unfolded inputs held at once while collecting second moments (bytes, per layer); small
#: enough to stay in a CPU's cache.
_COLUMN_BYTES = 1 << 25


def collect_input_moments(prepared: fx.GraphModule, batches: Iterable, max_batches: int,
                          mode: str = FLOAT, progress: bool = False) -> dict[str, SecondMoment]:
    """H per rewritten conv (blocks of at most ``rounding.max_block`` columns), averaged over its inputs:
    those of the float model (``mode=FLOAT``) or of the quantized model with its hard-rank adapters
    (``mode=HARD``). Under `torch.distributed` each process reads ``max_batches`` of its own batches and the
    sums are all-reduced (W processes at batch B: the moments of one process at batch W * B)."""
    max_block = get_state(prepared).config.rounding.max_block
    folded = folded_copy(prepared)
    wrappers = {n: m for n, m in folded.named_modules() if isinstance(m, CoRaConv2d)}
    moments = {n: _InputMoments(m, max_block) for n, m in wrappers.items()}
    handles = [m.register_forward_pre_hook(moments[n]) for n, m in wrappers.items()]
    device = model_device(prepared)
    seen = 0
    folded.eval()
    bar = tqdm(total=max_batches, desc=f"cora input moments ({mode})", disable=not distributed.shows_progress(progress),
               leave=False)
    try:
        with folded_modes(list(wrappers.values()), mode), torch.no_grad():
            for batch in batches:
                if seen >= max_batches:
                    break
                folded(*split_batch(batch, device)[0])
                seen += 1
                bar.update(1)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    if not distributed.all_reduce_min(seen):
        raise CoRaError("calibrate_rounding: the calibration batches are empty"
                        + (" on at least one process" if distributed.active() else ""))
    return {n: m.moment() for n, m in moments.items() if m.h[0] is not None}


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I per group, in float64; dead inputs (zero diagonal) get 1."""
    h = h.to(torch.float64, copy=True)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)
    mean = diag.mean(dim=-1, keepdim=True)
    diag += damp * mean
    return h


def gptq_quantize(weight: torch.Tensor, h: SecondMoment | torch.Tensor, qw: QuantizedWeight,
                  damp: float = 0.01) -> QuantizedWeight:
    """GPTQ rounding of ``weight`` on the grid of ``qw`` (same scale / zero point), groups batched;
    with a block-diagonal H each block of columns is rounded on its own."""
    moment = h if isinstance(h, SecondMoment) else SecondMoment([h], [(0, h.shape[-1])])
    columns = weight.detach().reshape(weight.shape[0], -1)
    codes = torch.cat([_gptq_codes(columns[:, a:b], hb, qw, damp)
                       for hb, (a, b) in zip(moment.blocks, moment.bounds)], dim=1)
    return QuantizedWeight(codes.reshape(weight.shape), qw.scale, qw.zero_point, qw.bits, qw.clip_min,
                           qw.clip_max)


def _gptq_codes(weight: torch.Tensor, h: torch.Tensor, qw: QuantizedWeight, damp: float,
                block: int = 128) -> torch.Tensor:
    """GPTQ codes (int8) of the (m, d) columns ``weight`` for their H block (g, d, d).

    Columns are processed in descending order of diag(H) ("act order").
    """
    g = h.shape[0]
    m = weight.shape[0]
    w = weight.detach().to(torch.float64).reshape(g, m // g, -1).clone()
    d = w.shape[-1]
    scale = qw.scale.to(torch.float64).reshape(-1)
    zero_point = qw.zero_point.to(torch.float64).reshape(-1)
    if scale.numel() == 1:
        scale, zero_point = scale.expand(m), zero_point.expand(m)
    scale, zero_point = scale.reshape(g, m // g, 1), zero_point.reshape(g, m // g, 1)
    qmin, qmax = quant_range(qw.bits)
    hd = _damped(h, damp)
    perm = torch.argsort(torch.diagonal(hd, dim1=-2, dim2=-1), dim=-1, descending=True)  # (g, d)
    w = torch.gather(w, 2, perm.unsqueeze(1).expand_as(w))
    hd = torch.gather(torch.gather(hd, 1, perm.unsqueeze(2).expand_as(hd)), 2, perm.unsqueeze(1).expand_as(hd))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    codes = torch.zeros_like(w)
    for start in range(0, d, block):
        stop = min(start + block, d)
        w1 = w[:, :, start:stop].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[:, start:stop, start:stop]
        for i in range(stop - start):
            col = w1[:, :, i:i + 1]
            q = torch.clamp(torch.round(col / scale) + zero_point, qmin, qmax)
            codes[:, :, start + i:start + i + 1] = q
            err = (col - (q - zero_point) * scale) / h1[:, i, i].reshape(g, 1, 1)
            w1[:, :, i:] -= err * h1[:, i, i:].unsqueeze(1)
            err1[:, :, i:i + 1] = err
        w[:, :, stop:] -= torch.bmm(err1, hinv[:, start:stop, stop:])
    inverse = torch.argsort(perm, dim=-1)
    codes = torch.gather(codes, 2, inverse.unsqueeze(1).expand_as(codes))
    return codes.reshape(weight.shape).to(torch.int8)


def whitening(h: SecondMoment, damp: float = 0.01, release: bool = False) -> list[torch.Tensor]:
    """Lower Cholesky factors L_i of the damped blocks H_i = L_i L_i^T, per group (float32).

    With ``release``, each block of ``h`` is dropped as soon as its factor exists (H is not needed after the
    whitening), so H and L are never both whole in memory."""
    factors = []
    for i, block in enumerate(h.blocks):
        factors.append(torch.linalg.cholesky(_damped(block, damp)).to(torch.float32))
        if release:
            h.blocks[i] = None
    return factors


def calibrate_rounding(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True,
                       **overrides: Any) -> int:
    """Re-round the main weights (``rounding.method="gptq"``) and/or re-factor the residuals
    (``adapter.svd="activation"``) of ``prepared`` from calibration data; returns the layers updated.
    ``overrides`` (``rounding_batches=``, ``rounding_inputs=``, ``max_block=``) change them for this call
    (`step_config`).

    docs/method.md sections 5-6. The float weight is recovered exactly from [W]_n plus the full-rank
    residual (Theorem 1). Hard ranks are kept (clamped to the new R). Runs before `search_ranks`.
    """
    state = step_state(prepared, "calibrate_rounding")
    cfg = step_config(state.config, "calibrate_rounding", overrides)
    count = cfg.rounding.batches
    moments = collect_input_moments(prepared, batches, count, FLOAT, progress)
    updated = _reround(prepared, cfg, moments, progress)
    if cfg.rounding.inputs == "quantized":
        layers = adapters(prepared)
        saved = {n: int(a.hard_rank) for n, a in layers.items()}
        set_ranks(prepared, "heuristic")
        try:
            moments = collect_input_moments(prepared, batches, count, HARD, progress)
        finally:
            for name, adapter in layers.items():
                adapter.set_hard_rank(min(saved[name], adapter.max_rank))
        _reround(prepared, cfg, moments, progress)
    for layer in adapters(prepared):
        distributed.broadcast_state(prepared.get_submodule(layer))  # bit-identical on every process
    state.rounding_calibrated = True
    return updated


def _reround(prepared: fx.GraphModule, cfg: CoRaConfig, moments: dict[str, SecondMoment],
             progress: bool = False) -> int:
    """GPTQ and/or whitened SVD of every conv with moments, from its exactly recovered float weight."""
    updated = 0
    notes = get_state(prepared).rounding_notes
    layers = [(n, m) for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d) and n in moments]
    bar = tqdm(layers, desc="cora rounding", disable=not distributed.shows_progress(progress), leave=False)
    for name, layer in bar:
        moment = moments.pop(name)  # freed layer by layer
        factors = layer.adapter.factors
        weight = layer.quantized.weight + factors.folded_delta(torch.ones_like(factors.S[0]))
        qw = layer.quantized.quantized_weight()
        if cfg.rounding.method == "gptq":
            qw = gptq_quantize(weight, moment, qw)
        exact, blocks, fan_in = moment.exact, len(moment.blocks), moment.bounds[-1][1]
        factored = layer.adapter.policy != OFF
        white = whitening(moment, release=True) if cfg.adapter.svd == "activation" and factored else None
        del moment
        layer.quantized.set_quantized(qw)
        residual = weight - qw.dequantize()
        layer.adapter.set_factors(ResidualFactors(residual.to(torch.float32), layer.quantized.spec.groups, white,
                                                  factored))
        if not exact:
            notes[name] = (f"second moment kept as {blocks} diagonal blocks of at most "
                           f"{cfg.rounding.max_block} columns (fan-in {fan_in})")
        updated += 1
    return updated
