"""`allocate_jointly`: bits and ranks chosen together under one bit budget (``search.allocation="joint"``)."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cora_fx import CoRaConfig, CoRaError, convert_cora, prepare_cora, run_pipeline, summary
from cora_fx.allocation.bits import planned_bits
from cora_fx.allocation.joint import Option, allocate_jointly, cheapest_options, layer_options

from .conftest import SmallNet, random_batches

pytestmark = pytest.mark.unit


def test_a_rank_is_bought_where_it_removes_more_loss_per_bit_than_precision():
    # layer "spiky": one output direction holds 90% of its 4-bit error; layer "flat": 16 equal directions.
    spiky = {4: [10.0, 1.0] + [1.0 - i / 16 for i in range(1, 17)],
             3: [40.0] + [40.0 - 40 * i / 16 for i in range(1, 17)]}
    flat = {4: [10.0 - 10 * i / 16 for i in range(17)], 3: [40.0 - 40 * i / 16 for i in range(17)]}
    options = {name: layer_options(errors, growth=30.0, params=1024, per_rank=32, adapter_bits=8)
               for name, errors in (("spiky", spiky), ("flat", flat))}
    assert {(o.bits, o.rank) for o in options["flat"]} >= {(4, 0), (3, 0), (4, 16), (3, 1)}
    loss = {(o.bits, o.rank): o.loss for o in options["spiky"]}
    assert loss[(4, 0)] == pytest.approx(10.0) and loss[(3, 0)] == pytest.approx(40.0)  # s = 30 / (40 - 10) = 1
    # both at 4 bits cost 8,192 bits; 256 more buy one rank (costs are rounded up: a little slack): the spiky
    # layer's (error 10 -> 1), not the flat one's
    plan = cheapest_options(options, 8192 + 260)
    assert (plan["spiky"].bits, plan["spiky"].rank) == (4, 1) and (plan["flat"].bits, plan["flat"].rank) == (4, 0)
    harmless = layer_options(flat, growth=-1.0, params=1024, per_rank=32, adapter_bits=8)
    assert all(o.loss == 0 for o in harmless)  # a demotion measured harmless makes every option free of loss
    with pytest.raises(ValueError, match="cheapest plan"):
        cheapest_options(options, 2 * 3 * 1024 - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 5_000), st.floats(0, 10)), min_size=1, max_size=4),
                min_size=1, max_size=4), st.floats(0, 1))
def test_the_plan_is_the_cheapest_one_brute_force_finds(layers, share):
    """Within the budget, and no plan that fits with one rounding unit to spare per layer loses less."""
    options = {f"l{i}": [Option(4, r, float(c), loss) for r, (c, loss) in enumerate(opts)]
               for i, opts in enumerate(layers)}
    floor = sum(min(o.cost for o in opts) for opts in options.values())
    top = sum(max(o.cost for o in opts) for opts in options.values())
    budget = floor + share * (top - floor)
    plan = cheapest_options(options, budget)
    assert set(plan) == set(options) and sum(o.cost for o in plan.values()) <= budget + 1e-6
    unit = max(budget - floor, 1e-12) / 20_000
    best = min((sum(o.loss for o in combo) for combo in itertools.product(*options.values())
                if sum(o.cost for o in combo) <= budget - len(options) * unit), default=float("inf"))
    assert sum(o.loss for o in plan.values()) <= best + 1e-9


def test_joint_plan_meets_the_target_and_converts_to_its_accounting():
    net = SmallNet().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = CoRaConfig.recommended(4, rounding_batches=1, target_bits=None)
    batches = random_batches(3)
    full = planned_bits(prepare_cora(net, cfg, progress=False), {}, 0.0)  # every searchable conv at 4, no adapter
    for target in (full + 0.1, full - 0.25, full - 0.6):
        plan = allocate_jointly(net, batches, cfg, target, progress=False)
        prepared = prepare_cora(net, cfg.replace(layer_bits=plan.layer_bits), progress=False)
        run_pipeline(prepared, batches, ranks=plan.ranks, progress=False)
        s = summary(convert_cora(prepared))
        assert s.equivalent_bits == pytest.approx(plan.equivalent_bits) and s.equivalent_bits <= target + 1e-9
        assert {layer.name: layer.rank for layer in s.layers if layer.name in plan.ranks} == plan.ranks
        assert set(plan.layer_bits.values()) <= {3}
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the float model is untouched
    bits_only = allocate_jointly(net, batches, cfg, full - 0.25, ranks=(0,), progress=False)
    assert set(bits_only.ranks.values()) == {0} and bits_only.layer_bits and bits_only.equivalent_bits <= full - 0.25


def test_joint_allocation_errors_name_the_argument():
    net = SmallNet().eval()
    cfg = CoRaConfig.recommended(4, rounding_batches=1)
    with pytest.raises(ValueError, match="target_bits=1.0 is below"):
        allocate_jointly(net, random_batches(2), cfg, 1.0, progress=False)
    with pytest.raises(ValueError, match="ranks=.1, 2.* including 0"):
        allocate_jointly(net, random_batches(2), cfg, 4.0, ranks=(1, 2), progress=False)
    with pytest.raises(ValueError, match="low_bits"):
        allocate_jointly(net, random_batches(2), cfg, 4.0, low_bits=4, progress=False)
    with pytest.raises(ValueError, match="allocate_jointly: target_bits=nan"):
        allocate_jointly(net, random_batches(2), cfg, float("nan"), progress=False)
    with pytest.raises(CoRaError, match="allocate_jointly: Sequential has no searchable conv"):
        allocate_jointly(torch.nn.Sequential(torch.nn.Linear(4, 4)), [(torch.randn(8, 4), torch.zeros(8).long())],
                         cfg, 4.0, progress=False)
    with pytest.raises(CoRaError, match="empty"):
        allocate_jointly(net, [], cfg, 4.0, progress=False)
    with pytest.raises(ValueError, match="bits=.*two or more integers in 2..8"):
        allocate_jointly(net, random_batches(2), cfg, 4.0, bits=(4,), progress=False)
    with pytest.raises(ValueError, match="allocation"):
        cfg.replace(allocation="greedy")
    with pytest.raises(ValueError, match="plan_widths"):
        cfg.replace(plan_widths=4)
