"""Per-layer bit-widths (`QuantConfig.layer_bits`) and the bit allocation that chooses them."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cora_fx
from cora_fx import CoRaConfig, CoRaError, convert_cora, prepare_cora, run_pipeline, set_ranks, summary
from cora_fx.allocation.bits import ALLOCATION_BATCHES, allocate_bits, cheapest_demotions, planned_bits
from cora_fx.prepare import adapters

from .conftest import SmallNet, assert_same_up_to_summation, random_batches

LAYERS = ("stem.0", "block.0", "block.2", "block.4", "down", "head")


def _bits(prepared) -> dict[str, int]:
    return {layer.name: layer.bits for layer in summary(prepared).layers}


@pytest.mark.unit
def test_layer_bits_set_each_layer_and_the_accounting(small_net):
    cfg = CoRaConfig().replace(depthwise="int8", layer_bits={"down": 3, "block.2": 6, "head": 5})
    prepared = prepare_cora(small_net, cfg)
    assert _bits(prepared) == {"stem.0": 4, "block.0": 4, "block.2": 6, "block.4": 4, "down": 3, "head": 5}
    set_ranks(prepared, {n: 0 for n, a in adapters(prepared).items() if a.searchable})
    s = summary(prepared)
    convs = [layer for layer in s.layers if layer.kind == "conv"]
    assert s.equivalent_bits == pytest.approx(sum(layer.bits * layer.params for layer in convs) / s.conv_params)
    assert planned_bits(prepared, {}, cfg.search.budget) == pytest.approx(s.equivalent_bits + 8 * cfg.search.budget)
    converted = convert_cora(prepared)
    words = converted.meta["cora_fx_packed_layout"]["down.weight"][1]  # eight 3-bit codes per 32-bit word
    assert words == -(-24 // 8) * 16 * 9
    x = random_batches(1)[0][0]
    with torch.no_grad():
        assert_same_up_to_summation(converted(x), prepared(x), small_net)


@given(st.dictionaries(st.sampled_from(LAYERS), st.integers(2, 8), max_size=len(LAYERS)),
       st.sampled_from(["skip", "int8"]))
def test_any_layer_bits_convert_exactly(layer_bits, depthwise):
    torch.manual_seed(0)
    net = SmallNet().eval()
    prepared = prepare_cora(net, CoRaConfig().replace(granularity="per_channel", clipping="minmax",
                                                      depthwise=depthwise, layer_bits=layer_bits))
    bits = _bits(prepared)
    default = {"block.2": 8 if depthwise == "int8" else 4}
    assert all(bits[n] == layer_bits.get(n, default.get(n, 4)) for n in LAYERS)
    set_ranks(prepared, "heuristic")
    converted = convert_cora(prepared)
    x = random_batches(1)[0][0]
    with torch.no_grad():
        assert_same_up_to_summation(converted(x), prepared(x), net)


@pytest.mark.unit
def test_layer_bits_are_validated_and_copied(small_net):
    with pytest.raises(ValueError, match="layer_bits"):
        CoRaConfig().replace(layer_bits={"down": 9})
    with pytest.raises(ValueError, match="layer_bits"):
        CoRaConfig().replace(layer_bits={"down": True})
    with pytest.raises(ValueError, match="layer_bits"):
        CoRaConfig().replace(layer_bits=[("down", 3)])
    with pytest.raises(CoRaError, match="'nope'"):
        prepare_cora(small_net, CoRaConfig().replace(layer_bits={"nope": 3}))
    with pytest.raises(CoRaError, match="depthwise='float'"):
        prepare_cora(small_net, CoRaConfig().replace(depthwise="float", layer_bits={"block.2": 6}))
    with pytest.raises(CoRaError, match="quantize_linear=False"):
        prepare_cora(small_net, CoRaConfig().replace(quantize_linear=False, layer_bits={"head": 6}))
    plan = {"down": 3}
    cfg = CoRaConfig().replace(layer_bits=plan)
    plan["down"] = 5
    assert cfg.quant.bits_for("down") == 3 and cfg.quant.bits_for("head") == 4 and cfg.quant.bits_for("head", 8) == 8
    assert (hash(cfg) == hash(CoRaConfig().replace(layer_bits={"down": 3}))
            and cfg == CoRaConfig().replace(layer_bits={"down": 3}))
    assert cfg != CoRaConfig() and CoRaConfig.recommended(4, layer_bits={"down": 3}).quant.layer_bits == {"down": 3}


class TwoBranchNet(nn.Module):
    """Two convs of the same size; only ``used`` reaches the output (``ignored`` is scaled by 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.used = nn.Conv2d(8, 32, 3, padding=1)
        self.ignored = nn.Conv2d(8, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.head((self.used(x) + 0.0 * self.ignored(x)).mean(dim=(2, 3)))


@pytest.mark.unit
def test_allocation_demotes_the_layer_the_output_does_not_feel_and_meets_the_target():
    net = TwoBranchNet().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = CoRaConfig().replace(bits=4, granularity="per_channel", clipping="minmax", budget=0.02, quantize_linear=False)
    prepared = prepare_cora(net, cfg)
    base = planned_bits(prepared, {}, cfg.search.budget)
    one = 8 * 32 * 9 / prepared.meta["cora_fx"].conv_params  # bits saved by demoting one of the big convs
    plan = allocate_bits(net, random_batches(2), cfg, base - one / 2, progress=False)
    assert plan == {"ignored": 3}
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the float model is untouched
    assert allocate_bits(net, random_batches(1), cfg, base, progress=False) == {}
    two = allocate_bits(net, random_batches(1), cfg, base - 1.5 * one, progress=False)
    assert {"ignored", "used"} <= set(two) and set(two.values()) == {3}  # stem alone saves too little
    assert planned_bits(prepare_cora(net, cfg.replace(layer_bits=two)), {}, cfg.search.budget) <= base - 1.5 * one
    with pytest.raises(ValueError, match="target_bits"):
        allocate_bits(net, random_batches(1), cfg, 2.0, progress=False)
    with pytest.raises(ValueError, match="low_bits"):
        allocate_bits(net, random_batches(1), cfg, 3.5, low_bits=4, progress=False)
    with pytest.raises(ValueError, match="target_bits"):
        allocate_bits(net, random_batches(1), cfg, float("nan"), progress=False)
    with pytest.raises(CoRaError, match="allocate_bits: Sequential has no conv layer"):
        allocate_bits(nn.Sequential(nn.Linear(4, 4)), [(torch.randn(8, 4), None)], cfg, 4.0, progress=False)
    with pytest.raises(CoRaError, match="empty"):
        allocate_bits(net, [], cfg, base - one / 2, progress=False)


@pytest.mark.unit
def test_demotions_take_two_small_layers_where_the_greedy_rule_takes_one_large():
    loss = {"small": 1.0, "large": 5.0, "medium": 2.0}
    saved = {"small": 10, "large": 100, "medium": 95}
    # greedy by loss per saved bit: medium (0.021), then large (0.05): loss 7; the cheapest cover: 3
    assert sorted(cheapest_demotions(loss, saved, 100)) == ["medium", "small"]
    assert cheapest_demotions(loss, saved, 0) == [] and cheapest_demotions(loss, saved, 95) == ["medium"]
    assert cheapest_demotions({"free": -1.0, "large": 5.0}, {"free": 1, "large": 100}, 100) == ["large"]


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1, 10), st.integers(1, 10_000)), min_size=1, max_size=7), st.floats(0.01, 1.0))
def test_demotions_are_the_cheapest_cover_brute_force_finds(items, share):
    """Against every subset: the chosen layers meet the need, and no subset that meets it with a margin of
    one rounding unit (need / 20,000) per layer loses less."""
    loss = {f"l{i}": c for i, (c, _) in enumerate(items)}
    saved = {f"l{i}": w for i, (_, w) in enumerate(items)}
    need = share * sum(saved.values())
    chosen = cheapest_demotions(loss, saved, need)
    assert sum(saved[n] for n in chosen) >= need * (1 - 1e-9)

    def cost(names):
        return sum(max(loss[n], 0.0) for n in names)
    margin = need * (1 + len(loss) / 20_000)  # each saving is rounded down to whole units of need / 20,000
    best = min((cost(c) for r in range(len(loss) + 1) for c in itertools.combinations(loss, r)
                if sum(saved[n] for n in c) >= margin), default=float("inf"))
    assert cost(chosen) <= best + 1e-9


