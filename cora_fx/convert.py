"""`convert_cora` (the lowering pipeline) and `quantize_cora` (prepare -> search -> convert)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Optional

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from .config import ADAPTER_FORMS, CoRaConfig
from .lowering import Cleanup, ConversionPlan, FoldBatchNorm, FoldRanks, LowerToOps, QuantizeAdapters
from .passes import run_passes
from .prepare import prepare_cora
from .rank_search import search_ranks
from .state import CONVERTED, META_KEY, PREPARED, CoRaState, get_state
from .summary import layer_infos


def convert_passes(config: CoRaConfig, fold_batchnorm: bool = True) -> list:
    plan = ConversionPlan(config.adapter_bits, config.adapter_form)
    fold = [FoldBatchNorm(plan)] if fold_batchnorm else []
    return [FoldRanks(plan), QuantizeAdapters(plan), *fold, LowerToOps(plan), Cleanup()]


def convert_cora(prepared: fx.GraphModule, *, fold_batchnorm: bool = True,
                 adapter_form: Optional[str] = None) -> fx.GraphModule:
    """Lower a prepared model to integer codes + dequantize ops (``prepared`` is not changed).

    The result stores every main and adapter weight as packed codes (32-bit words, all in one
    uint8 buffer, `packing`) with float32 scale and zero-point buffers, has no observers, SVD
    factors or search state, and is accepted by ``torch.export.export`` and ``torch.compile``.
    With ``fold_batchnorm`` (default) an eval-mode BatchNorm2d that directly follows a conv is
    folded into the conv's per-channel scales and bias (exact up to float rounding; fewer bytes and ops).
    ``adapter_form`` (``"parallel"`` / ``"folded"``) overrides the config's
    `CoRaConfig.adapter_form` for this conversion.
    """
    state = get_state(prepared, PREPARED, "prepared")
    if adapter_form is not None:
        try:
            config = state.config.replace(adapter_form=adapter_form)
        except ValueError as err:
            raise ValueError(f"convert_cora: adapter_form={adapter_form!r}: must be one of {ADAPTER_FORMS}") from err
        state = dataclasses.replace(state, config=config)
    return _convert_in_place(copy.deepcopy(prepared), state, [], fold_batchnorm)


def _convert_in_place(gm: fx.GraphModule, state: CoRaState, before: list, fold_batchnorm: bool = True) -> fx.GraphModule:
    layers = []

    def record_layers(graph_module: fx.GraphModule) -> PassResult:
        layers.extend(layer_infos(graph_module))
        return PassResult(graph_module, False)

    gm = run_passes(gm, before + [record_layers] + convert_passes(state.config, fold_batchnorm))
    gm.meta[META_KEY] = CoRaState(state.config, CONVERTED, state.conv_params, dict(state.skipped),
                                  state.float_conv_params, state.search_result, layers)
    return gm


class RankSearchPass:
    """`search_ranks` as a pass, so one PassManager runs search and then the conversion."""

    def __init__(self, batches: Iterable, **kwargs: Any) -> None:
        self.batches = batches
        self.kwargs = kwargs

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        search_ranks(gm, self.batches, **self.kwargs)
        return PassResult(gm, True)


def quantize_cora(
    model: nn.Module, calib_batches: Iterable, config: Optional[CoRaConfig] = None,
    example_inputs: Optional[tuple] = None, *, leaf_modules: Iterable = (), progress: bool = True,
) -> fx.GraphModule:
    """One shot: prepare, search the ranks on ``calib_batches``, convert (model untouched).

    The search result is kept in ``result.meta["cora_fx"].search_result``.
    """
    prepared = prepare_cora(model, config, example_inputs=example_inputs, leaf_modules=leaf_modules)
    if not isinstance(prepared, fx.GraphModule):
        return prepared  # no Conv2d: prepare_cora warned and returned the model unchanged
    state = get_state(prepared, PREPARED)
    return _convert_in_place(prepared, state, [RankSearchPass(calib_batches, progress=progress)])
