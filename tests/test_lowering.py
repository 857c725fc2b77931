"""The convert side (`cora_fx.graph.lowering`): the plan is built by plain functions, the lowering passes declare
their preconditions, and the branches are found through node.meta."""
from __future__ import annotations

import copy

import pytest
import torch

from cora_fx import CoRaConfig, CoRaError, convert_cora, prepare_cora, set_ranks
from cora_fx.graph.lowering import ConversionPlan, LowerActivationQuantizers, LowerToOps, conversion_plan
from cora_fx.graph.passes import LAYER_META, ROLE_META, merge_nodes
from tests.conftest import SmallNet

pytestmark = pytest.mark.unit


def _prepared(**changes) -> torch.fx.GraphModule:
    prepared = prepare_cora(SmallNet().eval(), CoRaConfig().replace(**changes), progress=False)
    set_ranks(prepared, "heuristic")
    return prepared


def test_the_plan_leaves_the_graph_alone_and_covers_every_branch():
    prepared = _prepared()
    before = str(prepared.graph)
    plan = conversion_plan(prepared, adapter_bits=8, adapter_form="parallel")
    assert str(prepared.graph) == before
    assert set(plan.layers) == {name for name, *_ in merge_nodes(prepared)}
    for name, lowered in plan.layers.items():
        rank = int(prepared.get_submodule(name).adapter.hard_rank)
        assert (lowered.adapter_a is None) == (rank == 0), name
        if rank:
            assert lowered.adapter_a.bits == 8 and lowered.adapter_a.codes.shape[0] == rank * lowered.spec.groups


def test_lowering_passes_check_their_preconditions():
    gm = copy.deepcopy(_prepared())
    with pytest.raises(CoRaError, match=r"LowerToOps: no conversion plan for \[.*'stem.0'"):
        LowerToOps(ConversionPlan())(gm)
    quantized_activations = copy.deepcopy(_prepared(act_bits=8))  # never calibrated
    with pytest.raises(CoRaError, match="has no calibrated range; run calibrate_activations"):
        LowerActivationQuantizers()(quantized_activations)


def test_branches_are_found_through_node_meta_not_names():
    prepared = _prepared()
    merges = [n for n in prepared.graph.nodes if n.meta.get(ROLE_META) == "merge"]
    assert merges and all(n.meta[LAYER_META] for n in merges)
    name = merges[0].meta[LAYER_META]
    del merges[0].meta[ROLE_META]  # an add the rewrite did not mark is not a branch, whatever its arguments
    assert name not in {layer for layer, *_ in merge_nodes(prepared)}


def test_convert_is_unchanged_by_building_the_plan_first():
    prepared = _prepared(budget=0.2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = prepared(x)
        torch.testing.assert_close(convert_cora(prepared)(x), reference, rtol=0,
                                   atol=1e-5 * float(reference.abs().max()))
