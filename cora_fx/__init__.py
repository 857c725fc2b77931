"""cora_fx: CoRa low-bit weight quantization of ConvNets as a torch.fx pass.

Workflow (torch.ao style): ``prepare_cora`` -> ``search_ranks`` (or ``set_ranks``) ->
``convert_cora``; ``quantize_cora`` does all three. See METHOD.md for the math.
"""
from .batchnorm import correct_batchnorm
from .config import CoRaConfig
from .convert import convert_cora, quantize_cora
from .finetune import FinetuneResult, finetune
from .mixed_precision import allocate_bits
from .observers import NormalObserver
from .prepare import prepare_cora, set_ranks
from .rounding import calibrate_rounding
from .rank_search import RankSearchResult, SearchHistory, search_ranks
from .state import CoRaError
from .summary import CoRaSummary, LayerInfo, summary
from .tracer import CoRaTraceError
from .serialization import CoRaLoadError, load, read_summary, save
from .plots import plot_ranks, plot_search

__all__ = [
    "CoRaConfig", "calibrate_rounding", "correct_batchnorm", "prepare_cora", "search_ranks", "set_ranks", "convert_cora", "quantize_cora", "summary",
    "CoRaSummary", "LayerInfo", "RankSearchResult", "SearchHistory", "NormalObserver", "CoRaError", "CoRaTraceError",
    "save", "load", "read_summary", "CoRaLoadError", "plot_ranks", "plot_search", "finetune", "FinetuneResult",
    "allocate_bits",
]
