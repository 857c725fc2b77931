"""The cora_fx extensions beyond the paper: MSE clipping, int8 depthwise, BatchNorm correction,
GPTQ base rounding and output-aware (activation) residual factors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cora_fx import (
    CoRaConfig,
    CoRaError,
    calibrate_rounding,
    convert_cora,
    correct_batchnorm,
    prepare_cora,
    run_pipeline,
    search_ranks,
    set_ranks,
    summary,
)
from cora_fx.prepare import adapters
from cora_fx.quant.modules import CoRaConv2d
from cora_fx.quant.observers import MSEObserver, make_observer
from cora_fx.quant.uniform import quantize_weight

from .conftest import assert_same_up_to_summation, random_batches

pytestmark = pytest.mark.unit


def test_mse_clipping_has_less_weight_error_than_minmax():
    w = torch.randn(16, 8, 3, 3)
    w[0, 0, 0, 0] = 12.0  # an outlier that min-max must cover
    for per_channel in (False, True):
        errs = {}
        for clipping in ("minmax", "mse"):
            obs = make_observer(clipping, 3, per_channel)
            errs[clipping] = float((quantize_weight(w, obs, 3).dequantize() - w).pow(2).sum())
        assert errs["mse"] < errs["minmax"]
        assert isinstance(make_observer("mse", 3, per_channel), MSEObserver)


def test_depthwise_int8_policy_is_counted_at_8_bits(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(depthwise="int8"))
    layer = next(layer for layer in summary(prepared).layers if layer.name == "block.2")
    assert layer.bits == 8 and layer.rank == 0 and layer.policy == "off"
    skip = summary(prepare_cora(small_net, CoRaConfig().replace(depthwise="skip")))
    now = summary(prepared)
    assert now.equivalent_bits - skip.equivalent_bits == pytest.approx(4 * layer.params / now.conv_params)
    converted = convert_cora(prepared)
    words = converted.meta["cora_fx_packed_layout"]["block.2.weight"][1]  # four 8-bit codes per word, rows padded
    rows = converted.get_buffer("block.2.weight_scale").shape[0]
    assert words == -(-rows // 4) * (layer.params // rows)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def _trained_bn_net() -> BNNet:
    net = BNNet()
    net.train()
    with torch.no_grad():
        for x, _ in random_batches(20, batch=16):
            net(x + 0.5)  # running statistics of a shifted input distribution
    return net.eval()


def test_batchnorm_correction_brings_the_quantized_model_closer_to_float():
    net = _trained_bn_net()
    user_stats = net.body[1].running_mean.clone()
    data = [(x + 0.5, y) for x, y in random_batches(6, batch=16)]
    prepared = prepare_cora(net, CoRaConfig().replace(bits=2, granularity="per_tensor", clipping="minmax",
                                                      quantize_linear=False))
    set_ranks(prepared, {n: 0 for n in adapters(prepared)})
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        reference = net(x)
        before = (prepared(x) - reference).pow(2).mean()
        assert correct_batchnorm(prepared, data, bn_correction=6) == 2
        after = (prepared(x) - reference).pow(2).mean()
    assert after < 0.7 * before
    # the prepared copy was corrected; the user's model keeps its statistics
    assert not torch.equal(prepared.get_submodule("body.1").running_mean, user_stats)
    assert torch.equal(net.body[1].running_mean, user_stats)


def _output_error(prepared, net, data) -> float:
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        return float((prepared(x) - net(x)).pow(2).mean())


def test_gptq_rounding_lowers_the_output_error_of_plain_rounding():
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
    mix = torch.randn(8, 8)
    # correlated channels
    data = [(torch.einsum("ij,bjhw->bihw", mix, torch.randn(16, 8, 12, 12)), None) for _ in range(4)]
    errors = {}
    for rounding in ("nearest", "gptq"):
        prepared = prepare_cora(conv, CoRaConfig().replace(bits=3, granularity="per_channel", clipping="minmax",
                                                           rounding=rounding, rounding_batches=4))
        if rounding == "gptq":
            assert calibrate_rounding(prepared, data) == 1
        set_ranks(prepared, {"0": 0})
        errors[rounding] = _output_error(prepared, conv, data)
    assert errors["gptq"] < 0.8 * errors["nearest"]


@settings(max_examples=10)
@given(st.integers(1, 3), st.sampled_from(["nearest", "gptq"]))
def test_activation_factors_stay_exact_at_full_rank_and_win_at_low_rank(seed, rounding):
    torch.manual_seed(seed)
    conv = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=2)).eval()
    mix = torch.randn(8, 8)
    data = [(torch.einsum("ij,bjhw->bihw", mix, torch.randn(8, 8, 10, 10)), None) for _ in range(4)]
    errors = {}
    for svd in ("weight", "activation"):
        cfg = CoRaConfig().replace(bits=3, adapter_bits=None, granularity="per_channel", clipping="minmax",
                                   rounding=rounding, svd=svd, rounding_batches=4)
        prepared = prepare_cora(conv, cfg)
        if cfg.needs_rounding_data:
            calibrate_rounding(prepared, data)
        set_ranks(prepared, "full")
        assert _output_error(prepared, conv, data) < 1e-8  # Theorem 1 holds for any factorization
        set_ranks(prepared, {"0": 2})
        errors[svd] = _output_error(prepared, conv, data)
    assert errors["activation"] <= errors["weight"] * 1.001


def test_quantized_inputs_pass_rerounds_downstream_layers_and_keeps_ranks():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 10, 3, padding=1)).eval()
    data = [(torch.randn(8, 6, 10, 10), None) for _ in range(3)]
    codes = {}
    for inputs in ("float", "quantized"):
        cfg = CoRaConfig().replace(bits=3, adapter_bits=None, granularity="per_channel", clipping="minmax",
                                   rounding="gptq", svd="activation", rounding_batches=3, rounding_inputs=inputs)
        prepared = prepare_cora(net, cfg)
        set_ranks(prepared, {"0": 1, "2": 2})
        calibrate_rounding(prepared, data)
        assert {n: int(a.hard_rank) for n, a in adapters(prepared).items()} == {"0": 1, "2": 2}
        codes[inputs] = {n: m.quantized.quantized_weight().codes.clone() for n, m in prepared.named_modules()
                         if isinstance(m, CoRaConv2d)}
        set_ranks(prepared, "full")
        assert _output_error(prepared, net, data) < 1e-8  # Theorem 1 after both passes
    assert torch.equal(codes["float"]["0"], codes["quantized"]["0"])  # first layer: same inputs, same rounding
    assert not torch.equal(codes["float"]["2"], codes["quantized"]["2"])  # second layer sees quantized inputs
    with pytest.raises(ValueError, match=r"rounding\.inputs"):
        CoRaConfig().replace(rounding_inputs="int8")


def test_pipeline_runs_the_data_aware_steps_in_order_and_converts(small_net):
    cfg = CoRaConfig().replace(granularity="per_channel", clipping="mse", depthwise="int8", rounding="gptq",
                               svd="activation", rounding_batches=2, bn_correction=2, loss="kl", iterations=4)
    prepared = prepare_cora(small_net, cfg)
    with pytest.raises(CoRaError, match=r"call calibrate_rounding\(prepared, batches\) first"):
        search_ranks(prepared, random_batches(3), progress=False)
    seen = []
    steps = run_pipeline(prepared, random_batches(3), progress=False, on_step=seen.append)
    assert steps.steps == seen == ["calibrate_rounding", "search_ranks", "correct_batchnorm"]
    assert steps.batchnorm_layers > 0 and steps.finetune is None
    result = steps.search
    assert prepared.meta["cora_fx"].rounding_calibrated and result.budget <= 0.05 + 1e-9
    converted = convert_cora(prepared)
    x = random_batches(1)[0][0]
    with torch.no_grad():
        assert_same_up_to_summation(converted(x), prepared(x), small_net)


def test_recommended_config_is_valid_and_distinct_from_the_paper():
    for bits in (2, 3, 4, 5, 8):
        cfg = CoRaConfig.recommended(bits)
        assert cfg.quant.bits == bits and cfg.needs_rounding_data and cfg.quant.granularity == "per_channel"
        assert (cfg.search.target_bits, cfg.search.allocation) == (bits + 0.5, "joint")
    assert CoRaConfig.recommended(4, target_bits=4.0).search.target_bits == 4.0
    assert CoRaConfig.recommended(4, target_bits=None).search.target_bits is None  # the uniform recipe
    for bad in (1, 9, 4.5, True):
        with pytest.raises(ValueError, match="recommended: bits="):
            CoRaConfig.recommended(bad)
    assert all(CoRaConfig.recommended(bits).quant.clipping == "mse" for bits in (2, 3, 4, 5))
    assert CoRaConfig.recommended(4, budget=0.1).search.budget == 0.1
    assert CoRaConfig() != CoRaConfig.recommended(4)


# ---------------------------------------------------------------- fine-tuning (finetune.py)
def _kl_to_float(model: nn.Module, prepared: nn.Module, batches: list) -> float:
    with torch.no_grad():
        total = 0.0
        for x, _ in batches:
            ref, out = torch.log_softmax(model(x), -1), torch.log_softmax(prepared(x), -1)
            total += float(torch.nn.functional.kl_div(out, ref, reduction="batchmean", log_target=True))
    return total / len(batches)


def test_finetune_lowers_the_loss_and_converts_exactly(small_net):
    from cora_fx import finetune

    small_net.eval()
    data = random_batches(6)
    prepared = prepare_cora(small_net, CoRaConfig().replace(bits=3, granularity="per_channel", clipping="minmax",
                                                            loss="kl", budget=0.1, depthwise="int8"))
    set_ranks(prepared, "heuristic")
    ranks = {n: int(a.hard_rank) for n, a in adapters(prepared).items()}
    before = _kl_to_float(small_net, prepared, data)
    result = finetune(prepared, data, finetune_iterations=60, finetune_lr=3e-3, progress=False)
    after = _kl_to_float(small_net, prepared, data)
    assert result.iterations == 60 and result.parameters > 0 and len(result.loss) == 60
    assert after < 0.7 * before, (before, after)
    assert {n: int(a.hard_rank) for n, a in adapters(prepared).items()} == ranks  # ranks and budget unchanged
    tuned = [a for a in adapters(prepared).values() if a.tuned_a is not None]
    assert tuned and any(m.channel_factor is not None for m in prepared.modules() if hasattr(m, "channel_factor"))
    x = data[0][0]
    for form in ("parallel", "folded"):
        with torch.no_grad():
            torch.testing.assert_close(convert_cora(prepared, adapter_form=form)(x), prepared(x), rtol=1e-4, atol=1e-4)
    # the float teacher is still exact: [W]_n + residual = W, whatever was tuned
    from cora_fx.graph.passes import folded_copy
    from cora_fx.quant.modules import FLOAT, folded_modes
    gm = folded_copy(prepared)
    wrappers = [m for m in gm.modules() if isinstance(m, CoRaConv2d)]
    with folded_modes(wrappers, FLOAT), torch.no_grad():
        torch.testing.assert_close(gm(x), small_net(x), rtol=1e-4, atol=1e-4)
    name, adapter = next((n, a) for n, a in adapters(prepared).items() if a.tuned_a is not None)
    set_ranks(prepared, {name: int(adapter.hard_rank)})
    assert adapter.tuned_a is None  # a rank change drops that layer's tuned A and B


def test_finetune_runs_from_the_search_and_failures_leave_the_model_as_it_was(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(granularity="per_channel", loss="kl",
                                                            finetune_iterations=3))
    steps = run_pipeline(prepared, random_batches(2), skip=("calibrate_rounding",), progress=False)
    assert steps.steps == ["search_ranks", "finetune"] and steps.finetune.iterations == 3
    with pytest.raises(ValueError, match="unknown step"):
        run_pipeline(prepared, random_batches(2), skip=("search",))
    from cora_fx import finetune
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    bad = random_batches(1) + [(torch.randn(2, 5, 16, 16), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(CoRaError, match="calibration batch 1"):
        finetune(prepared, bad, finetune_iterations=4, progress=False)
    after = prepared.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    with pytest.raises(ValueError, match="iterations"):
        finetune(prepared, bad, finetune_iterations=-1)
    with pytest.raises(ValueError, match="finetune_lr"):
        CoRaConfig().replace(finetune_lr=0)
