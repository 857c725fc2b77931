"""Peer quantizers for the ImageNet benchmark: torchao RTN, brevitas GPTQ, AIMET AdaRound.

All peers are weight-only (activations stay float), quantize every ``nn.Conv2d`` (depthwise and the
first conv included) per output channel, and the final ``nn.Linear`` at the same bits (each note
says so). BatchNorm is not folded before quantizing, like cora_fx. The peers are imported lazily:
they are benchmark-only dependencies (``benchmarks/requirements-peers.txt``), never cora_fx's.
A peer that cannot run raises with a one-line reason, which the driver records as the row's error.

    runs = peer_runs(["torchao", "brevitas", "aimet"], quick=False)
    for name, bits, runner in runs:
        run = runner(float_model, calib_batches, example_images)   # -> MethodRun

Cost measured on the 2-core machine (MobileNetV2, 8 calibration images, CPU shared with other
jobs): torchao RTN ~2 s; brevitas GPTQ 700-1270 s, dominated by GPTQ's per-column Python loop
(~14,000 weight columns over 53 layers, nearly independent of the image count) plus one partial
forward per (layer, batch), which dominates on all 1,600 images (7,625 s, ~80 % in the forwards);
AIMET AdaRound ~1450 s with 2 batches and 20 steps per layer (~6.5 min of per-channel
tf_enhanced encodings, ~17 min of per-layer activation sampling and optimization, growing with
batches and steps). None of the heavy peers fits a < 3 minute smoke test. All peer
models are fake-quant (weights dequantized in every forward): their latency says nothing about
integer kernels. torch.export works on the torchao and brevitas models.
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
import time
from typing import Callable, Iterable

import torch
from torch import nn

from benchmarks.methods import MethodRun, state_dict_bytes

Runner = Callable[[nn.Module, list, torch.Tensor], MethodRun]

#: AdaRound optimization steps per layer (AIMET's default is 15,000 below 8 bits; see `aimet_adaround`).
ADAROUND_ITERATIONS = int(os.environ.get("CORA_FX_BENCH_ADAROUND_ITERS", "2000"))
ADAROUND_ITERATIONS_QUICK = 20


def peer_runs(names: list[str], quick: bool) -> list[tuple[str, int, Runner]]:
    """(method name, bits, runner(float_model, calib_batches, example_images) -> MethodRun) for each
    requested peer in ``names`` (a subset of "torchao", "brevitas", "aimet")."""
    unknown = set(names) - {"torchao", "brevitas", "aimet"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from torchao, brevitas, aimet")
    runs: list[tuple[str, int, Runner]] = []
    if "torchao" in names:
        for bits in (4, 3, 5):
            name = f"torchao IntxWeightOnly W{bits} per-channel"
            runs.append((name, bits, lambda m, c, x, b=bits, n=name: torchao_rtn(n, m, c, x, bits=b)))
    if "brevitas" in names:
        for bits in (4, 3, 5):
            name = f"brevitas GPTQ W{bits} per-channel"
            runs.append((name, bits, lambda m, c, x, b=bits, n=name: brevitas_gptq(n, m, c, x, bits=b)))
    if "aimet" in names:
        iters = ADAROUND_ITERATIONS_QUICK if quick else ADAROUND_ITERATIONS
        for bits in (4, 3, 5):
            name = f"AIMET AdaRound W{bits}"
            runs.append((name, bits,
                         lambda m, c, x, b=bits, n=name: aimet_adaround(n, m, c, x, bits=b, iterations=iters)))
    return runs


# --------------------------------------------------------------------------------------------- helpers

def conv_equivalent_bits(model: nn.Module, quantized: Iterable[str], bits: int, eight_bit: Iterable[str] = ()) -> float:
    """Average weight bits over the Conv2d weights of ``model`` (float ones counted at 32, ``eight_bit`` at 8)."""
    quantized, eight_bit = set(quantized), set(eight_bit)
    total = weighted = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            n = module.weight.numel()
            total += n
            weighted += n * (32 if name not in quantized else 8 if name in eight_bit else bits)
    return weighted / total if total else float("nan")


def _targets(model: nn.Module) -> tuple[list[str], list[str]]:
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return convs, linears


def _float_conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d]


def _widths(convs: int, bits: int, eight_bit: Iterable[str]) -> str:
    """The bit widths a peer's note states: "all 52 convs + Linear at W4" or the W8 layers named first."""
    if not eight_bit:
        return f"all {convs} convs + Linear at W{bits}"
    return f"{len(set(eight_bit))} layers (depthwise convs, first conv, last layer) at W8, the other convs at W{bits}"


