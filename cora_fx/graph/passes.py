"""Graph rewrites of the prepare side, each a small pass returning `PassResult`.

- `RewriteConvs`: every traced nn.Conv2d call -> quantized conv + parallel adapter + add
  (nn.Conv1d and nn.Linear layers arrive as nn.Conv2d calls, `lifting`; a Linear's adapter is
  searched only with ``adapter.linear``).
- `FoldAdaptersForSearch`: (main, adapter, add) -> one call of the `CoRaConv2d` container,
  the folded single-conv form of docs/method.md section 4 used by the rank search.
They are composed by `torch.fx.passes.infra.pass_manager.PassManager` (see `run_passes`).
"""
from __future__ import annotations

import copy
import operator
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager
from tqdm.auto import tqdm

from cora_fx.config import CoRaConfig
from cora_fx.errors import CoRaError
from cora_fx.graph.edits import module_calls, plain, set_submodule
from cora_fx.graph.lifting import KIND_META
from cora_fx.quant.modules import (
    CONV,
    FIXED,
    LINEAR,
    OFF,
    SEARCH,
    ConvBatchNorm,
    ConvSpec,
    CoRaConv2d,
    LowRankAdapter,
    QuantConv2d,
)
from cora_fx.quant.observers import main_observer, make_observer
from cora_fx.quant.residual import ResidualFactors
from cora_fx.quant.uniform import quantize_weight

ROLE_META, LAYER_META = "cora_role", "cora_layer"  # node.meta: a branch node's role and its layer's name
UNSUPPORTED_CONVS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DEPTHWISE_FLOAT = "depthwise conv kept float (depthwise='float')"


def run_passes(gm: fx.GraphModule, passes: Sequence[Callable[[fx.GraphModule], PassResult]]) -> fx.GraphModule:
    """Run ``passes`` once, in order, with torch.fx's PassManager; re-raise our own errors as is."""
    manager = PassManager(passes=list(passes), steps=1, run_checks_after_each_pass=True)
    try:
        return manager(gm).graph_module
    except Exception as err:  # PassManager wraps every error in a bare Exception
        cause = err.__cause__
        if isinstance(cause, (CoRaError, ValueError, TypeError, KeyboardInterrupt)):
            raise cause from None
        raise


def check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise CoRaError(f"layer '{name}' has NaN or Inf weights; fix the checkpoint before quantizing")


