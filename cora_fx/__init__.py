"""cora_fx: CoRa low-bit weight quantization of ConvNets as torch.fx passes.

Pipeline (torch.ao style, docs/method.md): ``prepare_cora`` -> ``calibrate_activations`` (with ``act_bits``)
-> ``calibrate_rounding`` -> ``search_ranks``
(or ``set_ranks``) -> ``correct_batchnorm`` -> ``finetune`` -> ``convert_cora``. ``run_pipeline`` runs the
data-aware steps the config asks for, in that order; ``quantize_cora`` runs the whole chain.
"""
from .activations import calibrate_activations
from .batchnorm import correct_batchnorm
from .config import (ActivationConfig, AdapterConfig, CoRaConfig, CoRaDeprecationWarning, QuantConfig, RefineConfig,
                     RoundingConfig, SearchConfig)
from .convert import convert_cora, quantize_cora
from .coverage import CoRaFloatWeightsWarning
from .finetune import FinetuneResult, finetune
from .joint_allocation import JointPlan, allocate_jointly, plan_target
from .mixed_precision import allocate_bits
from .observers import NormalObserver
from .onnx_export import export_onnx
from .pipeline import STEPS, PipelineResult, run_pipeline
from .prepare import prepare_cora, set_ranks
from .rounding import calibrate_rounding
from .rank_search import RankSearchResult, SearchHistory, search_ranks
from .state import CoRaError
from .summary import CoRaSummary, LayerInfo, summary
from .tracer import CoRaTraceError
from .serialization import CoRaLoadError, load, read_summary, save
from .plots import plot_ranks, plot_search

__version__ = "0.7.0"

__all__ = [
    "CoRaConfig", "QuantConfig", "AdapterConfig", "RoundingConfig", "SearchConfig", "RefineConfig", "ActivationConfig",
    "calibrate_activations", "export_onnx",
    "CoRaDeprecationWarning", "prepare_cora", "calibrate_rounding", "search_ranks", "set_ranks", "correct_batchnorm",
    "finetune", "convert_cora", "run_pipeline", "quantize_cora", "STEPS", "PipelineResult", "summary", "allocate_bits",
    "allocate_jointly", "JointPlan", "plan_target",
    "CoRaSummary", "LayerInfo", "RankSearchResult", "SearchHistory", "FinetuneResult", "NormalObserver", "CoRaError",
    "CoRaTraceError", "save", "load", "read_summary", "CoRaLoadError", "plot_ranks", "plot_search",
    "CoRaFloatWeightsWarning",
]
