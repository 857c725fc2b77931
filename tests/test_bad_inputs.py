"""Bad input: every mistake users make either works correctly or fails clearly, and nothing is lost.

Each test backs one row of the README table "Bad input: what happens". Rows already covered by
tests/test_workflow.py (not an nn.Module, no Conv2d, untraceable + leaf, NaN weights, empty
batches, labels out of range, failing generator, KeyboardInterrupt, preparing a prepared or
converted model, determinism) are referenced there, not repeated here.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from cora_fx import (
    CoRaConfig,
    CoRaError,
    CoRaFloatWeightsWarning,
    convert_cora,
    prepare_cora,
    quantize_cora,
    search_ranks,
    set_ranks,
    summary,
)
from cora_fx.calibrate.batches import split_batch as _split_batch
from cora_fx.quant.modules import CoRaConv2d

from .conftest import SmallNet, random_batches

pytestmark = pytest.mark.unit

X = torch.randn(2, 3, 16, 16)
EXACT = CoRaConfig().replace(adapter_bits=None, depthwise="residual", quantize_linear=False)


def rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * (1 + max|expected|): relative to the output's scale."""
    actual, expected = actual.detach().double(), expected.detach().double()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * (1.0 + float(expected.abs().max())))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values, NaN == NaN (torch.equal alone says NaN != NaN)."""
    if a.is_floating_point() and b.is_floating_point():
        return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)


def assert_unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not same(before[k], after[k])]
    assert not changed, f"mutated: {changed}"


def check_round_trip(model: nn.Module, x: torch.Tensor) -> None:
    """Full-rank float adapters == model; converted == prepared (heuristic ranks); exported == eager."""
    with torch.no_grad():
        reference = model(x)
    exact = prepare_cora(model, EXACT)
    set_ranks(exact, "full")
    with torch.no_grad():
        rel_close(exact(x), reference, 1e-4)
    prepared = prepare_cora(model, CoRaConfig())
    set_ranks(prepared, "heuristic")
    converted = convert_cora(prepared)
    with torch.no_grad():
        eager = converted(x)
        rel_close(eager, prepared(x), 1e-5)
        rel_close(torch.export.export(converted, (x,)).module()(x), eager, 1e-5)


# ---------------------------------------------------------------- Conv2d variants
CONV_VARIANTS = {
    "padding_reflect": dict(padding=1, padding_mode="reflect"),
    "padding_replicate": dict(padding=2, padding_mode="replicate"),
    "padding_circular": dict(padding=1, padding_mode="circular"),
    "dilation": dict(padding=2, dilation=2),
    "groups": dict(padding=1, groups=4),
    "depthwise": dict(padding=1, groups=8),
    "one_by_one": dict(kernel_size=1),
    "bias_off": dict(padding=1, bias=False),
    "stride_same": dict(padding="same"),
}


@pytest.mark.parametrize("variant", sorted(CONV_VARIANTS))
def test_conv2d_variants_are_rewritten_exact_and_exportable(variant):
    kwargs = dict(kernel_size=3) | CONV_VARIANTS[variant]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, **kwargs), nn.ReLU()).eval()
    before = snapshot(model)
    prepared = prepare_cora(model, CoRaConfig().replace(depthwise="residual"))
    assert isinstance(prepared.get_submodule("2"), CoRaConv2d)
    assert not prepared.meta["cora_fx"].skipped
    if variant == "depthwise":  # rank 1 per group: the policy decides, never a search
        assert prepared.get_submodule("2").adapter.policy == "fixed"
        assert prepare_cora(model).get_submodule("2").adapter.policy == "off"
        assert "2" in prepare_cora(model, CoRaConfig().replace(depthwise="float")).meta["cora_fx"].skipped
    check_round_trip(model, X)
    assert_unchanged(before, model)


class MixedConvs(nn.Module):
    """Conv2d layers next to Conv1d, Conv3d and ConvTranspose2d (which cora_fx leaves float)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.conv(x)))
        b, c, h, w = x.shape
        x = self.conv1d(x.flatten(2)).reshape(b, c, h, w)
        x = x + self.conv3d(x.unsqueeze(1)).mean(1)
        return self.head(x)


