"""Bit-widths and adapter ranks chosen together under one bit budget (``search.allocation="joint"``).

`allocate_bits` fixes the bits first (with the adapter budget spent in full) and leaves the ranks to the search,
so every adapter parameter is bought whether or not it beats one more bit of precision. Here each searchable
conv l gets one option (k, r): main bits k in {n - 1, n} and adapter rank r, chosen for the whole model at once
(docs/method.md section 8):

- each layer is rounded (the config's rounding, GPTQ for `recommended`) at both bit-widths, and its residual
  factored (output-aware with ``adapter.svd="activation"``): the output error left with rank r is
  E_l(k, r) = sum of S_i^2 over i > r, the residual's singular values past the r kept;
- one sensitivity per layer turns output error into model loss: s_l = (KL_l(n - 1) - KL_l(n)) / (E_l(n - 1, 0)
  - E_l(n, 0)), the growth of the label-free objective when the layer alone is demoted (as `allocate_bits`
  measures it), over the output error that demotion adds;
- the plan minimizes sum_l s_l E_l(k_l, r_l) subject to sum_l (k_l P_l + adapter_bits r_l D_l) within the target
  (P_l weights, D_l adapter parameters per rank): a multiple-choice knapsack, solved exactly on a grid
  of the budget (`cheapest_options`).

A rank is bought only where it removes more loss per bit than precision does: on MobileNetV2 after GPTQ that is
the few layers whose residual has a dominant output direction (the projection convs of deep blocks), while most
layers gain ~3x more from one more bit. The ranks are then fixed (no gradient search).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from cora_fx.allocation.bits import planned_bits
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
from cora_fx.calibrate.rounding import calibrate_rounding
from cora_fx.config import CoRaConfig
from cora_fx.errors import CoRaError
from cora_fx.prepare import adapters, prepare_cora
from cora_fx.quant.modules import CONV_KINDS
from cora_fx.state import get_state

#: The ranks a layer may take (up to its R): every rank where the first singular values dominate, coarser above.
RANK_CHOICES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Option:
    """One (bits, rank) choice for one layer: its storage in bits and its predicted loss."""

    bits: int
    rank: int
    cost: float
    loss: float


@dataclass
class JointPlan:
    """What `allocate_jointly` chose: ``layer_bits`` for `QuantConfig.layer_bits`, ``ranks`` for `set_ranks`,
    and the ``equivalent_bits`` they add up to."""

    layer_bits: dict[str, int]
    ranks: dict[str, int]
    equivalent_bits: float


def _rounded(model: nn.Module, config: CoRaConfig, bits: dict[str, int], batches: Iterable,
             progress: bool, capture_options: dict) -> torch.fx.GraphModule:
    """``model`` prepared with ``bits`` per layer and rounded as the config asks (GPTQ, activation SVD)."""
    prepared = prepare_cora(model, config.replace(layer_bits=bits), progress=progress, **capture_options)
    check_batches(prepared, batches, "allocate_jointly")
    if config.needs_rounding_data:
        calibrate_rounding(prepared, batches, progress=progress)
    return prepared


def _errors(prepared: torch.fx.GraphModule, names: Iterable[str]) -> dict[str, list[float]]:
    """Per layer, the output error left at each rank r = 0..R: sum of S_i^2 for i > r (over groups)."""
    out = {}
    for name, adapter in adapters(prepared).items():
        if name in names:
            energy = adapter.factors.S.double().square().sum(dim=0)
            out[name] = energy.flip(0).cumsum(0).flip(0).tolist() + [0.0]
    return out


def _demotion_losses(model: nn.Module, high: torch.fx.GraphModule, low: torch.fx.GraphModule,
                     names: list[str], config: CoRaConfig, inputs: list, progress: bool) -> dict[str, float]:
    """Per layer, the mean growth of the label-free objective when it alone goes from high to low bits."""
    reference_model = copy.deepcopy(model).eval()
    sensitivity = Sensitivity(config, get_state(high).concrete_args)
    reference = sensitivity.outputs(reference_model, inputs)

    def weights(name: str, conv: nn.Conv2d) -> list[torch.Tensor]:
        return [prepared.get_submodule(name).quantized.weight for prepared in (high, low)]

    losses = swapped_losses(reference_model, names, weights, inputs, reference, sensitivity, progress,
                            "joint allocation")
    return mean_growth({name: (values[0], values[1]) for name, values in losses.items()})


def layer_options(errors: dict[int, list[float]], growth: float, params: int, per_rank: int,
                  adapter_bits: int, ranks: Sequence[int] = RANK_CHOICES) -> list[Option]:
    """Every (bits, rank) of one layer with its cost in bits and predicted loss s * E(bits, rank).

    ``errors`` maps each bit-width to the output error left at each rank; the sensitivity s is the
    loss ``growth`` of the lower bit-width over the error it adds (0 when the demotion measured harmless);
    ``ranks`` are the ranks offered (those up to the layer's R).
    """
    low, high = min(errors), max(errors)
    added = errors[low][0] - errors[high][0]
    scale = max(growth, 0.0) / added if added > 0 else 0.0
    options = []
    for bits, error in errors.items():
        for rank in ranks:
            if rank < len(error):
                options.append(Option(bits, rank, bits * params + adapter_bits * rank * per_rank, scale * error[rank]))
    return options


def cheapest_options(options: dict[str, list[Option]], budget: float, resolution: int = 20_000) -> dict[str, Option]:
    """One option per layer with the least summed loss whose summed cost is at most ``budget`` bits.

    A multiple-choice knapsack solved by dynamic programming over the cost above each layer's cheapest option,
    in units of that spare budget / ``resolution``; costs are rounded up, so the plan never exceeds ``budget``.
    """
    floor = sum(min(o.cost for o in opts) for opts in options.values())
    spare = budget - floor
    if spare < 0:
        raise ValueError(f"the cheapest plan needs {floor:.0f} bits, more than the budget {budget:.0f}")
    unit = max(spare, 1e-12) / resolution
    best = torch.zeros(resolution + 1, dtype=torch.float64)  # best[j]: least loss within j units
    steps = []
    for opts in options.values():
        cheapest = min(o.cost for o in opts)
        units = [math.ceil((o.cost - cheapest) / unit - 1e-9) for o in opts]
        candidates = torch.full((len(opts), resolution + 1), math.inf, dtype=torch.float64)
        for i, (option, size) in enumerate(zip(opts, units)):
            if size <= resolution:
                candidates[i, size:] = best[:resolution + 1 - size] + option.loss
        best, choice = candidates.min(dim=0)
        steps.append((choice, units))
    plan, j = {}, resolution
    for name, opts, (choice, units) in zip(reversed(list(options)), reversed(list(options.values())),
                                           reversed(steps)):
        index = int(choice[j])
        plan[name] = opts[index]
        j -= units[index]
    return plan


def allocate_jointly(model: nn.Module, batches: Iterable, config: CoRaConfig, target_bits: float, *,
                     low_bits: Optional[int] = None, max_batches: int = ALLOCATION_BATCHES, progress: bool = True,
                     ranks: Sequence[int] = RANK_CHOICES, **capture_options: Any) -> JointPlan:
    """Bits in {``low_bits``, ``config.quant.bits``} and ranks for every searchable conv, at most ``target_bits``
    equivalent bits (docs/method.md section 8). Arguments as `allocate_bits`; ``ranks`` are the ranks offered
    to every layer (``(0,)``: bits only, the same loss model without adapters). The model is not modified."""
    if not ranks or 0 not in ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
        raise ValueError(f"allocate_jointly: ranks={ranks!r} must be integers >= 0 including 0")
    high = config.quant.bits
    low = high - 1 if low_bits is None else low_bits
    if not isinstance(low, int) or not 2 <= low < high:
        raise ValueError(f"allocate_jointly: low_bits={low!r} must be an integer in 2..{high - 1}")
    check_arguments("allocate_jointly", model, target_bits, max_batches, capture_options)
    config = config.replace(target_bits=None)  # this is the plan; its own preparations are plain
    show = distributed.shows_progress(progress)
    rounded = {high: _rounded(model, config, dict(config.quant.layer_bits), batches, show, capture_options)}
    convs = adapters(rounded[high], CONV_KINDS)
    names = [n for n, a in convs.items() if a.searchable and config.quant.bits_for(n) == high]
    if not names:
        raise CoRaError(f"allocate_jointly: {type(model).__name__} has no searchable conv at {high} bits")
    rounded[low] = _rounded(model, config, {**config.quant.layer_bits, **{n: low for n in names}}, batches,
                            show, capture_options)
    growth = _demotion_losses(model, rounded[high], rounded[low], names, config,
                              first_inputs(model, batches, max_batches, "allocate_jointly"), show)
    errors = {bits: _errors(prepared, names) for bits, prepared in rounded.items()}
    layers = adapters(rounded[high])
    adapter_bits = 32 if config.adapter.bits is None else config.adapter.bits
    options = {n: layer_options({b: errors[b][n] for b in errors}, growth[n], math.prod(layers[n].factors.weight_shape),
                                layers[n].factors.params_per_rank, adapter_bits, ranks) for n in names}
    state = get_state(rounded[high])
    total = max(state.conv_params, 1)
    # every bit outside the planned layers: other convs, fixed (depthwise) adapters, float convs
    fixed = planned_bits(rounded[high], {**config.quant.layer_bits, **{n: 0 for n in names}}, 0.0) * total
    floor = fixed + sum(min(o.cost for o in opts) for opts in options.values())
    if floor > target_bits * total:
        raise ValueError(f"allocate_jointly: target_bits={target_bits} is below {floor / total:.3f}, the "
                         f"equivalent bits with every searchable conv at {low} bits and no adapter")
    plan = cheapest_options(options, target_bits * total - fixed)
    spent = fixed + sum(o.cost for o in plan.values())
    return JointPlan({**config.quant.layer_bits, **{n: o.bits for n, o in plan.items() if o.bits != high}},
                     {n: o.rank for n, o in plan.items()}, spent / total)
