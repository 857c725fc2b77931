"""`convert_cora` (the lowering passes) and `quantize_cora` (prepare -> the data-aware steps -> convert)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Mapping, Optional

import torch.fx as fx
from torch import nn

from cora_fx.config import ADAPTER_FORMS, CoRaConfig
from cora_fx.devices import model_device
from cora_fx.graph.lowering import (
    Cleanup,
    EmulateIntegerKernels,
    FoldBatchNorm,
    LowerActivationQuantizers,
    LowerToOps,
    conversion_plan,
)
from cora_fx.graph.passes import run_passes
from cora_fx.io.summary import layer_infos
from cora_fx.pipeline import run_pipeline
from cora_fx.prepare import RankSpec, prepare_cora
from cora_fx.state import CONVERTED, META_KEY, PREPARED, CoRaState, get_state, step_state


def lowering_passes(gm: fx.GraphModule, config: CoRaConfig, fold_batchnorm: bool = True) -> list:
    """The conversion plan of ``gm`` (`conversion_plan`) and the graph rewrites that lower it, in order."""
    plan = conversion_plan(gm, config.adapter.bits, config.adapter.form, config.activation.bits is not None)
    fold = [FoldBatchNorm(plan)] if fold_batchnorm else []
    emulate = [EmulateIntegerKernels()] if plan.integer_kernels else []
    return [*fold, LowerToOps(plan), LowerActivationQuantizers(), *emulate, Cleanup()]


def convert_cora(prepared: fx.GraphModule, *, fold_batchnorm: bool = True,
                 adapter_form: Optional[str] = None) -> fx.GraphModule:
    """Lower a prepared model to integer codes + dequantize ops (``prepared`` is not changed).

    The result stores every main and adapter weight as packed codes (32-bit words, all in one
    uint8 buffer, `packing`) with float32 scale and zero-point buffers, has no observers, SVD
    factors or search state, and is accepted by ``torch.export.export`` and ``torch.compile``.
    With ``fold_batchnorm`` (default) an eval-mode BatchNorm2d that directly follows a conv is
    folded into the conv's per-channel scales and bias (exact up to float rounding; fewer bytes and ops).
    ``adapter_form`` (``"parallel"`` / ``"folded"``) overrides the config's
    ``config.adapter.form`` for this conversion.
    """
    state = step_state(prepared, "convert_cora")
    if adapter_form is not None:
        try:
            config = state.config.replace(adapter_form=adapter_form)
        except ValueError as err:
            raise ValueError(f"convert_cora: adapter_form={adapter_form!r}: must be one of {ADAPTER_FORMS}") from err
        state = dataclasses.replace(state, config=config)
    return _convert_in_place(copy.deepcopy(prepared), state, fold_batchnorm)


def _convert_in_place(gm: fx.GraphModule, state: CoRaState, fold_batchnorm: bool = True) -> fx.GraphModule:
    layers = layer_infos(gm)
    device = model_device(gm)
    gm = run_passes(gm, lowering_passes(gm, state.config, fold_batchnorm))
    if device.type != "cpu":
        gm.to(device)  # the constants the passes add (shifts, integer-kernel qparams) beside the weights
    gm.meta[META_KEY] = dataclasses.replace(state, stage=CONVERTED, skipped=dict(state.skipped), layers=layers)
    return gm


def quantize_cora(
    model: nn.Module, batches: Iterable, config: Optional[CoRaConfig] = None,
    example_inputs: Optional[tuple] = None, *, leaf_modules: Iterable = (), ranks: RankSpec = "search",
    skip: Iterable[str] = (), progress: bool = True, example_kwargs: Optional[Mapping[str, Any]] = None,
    concrete_args: Optional[Mapping[str, Any]] = None, capture: str = "auto",
) -> fx.GraphModule:
    """The whole chain: `prepare_cora`, `run_pipeline` on ``batches``, `convert_cora` (model untouched).

    ``ranks`` and ``skip`` are `run_pipeline`'s; ``leaf_modules``, ``example_kwargs``, ``concrete_args``
    and ``capture`` are `prepare_cora`'s. The steps' results are kept in
    ``result.meta["cora_fx"].pipeline`` (a `PipelineResult`) and the search's in ``.search_result``.
    With ``config.search.target_bits`` (`CoRaConfig.recommended`) the bits, and with ``allocation="joint"`` the
    ranks unless ``ranks`` names other ones, are planned first (`plan_target`, `run_pipeline`'s first step).
    """
    prepared = prepare_cora(model, config, example_inputs, leaf_modules=leaf_modules, progress=progress,
                            example_kwargs=example_kwargs, concrete_args=concrete_args, capture=capture)
    if not isinstance(prepared, fx.GraphModule):
        return prepared  # no Conv2d: prepare_cora warned and returned the model unchanged
    state = get_state(prepared, PREPARED)
    state.pipeline = run_pipeline(prepared, batches, ranks=ranks, skip=skip, progress=progress)
    return _convert_in_place(prepared, state)