@pytest.mark.filterwarnings("ignore:prepare_cora. 2 weight-bearing:cora_fx.CoRaFloatWeightsWarning")
def test_other_conv_types_stay_float_and_are_listed_as_skipped():
    model = MixedConvs().eval()
    with pytest.warns(CoRaFloatWeightsWarning, match="2 weight-bearing layer.* stay float: up, conv3d"):
        prepared = prepare_cora(model, EXACT, example_inputs=(X,))
    skipped = summary(prepared).skipped
    assert set(skipped) == {"up", "conv3d"}  # a Conv1d is quantized as a Conv2d over a unit dimension
    assert all("not supported; left float" in why for why in skipped.values())
    for name in skipped:  # the very same float modules, weights untouched
        assert torch.equal(prepared.get_submodule(name).weight, model.get_submodule(name).weight)
    assert {n for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d)} == {"conv", "conv1d", "head"}
    for name in skipped:  # the summary table has a "<name>  skipped: <reason>" row
        assert re.search(rf"^{name}\s+skipped: ", str(summary(prepared)), re.M)
    check_round_trip(model, X)
    assert "conv3d" in summary(convert_cora(prepare_cora(model))).skipped


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("layer", ["block.4", "head"])
def test_nan_or_inf_weights_are_refused_naming_the_layer(small_net, value, layer):
    with torch.no_grad():
        small_net.get_submodule(layer).weight.view(-1)[3] = value
    before = snapshot(small_net)
    with pytest.raises(CoRaError, match=f"'{layer}' has NaN or Inf weights"):
        prepare_cora(small_net)
    assert_unchanged(before, small_net)


def on_grid_weight(shape: tuple[int, ...], scale: float = 0.125) -> torch.Tensor:
    """Weights k * scale, k in -8..7, with both ends present: exactly on the 4-bit min-max grid."""
    codes = torch.randint(-8, 8, shape)
    codes.view(-1)[0], codes.view(-1)[1] = -8, 7
    return codes.float() * scale


@pytest.mark.parametrize("case", ["all_zero", "on_grid"])
def test_zero_residual_layers_get_rank_zero_and_no_adapter(case):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.zeros(8, 8, 3, 3) if case == "all_zero" else on_grid_weight((8, 8, 3, 3)))
    cfg = CoRaConfig().replace(clipping="minmax")
    prepared = prepare_cora(model, cfg)
    adapter = prepared.get_submodule("2").adapter
    assert adapter.policy == "off" and int(adapter.hard_rank) == 0 and adapter.parameter_count() == 0
    assert float(adapter.factors.S.abs().max()) == 0.0
    assert torch.equal(prepared.get_submodule("2").quantized.weight, model[2].weight)  # [W]_n == W
    assert set_ranks(prepared, "full")["2"] == 0
    with pytest.raises(ValueError, match="'2' has policy 'off'"):
        set_ranks(prepared, {"2": 1})
    result = search_ranks(prepared, random_batches(2, batch=2), iterations=3, loss="kl", progress=False)
    assert "2" not in result.ranks and all(torch.isfinite(torch.tensor(result.history.loss)))
    converted = convert_cora(prepared)
    assert not any(n.startswith("2.adapter") for n, _ in converted.named_buffers())
    with torch.no_grad():
        out = converted(X)
        assert torch.isfinite(out).all()
        rel_close(out, prepared(X), 1e-5)
    exact = prepare_cora(model, EXACT)
    set_ranks(exact, "full")
    with torch.no_grad():
        rel_close(exact(X), model(X), 1e-5)


