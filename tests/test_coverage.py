"""Every weight the model computes with is quantized or reported (cora_fx.graph.coverage, cora_fx.graph.lifting).

Each pattern a user's model may hold: Conv2d subclasses with their own forward ("same" padding, static and
dynamic, weight standardization), functional convs on registered parameters, weights computed from the inputs,
Conv1d stacks, Linear layers (GPTQ, optional adapters), and layers cora_fx keeps float (LSTM, embeddings,
transposed convs, leaves), which must be listed with a reason, warned about, and counted in the bits.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cora_fx import (
    CoRaConfig,
    CoRaError,
    calibrate_rounding,
    convert_cora,
    load,
    prepare_cora,
    quantize_cora,
    save,
    set_ranks,
    summary,
)
from cora_fx.errors import CoRaFloatWeightsWarning
from cora_fx.graph.coverage import unreported_weights
from cora_fx.quant.modules import CoRaConv2d

from .conftest import random_batches

pytestmark = pytest.mark.unit

EXACT = CoRaConfig().replace(adapter_bits=None, depthwise="residual", adapter_linear=True)


class StaticSameConv(nn.Conv2d):
    """efficientnet_pytorch's Conv2dStaticSamePadding: a ZeroPad2d child, then F.conv2d on self.weight."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, image: int = 16) -> None:
        super().__init__(cin, cout, k, stride=stride)
        out = math.ceil(image / stride)
        pad = max((out - 1) * stride + k - image, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DynamicSameConv(nn.Conv2d):
    """timm's Conv2dSame: the padding computed from the input size in forward (not symbolically traceable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight standardized per output channel in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SameNet(nn.Module):
    """A small ConvNet whose convs are ``conv`` layers ("same" padding), with a Linear head."""

    def __init__(self, conv: type, **kw) -> None:
        super().__init__()
        self.c1 = conv(3, 16, 3, **kw)
        self.c2 = conv(16, 32, 3, **kw)
        self.c3 = conv(32, 32, 3, **kw)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.head(x.mean((2, 3)))


def plain_conv(cin: int, cout: int, k: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def kl(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean"))


def quantized_layers(gm) -> dict[str, str]:
    return {n: m.kind for n, m in gm.named_modules() if isinstance(m, CoRaConv2d)}


def prepare_quietly(model, config=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoRaFloatWeightsWarning)
        return prepare_cora(model, config, progress=False, **kw)


# ---------------------------------------------------------------- Conv2d subclasses and functional convs
@pytest.mark.filterwarnings("ignore:SameNet. symbolic tracing failed:UserWarning")  # the export path then
@pytest.mark.parametrize("conv", [StaticSameConv, DynamicSameConv])
def test_same_padding_subclasses_quantize_like_plain_convs(conv):
    same = SameNet(conv).eval()
    plain = SameNet(plain_conv).eval()
    plain.load_state_dict(same.state_dict())  # the ZeroPad2d children hold no tensors
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(same(x), plain(x))  # stride 1, odd kernel: "same" is padding 1 either way
    calib = random_batches(3, size=16)
    config = CoRaConfig.recommended(4, iterations=5, target_bits=None)
    results = {}
    for name, model in (("same", same), ("plain", plain)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", CoRaFloatWeightsWarning)  # nothing is left float
            q = quantize_cora(model, calib, config, example_inputs=(x[:1],), progress=False)
        report = summary(q)
        assert not report.skipped and not unreported_weights(q, model)
        with torch.no_grad():
            results[name] = ({layer.name for layer in report.layers}, report.equivalent_bits, kl(q(x), model(x)))
    assert results["same"][0] == results["plain"][0] == {"c1", "c2", "c3", "head"}
    assert results["same"][1] == pytest.approx(results["plain"][1])
    assert results["same"][2] <= 3 * results["plain"][2] + 1e-4


def test_subclass_keeps_its_own_children_and_behaviour():
    model = SameNet(StaticSameConv, stride=2).eval()  # asymmetric "same" padding: only the subclass computes it
    x = torch.randn(2, 3, 16, 16)
    prepared = prepare_quietly(model, EXACT, example_inputs=(x,))
    assert set(quantized_layers(prepared)) == {"c1", "c2", "c3", "head"}
    assert isinstance(prepared.get_submodule("c1.static_padding"), nn.ZeroPad2d)
    set_ranks(prepared, "full")
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-4)  # Theorem 1: the float model


class FunctionalBlock(nn.Module):
    """A conv called functionally on a registered parameter, as in a user's own module."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.proj = nn.Parameter(torch.randn(5, 8) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(F.conv2d(x, self.w, self.b, padding=1))
        return F.linear(y.mean((2, 3)), self.proj)


def test_functional_convs_and_linears_on_parameters_are_quantized():
    model = FunctionalBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_quietly(model, EXACT, example_inputs=(x,))
    assert quantized_layers(prepared) == {"w": "conv", "proj": "linear"}
    assert not summary(prepared).skipped and not unreported_weights(prepared, model)
    set_ranks(prepared, "full")
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-4)
    converted = convert_cora(prepared)
    assert not any(p.dim() >= 2 and p.is_floating_point() for p in converted.parameters())


