"""cora_fx: CoRa low-bit weight quantization of ConvNets as torch.fx passes.

Pipeline (torch.ao style, docs/method.md; the package layout in docs/architecture.md): ``prepare_cora`` ->
``calibrate_activations`` (with ``act_bits``) -> ``calibrate_rounding`` -> ``search_ranks`` (or ``set_ranks``)
-> ``reconstruct`` -> ``correct_batchnorm`` -> ``finetune`` -> ``convert_cora``. ``run_pipeline`` runs the
data-aware steps the config asks for, in that order; ``quantize_cora`` runs the whole chain (planning a target
bit-width first with ``plan_target``). The public names are listed in docs/api.md.
"""
from cora_fx.allocation.plan import plan_target
from cora_fx.calibrate import distributed
from cora_fx.calibrate.activations import calibrate_activations
from cora_fx.calibrate.batchnorm import correct_batchnorm
from cora_fx.calibrate.finetune import FinetuneResult, finetune
from cora_fx.calibrate.rank_search import RankSearchResult, SearchHistory, search_ranks
from cora_fx.calibrate.reconstruct import ReconstructResult, reconstruct
from cora_fx.calibrate.rounding import calibrate_rounding
from cora_fx.config import (
    ActivationConfig,
    AdapterConfig,
    CoRaConfig,
    QuantConfig,
    ReconstructConfig,
    RefineConfig,
    RoundingConfig,
    SearchConfig,
)
from cora_fx.convert import convert_cora, quantize_cora
from cora_fx.errors import CoRaDeprecationWarning, CoRaError, CoRaFloatWeightsWarning, CoRaLoadError, CoRaTraceError
from cora_fx.io.onnx_export import export_onnx
from cora_fx.io.serialization import load, read_summary, save
from cora_fx.io.summary import CoRaSummary, LayerInfo, summary
from cora_fx.pipeline import STEPS, PipelineResult, run_pipeline
from cora_fx.prepare import prepare_cora, set_ranks
from cora_fx.quant.observers import NormalObserver
from cora_fx.tools.plots import plot_ranks, plot_search

__version__ = "0.12.0"

__all__ = [
    # configuration
    "CoRaConfig", "QuantConfig", "AdapterConfig", "RoundingConfig", "SearchConfig", "RefineConfig", "ActivationConfig",
    "ReconstructConfig", "NormalObserver",
    # workflow
    "prepare_cora", "calibrate_activations", "calibrate_rounding", "search_ranks", "set_ranks", "reconstruct",
    "correct_batchnorm", "finetune", "convert_cora", "run_pipeline", "quantize_cora", "plan_target", "STEPS",
    # results and reports
    "PipelineResult", "RankSearchResult", "SearchHistory", "FinetuneResult", "ReconstructResult",
    "summary", "CoRaSummary", "LayerInfo",
    "plot_ranks", "plot_search",
    # artifacts
    "save", "load", "read_summary", "export_onnx",
    # several processes (torch.distributed)
    "distributed",
    # errors and warnings
    "CoRaError", "CoRaTraceError", "CoRaLoadError", "CoRaFloatWeightsWarning", "CoRaDeprecationWarning",
]

#: Names that left the top level, and where they live now (a clear error instead of a bare AttributeError).
_MOVED = {"allocate_bits": "cora_fx.allocation", "allocate_jointly": "cora_fx.allocation",
          "JointPlan": "cora_fx.allocation"}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        raise AttributeError(f"cora_fx.{name} is in {_MOVED[name]} (from {_MOVED[name]} import {name}); the public "
                             f"planner is cora_fx.plan_target, which quantize_cora runs for config.search.target_bits")
    raise AttributeError(f"module 'cora_fx' has no attribute {name!r}")
