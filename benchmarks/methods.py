"""The quantization methods the ImageNet benchmark compares, each a function model -> artifact.

Every method returns a `MethodRun`: the quantized model (callable on normalized images), the
calibration wall time and iterations, the equivalent bit-width (conv layers, as in the paper;
for peers: their weight bits, depthwise included) and the artifact bytes.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from cora_fx import CoRaConfig, convert_cora, prepare_cora, run_pipeline, summary
from cora_fx.allocation.joint import allocate_jointly
from cora_fx.allocation.bits import allocate_bits
from cora_fx.prepare import adapters

#: method name -> {layer: rank} recorded by an earlier run (``imagenet_bench.py --ranks-from``):
#: such a "search" row sets these ranks instead of searching, to rebuild its artifact cheaply.
RECORDED_RANKS: dict[str, dict[str, int]] = {}


@dataclass
class MethodRun:
    name: str
    family: str
    bits: int
    model: Optional[Callable] = None
    calib_seconds: float = 0.0
    iterations: int = 0
    equivalent_bits: float = float("nan")
    artifact_bytes: int = 0
    budget: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def exported_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Size of the deployable artifact: the ``.pt2`` that ``cora_fx.save`` writes (no sample inputs)."""
    import cora_fx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.pt2")
        cora_fx.save(model, path, (example.expand(2, *example.shape[1:]),))
        return os.path.getsize(path)


def state_dict_bytes(model: nn.Module, deflate: bool = False) -> int:
    """Bytes of ``torch.save(model.state_dict())``; with ``deflate``, of its zlib level-9 stream
    (the fair reference for the deflate-compressed .pt2 artifacts)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(zlib.compress(buffer.getvalue(), 9)) if deflate else buffer.tell()


def cora(name: str, model: nn.Module, cfg: CoRaConfig, calib: list, example: torch.Tensor, *,
         ranks: str | dict[str, int], progress: bool = False) -> MethodRun:
    """CoRa with ``ranks`` = "rtn" (all 0), "heuristic", "search" or a ``{layer: rank}`` plan."""
    start = time.perf_counter()
    prepared = prepare_cora(model, cfg, example_inputs=(example[:1],))
    iterations = 0
    extra: dict = {}
    recorded = RECORDED_RANKS.get(name) if ranks == "search" else None
    if recorded is not None and (cfg.refine.bn_correction or cfg.refine.finetune_iterations):
        raise ValueError(f"{name}: recorded ranks rebuild only configs without BN correction or fine-tuning")
    if recorded is not None:
        extra["ranks_recorded"] = True
        rank_spec = recorded
    elif isinstance(ranks, dict):
        rank_spec = ranks
    elif ranks == "rtn":
        rank_spec = {n: 0 for n, a in adapters(prepared).items() if a.searchable}
    else:
        rank_spec = "search" if ranks == "search" else "heuristic"
    steps = run_pipeline(prepared, calib, ranks=rank_spec, skip=("finetune",) if ranks == "rtn" else (),
                         progress=progress)
    if steps.search is not None:
        iterations = steps.search.iterations
    if steps.finetune is not None:
        extra["finetune_iterations"] = steps.finetune.iterations
    if steps.reconstruct is not None:
        extra["reconstruct_seconds"] = steps.reconstruct.seconds
        extra["reconstruct_changed_codes"] = steps.reconstruct.changed_codes
    converted = convert_cora(prepared)
    seconds = time.perf_counter() - start
    s = summary(converted)
    conv_layers = [layer for layer in s.layers if layer.kind == "conv" and layer.policy == "search"]
    extra.update({"ranks": {layer.name: layer.rank for layer in conv_layers},
                  "max_ranks": {layer.name: layer.max_rank for layer in conv_layers},
                  "heuristic": {layer.name: int(cfg.search.budget * layer.max_rank) for layer in conv_layers}})
    return MethodRun(name, "rtn" if ranks == "rtn" else "cora", cfg.quant.bits, converted, seconds, iterations,
                     s.equivalent_bits, exported_bytes(converted, example[:1]), s.budget, extra=extra)


def cora_mixed(name: str, model: nn.Module, cfg: CoRaConfig, calib: list, example: torch.Tensor, *,
               target_bits: float, ranks: str) -> MethodRun:
    """CoRa on a mixed-precision base: `allocate_bits` demotes layers to ``cfg.quant.bits - 1`` until the
    equivalent bits meet ``target_bits``; its time counts as calibration."""
    start = time.perf_counter()
    plan = allocate_bits(model, calib, cfg, target_bits, progress=False)
    seconds = time.perf_counter() - start
    run = cora(name, model, cfg.replace(layer_bits=plan), calib, example, ranks=ranks)
    run.calib_seconds += seconds
    run.extra.update(layer_bits=plan, allocation_seconds=seconds)
    return run


def cora_joint(name: str, model: nn.Module, cfg: CoRaConfig, calib: list, example: torch.Tensor, *,
               target_bits: float, **options) -> MethodRun:
    """CoRa with bits and ranks planned together by `allocate_jointly` (fixed ranks, no search; ``options``
    go to it); the planning counts as calibration."""
    start = time.perf_counter()
    plan = allocate_jointly(model, calib, cfg, target_bits, progress=False, **options)
    seconds = time.perf_counter() - start
    run = cora(name, model, cfg.replace(layer_bits=plan.layer_bits), calib, example, ranks=plan.ranks)
    run.calib_seconds += seconds
    run.extra.update(layer_bits=plan.layer_bits, allocation_seconds=seconds)
    return run
