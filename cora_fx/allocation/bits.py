"""`allocate_bits`: a per-layer bit-width plan that meets a target equivalent bit-width (an extension).

CoRa spends an adapter budget on top of one base bit-width n, so its equivalent bits are
n + m*b + (what depthwise layers at 8 bits add) (docs/method.md section 3). To land at or below a
target such as exactly 4.0 bits, some layers must take n - 1 bits. `allocate_bits` picks them
by a one-layer-at-a-time sensitivity (HAWQ-style): the growth of the config's label-free objective (KL for
``loss="ce"``) between the model's output and the float model's when that layer alone is rounded to nearest at
n - 1 bits, minus the same at n bits, each with the heuristic-rank adapter (the top floor(b*R) singular
triplets of its residual) added back, averaged over the first `ALLOCATION_BATCHES` calibration batches
(`cora_fx.allocation.sensitivity`). Taking those losses as additive, the demoted set is the one with the least
summed loss whose saved bits meet the target: a 0/1 knapsack, solved exactly (`cheapest_demotions`).
The result is a `CoRaConfig.layer_bits` mapping.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from cora_fx.allocation.sensitivity import (
    ALLOCATION_BATCHES,
    Sensitivity,
    check_arguments,
    first_inputs,
    mean_growth,
    swapped_losses,
)
from cora_fx.calibrate import distributed
from cora_fx.calibrate.checks import check_batches
from cora_fx.config import CoRaConfig
from cora_fx.errors import CoRaError
from cora_fx.io.summary import is_conv, layer_infos
from cora_fx.prepare import adapters, heuristic_rank, prepare_cora
from cora_fx.quant.modules import CONV_KINDS
from cora_fx.quant.observers import main_observer
from cora_fx.quant.residual import ResidualFactors
from cora_fx.quant.uniform import quantize_weight
from cora_fx.state import get_state

#: The adapter budget to pair with `allocate_bits`, e.g. ``CoRaConfig.recommended(4, budget=MIXED_BUDGET)``
#: (what ``cora-fx quantize --target-bits`` takes without ``--budget``). At a fixed equivalent bit-width
#: the budget competes with main-weight bits (each adapter parameter costs 8 bits); the mixed-precision
#: rows of benchmarks/RESULTS.md compare budgets and show why this one is the default.
MIXED_BUDGET = 0.02

def planned_bits(prepared: torch.fx.GraphModule, layer_bits: dict[str, int], budget: float) -> float:
    """Equivalent bits of ``prepared`` with ``layer_bits`` applied and the adapter budget spent in full."""
    state = get_state(prepared)
    cfg = state.config
    adapter_bits = 32 if cfg.adapter.bits is None else cfg.adapter.bits
    convs = [layer for layer in layer_infos(prepared) if is_conv(layer.kind)]
    weight_bits = sum(layer_bits.get(layer.name, layer.bits) * layer.params for layer in convs)
    fixed_adapters = sum(layer.adapter_params for layer in convs if layer.policy != "search")
    total = max(state.conv_params, 1)
    return (weight_bits + state.float_conv_bits + adapter_bits * (budget * total + fixed_adapters)) / total


def _restored(base: torch.Tensor, factors: ResidualFactors, rank: int) -> torch.Tensor:
    """[W]_n plus the best rank-``rank`` approximation of its residual: what a heuristic adapter restores."""
    keep = (torch.arange(factors.max_rank, device=factors.S.device) < rank).float()
    return base + factors.folded_delta(keep)


def _demoted(weight: torch.Tensor, groups: int, cfg: CoRaConfig, bits: int, rank: int) -> torch.Tensor:
    """`_restored` for ``weight`` rounded to nearest at ``bits`` (the config's clipping and granularity)."""
    base = quantize_weight(weight, main_observer(cfg.quant, bits), bits).dequantize()
    return _restored(base, ResidualFactors(weight.detach().float() - base, groups), rank)


def allocate_bits(
    model: nn.Module,
    batches: Iterable,
    config: CoRaConfig,
    target_bits: float,
    *,
    low_bits: Optional[int] = None,
    max_batches: int = ALLOCATION_BATCHES,
    progress: bool = True,
    **capture_options: Any,
) -> dict[str, int]:
    """Choose which convs drop from ``config.quant.bits`` to ``low_bits`` so that the equivalent bits
    (adapter budget spent in full) are at most ``target_bits``.

    Args:
        model: the float model (not modified).
        batches: ``(inputs, labels)`` calibration batches; the first ``max_batches`` (default
            `ALLOCATION_BATCHES`, 4) measure sensitivity, averaged (two forward passes per batch and
            candidate layer: MobileNetV2 has 35 candidates). Fewer are used if fewer are given.
        config: the CoRa configuration the plan is for (its clipping, granularity, budget).
        target_bits: the equivalent bit-width to meet.
        low_bits: the demoted bit-width (default ``config.quant.bits - 1``).
        capture_options: `prepare_cora`'s ``example_inputs``, ``leaf_modules``, ``example_kwargs``,
            ``concrete_args`` and ``capture``, for models that need them to be traced.
    Returns:
        ``config.quant.layer_bits`` plus ``{layer name: low_bits}`` for each demoted layer (nothing added
        when the target is already met), to pass as ``config.replace(layer_bits=...)``.
    """
    low_bits = config.quant.bits - 1 if low_bits is None else low_bits
    if not isinstance(low_bits, int) or not 2 <= low_bits < config.quant.bits:
        raise ValueError(f"allocate_bits: low_bits={low_bits!r} must be an integer in 2..{config.quant.bits - 1}")
    check_arguments("allocate_bits", model, target_bits, max_batches, capture_options)
    config = config.replace(target_bits=None)  # this is the plan; its own preparations are plain
    prepared = prepare_cora(model, config, progress=progress, **capture_options)
    if not get_state(prepared).conv_params:
        raise CoRaError(f"allocate_bits: {type(model).__name__} has no conv layer to allocate bits to")
    check_batches(prepared, batches, "allocate_bits")
    start = planned_bits(prepared, dict(config.quant.layer_bits), config.search.budget)
    if start <= target_bits:
        return dict(config.quant.layer_bits)
    candidates, saved = demotion_candidates(prepared, config, low_bits, start)
    demote_all = {**config.quant.layer_bits, **{n: low_bits for n in candidates}}
    floor = planned_bits(prepared, demote_all, config.search.budget)
    if floor > target_bits:
        raise ValueError(f"allocate_bits: target_bits={target_bits} is below {floor:.3f}, "
                         "the equivalent bits with every "
                         f"searchable conv at {low_bits} bits and budget {config.search.budget}")

    reference_model = copy.deepcopy(model).eval()
    inputs = first_inputs(reference_model, batches, max_batches, "allocate_bits")
    sensitivity = Sensitivity(config, get_state(prepared).concrete_args)
    reference = sensitivity.outputs(reference_model, inputs)
    per_batch = batch_sensitivities(reference_model, prepared, candidates, config, low_bits, inputs, reference,
                                     sensitivity, distributed.shows_progress(progress))
    kl_growth = mean_growth(per_batch)

    # a hair more, so float rounding cannot leave the plan just above the target
    need = (start - target_bits) * (1 + 1e-9)
    demoted = cheapest_demotions(kl_growth, saved, need)
    return {**config.quant.layer_bits, **{name: low_bits for name in demoted}}


def demotion_candidates(prepared: torch.fx.GraphModule, config: CoRaConfig, low_bits: int,
                         start: float) -> tuple[dict, dict[str, float]]:
    """The searchable convs above ``low_bits`` (name -> adapter) and the equivalent bits that demoting
    each one saves from ``start`` (equivalent bits are linear in the layers' bits, so savings add up)."""
    convs = adapters(prepared, CONV_KINDS)
    candidates = {n: a for n, a in convs.items() if a.searchable and config.quant.bits_for(n) > low_bits}
    saved = {name: start - planned_bits(prepared, {**config.quant.layer_bits, name: low_bits}, config.search.budget)
             for name in candidates}
    return candidates, saved


def batch_sensitivities(reference_model: nn.Module, prepared: torch.fx.GraphModule, candidates: dict,
                         config: CoRaConfig, low_bits: int, inputs: list, reference: list[Any],
                         sensitivity: Sensitivity,
                         progress: bool = False) -> dict[str, tuple[list[float], list[float]]]:
    """Per candidate layer, the output KL to ``reference`` on each batch with the layer at its own bits
    and at ``low_bits``, its heuristic-rank adapter added back each time (what `allocate_bits` averages).

    ``reference_model`` is the float model whose weights are swapped one layer at a time (and put
    back); ``candidates`` maps layer names to their adapters in ``prepared``.
    """
    def weights(name: str, conv: nn.Conv2d) -> list[torch.Tensor]:
        adapter = candidates[name]
        rank = heuristic_rank(adapter, config.search.budget)
        # at its own bits the prepared layer already holds [W]_n and its residual's SVD; only the demotion is new
        return [_restored(prepared.get_submodule(name).quantized.weight, adapter.factors, rank),
                _demoted(conv.weight.data, adapter.factors.groups, config, low_bits, rank)]

    losses = swapped_losses(reference_model, list(candidates), weights, inputs, reference, sensitivity,
                            progress, "bit allocation")
    return {name: (values[0], values[1]) for name, values in losses.items()}


def cheapest_demotions(loss: dict[str, float], saved: dict[str, float], need: float,
                        resolution: int = 20_000) -> list[str]:
    """The layers with the least summed ``loss`` whose ``saved`` bits add up to at least ``need``.

    A 0/1 knapsack (min-cost cover), solved by dynamic programming over the saved bits in units of
    ``need / resolution``. Each layer's saving is rounded down to whole units, so the set found meets
    ``need`` (to a relative 1e-12) and loses no more than any set that saves ``len(loss)`` units more.
    Negative losses (noise: the demotion measured as harmless) count as zero, so such layers are taken
    only where they help. The greedy rule (demote in order of loss per saved bit until the target is
    met) can end on one large layer where two small ones lose less; this cannot.
    """
    names = list(loss)
    if need <= 0 or not names:
        return []
    # the 1e-12 absorbs float error at exact multiples (100 // (100 / 20_000) is 19999.0)
    units = {name: math.floor(saved[name] * resolution / need * (1 + 1e-12)) for name in names}
    best = torch.full((resolution + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0  # best[j]: least loss that saves at least j units (j = resolution: at least ``need``)
    reach = torch.arange(resolution + 1)
    taken = []
    for name in names:
        source = (reach - units[name]).clamp(min=0)
        with_it = best[source] + max(loss[name], 0.0)
        take = with_it < best
        best = torch.where(take, with_it, best)
        taken.append(take)
    if not torch.isfinite(best[resolution]):  # only the rounding down can leave it unreached: demote every layer
        return names
    chosen, j = [], resolution
    for name, take in zip(reversed(names), reversed(taken)):
        if take[j]:
            chosen.append(name)
            j = max(j - units[name], 0)
    return chosen[::-1]