def _missing(package: str, err: Exception) -> RuntimeError:
    return RuntimeError(f"{package} is not installed in the benchmark environment "
                        f"(pip install -r benchmarks/requirements-peers.txt): {err}")


# --------------------------------------------------------------------------------------------- torchao

def torchao_rtn(name: str, float_model: nn.Module, calib: list, example: torch.Tensor, *, bits: int,
                eight_bit: Iterable[str] = ()) -> MethodRun:
    """torchao weight-only int{bits} round-to-nearest, symmetric, one scale per output channel.

    ``quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity=PerAxis(0)))``
    does per-output-channel for Linear and 1x1 convs. For a KxK conv (K > 1) torchao 0.18 builds
    the block (1, C_in, 1, 1), i.e. one scale per (output channel, kernel position), and its
    choose_qparams_affine fails on that 4-d block (RuntimeError on the 3x3 stem conv). So KxK convs
    get the same tensor subclass built directly with the per-output-channel block (1, C_in, K, K):
    ``IntxUnpackedToInt8Tensor.from_hp(w, (1, C_in, K, K), torch.int{bits}, mapping_type=SYMMETRIC)``,
    which is exactly what the config does for 1x1 convs. Layers named in ``eight_bit`` get int8 instead
    (torchao's per-layer choice: a second ``quantize_`` whose ``filter_fn`` selects them).
    """
    try:
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor
    except ImportError as err:
        raise _missing("torchao", err) from err
    dtype = getattr(torch, f"int{bits}")
    start = time.perf_counter()
    model = copy.deepcopy(float_model).eval()
    convs, linears = _targets(model)

    eight_bit = set(eight_bit)

    def pointwise(wide: bool) -> Callable[[nn.Module, str], bool]:
        def chosen(module: nn.Module, fqn: str) -> bool:
            kind = type(module) is nn.Linear or (type(module) is nn.Conv2d and module.kernel_size == (1, 1))
            return kind and (fqn in eight_bit) == wide
        return chosen

    for wide, weight_dtype in ((False, dtype), (True, torch.int8)):
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=PerAxis(0),
                                              mapping_type=MappingType.SYMMETRIC), filter_fn=pointwise(wide))
    spatial = 0
    for fqn, module in model.named_modules():
        if type(module) is nn.Conv2d and module.kernel_size != (1, 1):
            w = module.weight.detach()
            qw = IntxUnpackedToInt8Tensor.from_hp(w, (1, *w.shape[1:]), torch.int8 if fqn in eight_bit else dtype,
                                                  mapping_type=MappingType.SYMMETRIC)
            module.weight = nn.Parameter(qw, requires_grad=False)
            spatial += 1
    seconds = time.perf_counter() - start
    for n, m in model.named_modules():  # every conv and the Linear really holds torchao int weights
        if n in convs or n in linears:
            assert isinstance(m.weight, IntxUnpackedToInt8Tensor), n
    wide = f"; {len(eight_bit)} layers at int8" if eight_bit else ""
    note = (f"torchao {_version('torchao')} IntxWeightOnlyConfig(int{bits}, PerAxis(0), SYMMETRIC) via quantize_ on "
            f"{len(convs) - spatial} 1x1 convs + {len(linears)} Linear; {spatial} KxK convs (stem + depthwise) "
            f"quantized to the same IntxUnpackedToInt8Tensor with a per-output-channel block (quantize_ builds "
            f"per-(channel, tap) blocks for KxK and crashes on them); weight-only, BN not folded; "
            f"artifact = torch.save(state_dict) (int{bits} values stored unpacked in int8 + fp32 scales){wide}")
    return MethodRun(name, "peer", bits, model, seconds, 0, conv_equivalent_bits(float_model, convs, bits, eight_bit),
                     state_dict_bytes(model), note=note,
                     extra=dict(convs=len(convs), kxk_convs_via_from_hp=spatial, linear_quantized=len(linears)))


