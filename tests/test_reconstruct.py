"""Block-wise reconstruction (docs/method.md section 17): the blocks, the learned rounding, the pipeline step."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from cora_fx import CoRaConfig, CoRaError, ReconstructConfig, convert_cora, prepare_cora, reconstruct, run_pipeline
from cora_fx.graph.blocks import cut_positions, graph_blocks
from cora_fx.graph.passes import folded_copy
from cora_fx.prepare import adapters
from cora_fx.quant.learned_rounding import LearnedRounding
from cora_fx.quant.modules import FLOAT, CoRaConv2d, folded_modes
from cora_fx.quant.observers import make_observer
from cora_fx.quant.uniform import quantize_weight

from .conftest import random_batches

pytestmark = pytest.mark.unit


def _is_layer(gm: fx.GraphModule):
    return lambda n: n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (nn.Conv2d, nn.Linear))


def test_blocks_chain_back_to_the_model_and_never_cut_a_residual_branch(small_net):
    gm = fx.symbolic_trace(small_net)
    nodes = list(gm.graph.nodes)
    cuts = {nodes[i].name for i in cut_positions(gm.graph)}
    assert "stem_2" in cuts and "add" in cuts  # before and after the residual block
    assert not cuts & {"block_0", "block_1", "block_2", "block_3"}  # the skip is live inside it
    x = torch.randn(2, 3, 16, 16)
    for min_layers in (1, 2, 3):
        blocks = graph_blocks(gm, _is_layer(gm), min_layers)
        counts = [sum(map(_is_layer(gm), b.nodes)) for b in blocks]
        assert all(c >= min_layers for c in counts[:-1]) and sum(counts) == 6
        value = x
        for block in blocks:
            value = block.module(value)
        torch.testing.assert_close(value, small_net(x), rtol=0, atol=0)
    one = graph_blocks(gm, _is_layer(gm), 1)
    assert [sum(map(_is_layer(gm), b.nodes)) for b in one] == [1, 3, 1, 1]


def test_learned_rounding_starts_at_the_codes_and_moves_each_at_most_one_step():
    w = torch.randn(8, 4, 3, 3)
    qw = quantize_weight(w, make_observer("minmax", 3, True), 3)
    rounding = LearnedRounding(w, qw)
    assert torch.equal(rounding.quantized().codes, qw.codes) and rounding.changed() == 0
    torch.testing.assert_close(rounding.weight(), qw.dequantize())
    for _ in range(5):
        rounding.offset.grad = torch.randn_like(rounding.offset)
        rounding.signed_step(0.3)
    moved = (rounding.quantized().codes.int() - qw.codes.int()).abs()
    assert int(moved.max()) <= 1 and rounding.changed() > 0
    assert qw.qmin <= int(rounding.quantized().codes.min()) and int(rounding.quantized().codes.max()) <= qw.qmax


def _config(**changes):
    return CoRaConfig().replace(**{**dict(bits=2, granularity="per_channel", clipping="mse", depthwise="int8",
                                          loss="kl", rounding="gptq", svd="activation"), **changes})


def test_reconstruct_lowers_the_held_out_loss_and_keeps_grids_ranks_and_an_exact_teacher(small_net):
    data = random_batches(4)
    prepared = prepare_cora(small_net, _config(loss="mse"))  # a random net's softmax is flat: KL tells little
    run_pipeline(prepared, data, ranks="heuristic", progress=False)
    ranks = {n: int(a.hard_rank) for n, a in adapters(prepared).items()}
    layers = {n: m for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d)}
    before = {n: m.quantized.quantized_weight() for n, m in layers.items()}
    result = reconstruct(prepared, data, reconstruct_iterations=100, reconstruct_samples=32, reconstruct_min_layers=1,
                         progress=False)
    assert result.blocks >= 2 and result.samples == 32 and result.changed_codes > 0 and result.kept < result.blocks
    assert result.loss_after < result.loss_before  # blocks keep learned codes only where the model's loss falls
    assert {n: int(a.hard_rank) for n, a in adapters(prepared).items()} == ranks
    for name, layer in layers.items():
        after = layer.quantized.quantized_weight()
        assert torch.equal(after.scale, before[name].scale) and after.bits == before[name].bits
        assert int((after.codes.int() - before[name].codes.int()).abs().max()) <= 1
    x = data[0][0]
    gm = folded_copy(prepared)
    with folded_modes([m for m in gm.modules() if isinstance(m, CoRaConv2d)], FLOAT), torch.no_grad():
        torch.testing.assert_close(gm(x), small_net(x), rtol=1e-4, atol=1e-4)  # [W]_n + residual = W still
    with torch.no_grad():
        torch.testing.assert_close(convert_cora(prepared)(x), prepared(x), rtol=1e-4, atol=1e-4)


def test_pipeline_runs_reconstruct_after_the_ranks_and_the_config_round_trips(small_net):
    config = _config(reconstruct_iterations=3, reconstruct_samples=8)
    prepared = prepare_cora(small_net, config)
    result = run_pipeline(prepared, random_batches(2), ranks="heuristic", progress=False)
    assert result.steps == ["calibrate_rounding", "set_ranks", "reconstruct"]
    assert result.reconstruct.iterations == 3 and result.reconstruct.samples == 8
    assert CoRaConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in config.to_dict().items() if k != "reconstruct"}
    assert CoRaConfig.from_dict(old).reconstruct == ReconstructConfig()  # a file from before the group
    off = prepare_cora(small_net, _config())
    assert "reconstruct" not in run_pipeline(off, random_batches(2), ranks="heuristic", progress=False).steps
    assert reconstruct(off, random_batches(1), progress=False).blocks == 0  # 0 iterations: nothing to do
    with pytest.raises(TypeError, match="reconstruct_iterations"):
        reconstruct(off, random_batches(1), budget=0.1)
    with pytest.raises(ValueError, match="reconstruct.samples"):
        CoRaConfig().replace(reconstruct_samples=0)
    with pytest.raises(CoRaError, match="reconstruct: the calibration batches are empty"):
        reconstruct(off, [], reconstruct_iterations=1, progress=False)


def test_recommended_reconstructs_at_two_bits_only():
    assert [CoRaConfig.recommended(n).reconstruct.iterations for n in (2, 3, 4, 5)] == [200, 0, 0, 0]
    assert CoRaConfig.recommended(3, reconstruct_iterations=50).reconstruct.iterations == 50
    assert CoRaConfig.recommended(2, reconstruct_iterations=0).reconstruct == ReconstructConfig()
