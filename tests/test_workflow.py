"""The public API on small models: prepare -> search / set_ranks -> convert -> summary."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

import cora_fx
from cora_fx import (
    CoRaConfig,
    CoRaError,
    CoRaFloatWeightsWarning,
    CoRaSummary,
    CoRaTraceError,
    RankSearchResult,
    convert_cora,
    prepare_cora,
    quantize_cora,
    search_ranks,
    set_ranks,
    summary,
)
from cora_fx.config import FLAT_NAMES
from cora_fx.quant.modules import CoRaConv2d, LowRankAdapter

from .conftest import assert_same_up_to_summation, random_batches

pytestmark = pytest.mark.unit

X = torch.randn(2, 3, 16, 16)


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("bits", 1), ("bits", 9), ("bits", 4.0), ("adapter_bits", 1), ("granularity", "per_row"), ("clipping", "l1"),
    ("k", -1.0), ("budget", 0.0), ("budget", 1.5), ("nbk_order", 0), ("penalty", -1), ("lr", 0),
    ("iterations", -1), ("grad_clip", 0), ("init_rank", 0), ("loss", "hinge"), ("quantize_linear", 1),
    ("depthwise", "drop"), ("adapter_form", "merged"), ("init_rank", "half"), ("micro_batch", 0),
    ("micro_batch", "8"), ("channels_last", 1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    group, key = FLAT_NAMES[field]
    with pytest.raises(ValueError, match=rf"CoRaConfig\.{group}\.{key}="):
        CoRaConfig().replace(**{field: value})


def test_config_defaults_are_the_papers():
    cfg = CoRaConfig()
    assert ((cfg.quant.bits, cfg.adapter.bits, cfg.quant.granularity, cfg.quant.clipping, cfg.quant.k)
            == (4, 8, "per_tensor", "normal", 4.0))
    assert ((cfg.search.budget, cfg.search.nbk_order, cfg.search.penalty, cfg.search.lr, cfg.search.iterations)
            == (0.05, 4.0, 1.0, 0.01, 250))
    assert ((cfg.search.grad_clip, cfg.search.init_rank, cfg.search.loss, cfg.quant.quantize_linear)
            == (0.2, 0.9, "ce", True))
    assert cfg.adapter.form == "parallel"
    assert CoRaConfig().replace(adapter_bits=None).adapter.bits is None
    with pytest.raises(ValueError, match="nope"):
        cfg.replace(nope=1)


# ---------------------------------------------------------------- prepare
def test_prepare_rewrites_every_conv_into_parallel_branches(small_net):
    before = state_of(small_net)
    prepared = prepare_cora(small_net, example_inputs=(X,))
    assert isinstance(prepared, fx.GraphModule)
    assert_same_state(before, small_net)  # the user's model is not mutated
    convs = [n for n, m in small_net.named_modules() if isinstance(m, nn.Conv2d)]
    rewritten = {n for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d)}
    assert rewritten == set(convs) | {"head"}
    targets = [n.target for n in prepared.graph.nodes if n.op == "call_module"]
    for name in convs:
        assert f"{name}.quantized" in targets and f"{name}.adapter" in targets
    head = prepared.get_submodule("head")  # the Linear as a 1x1 conv, GPTQ-ready, no adapter by default
    assert head.kind == "linear" and head.adapter.policy == "off"
    # initial rank ceil(init_rank * R) on searchable layers; depthwise skipped by default
    adapter = prepared.get_submodule("stem.0").adapter
    assert int(adapter.hard_rank) == math.ceil(0.9 * adapter.max_rank)
    assert prepared.get_submodule("block.2").adapter.policy == "off"


def test_prepare_full_ranks_float_adapters_reproduce_the_model(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(adapter_bits=None, depthwise="residual",
                                                            quantize_linear=False))
    set_ranks(prepared, "full")
    with torch.no_grad():
        torch.testing.assert_close(prepared(X), small_net(X), rtol=1e-4, atol=1e-5)


def test_prepare_accepts_any_torch_ao_observer(small_net):
    for clipping in (MinMaxObserver, HistogramObserver, MinMaxObserver.with_args(eps=1e-5)):
        prepared = prepare_cora(small_net, CoRaConfig().replace(clipping=clipping))
        assert isinstance(prepared.get_submodule("down.quantized").weight_observer, (MinMaxObserver, HistogramObserver))
    with pytest.raises(ValueError, match="clipping"):
        prepare_cora(small_net, CoRaConfig().replace(clipping=lambda **kw: None))


def test_prepare_argument_errors(small_net):
    with pytest.raises(TypeError, match="nn.Module"):
        prepare_cora("resnet18")
    with pytest.raises(TypeError, match="CoRaConfig"):
        prepare_cora(small_net, {"bits": 4})
    with pytest.raises(TypeError, match="example_inputs"):
        prepare_cora(small_net, example_inputs=X)
    with pytest.raises(ValueError, match="nothere"):
        prepare_cora(small_net, leaf_modules=["nothere"])
    with pytest.raises(CoRaError, match="example_inputs"):
        prepare_cora(small_net, example_inputs=(torch.randn(2, 5, 16, 16),))


def test_prepare_refuses_prepared_and_converted_models(small_net):
    prepared = prepare_cora(small_net)
    with pytest.raises(CoRaError, match="already prepared"):
        prepare_cora(prepared)
    with pytest.raises(CoRaError, match="already converted"):
        prepare_cora(convert_cora(prepared))
    with pytest.raises(CoRaError, match="already"):
        convert_cora(convert_cora(prepared))


def test_model_without_weights_warns_and_is_returned_unchanged():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.warns(UserWarning, match="no weight matrix"):
        assert prepare_cora(model) is model
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # Linear layers alone are quantized
    assert {layer.kind for layer in summary(prepare_cora(mlp, progress=False)).layers} == {"linear"}


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return -self.conv(x)


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.branch = Untraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.stem(x))


def test_untraceable_module_is_named_and_works_as_a_leaf():
    model = WithUntraceable().eval()
    with pytest.raises(CoRaTraceError, match="'branch'.*leaf_modules") as info:
        prepare_cora(model)
    assert info.value.module == "branch"
    for leaf in (["branch"], [Untraceable]):
        with pytest.warns(CoRaFloatWeightsWarning, match="branch.conv"):  # a leaf's convs stay float
            prepared = prepare_cora(model, leaf_modules=leaf, example_inputs=(X[:, :3],))
        assert isinstance(prepared.get_submodule("stem"), CoRaConv2d)
        assert "branch.conv" in prepared.meta["cora_fx"].skipped
        assert "branch.conv" in summary(prepared).skipped


def test_nan_weights_are_refused_naming_the_layer(small_net):
    with torch.no_grad():
        small_net.down.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CoRaError, match="'down'"):
        prepare_cora(small_net)


def test_inplace_shares_modules_but_default_copies(small_net):
    prepared = prepare_cora(small_net)
    assert prepared.get_submodule("stem.1") is not small_net.stem[1]
    shared = prepare_cora(small_net, inplace=True)
    assert shared.get_submodule("stem.1") is small_net.stem[1]
    assert isinstance(small_net.stem[0], nn.Conv2d)  # the rewritten convs are new modules either way


# ---------------------------------------------------------------- ranks
def test_set_ranks_heuristic_full_and_dict(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(budget=0.25))
    heuristic = set_ranks(prepared, "heuristic")
    adapters = {n: m.adapter for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d)}
    for name, a in adapters.items():
        if a.searchable:
            assert heuristic[name] == math.floor(0.25 * a.max_rank)
    full = set_ranks(prepared, "full")
    assert all(full[n] == a.max_rank for n, a in adapters.items() if a.searchable)
    ranks = set_ranks(prepared, {"down": 3})
    assert ranks["down"] == 3 and ranks["stem.0"] == adapters["stem.0"].max_rank
    with pytest.raises(ValueError, match="nothere"):
        set_ranks(prepared, {"nothere": 1})
    with pytest.raises(ValueError, match="down"):
        set_ranks(prepared, {"down": 10_000})
    with pytest.raises(ValueError, match="block.2"):
        set_ranks(prepared, {"block.2": 1})
    with pytest.raises(ValueError, match="ranks"):
        set_ranks(prepared, "best")


def test_search_returns_a_result_and_meets_the_budget(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(budget=0.1, iterations=12))
    result = search_ranks(prepared, random_batches(4), progress=False)
    assert isinstance(result, RankSearchResult)
    assert set(result.ranks) == {n for n, m in prepared.named_modules()
                                 if isinstance(m, CoRaConv2d) and m.adapter.searchable}
    assert result.iterations == 12 and len(result.history.loss) == 12 == len(result.history.budget)
    assert result.budget <= 0.1 + 1e-9
    assert result.soft_budget > 0
    s = summary(prepared)
    assert s.budget == pytest.approx(result.budget)
    assert result.equivalent_bits == pytest.approx(4 + 8 * result.budget)
    for name, rank in result.ranks.items():
        assert int(prepared.get_submodule(name).adapter.hard_rank) == rank
    assert prepared.meta["cora_fx"].search_result is result


def test_search_history_moves_ranks_down_under_budget_pressure(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(budget=0.02, penalty=50.0))
    result = search_ranks(prepared, random_batches(3), iterations=40, lr=0.05, progress=False)
    assert result.history.budget[-1] < result.history.budget[0]
    assert all(result.soft_ranks[n] >= 1.0 for n in result.soft_ranks)


def test_search_is_deterministic(small_net):
    results = []
    for _ in range(2):
        prepared = prepare_cora(small_net, CoRaConfig().replace(budget=0.1))
        results.append(search_ranks(prepared, random_batches(2), iterations=6, progress=False))
        converted = convert_cora(prepared)
        results.append({k: v.clone() for k, v in converted.state_dict().items()})
    assert results[0].ranks == results[2].ranks
    assert results[0].soft_ranks == results[2].soft_ranks
    assert all(torch.equal(results[1][k], results[3][k]) for k in results[1])


def test_search_kl_callable_and_tuple_inputs(small_net):
    prepared = prepare_cora(small_net)
    unlabeled = [(x, None) for x, _ in random_batches(2)]
    result = search_ranks(prepared, unlabeled, iterations=3, loss="kl", progress=False)
    assert result.history.task_loss[0] >= 0

    seen = []

    def my_loss(output, float_output, labels):
        seen.append((output.shape, float_output.shape))
        return (output - float_output).pow(2).mean()

    search_ranks(prepared, random_batches(2), iterations=2, loss=my_loss, progress=False)
    assert seen and seen[0][0] == seen[0][1]

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

        def forward(self, x, y):
            return (self.a(x) + self.b(y)).mean(dim=(2, 3))

    two = prepare_cora(TwoInputs())
    batches = [((torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)), torch.randint(0, 8, (4,))) for _ in range(2)]
    assert search_ranks(two, batches, iterations=2, progress=False).iterations == 2


def test_search_errors_leave_the_model_unchanged(small_net):
    prepared = prepare_cora(small_net)
    set_ranks(prepared, "heuristic")
    before = summary(prepared).layers
    with pytest.raises(CoRaError, match="empty"):
        search_ranks(prepared, [], progress=False)
    with pytest.raises(CoRaError, match="labels out of range"):
        search_ranks(prepared, [(X, torch.tensor([0, 99]))], progress=False)
    with pytest.raises(CoRaError, match="pair"):
        search_ranks(prepared, [X], progress=False)
    with pytest.raises(TypeError, match="bits"):
        search_ranks(prepared, random_batches(1), bits=3)

    def failing():
        yield from random_batches(2)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        search_ranks(prepared, failing(), iterations=10, progress=False)
    assert summary(prepared).layers == before
    assert all(not p.requires_grad or "rank" not in n for n, p in prepared.named_parameters())


def test_keyboard_interrupt_keeps_ranks_so_far_and_stays_convertible(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(budget=0.1))

    def interrupted():
        yield from random_batches(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_ranks(prepared, interrupted(), iterations=10, progress=False)
    result = prepared.meta["cora_fx"].search_result
    assert result.interrupted and result.iterations == 3 and result.budget <= 0.1 + 1e-9
    convert_cora(prepared)(X)


def test_one_shot_iterator_ends_the_search_when_exhausted(small_net):
    prepared = prepare_cora(small_net)
    result = search_ranks(prepared, iter(random_batches(3)), iterations=10, progress=False)
    assert result.iterations == 3


# ---------------------------------------------------------------- convert
def test_convert_equals_prepared_and_has_only_codes(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(depthwise="residual"))
    set_ranks(prepared, "heuristic")
    before = state_of(prepared)
    converted = convert_cora(prepared)
    assert_same_state(before, prepared)  # convert does not touch the prepared model
    with torch.no_grad():
        assert_same_up_to_summation(converted(X), prepared(X), small_net)
    kinds = {type(m) for m in converted.modules()}
    assert not kinds & {CoRaConv2d, LowRankAdapter, nn.Conv2d, nn.Linear}
    buffers = dict(converted.named_buffers())
    assert buffers["cora_packed_words"].dtype == torch.uint8
    assert converted.meta["cora_fx_packed_layout"]["stem.0.weight"][1] == 16 * 3 * 9 // 8  # eight 4-bit codes per word
    assert not any(n.endswith((".U", ".S", ".Vh", "min_val")) for n in buffers)
    assert converted.meta["cora_fx"].stage == "converted"
    text = str(summary(converted))
    assert "stem.0" in text and "equivalent bits" in text


def test_quantize_cora_one_shot(small_net):
    before = state_of(small_net)
    quantized = quantize_cora(small_net, random_batches(2), CoRaConfig().replace(iterations=3), example_inputs=(X,),
                              progress=False)
    assert_same_state(before, small_net)
    assert quantized.meta["cora_fx"].search_result.iterations == 3
    assert quantized(X).shape == (2, 10)


def test_summary_accounting_counts_depthwise_honestly(small_net):
    skip = summary(set_ranks_and_get(small_net, "skip"))
    residual = summary(set_ranks_and_get(small_net, "residual"))
    floated = summary(set_ranks_and_get(small_net, "float"))
    assert isinstance(skip, CoRaSummary)
    dw = 32 * 9  # block.2: 32 depthwise 3x3
    dw_adapter = 32 * 9 + 32  # A (32,1,3,3) + B (32,1,1,1)
    assert residual.adapter_params - skip.adapter_params == dw_adapter
    assert residual.equivalent_bits - skip.equivalent_bits == pytest.approx(8 * dw_adapter / skip.conv_params)
    assert floated.equivalent_bits - skip.equivalent_bits == pytest.approx((32 - 4) * dw / skip.conv_params)
    assert "block.2" in floated.skipped
    assert skip.equivalent_bits == pytest.approx(4 + 8 * skip.budget)


def set_ranks_and_get(model: nn.Module, depthwise: str) -> fx.GraphModule:
    prepared = prepare_cora(model, CoRaConfig().replace(depthwise=depthwise))
    set_ranks(prepared, "heuristic")
    return prepared


def test_public_names_are_exported():
    for name in ("CoRaConfig", "prepare_cora", "search_ranks", "set_ranks", "convert_cora", "summary", "quantize_cora",
                 "CoRaSummary", "RankSearchResult"):
        assert hasattr(cora_fx, name)


def test_convert_folds_batchnorm_exactly_or_keeps_it(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(granularity="per_tensor"))
    set_ranks(prepared, "heuristic")
    folded, kept = convert_cora(prepared), convert_cora(prepared, fold_batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
    assert folded.get_buffer("stem.0.weight_scale").shape == (16, 1, 1, 1)  # per-tensor scale absorbed per channel
    assert folded.get_buffer("stem.0.weight_zero_point").dtype == torch.float32  # exact small integers
    with torch.no_grad():
        ref = prepared(X)
        torch.testing.assert_close(folded(X), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(kept(X), ref, rtol=0, atol=1e-6)
    assert summary(folded).nbytes < summary(kept).nbytes


def test_folded_adapters_with_batchnorm_equal_prepared_and_reject_bad_form(small_net):
    prepared = prepare_cora(small_net, CoRaConfig().replace(granularity="per_channel", adapter_form="folded"))
    set_ranks(prepared, "heuristic")
    folded, parallel = convert_cora(prepared), convert_cora(prepared, adapter_form="parallel")
    conv = torch.nn.functional.conv2d
    n_folded = sum(n.target is conv for n in folded.graph.nodes)
    n_parallel = sum(n.target is conv for n in parallel.graph.nodes)
    assert n_folded == sum(isinstance(m, CoRaConv2d) for m in prepared.modules()) < n_parallel
    assert summary(folded).nbytes == summary(parallel).nbytes  # same stored codes
    with torch.no_grad():
        ref = prepared(X)
        torch.testing.assert_close(folded(X), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="adapter_form='merged'"):
        convert_cora(prepared, adapter_form="merged")