@pytest.mark.unit
def test_allocation_averages_the_first_batches_and_reads_no_further():
    net = TwoBranchNet().eval()
    cfg = CoRaConfig().replace(bits=4, granularity="per_channel", clipping="minmax", budget=0.02, quantize_linear=False)
    base = planned_bits(prepare_cora(net, cfg), {}, cfg.search.budget)
    data = random_batches(ALLOCATION_BATCHES + 2)
    read = []

    def counted():
        for i, batch in enumerate(data):
            read.append(i)
            yield batch

    target = base - 0.05
    plan = allocate_bits(net, counted(), cfg, target, progress=False)
    assert read == list(range(ALLOCATION_BATCHES))  # the default, and not one batch more
    read.clear()
    assert allocate_bits(net, counted(), cfg, target, max_batches=2, progress=False) == \
        allocate_bits(net, data[1::-1], cfg, target, max_batches=2, progress=False)  # a mean: the order does not matter
    assert read == [0, 1]
    assert allocate_bits(net, data[:2], cfg, target, progress=False) == \
        allocate_bits(net, data, cfg, target, max_batches=2, progress=False)  # fewer batches than asked: all of them
    assert plan and planned_bits(prepare_cora(net, cfg.replace(layer_bits=plan)), {}, cfg.search.budget) <= target


def test_allocated_plan_searches_converts_and_round_trips_within_the_target(small_net, tmp_path):
    cfg = CoRaConfig.recommended(4, rounding_batches=1, iterations=4, target_bits=None)
    batches = random_batches(3)
    prepared = prepare_cora(small_net, cfg)
    target = planned_bits(prepared, {}, cfg.search.budget) - 0.3
    plan = allocate_bits(small_net, batches, cfg, target, progress=False)
    assert plan and set(plan.values()) == {3}
    prepared = prepare_cora(small_net, cfg.replace(layer_bits=plan))
    result = run_pipeline(prepared, batches, progress=False).search
    converted = convert_cora(prepared)
    s = summary(converted)
    assert result.budget <= cfg.search.budget + 1e-9 and s.equivalent_bits <= target + 1e-9
    assert {layer.name: layer.bits for layer in s.layers if layer.name in plan} == plan
    path = tmp_path / "mixed.pt2"
    x = random_batches(1)[0][0]
    cora_fx.save(converted, path, (x,))
    loaded = cora_fx.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=1e-6)