# --------------------------------------------------------------------------------------------- brevitas

def brevitas_gptq(name: str, float_model: nn.Module, calib: list, example: torch.Tensor, *, bits: int,
                  act_order: bool = False, eight_bit: Iterable[str] = ()) -> MethodRun:
    """brevitas GPTQ: weight-only Int{bits} per-channel (abs-max float scale, full range), float activations.

    Follows brevitas_examples/imagenet_classification/ptq (``apply_gptq``): ``layerwise_quantize`` with
    QuantConv2d / QuantLinear (input/output/bias quant off), then ``gptq_mode`` with one pass over
    the calibration batches per layer and ``gptq.update()``, in eval mode under ``torch.no_grad``. As in that
    example, the weight scales are ``ParameterFromStatsFromParameterScaling``: set from the weights' abs-max by a
    first forward, then held, so GPTQ's updates of the weights do not move the grid its rounding decisions were
    made on (with the default runtime-stats scales they do, and GPTQ W4 scores below round-to-nearest). Layers named in
    ``eight_bit`` get Int8 weights: a first ``layerwise_quantize`` at {bits} bits skips them (``name_blacklist``),
    a second one at 8 bits quantizes what is still float; GPTQ then runs on all.
    """
    try:
        import brevitas.nn as qnn
        from brevitas.graph.gptq import gptq_mode
        from brevitas.graph.quantize import layerwise_quantize
        from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
        from brevitas.quant import Int8WeightPerChannelFloat
    except ImportError as err:
        raise _missing("brevitas", err) from err

    def layer_map(width: int) -> dict:
        weight = Int8WeightPerChannelFloat.let(bit_width=width, narrow_range=False,
                                               scaling_impl=ParameterFromStatsFromParameterScaling)
        common = dict(weight_quant=weight,
                      input_quant=None, output_quant=None, bias_quant=None, return_quant_tensor=False)
        return {nn.Conv2d: (qnn.QuantConv2d, dict(common)), nn.Linear: (qnn.QuantLinear, dict(common))}

    eight_bit = sorted(set(eight_bit))
    start = time.perf_counter()
    model = copy.deepcopy(float_model).eval()
    convs, linears = _targets(model)
    model = layerwise_quantize(model, compute_layer_map=layer_map(bits), name_blacklist=eight_bit or None)
    if eight_bit:
        model = layerwise_quantize(model, compute_layer_map=layer_map(8))
    model.eval()
    passes = 0
    with torch.no_grad():
        model(example[:1])  # sets every weight scale from its weights' statistics, once
        with gptq_mode(model, use_quant_activations=False, create_weight_orig=False, act_order=act_order) as gptq:
            gptq_model = gptq.model
            layers = gptq.num_layers
            for _ in range(layers):
                for images, _ in calib:
                    gptq_model(images)
                    passes += 1
                gptq.update()
    seconds = time.perf_counter() - start
    quant = {n for n, m in model.named_modules() if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))}
    missing = [n for n in convs + linears if n not in quant]
    if missing:
        raise RuntimeError(f"brevitas left {len(missing)} layers unquantized: {missing[:3]}")
    widths = {n: m.quant_weight().bit_width for n, m in model.named_modules()
              if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))}
    wrong = [n for n, w in widths.items() if int(w) != (8 if n in eight_bit else bits)]
    if wrong:
        raise RuntimeError(f"brevitas gave {len(wrong)} layers the wrong bit width: {wrong[:3]}")
    artifact = _brevitas_int_state_bytes(model)
    note = (f"brevitas {_version('brevitas')} layerwise_quantize(QuantConv2d/QuantLinear, "
            f"Int8WeightPerChannelFloat.let(bit_width={bits}, narrow_range=False, "
            f"scaling_impl=ParameterFromStatsFromParameterScaling), no act/bias quant) + "
            f"gptq_mode(act_order={act_order}) over {len(calib)} batches x {layers} layers; "
            f"{_widths(len(convs), bits, eight_bit)}, weight-only, BN not folded; artifact = torch.save of brevitas's "
            f"int weights (quant_weight().int() as int8) + fp32 scales + other float params (the fake-quant state "
            f"dict itself stores fp32 weights)")
    return MethodRun(name, "peer", bits, model, seconds, passes,
                     conv_equivalent_bits(float_model, convs, bits, eight_bit),
                     artifact, note=note, extra=dict(gptq_layers=layers, calib_batches=len(calib),
                                                     fake_quant_state_dict_bytes=state_dict_bytes(model)))


