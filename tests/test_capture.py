"""Models whose forward takes flags, returns structures or branches on shapes: capture and quantize."""
from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from cora_fx import CoRaConfig, CoRaError, prepare_cora, quantize_cora, summary
from cora_fx.errors import CoRaTraceError
from cora_fx.graph.capture import specialised_arguments

from .conftest import random_batches

pytestmark = pytest.mark.unit

FAST = CoRaConfig().replace(iterations=2, budget=0.2, loss="kl")
Pair = collections.namedtuple("Pair", "logits features")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))


class FlagNet(Body):
    """forward(x, embed=False): the pattern of audio / face models that can return embeddings."""

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        f = self.features(x)
        if embed:
            return f
        return self.head(f.mean((2, 3)))


class KeywordOnlyNet(Body):
    def forward(self, x: torch.Tensor, *, return_features: bool = False, scale: float = 1.0):
        f = self.features(x)
        logits = self.head(f.mean((2, 3))) * scale
        return (logits, f) if return_features else logits


class StructNet(Body):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        logits = self.head(f.mean((2, 3)))
        if self.kind == "dict":
            return {"logits": logits, "features": f, "stride": 1}
        if self.kind == "tuple":
            return logits, f
        if self.kind == "namedtuple":
            return Pair(logits, f)
        return Output(logits, f)