class MatMulAttention(nn.Module):
    """Linear layers written as ``x @ W`` (as ONNX MatMul converts), around a product of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.register_buffer("out", torch.randn(8, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w
        attention = torch.softmax(h @ h.transpose(1, 2), dim=-1)
        return torch.matmul(attention @ h, self.out)


def test_matmul_with_a_constant_matrix_is_a_linear_layer():
    model = MatMulAttention().eval()
    x = torch.randn(2, 5, 16)
    prepared = prepare_quietly(model, EXACT, example_inputs=(x,))
    assert quantized_layers(prepared) == {"w": "linear", "out": "linear"}  # the attention product is untouched
    assert not summary(prepared).skipped and not unreported_weights(prepared, model)
    set_ranks(prepared, "full")
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(convert_cora(prepared)(x), model(x), rtol=1e-4, atol=1e-4)


def test_standardized_weight_is_quantized_after_the_standardization():
    model = nn.Sequential(StdConv(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_quietly(model, CoRaConfig().replace(granularity="per_channel", clipping="minmax", bits=8),
                               example_inputs=(x,))
    assert set(quantized_layers(prepared)) == {"0"}
    layer = prepared.get_submodule("0")
    with torch.no_grad():
        standardized = F.batch_norm(model[0].weight.reshape(1, 8, -1), None, None, training=True,
                                    eps=1e-6).reshape_as(model[0].weight)
        assert (layer.quantized.weight - standardized).abs().max() < 0.02 * standardized.abs().max()
        assert (layer.quantized.weight - model[0].weight).abs().max() > 0.1  # not the raw weight
        torch.testing.assert_close(convert_cora(prepared)(x), model(x), rtol=0.05, atol=0.05)


class InputWeighted(nn.Module):
    """A weight that depends on the input (a hypernetwork): it cannot be quantized ahead of time."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.conv2d(x, self.w * x.mean(), padding=1))


def test_weight_computed_from_inputs_is_reported_and_warned():
    model = InputWeighted().eval()
    with pytest.warns(CoRaFloatWeightsWarning, match=r"1 weight-bearing layer\(s\) of InputWeighted stay float: w"):
        prepared = prepare_cora(model, progress=False)
    skipped = summary(prepared).skipped
    assert "depends on the inputs" in skipped["w"]
    assert set(quantized_layers(prepared)) == {"conv"}
    assert not unreported_weights(prepared, model)


