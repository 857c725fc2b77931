"""`CoRaConfig.recommended(n)`: the joint plan for n + 0.5 bits, planned by `run_pipeline`'s first step
(`plan_target`) on the user's model; depthwise convs moved only where the target needs it."""
from __future__ import annotations

import pytest
import torch

from cora_fx import (CoRaConfig, CoRaError, calibrate_rounding, convert_cora, prepare_cora, quantize_cora,
                     run_pipeline, search_ranks, set_ranks, summary)
from cora_fx.allocation.bits import planned_bits
from cora_fx.allocation.plan import plan_target
from cora_fx.state import get_state

from .conftest import SmallNet, random_batches


@pytest.mark.parametrize("allocation", ["joint", "bits"])
def test_a_config_target_is_planned_first_by_run_pipeline_and_quantize_cora(allocation):
    net = SmallNet().eval()
    batches = random_batches(2)
    cfg = CoRaConfig.recommended(4, rounding_batches=1, allocation=allocation, iterations=2, target_bits=None)
    full = planned_bits(prepare_cora(net, cfg, progress=False), {}, 0.0)
    targeted = cfg.replace(target_bits=full - 0.25)
    planned, ranks = plan_target(net, batches, targeted, progress=False)
    assert planned.search.target_bits is None and set(planned.quant.layer_bits.values()) == {3}
    assert (ranks is not None) == (allocation == "joint")
    prepared = prepare_cora(net, targeted, progress=False)  # every conv at 4 bits until the plan runs
    assert {layer.bits for layer in summary(prepared).layers if layer.policy == "search"} == {4}
    result = run_pipeline(prepared, batches, progress=False)
    assert result.steps[0] == "plan_target" and result.planned_ranks == ranks
    assert ("set_ranks" in result.steps) == (allocation == "joint")
    assert get_state(prepared).plan_source is None and get_state(prepared).config == planned
    s = summary(convert_cora(prepared))
    assert s.equivalent_bits <= full - 0.25 + 1e-9
    if allocation == "joint":
        assert {layer.name: layer.rank for layer in s.layers if layer.name in ranks} == ranks
    quantized = summary(quantize_cora(net, batches, targeted, progress=False))
    assert [(x.name, x.bits, x.rank) for x in quantized.layers] == [(x.name, x.bits, x.rank) for x in s.layers]
    assert plan_target(net, batches, cfg, progress=False) == (cfg, None)  # no target: nothing planned
    unplanned = prepare_cora(net, targeted, progress=False)  # a step run before the plan would ignore the target
    for step in (lambda: run_pipeline(unplanned, batches, skip=("plan_target",), progress=False),
                 lambda: calibrate_rounding(unplanned, batches, progress=False), lambda: convert_cora(unplanned),
                 lambda: search_ranks(unplanned, batches, progress=False), lambda: set_ranks(unplanned, "heuristic")):
        with pytest.raises(CoRaError, match="target_bits=.* is not planned yet; call cora_fx.plan_target"):
            step()
    config, planned_ranks = plan_target(unplanned, batches, progress=False)  # the step, by hand
    assert config == planned and planned_ranks == ranks
    with pytest.raises(CoRaError, match="no target_bits left to plan"):
        plan_target(unplanned, batches)
    with pytest.raises(TypeError, match="config is required"):
        plan_target(net, batches)


def test_recommended_plans_n_and_n_plus_one_bits_within_n_plus_half():
    net = SmallNet().eval()
    batches = random_batches(3)
    for bits in (2, 3, 4):
        report = summary(quantize_cora(net, batches, CoRaConfig.recommended(bits, rounding_batches=1), progress=False))
        planned = {layer.bits for layer in report.layers if layer.policy == "search" and layer.kind == "conv"}
        assert planned <= {bits, bits + 1} and report.equivalent_bits <= bits + 0.5 + 1e-9
        assert {layer.bits for layer in report.layers if layer.kind == "linear"} == {bits}
    exact = summary(quantize_cora(net, batches, CoRaConfig.recommended(4, rounding_batches=1, target_bits=4.0),
                                  progress=False))
    assert exact.equivalent_bits <= 4.0 + 1e-9
    assert {layer.bits for layer in exact.layers if layer.policy == "search"} <= {3, 4}


def test_depthwise_convs_are_offered_fewer_bits_only_where_the_target_needs_it():
    """A net whose 8-bit depthwise convs alone put it above n + 0.5: the plan moves them, not the user."""
    net = DepthwiseHeavyNet().eval()
    batches = random_batches(3)
    cfg = CoRaConfig.recommended(4, rounding_batches=1)
    prepared = prepare_cora(net, cfg.replace(target_bits=None), progress=False)
    assert planned_bits(prepared, {n: 4 for n in ("pw1", "pw2")}, 0.0) > 4.5  # depthwise at 8 bits: too many
    report = summary(quantize_cora(net, batches, cfg, progress=False))
    assert report.equivalent_bits <= 4.5 + 1e-9
    depthwise = {layer.name: layer.bits for layer in report.layers if layer.name.startswith("dw")}
    assert set(depthwise.values()) <= {5, 8} and 5 in depthwise.values()
    roomy = summary(quantize_cora(net, batches, cfg.replace(target_bits=7.0), progress=False))
    assert {layer.bits for layer in roomy.layers if layer.name.startswith("dw")} == {8}  # fits: left at 8


class DepthwiseHeavyNet(torch.nn.Module):
    """Wide depthwise convs beside narrow pointwise ones (most conv weights are depthwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.dw1 = torch.nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.pw1 = torch.nn.Conv2d(32, 64, 1)
        self.dw2 = torch.nn.Conv2d(64, 64, 7, padding=3, groups=64)
        self.pw2 = torch.nn.Conv2d(64, 32, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pw1(torch.relu(self.dw1(torch.relu(self.stem(x))))))
        x = torch.relu(self.pw2(self.dw2(x)))
        return self.head(x.mean(dim=(2, 3)))
