"""ONNX export (`export_onnx`, ``cora-fx export``) and 8-bit activations (``act_bits``), checked in onnxruntime."""
from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks.zoo_sweep import FAST, rel_err, zoo
from cora_fx import (
    ActivationConfig,
    CoRaConfig,
    CoRaError,
    QuantConfig,
    calibrate_activations,
    convert_cora,
    export_onnx,
    prepare_cora,
    quantize_cora,
    save,
)
from cora_fx.calibrate.activations import QUANTIZE, quantizers
from cora_fx.quant.modules import CoRaConv2d
from cora_fx.tools.cli import main as cli_main
from tests.conftest import random_batches

onnx = pytest.importorskip("onnx", reason="the [onnx] extra (onnx, onnxscript) is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the [onnx] extra) is not installed")

ZOO = zoo()
#: Fast-tier models exported in the default run; the larger ones (tens of millions of weights) run with -m slow.
BIG = {"convnext_tiny", "vgg11", "densenet121", "inception_v3", "googlenet"}
#: Fast-tier models whose export repeats what another default-run model covers (a MobileNetV3 block: lraspp's
#: backbone; grouped convs: shufflenet; an inverted residual: efficientnet): with -m slow.
COVERED = {"mobilenet_v3_small", "regnet_x_400mf", "mnasnet0_5"}


def run_onnx(path, *inputs):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def w8a8(model, batches, **changes):
    config = CoRaConfig(act_bits=8).replace(bits=8, granularity="per_channel", adapter_form="folded", **changes)
    return quantize_cora(model, batches, config, ranks="heuristic", progress=False)


def _round_trip(name, tmp_path):
    entry = ZOO[name]
    model = entry.build().eval()
    x = torch.randn(2, 3, entry.size, entry.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = quantize_cora(model, [(x, None)], CoRaConfig(), (x,), ranks="heuristic", progress=False)
    path = export_onnx(converted, (x,), tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        reference = converted(x)
    outputs = [torch.from_numpy(o) for o in run_onnx(path, x)]
    assert rel_err(outputs, torch.utils._pytree.tree_leaves(reference)) < 1e-4


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in COVERED else n
                                  for n in FAST if n not in BIG])
def test_onnx_round_trip_zoo_fast(name, tmp_path):
    _round_trip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BIG & set(FAST)))
def test_onnx_round_trip_zoo_big(name, tmp_path):
    _round_trip(name, tmp_path)


def test_weights_are_integer_initializers_without_float_copies(small_net, tmp_path):
    converted = quantize_cora(small_net, random_batches(1), CoRaConfig(), ranks="heuristic", progress=False)
    path = export_onnx(converted, (torch.randn(1, 3, 16, 16),), tmp_path / "net.onnx", weights="codes")
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    produced = {out: n for n in graph.node for out in n.output}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len([n for n in layers if n.op_type == "Conv"]) >= 5
    integer = (onnx.TensorProto.UINT4, onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    for node in layers:
        weight = node.input[1]
        assert weight not in inits, f"{node.name} reads a float initializer {weight}"
        source = produced[weight]
        while source.op_type in ("Transpose", "Reshape"):
            source = produced[source.input[0]]
        assert source.op_type == "DequantizeLinear", node.name
        assert inits[source.input[0]].data_type in integer
    float_elements = sum(int(torch.tensor(i.dims).prod()) for i in graph.initializer
                         if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 1)
    weights = sum(p.numel() for n, p in small_net.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert float_elements < 0.05 * weights  # no float copy of a quantized weight (only per-channel scales)


def test_debug_info_is_dropped_unless_asked_for(small_net, tmp_path):
    converted = quantize_cora(small_net, random_batches(1), CoRaConfig(), ranks="heuristic", progress=False)
    x = (torch.randn(1, 3, 16, 16),)
    lean = onnx.load(str(export_onnx(converted, x, tmp_path / "lean.onnx")))
    full = onnx.load(str(export_onnx(converted, x, tmp_path / "full.onnx", debug_info=True)))
    assert not any(n.metadata_props for n in lean.graph.node) and not lean.graph.value_info
    assert any(n.metadata_props for n in full.graph.node) and full.graph.value_info
    assert (tmp_path / "lean.onnx").stat().st_size < (tmp_path / "full.onnx").stat().st_size


def test_w8a8_runs_integer_convolutions_in_onnxruntime(small_net, tmp_path):
    converted = w8a8(small_net, random_batches(2))
    x = torch.randn(4, 3, 16, 16)
    path = export_onnx(converted, (x,), tmp_path / "w8a8.onnx")
    ops = optimized_ops(path, tmp_path)
    # the five convs and the Linear head (a 1x1 conv over its rows, docs/method.md s.12): integer kernels
    assert ops.count("QLinearConv") == 6 and "Conv" not in ops and "Gemm" not in ops, ops
    with torch.no_grad():
        reference = converted(x)
    (out,) = run_onnx(path, x)
    # the converted model computes the integer kernels' arithmetic (quant.integer): the same codes
    assert_same_codes_but_pooling(converted, out, reference)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_weights_are_symmetric_and_exact_on_a_symmetric_grid(small_net, tmp_path, symmetric):
    config = CoRaConfig(quant=QuantConfig(bits=8, granularity="per_channel", symmetric_int8=symmetric))
    no_adapters = {name: 0 for name in ("stem.0", "block.0", "block.4", "down")}
    converted = quantize_cora(small_net, random_batches(1), config, ranks=no_adapters, progress=False)
    x = torch.randn(2, 3, 16, 16)
    path = export_onnx(converted, (x,), tmp_path / "w8.onnx", weights="int8")
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].dtype == "int8"]
    assert len(weights) >= 5 and all(len(n.input) == 2 for n in weights)  # symmetric: no zero point
    with torch.no_grad():
        error = rel_err(torch.from_numpy(run_onnx(path, x)[0]), converted(x))
    # a symmetric grid is stored code for code; an asymmetric 8-bit one is rounded once more
    assert error < 1e-5 if symmetric else 1e-5 < error < 0.05