# ---------------------------------------------------------------- Conv1d
class AudioNet(nn.Module):
    """A 1-D conv stack over (N, C, L) frames, as in audio and time-series models."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(2, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, stride=2,
                                   padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv1d(16, 16, 3, groups=16,
                                   padding="same"), nn.ReLU(), nn.Conv1d(16, 24, 1))
        self.head = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x).mean(-1))


def test_conv1d_is_a_conv2d_with_a_unit_dimension():
    model = AudioNet().eval()
    x = torch.randn(3, 2, 40)
    exact = prepare_quietly(model, EXACT, example_inputs=(x,))
    kinds = quantized_layers(exact)
    assert kinds == {"convs.0": "conv1d", "convs.2": "conv1d", "convs.4": "conv1d", "convs.6": "conv1d",
                     "head": "linear"}
    set_ranks(exact, "full")
    with torch.no_grad():
        torch.testing.assert_close(exact(x), model(x), rtol=1e-4, atol=1e-4)  # Theorem 1 holds for Conv1d
    calib = [(torch.randn(8, 2, 40), None) for _ in range(3)]
    q = quantize_cora(model, calib, CoRaConfig.recommended(4), example_inputs=(x,), progress=False)  # planned
    report = summary(q)
    assert {layer.kind for layer in report.layers} == {"conv1d", "linear"} and not report.skipped
    assert report.equivalent_bits <= 4.5 + 1e-9 and report.linear_equivalent_bits == pytest.approx(4.0)
    with torch.no_grad():
        assert kl(q(x), model(x)) < 0.05


def test_conv1d_gets_gptq_rounding():
    model = AudioNet().eval()
    calib = [(torch.randn(8, 2, 40), None) for _ in range(3)]
    config = CoRaConfig.recommended(3, iterations=5, target_bits=None)
    prepared = prepare_quietly(model, config, example_inputs=(calib[0][0],))
    before = prepared.get_submodule("convs.2").quantized.weight_codes.clone()
    calibrate_rounding(prepared, calib, progress=False)
    assert not torch.equal(before, prepared.get_submodule("convs.2").quantized.weight_codes)


def test_conv1d_and_subclass_models_save_load_and_export(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from cora_fx import export_onnx

    for model, x in ((AudioNet().eval(), torch.randn(2, 2, 40)),
                     (SameNet(StaticSameConv, stride=2).eval(), torch.randn(2, 3, 16, 16))):
        calib = [(torch.randn(4, *x.shape[1:]), None) for _ in range(2)]
        config = CoRaConfig.recommended(4, iterations=3, target_bits=None)
        q = quantize_cora(model, calib, config, example_inputs=(x,), progress=False)
        path = save(q, tmp_path / f"{type(model).__name__}.pt2", (x,))
        torch.testing.assert_close(load(path)(x), q(x), rtol=1e-5, atol=1e-5)
        onnx_path = export_onnx(q, (x,), tmp_path / f"{type(model).__name__}.onnx")
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), q(x), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- Linear
def test_linear_layers_get_gptq_and_optional_adapters(small_net):
    calib = random_batches(4)
    config = CoRaConfig.recommended(3, iterations=5, target_bits=None)
    prepared = prepare_quietly(small_net, config)
    head = prepared.get_submodule("head")
    assert head.kind == "linear" and head.adapter.policy == "off"
    rtn = head.quantized.weight.clone()
    calibrate_rounding(prepared, calib, progress=False)
    gptq = head.quantized.weight
    assert not torch.equal(rtn, gptq)
    x = torch.cat([b[0] for b in calib])
    feats = []
    hook = small_net.head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    with torch.no_grad():
        small_net(x)
    hook.remove()
    w = small_net.head.weight.detach()
    output_error = lambda q: float(((feats[0] @ (q.flatten(1) - w).T) ** 2).sum())  # noqa: E731
    assert output_error(gptq) < output_error(rtn)
    with_adapters = prepare_quietly(small_net, config.replace(adapter_linear=True))
    assert with_adapters.get_submodule("head").adapter.policy == "search"


# ---------------------------------------------------------------- what stays float is reported and counted
class Recognizer(nn.Module):
    """An OCR-style model: convs, an embedding, a BiLSTM, a transposed conv and a Linear head on (T, N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.rnn = nn.LSTM(8, 8, bidirectional=True)
        self.pos = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.up(torch.relu(self.conv(x))).mean(2)  # (N, C, T)
        seq, _ = self.rnn(f.permute(2, 0, 1))  # (T, N, 2C)
        return self.head(seq + self.pos.weight[: seq.shape[0], None, :])


def test_float_layers_are_listed_warned_and_counted():
    model = Recognizer().eval()
    x = torch.randn(2, 1, 8, 16)
    with pytest.warns(CoRaFloatWeightsWarning) as record:
        prepared = prepare_cora(model, CoRaConfig(), example_inputs=(x,), progress=False)
    assert len(record) == 1 and "3 weight-bearing layer(s)" in str(record[0].message)
    report = summary(prepared)
    assert "ConvTranspose2d is not supported" in report.skipped["up"] and "recurrent" in report.skipped["rnn"]
    assert "pos.weight" in report.skipped
    assert not unreported_weights(prepared, model)
    conv, up = model.conv.weight.numel(), model.up.weight.numel()
    assert report.conv_params == conv + up
    assert report.equivalent_bits == pytest.approx((4 * conv + 8 * report.adapter_params + 32 * up) / (conv + up))
    assert report.linear_params == model.head.weight.numel() and report.linear_equivalent_bits == pytest.approx(4)
    with torch.no_grad():
        out = convert_cora(prepared)(x)
    assert out.shape == model(x).shape  # a Linear on (T, N, C) runs as a 1x1 conv and reshapes back


class HalfLeaf(nn.Module):
    """A leaf holding a bfloat16 conv: float in the file at 16 bits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.to(torch.bfloat16)).float()


def test_bits_count_float_weights_at_their_stored_width():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), HalfLeaf(), nn.Conv2d(4, 4, 3, groups=4)).eval()
    prepared = prepare_quietly(model, CoRaConfig().replace(depthwise="float"), leaf_modules=[HalfLeaf])
    report = summary(prepared)
    assert set(report.skipped) == {"1.conv", "2"}
    sizes = [model[0].weight.numel(), model[1].conv.weight.numel(), model[2].weight.numel()]
    assert report.equivalent_bits == pytest.approx((4 * sizes[0] + 8 * report.adapter_params + 16 * sizes[1]
                                                    + 32 * sizes[2]) / sum(sizes))


def test_chosen_float_layers_are_reported_without_warning(small_net):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoRaFloatWeightsWarning)
        prepared = prepare_cora(small_net, CoRaConfig().replace(depthwise="float", quantize_linear=False),
                                progress=False)
    skipped = summary(prepared).skipped
    assert "depthwise='float'" in skipped["block.2"] and "quantize_linear=False" in skipped["head"]
    assert summary(prepared).linear_equivalent_bits == pytest.approx(32)


# ---------------------------------------------------------------- calibration data that does not fit
def test_calibration_batches_that_do_not_fit_are_refused_at_once(small_net):
    x = torch.randn(1, 3, 16, 16)
    config = CoRaConfig.recommended(4, iterations=5, target_bits=None)
    prepared = prepare_quietly(small_net, config, example_inputs=(x,))
    from cora_fx import run_pipeline

    with pytest.raises(CoRaError, match=r"batch 0, input 0, has shape \(8, 1, 16, 16\); the model expects "
                                        r"\(1, 3, 16, 16\): 3 channels in dimension 1"):
        run_pipeline(prepared, [(torch.randn(8, 1, 16, 16), None)], progress=False)
    with pytest.raises(CoRaError, match="add the batch dimension"):
        run_pipeline(prepared, [(torch.randn(3, 16, 16), None)], progress=False)
    with pytest.raises(CoRaError, match="calibration batches are empty"):
        quantize_cora(small_net, [], CoRaConfig.recommended(4, iterations=5, target_bits=None), example_inputs=(x,),
                      progress=False)


def test_kl_on_sigmoid_outputs_is_refused_before_the_search():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
                          nn.Sigmoid()).eval()
    calib = [(torch.randn(4, 3, 8, 8), None)]
    with pytest.raises(CoRaError, match="use loss='bce'"):
        quantize_cora(model, calib, CoRaConfig(search=CoRaConfig().search.__class__(loss="kl", iterations=3)),
                      progress=False)