class RewriteConvs:
    """Rewrite nn.Conv2d calls into main + adapter branches (docs/method.md sections 1-2).

    Depthwise-like convs (rank 1 per group) follow ``config.quant.depthwise``; convs whose
    weight the forward reads directly, overridden Conv2d subclasses and other conv types
    are left float and recorded in ``skipped``. ``progress`` shows a bar over the convs (quantization and
    residual SVD: the slow part on large models).
    """

    def __init__(self, config: CoRaConfig, progress: bool = False) -> None:
        self.config = config
        self.progress = progress
        self.skipped: dict[str, str] = {}

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        read_directly = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes
                         if n.op == "get_attr" and str(n.target).endswith((".weight", ".bias"))}
        done: dict[str, CoRaConv2d] = {}
        modified = False
        calls = list(module_calls(gm, nn.Module))
        for node, conv in tqdm(calls, desc="cora prepare", disable=not self.progress, leave=False):
            name = str(node.target)
            if name in done:
                pass
            elif (isinstance(conv, UNSUPPORTED_CONVS)
                  or (isinstance(conv, nn.Conv2d) and not plain(conv, nn.Conv2d, "_conv_forward"))):
                self.skipped[name] = f"{type(conv).__name__} is not supported; left float"
                continue
            elif not isinstance(conv, nn.Conv2d):
                continue
            elif name in read_directly:
                self.skipped[name] = "the model reads its weight directly; left float"
                continue
            else:
                check_finite(name, conv.weight)
                container = self._build(name, conv, node.meta.get(KIND_META, CONV))
                if container is None:
                    self.skipped[name] = DEPTHWISE_FLOAT
                    continue
                done[name] = container
                set_submodule(gm, name, container)
            with gm.graph.inserting_after(node):
                main = gm.graph.call_module(f"{name}.quantized", node.args, node.kwargs)
            with gm.graph.inserting_after(main):
                adapter = gm.graph.call_module(f"{name}.adapter", node.args, node.kwargs)
            with gm.graph.inserting_after(adapter):
                merged = gm.graph.call_function(operator.add, (main, adapter))
            for new, role in ((main, "main"), (adapter, "adapter"), (merged, "merge")):
                new.meta.update(node.meta, **{LAYER_META: name, ROLE_META: role})
            node.replace_all_uses_with(merged)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)

    def _build(self, name: str, conv: nn.Conv2d, kind: str) -> Optional[CoRaConv2d]:
        cfg = self.config
        m, n_per_group, k1, k2 = conv.weight.shape
        depthwise = min(m // conv.groups, n_per_group * k1 * k2) == 1  # rank 1 per group, docs/method.md s.2
        policy = SEARCH if kind != LINEAR or cfg.adapter.linear else OFF
        bits, observer = cfg.quant.bits_for(name), None
        if depthwise:
            if cfg.quant.depthwise == "float":
                return None
            policy = FIXED if cfg.quant.depthwise == "residual" else OFF
            if cfg.quant.depthwise == "int8":
                bits = cfg.quant.bits_for(name, default=8)
                observer = make_observer("minmax", bits, True, symmetric=cfg.quant.symmetric_at(bits))
        observer = observer or main_observer(cfg.quant, bits)
        qw = quantize_weight(conv.weight, observer, bits)
        residual = conv.weight.detach().to(torch.float32) - qw.dequantize()
        factors = ResidualFactors(residual, conv.groups, factored=policy != OFF)
        spec = ConvSpec.of(conv)
        adapter = LowRankAdapter(factors, spec, cfg.adapter.bits, policy, cfg.search.start_rank)
        adapter.nbk_order = cfg.search.nbk_order
        container = CoRaConv2d(QuantConv2d(conv, qw, observer), adapter, kind)
        return container.to(conv.weight.device)


def merge_nodes(gm: fx.GraphModule) -> Iterator[tuple[str, fx.Node, fx.Node, fx.Node]]:
    """(layer name, main, adapter, add) for each parallel CoRa branch in the graph: the add nodes `RewriteConvs`
    marked (``node.meta["cora_role"] == "merge"``, the layer in ``node.meta["cora_layer"]``)."""
    for node in list(gm.graph.nodes):
        if node.meta.get(ROLE_META) != "merge" or node.target is not operator.add:
            continue
        main, adapter = node.args
        if (isinstance(gm.get_submodule(str(main.target)), QuantConv2d)
                and isinstance(gm.get_submodule(str(adapter.target)), LowRankAdapter)):
            yield node.meta[LAYER_META], main, adapter, node


class FoldAdaptersForSearch:
    """Replace each (main, adapter, add) triplet with a call of a `CoRaConv2d` (folded form).

    Run on a copy of the prepared graph (``fx.GraphModule(prepared, graph)``), whose plain
    containers get a fresh `CoRaConv2d` sharing the prepared model's branch modules.
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for name, main, adapter, merged in merge_nodes(gm):
            if not isinstance(gm.get_submodule(name), CoRaConv2d):
                set_submodule(gm, name, CoRaConv2d(gm.get_submodule(str(main.target)),
                                                   gm.get_submodule(str(adapter.target))))
            with gm.graph.inserting_before(merged):
                folded = gm.graph.call_module(name, main.args, main.kwargs)
            folded.meta.update(merged.meta, **{ROLE_META: "folded"})
            merged.replace_all_uses_with(folded)
            for node in (merged, adapter, main):
                gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)


class FoldBatchNormForSearch:
    """Merge each BatchNorm2d that alone reads a folded conv's output into that conv (`ConvBatchNorm`,
    eval-mode statistics). Only for the search's copy, which always runs in eval mode: the prepared model
    keeps its BatchNorms."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        for node, conv in module_calls(gm, CoRaConv2d):
            users = list(node.users)
            if len(users) != 1 or calls.count(node.target) != 1 or users[0].op != "call_module":
                continue
            bn = gm.get_submodule(str(users[0].target))
            if (type(bn) is not nn.BatchNorm2d or bn.running_mean is None
                    or bn.num_features != conv.quantized.weight.shape[0]):
                continue
            set_submodule(gm, str(node.target), ConvBatchNorm(conv, bn))
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
            modified = True
        return PassResult(gm, modified)


def folded_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``prepared``'s modules whose graph runs the folded form (section 4)."""
    return run_passes(fx.GraphModule(prepared, copy.deepcopy(prepared.graph)), [FoldAdaptersForSearch()])


def search_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    """`folded_copy` with each eval-mode conv + BatchNorm pair merged (section 4): what `search_ranks` runs."""
    return run_passes(folded_copy(prepared), [FoldBatchNormForSearch()])
