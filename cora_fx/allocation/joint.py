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
from cora_fx.io.summary import is_conv, layer_infos
from cora_fx.prepare import adapters, prepare_cora
from cora_fx.quant.modules import CONV_KINDS, OFF
from cora_fx.state import get_state

#: The ranks a layer may take (up to its R): every rank where the first singular values dominate, coarser above.
RANK_CHOICES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class NothingToPlan(CoRaError):
    """The model has no searchable conv at ``quant.bits``: no bits or ranks to choose."""


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
                  adapter_bits: int, ranks: Sequence[int] = RANK_CHOICES,
                  pair: Optional[Sequence[int]] = None) -> list[Option]:
    """Every (bits, rank) of one layer with its cost in bits and predicted loss s * E(bits, rank).

    ``errors`` maps each bit-width to the output error left at each rank; the sensitivity s is the
    loss ``growth`` of the lower bit-width over the error it adds (0 when the demotion measured harmless);
    ``ranks`` are the ranks offered (those up to the layer's R); ``pair`` the two bit-widths whose demotion
    ``growth`` measured (default: the lowest and highest in ``errors``).
    """
    low, high = sorted(pair) if pair is not None else (min(errors), max(errors))
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


def offered_bits(target_bits: float, widths: int = 2) -> tuple[int, ...]:
    """The main bit-widths the joint plan offers each searchable conv for ``target_bits`` (docs/method.md s.8):
    ceil(t) - 1 and ceil(t) (at least 2 and 3), and ceil(t) + 1 too with ``widths=3``; never above 8."""
    high = min(max(3, math.ceil(target_bits - 1e-9)), 8)
    return tuple(range(high - 1, min(high - 1 + widths, 9)))


def _planned_names(probe: torch.fx.GraphModule, config: CoRaConfig) -> list[str]:
    """The searchable convs the plan may move: at ``quant.bits``, not named in the prepared ``layer_bits``."""
    fixed = get_state(probe).config.quant.layer_bits  # the user's and `edge_bits`' choices
    return [n for n, a in adapters(probe, CONV_KINDS).items()
            if a.searchable and n not in fixed and config.quant.bits_for(n) == config.quant.bits]


def _movable_convs(probe: torch.fx.GraphModule, names: list[str], top: int) -> list[str]:
    """The other quantized convs above ``top`` bits that no ``layer_bits`` entry fixes (depthwise convs at 8 bits):
    offered ``top`` bits when the target cannot be met with them where they are."""
    fixed = get_state(probe).config.quant.layer_bits
    return [layer.name for layer in layer_infos(probe) if is_conv(layer.kind) and layer.name not in names
            and layer.name not in fixed and layer.policy == OFF and layer.bits > top]


def _reachable(probe: torch.fx.GraphModule, names: list[str], user_bits: dict[str, int], widths: tuple[int, ...],
               target_bits: float, lower_if_needed: bool) -> tuple[tuple[int, ...], list[str]]:
    """The widths to offer and the other convs to move (`_movable_convs`): none while every planned conv at the
    lowest width meets the target; with ``lower_if_needed``, widths one bit lower while even the moved convs miss."""
    while True:
        movable = _movable_convs(probe, names, widths[-1])
        floor = planned_bits(probe, {**user_bits, **{n: widths[0] for n in names}}, 0.0)
        if floor <= target_bits:
            return widths, []
        moved = planned_bits(probe, {**user_bits, **{n: widths[0] for n in names},
                                     **{m: widths[-1] for m in movable}}, 0.0)
        if moved <= target_bits or not lower_if_needed or widths[0] <= 2:
            return widths, movable
        widths = tuple(w - 1 for w in widths)


def _bit_options(growth: float, params: int, bits: tuple[int, int]) -> list[Option]:
    """A layer with no adapter offered two bit-widths: the lower one predicted to add ``growth`` (measured)."""
    low, high = sorted(bits)
    return [Option(high, 0, high * params, 0.0), Option(low, 0, low * params, max(growth, 0.0))]


