"""`prepare_cora` and `set_ranks`: the torch.ao-style entry of the workflow."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from cora_fx.calibrate import distributed
from cora_fx.calibrate.activations import InsertActivationQuantizers
from cora_fx.calibrate.checks import example_shapes
from cora_fx.config import CoRaConfig
from cora_fx.devices import model_device, on_device
from cora_fx.errors import CoRaError
from cora_fx.graph.capture import capture as capture_model
from cora_fx.graph.capture import example_tensors
from cora_fx.graph.coverage import FloatWeight, float_weights, is_weight, warn_float
from cora_fx.graph.lifting import Conv1dAsConv2d, LiftFunctionalLayers, LinearAsConv2d
from cora_fx.graph.passes import RewriteConvs, run_passes
from cora_fx.graph.tracer import LeafSpec
from cora_fx.quant.modules import CONV_KINDS, LINEAR, CoRaConv2d, LowRankAdapter
from cora_fx.state import META_KEY, PREPARED, CoRaState, get_state, step_state

#: the layer modules cora_fx quantizes (with their subclasses and functional forms, `lifting`)
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prepare_cora(
    model: nn.Module,
    config: Optional[CoRaConfig] = None,
    example_inputs: Optional[tuple] = None,
    leaf_modules: Iterable[LeafSpec] = (),
    inplace: bool = False,
    *,
    example_kwargs: Optional[Mapping[str, Any]] = None,
    concrete_args: Optional[Mapping[str, Any]] = None,
    capture: str = "auto",
    progress: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` and rewrite every conv and linear layer into quantized conv + low-rank adapter.

    Conv2d, Conv1d and Linear layers, subclasses with their own ``forward`` and functional calls on the
    model's parameters are all quantized (docs/method.md s.12); every weight that stays float is listed in
    ``summary(prepared).skipped`` with the reason, and a `CoRaFloatWeightsWarning` names those the config
    did not ask to keep float.

    Args:
        model: the float model (left untouched unless ``inplace=True``, in which case the
            result shares the model's unrewritten submodules instead of copying them; the
            model's own containers are never rewritten, so a failed prepare leaves it as it was).
        config: a `CoRaConfig` (default: the paper's settings).
        example_inputs: optional tuple of inputs; when given, the prepared model is run
            once on them so shape errors surface here, naming the model.
        leaf_modules: module classes and/or qualified names traced as opaque calls;
            Conv2d layers inside them stay float and are listed as skipped.
        example_kwargs: keyword inputs of the example call; tensors become graph inputs, other
            values are fixed like ``concrete_args``.
        concrete_args: ``forward`` arguments fixed to constants while tracing (as in
            ``torch.fx.symbolic_trace``); arguments the example inputs do not give are fixed to
            their defaults anyway, so ``forward(x, embed=False)`` traces with ``embed=False``.
        capture: ``"symbolic"`` (torch.fx), ``"export"`` (torch.export on the example inputs) or
            ``"auto"``: symbolic, then export if that fails (docs/method.md section 12).
        progress: a progress bar over the convs while they are quantized and their residuals factored.
    Returns:
        A `torch.fx.GraphModule` whose adapters start at rank ceil(init_rank * R). With
        ``config.search.target_bits`` (`CoRaConfig.recommended`) every conv is at its ``quant`` bits until
        `run_pipeline` plans the target on calibration data (a float copy of the model is kept until then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_cora: model must be a torch.nn.Module, got {type(model).__name__}")
    config = CoRaConfig() if config is None else config
    if not isinstance(config, CoRaConfig):
        raise TypeError(f"prepare_cora: config must be a CoRaConfig, got {type(config).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError("prepare_cora: example_inputs must be a tuple of inputs, e.g. (x,)")
    _refuse_cora_models(model)
    _refuse_meta_tensors(model)
    if not any(isinstance(m, LAYERS) for m in model.modules()) and not any(is_weight(p) for p in model.parameters()):
        warnings.warn(f"prepare_cora: {type(model).__name__} has no weight matrix (conv or linear layer); "
                      "nothing to do, model returned unchanged")
        return model  # type: ignore[return-value]

    _check_layer_names(model, config)
    leaf_modules = tuple(leaf_modules)
    device = model_device(model)  # example inputs follow the model (a GPU model may be given CPU examples)
    example_inputs, example_kwargs = on_device(example_inputs, device), on_device(example_kwargs, device)
    # a target is planned on calibration data by `run_pipeline`, which prepares this float copy again
    plan_source = copy.deepcopy(model) if config.search.target_bits is not None else None
    source = model if inplace else copy.deepcopy(model)
    captured = capture_model(source, leaf_modules, example_inputs, example_kwargs, concrete_args, capture)
    config, edges = _with_edge_bits(captured.gm, captured.leaves, config)
    gm, skipped = _rewrite(captured.gm, captured.leaves, source, config, progress)
    skipped, floats = float_weights(gm, skipped, config.quant.quantize_linear)
    config = _check_layer_bits(gm, config, skipped, optional=edges)
    gm.meta[META_KEY] = _state(gm, config, skipped, floats, captured, example_shapes(example_inputs))
    if plan_source is not None:
        gm.meta[META_KEY].plan_source = plan_source
        gm.meta[META_KEY].capture_options = dict(example_inputs=example_inputs, leaf_modules=leaf_modules,
                                                 example_kwargs=example_kwargs, concrete_args=concrete_args,
                                                 capture=capture)
    warn_float(type(model).__name__, skipped)
    gm.train(source.training)
    if example_inputs is not None:
        # Checked in eval mode: a train-mode run would update BatchNorm running statistics
        # (of the prepared copy, and of the user's own modules when inplace=True).
        gm.eval()
        try:
            with torch.no_grad():
                gm(*example_tensors(example_inputs), **example_tensors(example_kwargs or {}))
        except Exception as err:
            raise CoRaError(
                f"the prepared {type(model).__name__} failed on example_inputs: {type(err).__name__}: {err}"
            ) from err
        finally:
            gm.train(source.training)
    return gm


def _rewrite(gm: fx.GraphModule, leaves: set[str], source: nn.Module, config: CoRaConfig,
             progress: bool) -> tuple[fx.GraphModule, dict[str, str]]:
    """The prepare passes (docs/method.md s.12, s.1-2, s.14) and the layers they left float, with the reason."""
    lift = LiftFunctionalLayers(leaves)
    rewrite = RewriteConvs(config, distributed.shows_progress(progress))
    passes = [lift, Conv1dAsConv2d(leaves)] + ([LinearAsConv2d(leaves)] if config.quant.quantize_linear else [])
    passes.append(rewrite)
    if config.activation.bits is not None:
        passes.append(InsertActivationQuantizers(config.activation))
    gm = run_passes(gm, passes)
    skipped = {**lift.skipped, **rewrite.skipped}
    for leaf in sorted(leaves):
        for name, m in source.get_submodule(leaf).named_modules():
            if isinstance(m, LAYERS):
                skipped[f"{leaf}.{name}" if name else leaf] = f"inside leaf module '{leaf}'; left float"
    return gm, skipped


def _state(gm: fx.GraphModule, config: CoRaConfig, skipped: dict[str, str], floats: Mapping[str, FloatWeight],
           captured: Any, shapes: list[tuple[int, ...]]) -> CoRaState:
    """The prepared model's `CoRaState`: every conv and linear weight counted, quantized or float."""
    layers = [m for m in gm.modules() if isinstance(m, CoRaConv2d)]

    def total(kinds: tuple[str, ...]) -> tuple[int, int]:
        quantized = sum(m.quantized.weight.numel() for m in layers if m.kind in kinds)
        kept = [w for w in floats.values() if w.kind in kinds]
        return quantized + sum(w.params for w in kept), sum(w.params * w.bits for w in kept)

    conv_params, float_conv_bits = total(CONV_KINDS)
    linear_params, float_linear_bits = total((LINEAR,))
    return CoRaState(config, PREPARED, conv_params, skipped, float_conv_bits, linear_params, float_linear_bits,
                     capture=captured.method, concrete_args=captured.concrete_args, example_shapes=shapes)