def test_recommended_with_activations_puts_8_bit_weights_on_a_symmetric_grid(small_net):
    config = CoRaConfig.recommended(4, act_bits=8)
    assert config.quant.symmetric_int8 and not CoRaConfig.recommended(4).quant.symmetric_int8
    prepared = prepare_cora(small_net, config.replace(layer_bits={"stem.0": 8}), progress=False)
    zero_points = {name: m.quantized.quantized_weight().zero_point for name, m in prepared.named_modules()
                   if isinstance(m, CoRaConv2d)}
    assert not zero_points["stem.0"].any() and not zero_points["block.2"].any()  # 8 bits: stem.0, depthwise
    assert zero_points["down"].any()  # 4 bits: asymmetric


@pytest.mark.unit
def test_edge_bits_put_the_first_and_last_layers_at_their_bits(small_net):
    config = CoRaConfig.recommended(4, act_bits=8)
    assert (config.quant.edge_bits, config.refine.bn_correction) == (8, 8)
    assert CoRaConfig.recommended(4).quant.edge_bits is None
    bits = {name: m.quantized.bits for name, m in prepare_cora(small_net, config, progress=False).named_modules()
            if isinstance(m, CoRaConv2d)}
    assert bits["stem.0"] == bits["head"] == 8 and bits["down"] == 4
    kept = prepare_cora(small_net, config.replace(layer_bits={"stem.0": 6}, quantize_linear=False), progress=False)
    # a name the user set wins; without quantized Linear layers the last quantized layer is the last conv
    assert kept.meta["cora_fx"].config.quant.layer_bits == {"stem.0": 6, "down": 8}
    with pytest.raises(ValueError, match="edge_bits"):
        CoRaConfig().replace(edge_bits=9)


def test_activation_quantizers_are_calibrated_then_frozen(small_net):
    prepared = prepare_cora(small_net, CoRaConfig(act_bits=8), progress=False)
    found = quantizers(prepared)
    assert len(found) >= 5
    with pytest.raises(CoRaError, match="calibrate_activations"):
        convert_cora(prepared)
    batches = random_batches(3)
    assert calibrate_activations(prepared, batches, progress=False) == len(found)
    assert all(q.state == QUANTIZE and float(q.scale) > 0 for q in found)
    scales = [float(q.scale) for q in found]
    with torch.no_grad():
        prepared(batches[0][0] * 10)  # a far wider input after calibration moves no range
    assert [float(q.scale) for q in found] == scales
    x = batches[0][0]
    with torch.no_grad():
        assert not torch.equal(prepared(x), small_net(x))
        # the converted model rounds as integer kernels do (quant.integer): a few codes differ by one step
        assert rel_err(convert_cora(prepared)(x), prepared(x)) < 0.05


def test_search_sees_quantized_activations_and_float_teacher(small_net):
    from cora_fx.calibrate.objective import teacher_output
    from cora_fx.graph.passes import search_copy
    from cora_fx.quant.modules import CoRaConv2d

    prepared = prepare_cora(small_net, CoRaConfig(act_bits=8), progress=False)
    calibrate_activations(prepared, random_batches(2), progress=False)
    search = search_copy(prepared)
    wrappers = [m for m in search.modules() if isinstance(m, CoRaConv2d)]
    x = random_batches(1)[0][0]
    with torch.no_grad():
        teacher = teacher_output(search, wrappers, (x,))
        assert rel_err(teacher, small_net(x)) < 1e-5  # the teacher is the float model, activations float too
    assert any(n.meta.get("cora_role") == "activation" for n in search.graph.nodes)