def test_every_layer_zero_residual_search_still_reports():
    """No searchable layer at all: the search runs the loss, sets nothing, divides by nothing."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(on_grid_weight((4, 3, 3, 3)))
    prepared = prepare_cora(model, CoRaConfig().replace(clipping="minmax", quantize_linear=False))
    result = search_ranks(prepared, random_batches(2, batch=2, classes=4), iterations=2, progress=False)
    assert result.ranks == {} and result.budget == 0.0 and result.iterations == 2
    convert_cora(prepared)(X)


# ---------------------------------------------------------------- precision and device
@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_models_and_inputs(dtype, rel):
    """float16 / bfloat16 models work end to end; CoRa weights are kept in float32 and cast to x.dtype.

    Tolerances are the formats' own rounding (bf16 has 8 mantissa bits, fp16 11), over 5 layers.
    """
    model = SmallNet().eval().to(dtype)
    x = X.to(dtype)
    before = snapshot(model)
    exact = prepare_cora(model, EXACT, example_inputs=(x,))
    set_ranks(exact, "full")
    with torch.no_grad():
        reference = model(x)
        out = exact(x)
    assert out.dtype == dtype
    rel_close(out, reference, rel)
    prepared = prepare_cora(model, CoRaConfig().replace(budget=0.2))
    # float32 batches are cast to the model's dtype (search_ranks documents the move)
    result = search_ranks(prepared, random_batches(2, batch=2), iterations=2, progress=False)
    assert result.iterations == 2 and all(r >= 0 for r in result.ranks.values())
    converted = convert_cora(prepared)
    with torch.no_grad():
        eager = converted(x)
        assert eager.dtype == dtype
        rel_close(eager, prepared(x), 1e-5)
        rel_close(torch.export.export(converted, (x,)).module()(x), eager, 1e-5)
    assert_unchanged(before, model)


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_converted_model_cast_to_half_keeps_its_codes(dtype, rel):
    """``converted.to(dtype)`` casts floating buffers: the packed words are uint8 and survive, the
    float32 zero points are small integers (exact in both formats), so the model stays correct."""
    prepared = prepare_cora(SmallNet().eval(), CoRaConfig().replace(budget=0.2))
    set_ranks(prepared, "heuristic")
    converted = convert_cora(prepared)
    packed = {n: b.clone() for n, b in converted.named_buffers() if n == "cora_packed_words"}
    zero_points = {n: b.clone() for n, b in converted.named_buffers() if n.endswith("_zero_point")}
    with torch.no_grad():
        reference = converted(X)
        cast = converted.to(dtype)
        out = cast(X.to(dtype))
    assert out.dtype == dtype
    rel_close(out.float(), reference, rel)
    assert packed and all(torch.equal(cast.get_buffer(n), b) for n, b in packed.items())
    assert all(torch.equal(cast.get_buffer(n).float(), b) for n, b in zero_points.items())


def test_batches_of_another_dtype_are_cast_to_the_models():
    prepared = prepare_cora(SmallNet().eval())
    batches = [(x.double(), y) for x, y in random_batches(2, batch=2)]  # float64 into a float32 BatchNorm
    assert search_ranks(prepared, batches, iterations=2, progress=False).iterations == 2
    inputs, labels = _split_batch((torch.randn(1, 3), torch.tensor([1])), torch.device("cpu"), torch.bfloat16)
    assert inputs[0].dtype == torch.bfloat16 and labels.dtype == torch.int64  # labels keep their dtype


def test_batches_are_moved_to_the_models_device():
    """search_ranks moves every batch to the model's device (only CPU exists here: use 'meta')."""
    meta = torch.device("meta")
    inputs, labels = _split_batch(((torch.randn(2, 3), torch.randn(2, 3)), torch.tensor([0, 1])), meta)
    assert all(t.device == meta for t in inputs) and labels.device == meta


def test_model_on_the_meta_device_is_refused_naming_the_tensor():
    model = SmallNet().to("meta")
    with pytest.raises(CoRaError, match="'stem.0.weight' is on the meta device"):
        prepare_cora(model)


# ---------------------------------------------------------------- calibration data
def test_wrong_shape_batches_fail_clearly_and_change_nothing(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(budget=0.2))
    set_ranks(prepared, "heuristic")
    before, layers = snapshot(prepared), summary(prepared).layers
    bad = [(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))]  # 1 channel into a 3-channel stem
    with pytest.raises(CoRaError, match=r"calibration batch 0 \(input shapes \[\(2, 1, 16, 16\)\]\)"):
        search_ranks(prepared, bad, progress=False)
    mixed = random_batches(2, batch=2) + bad  # fails on the 3rd batch, after two search steps
    with pytest.raises(CoRaError, match="calibration batch 2"):
        search_ranks(prepared, mixed, iterations=5, progress=False)
    assert_unchanged(before, prepared)
    assert summary(prepared).layers == layers
    assert prepared.meta["cora_fx"].search_result is None
    with torch.no_grad():  # still usable: runs, converts, and a good search still works
        rel_close(convert_cora(prepared)(X), prepared(X), 1e-5)
    assert search_ranks(prepared, random_batches(2, batch=2), iterations=2, progress=False).iterations == 2