def _check_layer_names(model: nn.Module, config: CoRaConfig) -> None:
    """Before anything is rewritten: every `CoRaConfig.layer_bits` key names a conv or linear layer, or a weight."""
    layers = {n for n, m in model.named_modules() if isinstance(m, LAYERS)}
    weights = {n for n, p in model.named_parameters() if is_weight(p)}
    known = layers | weights | {n.rpartition(".")[0] for n in weights}
    for name in sorted(set(config.quant.layer_bits) - known):
        raise CoRaError(f"prepare_cora: config.quant.layer_bits names '{name}', which is not a conv or linear layer "
                        f"of {type(model).__name__}; e.g. {sorted(layers)[:4]}")


def _with_edge_bits(gm: fx.GraphModule, leaves: set[str], config: CoRaConfig) -> tuple[CoRaConfig, set[str]]:
    """``config`` with the first and last layer modules of the graph at ``quant.edge_bits`` in ``layer_bits`` (names
    already there are kept), and the names it added."""
    edge_bits = config.quant.edge_bits
    kinds = LAYERS if config.quant.quantize_linear else (nn.Conv1d, nn.Conv2d)
    layers = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(str(n.target)), kinds)
              and not any(str(n.target) == leaf or str(n.target).startswith(f"{leaf}.") for leaf in leaves)]
    if edge_bits is None or not layers:
        return config, set()
    edges = {layers[0], layers[-1]} - set(config.quant.layer_bits)
    return config.replace(layer_bits={**{name: edge_bits for name in edges}, **config.quant.layer_bits}), edges