@pytest.mark.parametrize("changes, match", [
    ({"act_bits": 9}, "activation.bits"), ({"act_bits": "8"}, "activation.bits"), ({"act_bits": True}, "bits"),
    ({"act_observer": "percentile"}, "activation.observer"), ({"act_dtype": "int16"}, "activation.dtype"),
    ({"act_batches": 0}, "activation.batches"),
])
def test_act_bits_is_validated(changes, match):
    with pytest.raises(ValueError, match=match):
        CoRaConfig().replace(**changes)


def test_activation_config_round_trips_and_reads_older_dicts():
    config = CoRaConfig(act_bits=8, activation=ActivationConfig(observer="minmax", dtype="int8"))
    assert config.act_bits == 8 and config.activation.dtype == "int8"
    assert CoRaConfig.from_dict(config.to_dict()) == config
    older = {k: v for k, v in CoRaConfig().to_dict().items() if k != "activation"}
    assert CoRaConfig.from_dict({**older, "version": 2}).act_bits is None
    v3 = config.to_dict()
    del v3["quant"]["symmetric_int8"]
    assert CoRaConfig.from_dict({**v3, "version": 3}) == config  # before symmetric_int8: False
    with pytest.raises(ValueError, match="symmetric_int8"):
        config.replace(symmetric_int8=1)