class ShapeNet(Body):
    """Branches on a static input size: symbolic tracing cannot, torch.export specialises it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = nn.functional.avg_pool2d(x, 2)
        return self.head(self.features(x).mean((2, 3)))


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class DataNet(Body):
    def __init__(self) -> None:
        super().__init__()
        self.gate = DataDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.features(x)).mean((2, 3)))


def _x(batch: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


def _close(a, b) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for item in dataclasses.fields(a):
            _close(getattr(a, item.name), getattr(b, item.name))
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    else:
        assert a == b


def _full_rank_matches(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.fx.GraphModule:
    """Prepared at full rank with 8-bit adapters, the model reproduces the float one (Theorem 1)."""
    cfg = CoRaConfig().replace(adapter_bits=None, quantize_linear=False)
    prepared = prepare_cora(model, cfg, example_inputs=(x,), **kwargs)
    from cora_fx import set_ranks

    set_ranks(prepared, "full")
    with torch.no_grad():
        _close(model(x, **kwargs.get("example_kwargs", {})), prepared(x))
    return prepared


def test_flag_argument_takes_its_default_and_the_model_quantizes():
    model = FlagNet().eval()
    x = _x()
    prepared = _full_rank_matches(model, x)
    assert summary(prepared).capture == "symbolic"
    assert prepared.meta["cora_fx"].concrete_args == {"embed": False}
    q = quantize_cora(model, random_batches(2, size=16), FAST, example_inputs=(x,), progress=False)
    assert q(x).shape == (4, 10)


def test_flag_given_in_example_kwargs_or_concrete_args_is_fixed_to_that_value():
    model = FlagNet().eval()
    x = _x()
    for kwargs in ({"example_kwargs": {"embed": True}}, {"concrete_args": {"embed": True}}):
        prepared = prepare_cora(model, FAST, example_inputs=(x,), **kwargs)
        assert prepared(x).shape == (4, 16, 16, 16)


def test_keyword_only_flags_and_return_features_switches():
    model = KeywordOnlyNet().eval()
    x = _x()
    prepared = _full_rank_matches(model, x, example_kwargs={"return_features": True})
    assert isinstance(prepared(x), tuple)
    assert prepare_cora(model, FAST, example_inputs=(x,))(x).shape == (4, 10)


def test_unknown_concrete_argument_is_refused_naming_the_arguments():
    with pytest.raises(ValueError, match="has no argument 'flag'.*embed"):
        prepare_cora(FlagNet(), FAST, concrete_args={"flag": True})


@pytest.mark.parametrize("kind", ["dict", "tuple", "namedtuple", "dataclass"])
def test_structured_outputs_pass_through_prepare_search_and_convert(kind):
    model = StructNet(kind).eval()
    x = _x()
    _full_rank_matches(model, x)
    q = quantize_cora(model, random_batches(2, size=16), FAST.replace(loss="mse"), example_inputs=(x,),
                      progress=False)
    out = q(x)
    assert type(out) is type(model(x))


def test_shape_branch_fails_symbolic_tracing_with_advice_and_is_captured_by_export():
    model = ShapeNet().eval()
    x = _x()
    with pytest.raises(CoRaTraceError, match=r"x\.shape\[-1\] > 8.*capture='export'"):
        prepare_cora(model, FAST, example_inputs=(x,), capture="symbolic")
    with pytest.warns(UserWarning, match="captured with torch.export"):
        auto = prepare_cora(model, FAST, example_inputs=(x,))
    exported = _full_rank_matches(model, x, capture="export")
    assert summary(exported).capture == "export" and summary(auto).capture == "export"
    names = {n for n, _ in exported.named_modules() if n.count(".") == 0}
    assert {"conv1", "conv2", "bn", "head"} <= names  # the model's own names, BatchNorm a module again


def test_export_capture_converts_and_exports_like_symbolic_tracing(tmp_path):
    model = FlagNet().eval()
    x = _x()
    batches = random_batches(2, size=16)
    results = {}
    for capture in ("symbolic", "export"):
        q = quantize_cora(model, batches, FAST, example_inputs=(x,), capture=capture, progress=False)
        results[capture] = q(x)
        info = summary(q)
        assert [layer.name for layer in info.layers] == ["conv1", "conv2", "head"]
    torch.testing.assert_close(results["symbolic"], results["export"], rtol=1e-4, atol=1e-4)
    from cora_fx import load, save

    save(q, tmp_path / "m.pt2", (x,))
    torch.testing.assert_close(load(tmp_path / "m.pt2")(x), results["export"], rtol=1e-4, atol=1e-4)


def test_data_dependent_submodule_is_named_and_a_leaf_fixes_it():
    model = DataNet().eval()
    x = _x()
    with pytest.raises(CoRaTraceError, match=r"module 'gate' \(DataDependent\).*x\.sum\(\) > 0.*leaf_modules="):
        prepare_cora(model, FAST, capture="symbolic")
    prepared = _full_rank_matches(model, x, leaf_modules=["gate"])
    assert "gate" in str(prepared.code)


def test_root_flag_that_cannot_take_a_default_gets_concrete_args_advice():
    class Required(Body):
        def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
            if mode == "embed":
                return self.features(x)
            return self.head(self.features(x).mean((2, 3)))

    with pytest.raises(CoRaTraceError, match=r"concrete_args=\{'mode': <value>\}"):
        prepare_cora(Required(), FAST, capture="symbolic")
    prepared = prepare_cora(Required().eval(), FAST, example_inputs=(_x(), "logits"))
    assert prepared(_x()).shape == (4, 10)


def test_export_capture_needs_example_inputs_and_says_so():
    with pytest.raises(CoRaError, match="capture='export' needs example_inputs"):
        prepare_cora(FlagNet(), FAST, capture="export")
    with pytest.raises(ValueError, match="capture='magic'"):
        prepare_cora(FlagNet(), FAST, capture="magic")


def test_export_capture_keeps_layers_inside_leaf_modules_float():
    model = ShapeNet().eval()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_cora(model, FAST, example_inputs=(x,), capture="export", leaf_modules=["conv2"])
    assert "conv2" in summary(prepared).skipped


def test_specialised_arguments_rule():
    model = KeywordOnlyNet()
    x = torch.zeros(1)
    assert specialised_arguments(model, (x,), None, None) == {"return_features": False, "scale": 1.0}
    assert specialised_arguments(model, (x,), {"scale": 2.0}, {"return_features": True}) == {
        "return_features": True, "scale": 2.0}


def test_allocate_bits_takes_the_capture_options_and_refuses_others():
    from cora_fx.allocation import allocate_bits

    model = FlagNet().eval()
    cfg = CoRaConfig().replace(budget=0.05, loss="mse")
    plan = allocate_bits(model, random_batches(2, size=16), cfg, target_bits=4.2, progress=False,
                         concrete_args={"embed": True}, example_inputs=(_x(),))
    assert set(plan) <= {"conv1", "conv2"} and set(plan.values()) <= {3}
    with pytest.raises(TypeError, match="unexpected argument.*'bogus'"):
        allocate_bits(model, random_batches(1, size=16), cfg, target_bits=4.2, bogus=1)