def _check_layer_bits(gm: fx.GraphModule, config: CoRaConfig, skipped: Mapping[str, str],
                      optional: set[str] = frozenset()) -> CoRaConfig:
    """After the rewrite: every `CoRaConfig.layer_bits` entry names a layer that was quantized. An ``optional``
    entry (`_with_edge_bits`) that names no quantized layer is dropped instead; returns the config."""
    quantized = {n for n, m in gm.named_modules() if isinstance(m, CoRaConv2d)}
    for name in sorted(set(config.quant.layer_bits) - quantized - set(optional)):
        why = skipped.get(name, "it is not rewritten as a layer (see summary(prepared).skipped and the layer names)")
        raise CoRaError(f"prepare_cora: config.quant.layer_bits names '{name}', which is not quantized: {why}")
    unused = set(optional) - quantized
    if not unused:
        return config
    return config.replace(layer_bits={k: v for k, v in config.quant.layer_bits.items() if k not in unused})


def _refuse_meta_tensors(model: nn.Module) -> None:
    """Weights on the ``meta`` device have no values to quantize: say which one, not a pass error."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise CoRaError(
                f"prepare_cora: '{name}' is on the meta device (no data); materialize the model first, "
                "e.g. model.to_empty(device='cpu') and load_state_dict(...)"
            )


def _refuse_cora_models(model: nn.Module) -> None:
    if isinstance(model, fx.GraphModule) and META_KEY in getattr(model, "meta", {}):
        raise CoRaError(
            f"model is already {model.meta[META_KEY].stage} by cora_fx; prepare the original float model instead"
        )
    for name, m in model.named_modules():
        if isinstance(m, (CoRaConv2d, LowRankAdapter)):
            raise CoRaError(f"module '{name}' is already a cora_fx module; prepare the original float model instead")


def adapters(gm: fx.GraphModule, kinds: Optional[tuple[str, ...]] = None) -> dict[str, LowRankAdapter]:
    """Adapters of a prepared model keyed by the original layer's qualified name (of ``kinds`` only, if given:
    the bit allocators plan convs, `lifting.CONV_KINDS`)."""
    return {name: m.adapter for name, m in gm.named_modules()
            if isinstance(m, CoRaConv2d) and (kinds is None or m.kind in kinds)}


RankSpec = Union[str, Mapping[str, int]]


def heuristic_rank(adapter: LowRankAdapter, budget: float) -> int:
    """The paper's baseline r = floor(b * R) (docs/method.md section 3)."""
    return math.floor(budget * adapter.max_rank)


def set_ranks(prepared: fx.GraphModule, ranks: RankSpec) -> dict[str, int]:
    """Set the hard integer ranks of a prepared model.

    ``ranks`` is ``"heuristic"`` (floor(b * R) per searchable layer), ``"full"`` (R:
    the float model exactly, up to adapter quantization) or a dict ``{qualified name: rank}``;
    layers missing from the dict keep their rank. Depthwise layers keep their policy's rank.
    Returns the ranks now in force.
    """
    state = step_state(prepared, "set_ranks")
    layers = adapters(prepared)
    searchable = {n: a for n, a in layers.items() if a.searchable}
    if isinstance(ranks, str):
        if ranks == "heuristic":
            wanted = {n: heuristic_rank(a, state.config.search.budget) for n, a in searchable.items()}
        elif ranks == "full":
            wanted = {n: a.max_rank for n, a in searchable.items()}
        else:
            raise ValueError(f"set_ranks: ranks={ranks!r} must be 'heuristic', 'full' or a dict name -> rank")
    elif isinstance(ranks, Mapping):
        wanted = dict(ranks)
        for name, rank in wanted.items():
            if name not in layers:
                raise ValueError(f"set_ranks: '{name}' is not a rewritten conv; known layers: {sorted(layers)[:8]}...")
            if name not in searchable:
                raise ValueError(f"set_ranks: '{name}' has policy '{layers[name].policy}'; its rank is fixed")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= layers[name].max_rank:
                raise ValueError(f"set_ranks: rank of '{name}' must be an integer in 0..{layers[name].max_rank}, "
                                 f"got {rank!r}")
    else:
        raise TypeError(f"set_ranks: ranks must be a str or a dict, got {type(ranks).__name__}")
    for name, rank in wanted.items():
        layers[name].set_hard_rank(rank)
    return {n: int(a.hard_rank) for n, a in layers.items()}


def adopt(prepared: fx.GraphModule, other: fx.GraphModule) -> None:
    """Make ``prepared`` the model ``other`` is: its submodules, graph and state (the user keeps one object while
    `run_pipeline` prepares the model again with a planned config)."""
    for name, _ in list(prepared.named_children()):
        delattr(prepared, name)
    for name, child in other.named_children():
        setattr(prepared, name, child)
    for name, buffer in other.named_buffers(recurse=False):
        prepared.register_buffer(name, buffer)
    for name, param in other.named_parameters(recurse=False):
        prepared.register_parameter(name, param)
    prepared.graph = other.graph
    prepared.meta[META_KEY] = get_state(other)
    prepared.train(other.training)