def _brevitas_int_state_bytes(model: nn.Module) -> int:
    """torch.save size of a deployable state: int8-stored integer weights + scales for brevitas layers."""
    import brevitas.nn as qnn

    state = {}
    quant_params = set()
    for name, module in model.named_modules():
        if isinstance(module, (qnn.QuantConv2d, qnn.QuantLinear)):
            with torch.no_grad():
                qw = module.quant_weight()
                state[f"{name}.weight_int"] = qw.int().to(torch.int8)
                state[f"{name}.weight_scale"] = qw.scale.detach().reshape(-1).clone()
            quant_params.add(f"{name}.weight")
    for key, value in model.state_dict().items():
        if key.endswith(".weight") and key in quant_params or "weight_quant" in key:
            continue
        state[key] = value
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


# --------------------------------------------------------------------------------------------- AIMET

def aimet_adaround(name: str, float_model: nn.Module, calib: list, example: torch.Tensor, *, bits: int,
                   iterations: int, eight_bit: Iterable[str] = ()) -> MethodRun:
    """AIMET AdaRound, weight-only W{bits} per-channel (AIMET's default_config_per_channel.json), float activations.

    ``Adaround.apply_adaround(model, dummy, AdaroundParameters(calib, num_batches, iterations), path, prefix,
    default_param_bw=bits, default_quant_scheme=post_training_tf_enhanced, default_config_file=per-channel)``
    optimizes the rounding of every Conv2d/Linear layer by layer (AIMET's documented flow), then a
    ``QuantizationSimModel`` of the AdaRounded model with its input/output (activation) quantizers
    removed gets the AdaRound parameter encodings frozen in (``set_and_freeze_param_encodings``).
    AIMET's default is 15,000 steps per layer below 8 bits, which takes hours on a 2-core CPU, so
    ``iterations`` (CORA_FX_BENCH_ADAROUND_ITERS) is smaller; the note records the value. Layers named in
    ``eight_bit`` are rounded at 8 bits (``param_bw_override_list``) and their sim weight quantizers set to 8.
    """
    try:
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.nn import BaseQuantizationMixin
        from aimet_torch.quantsim import QuantizationSimModel
    except ImportError as err:
        raise _missing("aimet-torch", err) from err
    import aimet_torch

    config = os.path.join(os.path.dirname(aimet_torch.__file__), "common", "quantsim_config",
                          "default_config_per_channel.json")
    if not os.path.isfile(config):
        raise RuntimeError(f"aimet-torch {_version('aimet-torch')} ships no default_config_per_channel.json")
    num_batches = min(len(calib), max(1, -(-2000 // len(calib[0][0]))))  # AIMET's advice: min(len, ceil(2000/bs))
    dummy = example[:1].clone()
    start = time.perf_counter()
    model = copy.deepcopy(float_model).eval()
    convs, linears = _targets(model)
    eight_bit = set(eight_bit)
    overrides = [(m, 8) for n, m in model.named_modules() if n in eight_bit]
    with tempfile.TemporaryDirectory() as tmp:
        params = AdaroundParameters(data_loader=calib, num_batches=num_batches, default_num_iterations=iterations)
        ada_model = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="adaround",
                                            default_param_bw=bits, param_bw_override_list=overrides or None,
                                            default_quant_scheme=QuantScheme.post_training_tf_enhanced,
                                            default_config_file=config)
        sim = QuantizationSimModel(ada_model, dummy_input=dummy, quant_scheme=QuantScheme.post_training_tf_enhanced,
                                   default_param_bw=bits, config_file=config)
        for module in sim.model.modules():  # weight-only: drop every activation quantizer
            if isinstance(module, BaseQuantizationMixin):
                module.input_quantizers = nn.ModuleList([None for _ in module.input_quantizers])
                module.output_quantizers = nn.ModuleList([None for _ in module.output_quantizers])
        for layer, module in sim.model.named_modules():
            if layer in eight_bit and isinstance(module, BaseQuantizationMixin):
                module.param_quantizers["weight"].bitwidth = 8
        sim.set_and_freeze_param_encodings(encoding_path=os.path.join(tmp, "adaround.encodings"))
        seconds = time.perf_counter() - start
        quant = _aimet_weight_quantized(sim.model, BaseQuantizationMixin, bits, eight_bit)
        missing = [n for n in convs + linears if n not in quant]
        if [n for n in missing if n in convs]:
            raise RuntimeError(f"AIMET left {len(missing)} layers without {bits}-bit weight quantizers: {missing[:3]}")
        artifact, how = _aimet_artifact_bytes(sim, dummy, tmp)
    model = sim.model.eval()
    note = (f"aimet-torch {_version('aimet-torch')} Adaround.apply_adaround(default_param_bw={bits}, "
            f"post_training_tf_enhanced, default_config_per_channel.json) with {num_batches} batches and {iterations} "
            f"iterations per layer (AIMET default 15000), then QuantizationSimModel with activation quantizers removed "
            f"+ set_and_freeze_param_encodings; {_widths(len(convs), bits, eight_bit)}"
            f"{'' if not missing else ' (Linear float)'}, per-channel, weight-only, BN not folded; "
            f"artifact = {how}")
    return MethodRun(name, "peer", bits, model, seconds, iterations * (len(convs) + len(linears) - len(missing)),
                     conv_equivalent_bits(float_model, [n for n in convs if n in quant], bits, eight_bit), artifact,
                     note=note,
                     extra=dict(adaround_iterations_per_layer=iterations, adaround_batches=num_batches,
                                layers=len(quant)))


def _aimet_weight_quantized(model: nn.Module, mixin: type, bits: int, eight_bit: set[str] = frozenset()) -> set[str]:
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, mixin):
            q = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
            if q is not None and getattr(q, "bitwidth", None) == (8 if name in eight_bit else bits):
                out.add(name)
    return out


def _aimet_artifact_bytes(sim, dummy: torch.Tensor, tmp: str) -> tuple[int, str]:
    """Size of AIMET's own export (ONNX model + encodings JSON); falls back to the sim state dict."""
    folder = os.path.join(tmp, "export")
    os.makedirs(folder, exist_ok=True)
    try:
        sim.export(folder, "model", dummy_input=dummy)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        return size, "AIMET sim.export (fp32 ONNX + encodings JSON; integer weights are produced by the target runtime)"
    except Exception as err:  # noqa: BLE001 - the export is informative only
        return (state_dict_bytes(sim.model),
                f"torch.save(sim state_dict) (fp32 weights; sim.export failed: {type(err).__name__})")


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # pragma: no cover
        return "?"