def allocate_jointly(model: nn.Module, batches: Iterable, config: CoRaConfig, target_bits: float, *,
                     low_bits: Optional[int] = None, bits: Optional[Sequence[int]] = None,
                     lower_if_needed: bool = False, max_batches: int = ALLOCATION_BATCHES, progress: bool = True,
                     ranks: Sequence[int] = RANK_CHOICES, **capture_options: Any) -> JointPlan:
    """Bits and ranks for every searchable conv at ``quant.bits``, at most ``target_bits`` equivalent bits
    (docs/method.md section 8). The model is not modified.

    ``bits`` are the main bit-widths offered (default ``(low_bits, quant.bits)``, ``low_bits`` defaulting to
    ``quant.bits - 1``; `plan_target` passes `offered_bits`); the sensitivity is measured between the two lowest.
    When even every planned conv at the lowest width misses the target, the other quantized convs above the
    highest width (depthwise convs at 8 bits) are offered that width too, each with its measured loss; and with
    ``lower_if_needed`` (`plan_target`), where even that misses, every width is lowered by one bit (down to 2).
    ``ranks`` are the ranks offered (``(0,)``: bits only); the other arguments are `allocate_bits`'.
    """
    if not ranks or 0 not in ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
        raise ValueError(f"allocate_jointly: ranks={ranks!r} must be integers >= 0 including 0")
    widths = _widths(config, low_bits, bits)
    check_arguments("allocate_jointly", model, target_bits, max_batches, capture_options)
    config = config.replace(target_bits=None)  # this is the plan; its own preparations are plain
    show = distributed.shows_progress(progress)
    probe = prepare_cora(model, config, progress=False, **capture_options)
    check_batches(probe, batches, "allocate_jointly")
    names = _planned_names(probe, config)
    if not names:
        raise NothingToPlan(f"allocate_jointly: {type(model).__name__} has no searchable conv at "
                            f"{config.quant.bits} bits to plan")
    total = max(get_state(probe).conv_params, 1)
    user_bits = dict(config.quant.layer_bits)
    widths, movable = _reachable(probe, names, user_bits, widths, target_bits, lower_if_needed)
    rounded = {k: _rounded(model, config, {**user_bits, **{n: k for n in names},
                                           **({m: widths[-1] for m in movable} if k == widths[0] else {})},
                           batches, show, capture_options) for k in widths}
    inputs = first_inputs(model, batches, max_batches, "allocate_jointly")
    growth = _demotion_losses(model, rounded[widths[1]], rounded[widths[0]], names + movable, config, inputs, show)
    errors = {k: _errors(prepared, names) for k, prepared in rounded.items()}
    layers = adapters(rounded[widths[0]])
    adapter_bits = 32 if config.adapter.bits is None else config.adapter.bits
    options = {n: layer_options({k: errors[k][n] for k in widths}, growth[n],
                                math.prod(layers[n].factors.weight_shape), layers[n].factors.params_per_rank,
                                adapter_bits, ranks, pair=widths[:2]) for n in names}
    own_bits = {layer.name: layer.bits for layer in layer_infos(probe)}
    options.update({m: _bit_options(growth[m], math.prod(layers[m].factors.weight_shape), (widths[-1], own_bits[m]))
                    for m in movable})
    # every bit outside the planned layers: other convs, fixed (depthwise) adapters, float convs
    fixed = planned_bits(probe, {**user_bits, **{n: 0 for n in options}}, 0.0) * total
    floor = fixed + sum(min(o.cost for o in opts) for opts in options.values())
    if floor > target_bits * total:
        raise ValueError(f"allocate_jointly: target_bits={target_bits} is below {floor / total:.3f}, the "
                         f"equivalent bits with every searchable conv at {widths[0]} bits, no adapter and "
                         f"every other quantized conv at {widths[-1]} bits or fewer")
    plan = cheapest_options(options, target_bits * total - fixed)
    spent = fixed + sum(o.cost for o in plan.values())
    chosen = {n: o.bits for n, o in plan.items() if o.bits != own_bits[n]}
    return JointPlan({**user_bits, **chosen}, {n: plan[n].rank for n in names}, spent / total)


def _widths(config: CoRaConfig, low_bits: Optional[int], bits: Optional[Sequence[int]]) -> tuple[int, ...]:
    """The sorted main bit-widths `allocate_jointly` offers, checked."""
    high = config.quant.bits
    if bits is None:
        low = high - 1 if low_bits is None else low_bits
        if not isinstance(low, int) or not 2 <= low < high:
            raise ValueError(f"allocate_jointly: low_bits={low!r} must be an integer in 2..{high - 1}")
        return (low, high)
    widths = tuple(sorted(set(bits)))
    if len(widths) < 2 or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in widths):
        raise ValueError(f"allocate_jointly: bits={bits!r} must be two or more integers in 2..8")
    return widths