def test_labels_that_are_not_class_indices_are_refused(small_net):
    prepared = prepare_cora(small_net)
    before = snapshot(prepared)
    with pytest.raises(CoRaError, match="integer class labels"):
        search_ranks(prepared, [(X, torch.rand(2))], progress=False)
    with pytest.raises(CoRaError, match="labels out of range.*-1"):
        search_ranks(prepared, [(X, torch.tensor([-1, 0]))], progress=False)
    assert_unchanged(before, prepared)


# ---------------------------------------------------------------- workflow misuse
def test_converting_twice_gives_identical_models_and_leaves_prepared_alone(small_net):
    prepared = prepare_cora(small_net)
    set_ranks(prepared, "heuristic")
    before = snapshot(prepared)
    first, second = convert_cora(prepared), convert_cora(prepared)
    assert first is not second
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_unchanged(before, prepared)
    with pytest.raises(CoRaError, match="already converted, expected a prepared model"):
        convert_cora(first)
    with pytest.raises(CoRaError, match="already converted"):
        search_ranks(first, random_batches(1))
    with pytest.raises(CoRaError, match="already converted"):
        set_ranks(first, "full")


def test_no_call_mutates_the_users_model_unless_inplace():
    """prepare (train-mode model, example_inputs), set_ranks, search, convert, summary, export, quantize_cora."""
    model = SmallNet().train()  # train mode: a forward would update BatchNorm statistics
    before = snapshot(model)
    prepared = prepare_cora(model, CoRaConfig().replace(budget=0.2), example_inputs=(X,))
    assert prepared.training
    set_ranks(prepared, "heuristic")
    search_ranks(prepared, random_batches(2, batch=2), iterations=2, progress=False)
    converted = convert_cora(prepared)
    summary(prepared), summary(converted)
    torch.export.export(converted.eval(), (X,))
    quantize_cora(model, random_batches(1, batch=2), CoRaConfig().replace(iterations=1), example_inputs=(X,),
                  progress=False)
    assert_unchanged(before, model)
    assert model.training and all(m.training for m in model.modules())


def test_example_inputs_check_does_not_touch_batchnorm_statistics():
    """prepare_cora's example_inputs run is in eval mode: no BatchNorm update, even with inplace=True."""
    model = SmallNet().train()
    before = snapshot(model)
    prepared = prepare_cora(model, example_inputs=(X,), inplace=True)
    assert prepared.training
    assert_unchanged(before, model)  # the shared BatchNorm of the inplace result kept its statistics


@pytest.mark.parametrize("case", ["layer_bits of a float depthwise conv", "NaN in the last conv", "example_inputs"])
def test_a_failed_inplace_prepare_leaves_the_users_model_as_it_was(case):
    """inplace=True shares leaf modules only: an error raised after the rewrite started (a
    `layer_bits` check, NaN weights met mid-rewrite, a failing `example_inputs` run) leaves
    every module of the user's model in place and every tensor bit-identical."""
    model = SmallNet().eval()
    config, inputs = CoRaConfig(), None
    if case.startswith("layer_bits"):
        config = CoRaConfig().replace(depthwise="float", layer_bits={"block.2": 4})
    elif case.startswith("NaN"):
        with torch.no_grad():
            model.down.bias[0] = float("nan")
            model.down.weight[0, 0, 0, 0] = float("nan")
    else:
        inputs = (torch.randn(2, 5, 16, 16),)  # 5 channels: the stem expects 3
    modules, before = dict(model.named_modules()), snapshot(model)
    with torch.no_grad():
        reference = model(X)
    with pytest.raises(CoRaError):
        prepare_cora(model, config, example_inputs=inputs, inplace=True)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert_unchanged(before, model)
    with torch.no_grad():
        assert same(model(X), reference)
