"""`CoRaConfig`: the settings of one CoRa run, grouped by the pipeline step that reads them.

Each group is a small frozen, validated dataclass (the shape of torchao's per-workflow configs):

- `QuantConfig` (``config.quant``): the main weights' quantizer (docs/method.md section 1);
- `AdapterConfig` (``config.adapter``): the residual adapters (sections 2, 4 and 6);
- `RoundingConfig` (``config.rounding``): data-aware base rounding, `calibrate_rounding` (section 5);
- `SearchConfig` (``config.search``): the differentiable rank search, `search_ranks` (section 3);
- `RefineConfig` (``config.refine``): the optional steps after the search (section 9);
- `ActivationConfig` (``config.activation``): 8-bit activation quantizers, `calibrate_activations` (section 14).

The defaults are the paper's settings (the normal clipping range cut back to [min, max], docs/method.md
section 1); `CoRaConfig.recommended(bits)` is the measured best recipe.
`to_dict` / `from_dict` give a JSON-ready form with a version, which `save` records in the artifact.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Optional, Union, get_args

from cora_fx.errors import CoRaDeprecationWarning

#: Steps per block of the block-wise reconstruction `CoRaConfig.recommended(2)` runs (docs/method.md section 17).
RECONSTRUCT_ITERATIONS = 200

#: Version of the `to_dict` layout; `from_dict` reads this version and the flat layout before it.
CONFIG_VERSION = 11

Granularity = Literal["per_tensor", "per_channel"]
Clipping = Literal["normal", "normal_paper", "minmax", "mse"]
Loss = Literal["ce", "kl", "bce", "bce_logits", "mse"]
DepthwisePolicy = Literal["skip", "residual", "float", "int8"]
Rounding = Literal["nearest", "gptq"]
Svd = Literal["weight", "activation"]
RoundingInputs = Literal["float", "quantized"]
AdapterForm = Literal["parallel", "folded"]
ActivationObserver = Literal["minmax", "moving_average", "histogram"]
ActivationDtype = Literal["uint8", "int8"]
Allocation = Literal["bits", "joint"]

GRANULARITIES = get_args(Granularity)
CLIPPINGS = get_args(Clipping)
LOSSES = get_args(Loss)
DEPTHWISE_POLICIES = get_args(DepthwisePolicy)
ROUNDINGS = get_args(Rounding)
SVDS = get_args(Svd)
ROUNDING_INPUTS = get_args(RoundingInputs)
ADAPTER_FORMS = get_args(AdapterForm)
ACTIVATION_OBSERVERS = get_args(ActivationObserver)
ACTIVATION_DTYPES = get_args(ActivationDtype)
ALLOCATIONS = get_args(Allocation)
#: The ``search.autocast`` precisions (torch dtype names).
AUTOCAST_DTYPES = ("bfloat16", "float16")

#: The modules `CoRaConfig.from_dict` imports a saved callable (``clipping``, ``loss``) from without being told:
#: cora_fx's own and torch.ao's observers. Any other must be named by the caller (``allowed_modules``).
TRUSTED_MODULES = ("cora_fx", "torch.ao.quantization.observer")

LossFn = Callable[..., Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class _Group:
    """Validation shared by the groups: `_rules` lists ``(field, ok(value), why)``, checked in order."""

    GROUP: ClassVar[str] = ""

    def _rules(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        return []

    def __post_init__(self) -> None:
        for name, ok, why in self._rules():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"CoRaConfig.{self.GROUP}.{name}={value!r}: {why}")


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _int_in(low: int, high: Optional[int] = None) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low and (high is None or v <= high)


def _valid_clipping(value: Any) -> bool:
    return value in CLIPPINGS if isinstance(value, str) else callable(value)


def _valid_loss(value: Any) -> bool:
    return value in LOSSES if isinstance(value, str) else callable(value)


def _valid_layer_bits(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(name, str) and _is_int(bits) and 2 <= bits <= 8 for name, bits in value.items())


@dataclass(frozen=True)
class QuantConfig(_Group):
    """How the main weights are quantized (docs/method.md section 1).

    Attributes:
        bits: weight bit-width n of the main convs (and of Linear layers), 2..8.
        granularity: ``"per_tensor"`` (paper) or ``"per_channel"`` (per output channel).
        clipping: ``"normal"`` (mu +- k*sigma intersected with the weights' own [min, max]),
            ``"normal_paper"`` (mu +- k*sigma as in the paper, possibly wider than the weights), ``"minmax"``,
            ``"mse"`` (the range that minimizes the squared rounding error), or a torch.ao observer class /
            ``with_args`` factory, built with ``dtype=torch.int8`` and the n-bit ``quant_min`` / ``quant_max``.
        k: width of the normal clipping range in standard deviations.
        quantize_linear: weight-quantize nn.Linear layers at ``bits`` (no adapter).
        depthwise: policy for convs whose residual has rank 1 per group (section 2): ``"skip"`` (no adapter),
            ``"residual"`` (the whole residual as a fixed rank-1 adapter, counted in the budget), ``"float"``
            (left in float, counted as 32 bits) or ``"int8"`` (8 bits per channel, min-max).
        layer_bits: per-layer bit-width overrides ``{qualified name of a Conv2d or Linear: bits}`` (mixed
            precision, section 8; `allocate_bits` chooses them). Unknown names raise in `prepare_cora`.
        edge_bits: bit-width of the first and the last quantized layer in graph order (the one reading the input
            and, usually, the classifier), whose errors no later layer averages out; ``None`` (default) leaves
            them at ``bits``. `prepare_cora` writes the choice into ``layer_bits``; a name already there wins.
        symmetric_int8: put every 8-bit weight (``depthwise="int8"``, ``layer_bits`` 8, ``bits=8``) on a
            symmetric grid, zero point 0: the INT8 layout of integer runtimes' kernels, so `export_onnx` stores
            it exactly (an asymmetric 8-bit weight is re-quantized there; section 15). Narrower weights keep
            their asymmetric grid, which the INT8 layout holds exactly.
    """

    GROUP: ClassVar[str] = "quant"
    bits: int = 4
    granularity: Granularity = "per_tensor"
    clipping: Union[Clipping, Callable[..., Any]] = "normal"
    k: float = 4.0
    quantize_linear: bool = True
    depthwise: DepthwisePolicy = "skip"
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    symmetric_int8: bool = False
    edge_bits: Optional[int] = None

    def _rules(self) -> list:
        return [
            ("bits", _int_in(2, 8), "must be an integer in 2..8"),
            ("granularity", _one_of(GRANULARITIES), f"must be one of {GRANULARITIES}"),
            ("clipping", _valid_clipping, f"must be one of {CLIPPINGS} or a torch.ao observer class/factory"),
            ("k", lambda v: _is_number(v) and v > 0, "must be a positive number"),
            ("quantize_linear", lambda v: isinstance(v, bool), "must be a bool"),
            ("depthwise", _one_of(DEPTHWISE_POLICIES), f"must be one of {DEPTHWISE_POLICIES}"),
            ("layer_bits", _valid_layer_bits, "must map layer names (str) to integers in 2..8"),
            ("symmetric_int8", lambda v: isinstance(v, bool), "must be a bool"),
            ("edge_bits", lambda v: v is None or _int_in(2, 8)(v), "must be None or an integer in 2..8"),
        ]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))  # a private copy: the config stays frozen

    def __hash__(self) -> int:  # hashable although layer_bits is a dict
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in _values(self)))

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    def symmetric_at(self, bits: int) -> bool:
        """Whether a weight quantized at ``bits`` gets the symmetric grid (`symmetric_int8`)."""
        return self.symmetric_int8 and bits == 8

    def bits_for(self, name: str, default: Optional[int] = None) -> int:
        """The main-weight bit-width of layer ``name``: its `layer_bits` entry, else ``default`` or `bits`."""
        return self.layer_bits.get(name, self.bits if default is None else default)


@dataclass(frozen=True)
class AdapterConfig(_Group):
    """The low-rank residual adapters (docs/method.md sections 2, 4 and 6).

    Attributes:
        bits: bit-width of A and B (min-max, section 1); ``None`` keeps them in float.
        svd: ``"weight"`` (paper: best rank-r approximation of dW) or ``"activation"``: the factors that
            minimize the conv's output error on calibration data (computed by `calibrate_rounding`).
        form: how `convert_cora` lowers an adapter: ``"parallel"`` (paper: conv(x, [W]_n) + B(A(x))) or
            ``"folded"`` (one conv whose weight dequant([W]_n) + fold(B o A) is computed from the stored
            codes in the graph: same bytes, the float model's conv FLOPs).
        linear: adapters on Linear layers too (a Linear is a 1x1 conv, docs/method.md s.12), searched under
            the same budget; ``False`` (default) gives Linear layers the base rounding (GPTQ with
            ``rounding.method="gptq"``) without adapter.
    """

    GROUP: ClassVar[str] = "adapter"
    bits: Optional[int] = 8
    svd: Svd = "weight"
    form: AdapterForm = "parallel"
    linear: bool = False

    def _rules(self) -> list:
        return [
            ("bits", lambda v: v is None or _int_in(2, 8)(v), "must be an integer in 2..8 or None (float adapters)"),
            ("svd", _one_of(SVDS), f"must be one of {SVDS}"),
            ("form", _one_of(ADAPTER_FORMS), f"must be one of {ADAPTER_FORMS}"),
            ("linear", lambda v: isinstance(v, bool), "must be True or False"),
        ]


@dataclass(frozen=True)
class RoundingConfig(_Group):
    """Data-aware base rounding, run by `calibrate_rounding` (docs/method.md section 5).

    Attributes:
        method: ``"nearest"`` (paper) or ``"gptq"`` (output-error-compensating rounding).
        batches: calibration batches that estimate the inputs' second moments (for ``"gptq"`` and for
            ``AdapterConfig.svd="activation"``).
        inputs: whose inputs those moments describe: ``"float"`` (the float model's, one pass) or
            ``"quantized"`` (a second pass over the model rounded once, with heuristic-rank adapters).
        max_block: the largest number of weight columns (in/groups x kh x kw) whose second moment is kept
            whole; a wider layer keeps only the diagonal blocks of at most this many columns (whole input
            channels), so memory and time grow linearly with its fan-in (section 5). `summary` lists those
            layers under ``rounding_notes``.
    """

    GROUP: ClassVar[str] = "rounding"
    method: Rounding = "nearest"
    batches: int = 8
    inputs: RoundingInputs = "float"
    max_block: int = 4096

    def _rules(self) -> list:
        return [
            ("method", _one_of(ROUNDINGS), f"must be one of {ROUNDINGS}"),
            ("batches", _int_in(1), "must be an integer >= 1"),
            ("inputs", _one_of(ROUNDING_INPUTS), f"must be one of {ROUNDING_INPUTS}"),
            ("max_block", _int_in(1), "must be an integer >= 1 (weight columns)"),
        ]


@dataclass(frozen=True)
class SearchConfig(_Group):
    """The differentiable rank search, `search_ranks` (docs/method.md section 3).

    Attributes:
        budget: target adapter parameters as a fraction b of the conv parameters, in (0, 1].
        nbk_order: order k of the normalized Butterworth kernel.
        penalty: lambda of the budget term lambda * exp(ReLU(running_budget - b)).
        lr: Adam learning rate on the normalized ranks r_l / R_l.
        iterations: maximum number of search steps.
        grad_clip: each rank gradient is clipped to [-grad_clip, grad_clip].
        init_rank: initial normalized rank r_l / R_l of every searchable layer (also the rank right after
            `prepare_cora`), or ``"budget"``: the one normalized rank at which the adapters spend exactly
            ``budget``, so the search starts on the budget instead of walking down to it.
        micro_batch: split each calibration batch into chunks of this many samples for the forward and
            backward passes (gradients added, weighted by size: the same step for the batch-mean losses
            ``"ce"``, ``"kl"``, ``"bce"``, ``"bce_logits"``; ``"mse"`` and callables always see the whole
            batch). None: never split; ``"auto"``: on a CPU, chunks of about 1.2M input values (8 ImageNet
            images at 224 px: MobileNetV2 then runs 2x faster per sample), whole batches on an accelerator
            (section 3).
        channels_last: run the search on 4-D inputs in channels-last memory format (faster CPU convs); a
            model that cannot (a ``view`` of a 4-D activation) falls back to contiguous inputs by itself.
        autocast: ``"bfloat16"`` or ``"float16"``: the search's forward passes (the float teacher's and the
            soft model's) under ``torch.autocast`` at that precision, on the model's device (section 16);
            the ranks and their gradients stay float32. None (the default): float32 throughout.
        loss: ``"ce"`` (labels) or a label-free objective against the float model's outputs (section 7):
            ``"kl"`` (class logits or probabilities along ``loss_dim``), ``"bce"`` (sigmoid probabilities),
            ``"bce_logits"`` (logits of independent labels), ``"mse"`` (raw outputs, scale-free); each sums
            over tuple / dict outputs. Or a callable ``loss(output, float_output, labels) -> scalar``.
        loss_dim: the class dimension of ``"kl"`` (1: ``(N, C)`` logits and ``(N, C, H, W)`` maps; -1 for
            ``(N, T, C)`` sequences).
        seed: seed of the search's random state.
        allocation: how a target equivalent bit-width is met (``cora-fx quantize --target-bits``, section 8):
            ``"bits"`` (`allocate_bits` demotes layers with ``budget`` spent in full, then this search picks the
            ranks) or ``"joint"`` (`allocate_jointly` picks every layer's bits and rank together under the one
            bit budget, buying a rank only where it removes more loss per bit than precision; no search).
        target_bits: the equivalent bits `run_pipeline` (and so `quantize_cora`, ``cora-fx quantize
            --target-bits``) plans for before the other steps (`plan_target`): with ``"joint"`` each searchable
            conv at ceil(t) - 1 or ceil(t) bits (`plan_widths`), with ``"bits"`` at ``quant.bits`` or one less.
            None (the default): every conv at its ``quant`` bits. `CoRaConfig.recommended(n)` sets n + 0.5.
        plan_widths: how many main bit-widths the joint plan offers each searchable conv: 2 (ceil(t) - 1 and
            ceil(t)) or 3 (and ceil(t) + 1: one more rounding pass).
        plan_adapters: whether the joint plan may buy adapter ranks; False plans bits only (every rank 0).
    """

    GROUP: ClassVar[str] = "search"
    budget: float = 0.05
    nbk_order: float = 4.0
    penalty: float = 1.0
    lr: float = 0.01
    iterations: int = 250
    grad_clip: float = 0.2
    init_rank: Union[float, Literal["budget"]] = 0.9
    loss: Union[Loss, LossFn] = "ce"
    loss_dim: int = 1
    seed: int = 0
    micro_batch: Union[int, Literal["auto"], None] = "auto"
    channels_last: bool = True
    autocast: Optional[str] = None
    allocation: Allocation = "bits"
    target_bits: Optional[float] = None
    plan_widths: int = 2
    plan_adapters: bool = True

    @property
    def start_rank(self) -> float:
        """The normalized rank adapters get at `prepare_cora`: ``init_rank``, or ``budget`` for ``"budget"``."""
        return float(self.budget if self.init_rank == "budget" else self.init_rank)

    def _rules(self) -> list:
        return [
            ("budget", lambda v: _is_number(v) and 0 < v <= 1, "must be in (0, 1]"),
            ("nbk_order", lambda v: _is_number(v) and v > 0, "must be a positive number"),
            ("penalty", lambda v: _is_number(v) and v >= 0, "must be >= 0"),
            ("lr", lambda v: _is_number(v) and v > 0, "must be > 0"),
            ("iterations", _int_in(0), "must be an integer >= 0"),
            ("grad_clip", lambda v: _is_number(v) and v > 0, "must be > 0"),
            ("init_rank", lambda v: v == "budget" or (_is_number(v) and 0 < v <= 1),
             "must be in (0, 1] or 'budget'"),
            ("loss", _valid_loss, f"must be one of {LOSSES} or a callable loss(output, float_output, labels)"),
            ("loss_dim", _is_int, "must be an integer (a dimension of the model's output)"),
            ("seed", _is_int, "must be an integer"),
            ("micro_batch", lambda v: v is None or v == "auto" or (_is_int(v) and v >= 1),
             "must be None, 'auto' or an integer >= 1"),
            ("channels_last", lambda v: isinstance(v, bool), "must be True or False"),
            ("autocast", lambda v: v is None or _one_of(AUTOCAST_DTYPES)(v),
             f"must be None or one of {AUTOCAST_DTYPES}"),
            ("allocation", _one_of(ALLOCATIONS), f"must be one of {ALLOCATIONS}"),
            ("target_bits", lambda v: v is None or (_is_number(v) and v > 0), "must be None or a positive number"),
            ("plan_widths", _int_in(2, 3), "must be 2 or 3"),
            ("plan_adapters", lambda v: isinstance(v, bool), "must be True or False"),
        ]


@dataclass(frozen=True)
class RefineConfig(_Group):
    """Optional steps after the ranks are fixed (docs/method.md section 9); 0 (the paper) skips them.

    Attributes:
        bn_correction: re-estimate the BatchNorm statistics on this many calibration batches
            (`correct_batchnorm`).
        finetune_iterations: train A_r, B_r (fake-quantized) and per-channel scales for this many Adam steps
            on the task loss (`finetune`). Ranks, codes and bits are unchanged.
        finetune_lr: Adam learning rate of that fine-tuning.
    """

    GROUP: ClassVar[str] = "refine"
    bn_correction: int = 0
    finetune_iterations: int = 0
    finetune_lr: float = 1e-3

    def _rules(self) -> list:
        return [
            ("bn_correction", _int_in(0), "must be an integer >= 0 (number of calibration batches)"),
            ("finetune_iterations", _int_in(0), "must be an integer >= 0"),
            ("finetune_lr", lambda v: _is_number(v) and v > 0, "must be > 0"),
        ]


@dataclass(frozen=True)
class ReconstructConfig(_Group):
    """Block-wise output reconstruction once the ranks are fixed (`reconstruct`, docs/method.md section 17);
    0 iterations (the default) skips it.

    Block by block, the rounding of every base weight below 8 bits (each code may move one step from its
    GPTQ value), and with ``adapter_lr`` the adapters' A_r, B_r, are learned so that the block's output on the
    quantized model's own inputs matches the float block's output; ranks, bits and grids do not change.

    Attributes:
        iterations: learning steps per block (0: the step is off).
        samples: calibration samples whose block inputs and float outputs are held in memory.
        batch_size: samples per step.
        lr: signed-gradient step of the rounding offsets at the first iteration (decays linearly to 0).
        adapter_lr: Adam learning rate of the adapters' A_r, B_r; 0 (the default, the better of the two on
            benchmarks/RESULTS.md's paired comparison) keeps them as they are while the rounding moves.
        min_layers: quantized layers per block at least (consecutive short segments are merged).
    """

    GROUP: ClassVar[str] = "reconstruct"
    iterations: int = 0
    samples: int = 512
    batch_size: int = 16
    lr: float = 0.005
    adapter_lr: float = 0.0
    min_layers: int = 3

    def _rules(self) -> list:
        return [
            ("iterations", _int_in(0), "must be an integer >= 0 (0 turns reconstruction off)"),
            ("samples", _int_in(1), "must be an integer >= 1"),
            ("batch_size", _int_in(1), "must be an integer >= 1"),
            ("lr", lambda v: _is_number(v) and v > 0, "must be > 0"),
            ("adapter_lr", lambda v: _is_number(v) and v >= 0, "must be >= 0 (0 keeps the adapters)"),
            ("min_layers", _int_in(1), "must be an integer >= 1"),
        ]


@dataclass(frozen=True)
class ActivationConfig(_Group):
    """Activation quantizers for integer runtimes, calibrated by `calibrate_activations` (docs/method.md s.14).

    Attributes:
        bits: activation bit-width (per tensor), 2..8; ``None`` (the default) keeps activations in float
            (weight-only quantization). 8 is what integer runtimes such as onnxruntime execute.
        observer: the torch.ao observer that sets each range: ``"minmax"`` (MinMaxObserver),
            ``"moving_average"`` (MovingAverageMinMaxObserver) or ``"histogram"`` (HistogramObserver: the range
            that minimizes the squared quantization error of the observed histogram).
        dtype: ``"uint8"`` (asymmetric, onnxruntime's default for activations) or ``"int8"`` (symmetric,
            zero point 0, as many NPU runtimes expect).
        batches: calibration batches the observers see before their ranges are frozen.
    """

    GROUP: ClassVar[str] = "activation"
    bits: Optional[int] = None
    observer: ActivationObserver = "histogram"
    dtype: ActivationDtype = "uint8"
    batches: int = 8

    def _rules(self) -> list:
        return [
            ("bits", lambda v: v is None or _int_in(2, 8)(v), "must be None (float activations) or an integer "
                                                               "in 2..8 (8 for integer runtimes)"),
            ("observer", _one_of(ACTIVATION_OBSERVERS), f"must be one of {ACTIVATION_OBSERVERS}"),
            ("dtype", _one_of(ACTIVATION_DTYPES), f"must be one of {ACTIVATION_DTYPES}"),
            ("batches", _int_in(1), "must be an integer >= 1"),
        ]


GROUPS: dict[str, type] = {"quant": QuantConfig, "adapter": AdapterConfig, "rounding": RoundingConfig,
                           "search": SearchConfig, "refine": RefineConfig, "reconstruct": ReconstructConfig,
                           "activation": ActivationConfig}

#: The single-field names `CoRaConfig.replace` and the steps' overrides take (`step_config`): name -> (group, field).
FLAT_NAMES: dict[str, tuple[str, str]] = {
    **{name: ("quant", name) for name in
       ("bits", "granularity", "clipping", "k", "quantize_linear", "depthwise", "layer_bits", "symmetric_int8",
        "edge_bits")},
    "adapter_bits": ("adapter", "bits"), "svd": ("adapter", "svd"), "adapter_form": ("adapter", "form"),
    "adapter_linear": ("adapter", "linear"),
    "rounding": ("rounding", "method"), "rounding_batches": ("rounding", "batches"),
    "rounding_inputs": ("rounding", "inputs"), "max_block": ("rounding", "max_block"),
    **{name: ("search", name) for name in
       ("budget", "nbk_order", "penalty", "lr", "iterations", "grad_clip", "init_rank", "loss", "loss_dim", "seed",
        "micro_batch", "channels_last", "autocast", "allocation", "target_bits", "plan_widths",
        "plan_adapters")},
    **{name: ("refine", name) for name in ("bn_correction", "finetune_iterations", "finetune_lr")},
    **{f"reconstruct_{name}": ("reconstruct", name) for name in
       ("iterations", "samples", "batch_size", "lr", "adapter_lr", "min_layers")},
    "act_bits": ("activation", "bits"), "act_observer": ("activation", "observer"),
    "act_dtype": ("activation", "dtype"), "act_batches": ("activation", "batches"),
}

#: The settings each data-aware step reads when it runs, by their `CoRaConfig.replace` names: what the step's
#: keyword overrides may change for one call (`step_config`). The other settings shape the prepared graph.
STEP_OVERRIDES: dict[str, tuple[str, ...]] = {
    "calibrate_activations": ("act_batches",),
    "calibrate_rounding": ("rounding_batches", "rounding_inputs", "max_block"),
    "search_ranks": tuple(f.name for f in dataclasses.fields(SearchConfig)),
    "correct_batchnorm": ("bn_correction",),
    "finetune": ("finetune_iterations", "finetune_lr"),
    "reconstruct": tuple(f"reconstruct_{f.name}" for f in dataclasses.fields(ReconstructConfig)),
}


def step_config(config: "CoRaConfig", step: str, overrides: Mapping[str, Any]) -> "CoRaConfig":
    """``config`` with a step's keyword ``overrides`` applied and validated (`replace`), for one call of ``step``.

    The one convention of every step (docs/api.md): ``search_ranks(prepared, batches, budget=0.03)``,
    ``finetune(prepared, batches, finetune_iterations=50)``; a setting the step does not read is refused.
    """
    allowed = STEP_OVERRIDES[step]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"{step}: unexpected keyword(s) {unknown}; the settings it reads are {list(allowed)} "
                        f"(the others are fixed by prepare_cora's config)")
    return config.replace(**overrides) if overrides else config


def _values(group: Any) -> list:
    return [getattr(group, f.name) for f in dataclasses.fields(group)]


@dataclass(frozen=True, init=False)
class CoRaConfig:
    """Settings of one CoRa run, one validated group per pipeline step.

    ``CoRaConfig()`` is the paper's setting (weights only; ``CoRaConfig(act_bits=8)`` adds 8-bit activations,
    short for ``activation=ActivationConfig(bits=8)``). Build one from groups,
    ``CoRaConfig(quant=QuantConfig(bits=3), search=SearchConfig(budget=0.04))``, or change fields by name with
    `replace` (``config.replace(bits=3, budget=0.04)``, the names in `FLAT_NAMES`). Fields are read through
    their group (``config.quant.bits``).
    """

    quant: QuantConfig
    adapter: AdapterConfig
    rounding: RoundingConfig
    search: SearchConfig
    refine: RefineConfig
    reconstruct: ReconstructConfig
    activation: ActivationConfig

    def __init__(self, quant: Optional[QuantConfig] = None, adapter: Optional[AdapterConfig] = None,
                 rounding: Optional[RoundingConfig] = None, search: Optional[SearchConfig] = None,
                 refine: Optional[RefineConfig] = None, activation: Optional[ActivationConfig] = None,
                 act_bits: Optional[int] = None, reconstruct: Optional[ReconstructConfig] = None,
                 **flat: Any) -> None:
        if flat or isinstance(rounding, str):
            names = sorted(flat) + (["rounding"] if isinstance(rounding, str) else [])
            raise TypeError(f"CoRaConfig({', '.join(f'{k}=...' for k in names)}): fields are set through their "
                            f"group (CoRaConfig(quant=QuantConfig(bits=3))) or by name with "
                            f"CoRaConfig().replace({', '.join(f'{k}=...' for k in names)})")
        given = {"quant": quant, "adapter": adapter, "rounding": rounding, "search": search, "refine": refine,
                 "reconstruct": reconstruct, "activation": activation}
        if act_bits is not None:  # the shorthand CoRaConfig(act_bits=8)
            given["activation"] = dataclasses.replace(activation or ActivationConfig(), bits=act_bits)
        for name, value in given.items():
            if value is None:
                value = GROUPS[name]()
            elif not isinstance(value, GROUPS[name]):
                raise TypeError(f"CoRaConfig.{name} must be a {GROUPS[name].__name__}, got {type(value).__name__}")
            object.__setattr__(self, name, value)

    @property
    def act_bits(self) -> Optional[int]:
        """The activation bit-width (``activation.bits``); None for weight-only quantization."""
        return self.activation.bits

    def __getattr__(self, name: str) -> Any:
        where = FLAT_NAMES.get(name)
        hint = f"; read CoRaConfig.{where[0]}.{where[1]}" if where else ""
        raise AttributeError(f"CoRaConfig has no attribute {name!r}{hint}")

    def replace(self, **changes: Any) -> "CoRaConfig":
        """A validated copy with ``changes`` applied: whole groups by group name, single fields by their
        flat name (`FLAT_NAMES`: ``bits``, ``adapter_bits``, ``budget``, ``rounding="gptq"``, ...)."""
        groups = {name: getattr(self, name) for name in GROUPS}
        flat = {}
        for name, value in changes.items():
            if name in GROUPS and not (name == "rounding" and isinstance(value, str)):
                groups[name] = value
            else:
                flat[name] = value
        result = CoRaConfig(**groups)
        for name, value in _grouped_changes(result, flat).items():
            object.__setattr__(result, name, value)
        return result

    @classmethod
    def recommended(cls, bits: int = 4, **changes: Any) -> "CoRaConfig":
        """The measured best recipe for about ``bits`` bits per conv weight (benchmarks/RESULTS.md).

        Per-channel MSE-optimal ranges, GPTQ base rounding, output-aware (activation) adapters lowered in the
        folded form, depthwise convs at 8 bits, and the joint plan of bits and ranks (`allocate_jointly`) for
        ``target_bits = bits + 0.5`` equivalent bits (adapters and 8-bit layers counted; docs/method.md s.8):
        each searchable conv at ``bits`` or ``bits + 1`` with the rank that removes the most loss per stored bit,
        decided on the user's model from its own calibration data. Where even every searchable conv at ``bits``
        misses the target (a small model with many depthwise convs), the depthwise convs are offered
        ``bits + 1`` too. Pass ``target_bits`` for an exact budget (``recommended(4, target_bits=4.0)``: a file at
        the peers' 4 bits, convs at 3 or 4 bits), or ``target_bits=None`` for every conv at ``bits`` with ranks
        searched under ``budget`` (the uniform recipe). Linear layers are rounded at ``bits`` by GPTQ. The plan
        runs first in `run_pipeline` / `quantize_cora`. At ``bits=2`` the ranks are followed by block-wise
        reconstruction of the rounding (`reconstruct`, ``RECONSTRUCT_ITERATIONS`` steps per block); from 3 bits up
        it measured a tie and is off (``reconstruct_iterations=`` sets it either way).

        With ``act_bits`` (an integer runtime) the 8-bit weights are symmetric (``symmetric_int8``), the first
        and last layers are at 8 bits (``edge_bits``) and the BatchNorm statistics are corrected on 8 batches
        (``bn_correction``): the levers that helped W4A8 MobileNetV2 (benchmarks/RESULTS.md, "Deployment").
        ``changes`` are applied with `replace`. ``CoRaConfig()`` stays the paper's.
        """
        if not _is_int(bits) or not 2 <= bits <= 8:
            raise ValueError(f"CoRaConfig.recommended: bits={bits!r} must be an integer in 2..8")
        changes = {"target_bits": bits + 0.5, **changes}
        if changes.get("act_bits") is not None:
            changes = {"symmetric_int8": True, "edge_bits": 8, "bn_correction": 8, **changes}
        budget = {2: 0.03, 3: 0.044, 4: 0.045}.get(bits, 0.05)
        base = cls(quant=QuantConfig(bits=bits, granularity="per_channel", clipping="mse", depthwise="int8"),
                   adapter=AdapterConfig(svd="activation", form="folded"),
                   rounding=RoundingConfig(method="gptq", batches=8),
                   search=SearchConfig(budget=budget, loss="kl", allocation="joint"),
                   reconstruct=ReconstructConfig(iterations=RECONSTRUCT_ITERATIONS if bits == 2 else 0))
        return base.replace(**changes)

    @property
    def needs_rounding_data(self) -> bool:
        """True when the base rounding or the adapters' factors depend on calibration data."""
        return self.rounding.method != "nearest" or self.adapter.svd != "weight"

    def to_dict(self, strict: bool = True) -> dict[str, Any]:
        """A JSON-ready dict ``{"version": CONFIG_VERSION, group: {field: value}}``.

        A callable (``clipping``, ``loss``) is stored as ``{"callable": "module:qualname"}`` when it can be
        imported back; any other raises ValueError, or with ``strict=False`` is stored as
        ``{"unserialisable": repr}`` (which `from_dict` refuses).
        """
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for name in GROUPS:
            group = getattr(self, name)
            out[name] = {f.name: _encode(getattr(group, f.name), f"{name}.{f.name}", strict)
                         for f in dataclasses.fields(group)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], allowed_modules: Iterable[str] = ()) -> "CoRaConfig":
        """The config `to_dict` described (also a flat dict of releases before 0.3, with a warning).

        A saved callable is imported only from `TRUSTED_MODULES` or a module in ``allowed_modules`` (a module
        name also allows its submodules): a saved file cannot make this import anything else.
        """
        version = data.get("version", 1)
        if not _is_int(version) or version > CONFIG_VERSION:
            raise ValueError(f"CoRaConfig.from_dict: version {version!r} is newer than this cora_fx reads "
                             f"({CONFIG_VERSION}); upgrade cora_fx")
        trusted = TRUSTED_MODULES + tuple(allowed_modules)
        if version < 2:
            warnings.warn("CoRaConfig.from_dict: a flat config of releases before 0.3; save it again with to_dict",
                          CoRaDeprecationWarning, stacklevel=2)
            flat = {k: v for k, v in data.items() if k != "version"}
            return cls().replace(**{k: _decode(v, k, trusted) for k, v in flat.items()})
        unknown = set(data) - set(GROUPS) - {"version"}
        if unknown:
            raise ValueError(f"CoRaConfig.from_dict: unknown group(s) {sorted(unknown)}; expected {list(GROUPS)}")
        groups = {}
        for name, fields in data.items():
            if name == "version":
                continue
            bad = set(fields) - {f.name for f in dataclasses.fields(GROUPS[name])}
            if bad:
                raise ValueError(f"CoRaConfig.from_dict: {name} has no field(s) {sorted(bad)}")
            groups[name] = GROUPS[name](**{k: _decode(v, f"{name}.{k}", trusted) for k, v in fields.items()})
        return cls(**groups)


def _grouped_changes(config: CoRaConfig, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The groups of ``config`` with the flat-named ``flat`` changes applied (validated)."""
    unknown = set(flat) - set(FLAT_NAMES)
    if unknown:
        raise ValueError(f"CoRaConfig has no field(s) {sorted(unknown)}; fields by name: {sorted(FLAT_NAMES)}, "
                         f"groups: {list(GROUPS)}")
    per_group: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        group, key = FLAT_NAMES[name]
        per_group.setdefault(group, {})[key] = value
    return {group: dataclasses.replace(getattr(config, group), **changes) for group, changes in per_group.items()}


def _encode(value: Any, where: str, strict: bool) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    path = _import_path(value)
    if path is not None:
        return {"callable": path}
    if strict:
        raise ValueError(f"CoRaConfig.{where}={value!r} cannot be saved: use a string setting or a module-level "
                         f"class or function that can be imported back")
    return {"unserialisable": repr(value)}


def _import_path(value: Any) -> Optional[str]:
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    try:
        found = _resolve(f"{module}:{qualname}")
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is value else None


#: Saved paths of callables whose module moved, old -> new (configs saved by releases before 0.8).
MOVED = {
    "cora_fx.observers:NormalObserver": "cora_fx.quant.observers:NormalObserver",
    "cora_fx.observers:MSEObserver": "cora_fx.quant.observers:MSEObserver",
}


def _resolve(path: str) -> Any:
    module, qualname = path.split(":", 1)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _trusted(path: str, trusted: tuple[str, ...]) -> bool:
    """Whether ``module:qualname`` names a module in ``trusted`` or one of their submodules."""
    module = path.split(":", 1)[0]
    return any(module == name or module.startswith(name + ".") for name in trusted)


def _decode(value: Any, where: str, trusted: tuple[str, ...]) -> Any:
    if not isinstance(value, Mapping) or where.endswith("layer_bits"):
        return value
    if "unserialisable" in value:
        raise ValueError(f"CoRaConfig.{where}: the saved config holds {value['unserialisable']}, which could not be "
                         f"saved; pass that setting again by hand")
    path = value.get("callable")
    if isinstance(path, str) and not _trusted(path, trusted):
        module = path.split(":", 1)[0]
        raise ValueError(f"CoRaConfig.{where}: the saved config names {path!r}; from_dict imports only from "
                         f"{list(TRUSTED_MODULES)} unless told: pass allowed_modules=[{module!r}] if you trust "
                         f"that module")
    try:
        return _resolve(MOVED.get(path, path))
    except (KeyError, ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"CoRaConfig.{where}: cannot import {value!r} ({err})") from None