def test_an_op_without_onnx_form_is_named(tmp_path):
    @torch.library.custom_op("cora_fx_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return mystery(self.conv(x))

    x = torch.randn(1, 3, 8, 8)
    converted = quantize_cora(Net().eval(), [(x, None)], CoRaConfig(), ranks="heuristic", progress=False)
    with pytest.raises(CoRaError, match="mystery"):
        export_onnx(converted, (x,), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_export_refuses_bad_arguments(small_net, tmp_path):
    converted = quantize_cora(small_net, random_batches(1), CoRaConfig(), ranks="heuristic", progress=False)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="weights"):
        export_onnx(converted, (x,), tmp_path / "a.onnx", weights="int4")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(converted, (x,), tmp_path / "a.onnx", opset=17)
    with pytest.raises(CoRaError, match="not a cora_fx model"):
        export_onnx(small_net, (x,), tmp_path / "a.onnx")


def test_cli_export_writes_an_onnx_file(small_net, tmp_path, capsys):
    converted = w8a8(small_net, random_batches(2))
    x = torch.randn(1, 3, 16, 16)
    save(converted, tmp_path / "net.pt2", (x,))
    assert cli_main(["export", str(tmp_path / "net.pt2"), "--format", "onnx", "--quiet"]) == 0
    assert "weights=auto" in capsys.readouterr().out
    (out,) = run_onnx(tmp_path / "net.onnx", torch.cat([x, x]))
    assert out.shape == (2, 10)
    assert optimized_ops(tmp_path / "net.onnx", tmp_path).count("QLinearConv") == 6


class SequenceHead(torch.nn.Module):
    """An OCR-style head: conv features as a (T, N, C) sequence, a BiLSTM, a Linear without adapter on 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.lstm = torch.nn.LSTM(8, 8, bidirectional=True)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.lstm(self.conv(x).mean(2).permute(2, 0, 1))
        return self.fc(sequence)


@pytest.mark.parametrize("weights", ["codes", "int8"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_a_linear_on_a_sequence_exports_and_matches(weights, act_bits, tmp_path):
    x = torch.randn(2, 3, 8, 16)
    config = CoRaConfig(act_bits=act_bits).replace(iterations=2, loss="kl", loss_dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LSTM stays float, as the coverage warning says
        converted = quantize_cora(SequenceHead().eval(), random_batches(2, batch=4, size=8), config, (x[:, :, :8],),
                                  progress=False)
    path = export_onnx(converted, (x,), tmp_path / "sequence.onnx", weights=weights)
    with torch.no_grad():
        reference = converted(x)
    (output,) = run_onnx(path, x)
    # float runs agree to rounding; with 8-bit activations onnxruntime may round a requantization one step apart
    scale = float(reference.abs().max())
    assert float((torch.from_numpy(output) - reference).abs().max()) <= (1e-5 if act_bits is None else 0.05) * scale


def w4a8(model, bits=4, act_bits=8):
    """The recommended W4A8 (or W3A8, or weight-only) model with heuristic ranks: folded adapters, no search."""
    config = CoRaConfig.recommended(bits, act_bits=act_bits, target_bits=None).replace(rounding_batches=2)
    return quantize_cora(model, random_batches(2), config, ranks="heuristic", progress=False)


def assert_same_codes_but_pooling(converted, out, reference):
    """onnxruntime's output equals the torch model's but where a float op between integer layers (average
    pooling, a residual add) summed in another order and a requantization fell one step apart."""
    ops = torch.ops.quantized_decomposed
    dequantize = [n for n in converted.graph.nodes if n.target is ops.dequantize_per_tensor.default]
    step = float(dequantize[-1].args[1])  # the output's scale: one code step
    diff = (torch.from_numpy(out) - reference).abs()
    assert float(diff.max()) <= 1.01 * step and float((diff > 0).float().mean()) <= 0.05


def initializer_types(path):
    graph = onnx.load(str(path)).graph
    return {i.name: i.data_type for i in graph.initializer}, graph


@pytest.mark.parametrize("bits", [4, 3])
def test_default_file_keeps_low_bit_codes_and_runs_integer_kernels(small_net, tmp_path, bits):
    converted = w4a8(small_net, bits)
    x = torch.randn(4, 3, 16, 16)
    path = export_onnx(converted, (x,), tmp_path / f"w{bits}a8.onnx")
    types, graph = initializer_types(path)
    uint4 = [name for name, t in types.items() if t == onnx.TensorProto.UINT4]
    assert len(uint4) >= 4  # the main weights' codes (3-bit codes in 4-bit containers)
    float_elements = sum(int(torch.tensor(i.dims).prod()) for i in graph.initializer
                         if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 1 and i.dims[1] > 1)
    assert float_elements == 0  # no float copy of a weight: only per-channel scales and biases
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 6 and "Conv" not in ops, ops
    with torch.no_grad():
        reference = converted(x)
    (out,) = run_onnx(path, x)
    assert_same_codes_but_pooling(converted, out, reference)  # torch computes the integer kernels' arithmetic


def test_folded_adapters_are_rounded_to_8_bits_as_integer_kernels_need(small_net):
    converted = w4a8(small_net)
    ops = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.cora_fx.requantize_int8.default) >= 1
    assert ops.count(torch.ops.cora_fx.qlinear_conv2d.default) == 6


def test_weight_only_default_file_becomes_float_weights_at_load(small_net, tmp_path):
    converted = w4a8(small_net, act_bits=None)
    x = torch.randn(2, 3, 16, 16)
    path = export_onnx(converted, (x,), tmp_path / "w4.onnx")
    types, _ = initializer_types(path)
    assert onnx.TensorProto.UINT4 in types.values()
    ops = optimized_ops(path, tmp_path)
    assert "DequantizeLinear" not in ops and "Cast" not in ops and ops.count("Conv") + ops.count("FusedConv") >= 5, ops
    with torch.no_grad():
        reference = converted(x)
    (out,) = run_onnx(path, x)  # a default session: no option to know
    assert rel_err(torch.from_numpy(out), reference) < 1e-5


def test_dynamic_size_is_kept_or_refused_never_fixed_silently(small_net, tmp_path):
    from cora_fx import load
    from tests.test_serialization import FixedSizeNet

    converted = w4a8(small_net, act_bits=None)
    x = torch.randn(1, 3, 16, 16)
    for name, sized in (("fixed", False), ("sized", True)):  # torch.onnx traces a loaded program anew
        save(converted, tmp_path / f"{name}.pt2", (x,), dynamic_size=sized)
        path = export_onnx(load(tmp_path / f"{name}.pt2"), (x,), tmp_path / f"{name}.onnx", dynamic_size=True)
        for shape in ((2, 3, 16, 16), (1, 3, 24, 40)):
            y = torch.randn(shape)
            with torch.no_grad():
                reference = converted(y)
            assert rel_err(torch.from_numpy(run_onnx(path, y)[0]), reference) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = quantize_cora(FixedSizeNet().eval(), [(x, None)], CoRaConfig(), (x,), ranks="heuristic",
                              progress=False)
    with pytest.raises(CoRaError, match="dynamic_size"):
        export_onnx(fixed, (x,), tmp_path / "position.onnx", dynamic_size=True)
    assert not (tmp_path / "position.onnx").exists()
    export_onnx(fixed, (x,), tmp_path / "position.onnx")  # the fixed size it was made for


def test_a_failed_export_leaves_an_existing_file_alone(small_net, tmp_path):
    converted = w4a8(small_net, act_bits=None)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="dynamic_size"):
        export_onnx(converted, (torch.randn(1, 3, 1, 16),), path, dynamic_size=True)
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]


def test_int8_layout_matches_the_torch_model_too(small_net, tmp_path):
    converted = w4a8(small_net)
    x = torch.randn(4, 3, 16, 16)
    path = export_onnx(converted, (x,), tmp_path / "int8.onnx", weights="int8")
    types, _ = initializer_types(path)
    assert onnx.TensorProto.UINT4 not in types.values()
    assert optimized_ops(path, tmp_path).count("QLinearConv") == 6
    with torch.no_grad():
        reference = converted(x)
    assert_same_codes_but_pooling(converted, run_onnx(path, x)[0], reference)  # folded weights kept on their grid
