"""`prepare_cora` and `set_ranks`: the torch.ao-style entry of the workflow."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from . import distributed
from .activations import InsertActivationQuantizers
from .capture import capture as capture_model
from .capture import example_tensors
from .config import CoRaConfig
from .modules import CoRaConv2d, LowRankAdapter, QuantLinear
from .passes import QuantizeLinears, RewriteConvs, run_passes
from .state import META_KEY, PREPARED, CoRaError, CoRaState, get_state
from .tracer import LeafSpec


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
    """Trace ``model`` and rewrite every nn.Conv2d into quantized conv + low-rank adapter.

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
        A `torch.fx.GraphModule` whose adapters start at rank ceil(init_rank * R).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_cora: model must be a torch.nn.Module, got {type(model).__name__}")
    config = CoRaConfig() if config is None else config
    if not isinstance(config, CoRaConfig):
        raise TypeError(f"prepare_cora: config must be a CoRaConfig, got {type(config).__name__}")
    if config.search.target_bits is not None:
        raise ValueError(f"prepare_cora: config.search.target_bits={config.search.target_bits} needs calibration "
                         "data to plan each conv's bits; call quantize_cora(model, calib, config), or plan first "
                         "(config, ranks = plan_target(model, calib, config)) and prepare with that config")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError("prepare_cora: example_inputs must be a tuple of inputs, e.g. (x,)")
    _refuse_cora_models(model)
    _refuse_meta_tensors(model)
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        warnings.warn(f"prepare_cora: {type(model).__name__} has no nn.Conv2d layer; "
                      "nothing to do, model returned unchanged")
        return model  # type: ignore[return-value]

    _check_layer_names(model, config)
    source = model if inplace else copy.deepcopy(model)
    captured = capture_model(source, leaf_modules, example_inputs, example_kwargs, concrete_args, capture)
    gm, leaves = captured.gm, captured.leaves
    conv_params = sum(m.weight.numel() for m in source.modules() if isinstance(m, nn.Conv2d))
    rewrite = RewriteConvs(config, distributed.shows_progress(progress))
    passes = [rewrite] + ([QuantizeLinears(config)] if config.quant.quantize_linear else [])
    if config.activation.bits is not None:
        passes.append(InsertActivationQuantizers(config.activation))
    gm = run_passes(gm, passes)
    skipped = dict(rewrite.skipped)
    for leaf in sorted(leaves):
        for name, m in source.get_submodule(leaf).named_modules():
            if isinstance(m, nn.Conv2d):
                skipped[f"{leaf}.{name}" if name else leaf] = f"inside leaf module '{leaf}'; left float"
    _check_layer_bits(gm, config, skipped)
    float_params = sum(source.get_submodule(n).weight.numel() for n in skipped
                       if isinstance(source.get_submodule(n), nn.Conv2d))
    gm.meta[META_KEY] = CoRaState(config, PREPARED, conv_params, skipped, float_params,
                                  capture=captured.method, concrete_args=captured.concrete_args)
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


def _check_layer_names(model: nn.Module, config: CoRaConfig) -> None:
    """Before anything is rewritten: every `CoRaConfig.layer_bits` key names a Conv2d or Linear."""
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name in sorted(set(config.quant.layer_bits) - layers):
        raise CoRaError(f"prepare_cora: config.quant.layer_bits names '{name}', which is not an nn.Conv2d or nn.Linear "
                        f"of {type(model).__name__}; e.g. {sorted(layers)[:4]}")


def _check_layer_bits(gm: fx.GraphModule, config: CoRaConfig, skipped: Mapping[str, str]) -> None:
    """After the rewrite: every `CoRaConfig.layer_bits` entry names a layer that was quantized."""
    quantized = {n for n, m in gm.named_modules() if isinstance(m, (CoRaConv2d, QuantLinear))}
    for name in sorted(set(config.quant.layer_bits) - quantized):
        why = skipped.get(name, "left float (quantize_linear=False)" if not config.quant.quantize_linear
                          else "left float (an nn.Linear subclass with its own forward)")
        raise CoRaError(f"prepare_cora: config.quant.layer_bits names '{name}', which is not quantized: {why}")


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
        if isinstance(m, (CoRaConv2d, QuantLinear, LowRankAdapter)):
            raise CoRaError(f"module '{name}' is already a cora_fx module; prepare the original float model instead")


def adapters(gm: fx.GraphModule) -> dict[str, LowRankAdapter]:
    """Adapters of a prepared model keyed by the original conv's qualified name."""
    return {name: m.adapter for name, m in gm.named_modules() if isinstance(m, CoRaConv2d)}


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
    state = get_state(prepared, PREPARED, "prepared")
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
