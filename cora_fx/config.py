"""`CoRaConfig`: one validated dataclass for the whole CoRa workflow.

The defaults are the paper's settings (METHOD.md sections 1 and 3): 4-bit per-tensor
weights with normal clipping (k = 4), 8-bit min-max adapters, budget 5 %, NBK order 4,
penalty 1, Adam lr 0.01, 250 iterations, gradient clip 0.2, initial normalized rank 0.9,
cross-entropy loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

GRANULARITIES = ("per_tensor", "per_channel")
CLIPPINGS = ("normal", "minmax", "mse")
LOSSES = ("ce", "kl")
DEPTHWISE_POLICIES = ("skip", "residual", "float", "int8")
ROUNDINGS = ("nearest", "gptq")
SVDS = ("weight", "activation")
ROUNDING_INPUTS = ("float", "quantized")
ADAPTER_FORMS = ("parallel", "folded")

#: Fields that only steer the rank search; `search_ranks(..., **overrides)` may change them.
SEARCH_FIELDS = frozenset(
    {"budget", "nbk_order", "penalty", "lr", "iterations", "grad_clip", "init_rank", "loss", "seed", "bn_correction",
     "finetune_iterations", "finetune_lr"}
)

LossFn = Callable[..., Any]


@dataclass(frozen=True)
class CoRaConfig:
    """Settings of one CoRa run; every field is checked in `__post_init__`.

    Attributes:
        bits: weight bit-width n of the main convs (and of Linear layers), 2..8.
        adapter_bits: bit-width of the adapters A and B (min-max, METHOD.md s.1);
            ``None`` keeps them in float.
        granularity: ``"per_tensor"`` (paper) or ``"per_channel"`` (per output channel).
        clipping: ``"normal"`` (mu +- k*sigma, paper), ``"minmax"``, ``"mse"`` (the range that
            minimizes the squared rounding error, an extension), or any torch.ao
            observer class / ``with_args`` factory; it is built with ``dtype=torch.int8``
            and the n-bit ``quant_min``/``quant_max``.
        k: width of the normal clipping range in standard deviations.
        budget: target adapter parameters as a fraction b of the conv parameters, in (0, 1].
        nbk_order: order k of the normalized Butterworth kernel (METHOD.md s.3).
        penalty: lambda of the budget term lambda * exp(ReLU(running_budget - b)).
        lr: Adam learning rate on the normalized ranks r_l / R_l.
        iterations: maximum number of search steps.
        grad_clip: each rank gradient is clipped to [-grad_clip, grad_clip].
        init_rank: initial normalized rank (also the rank right after `prepare_cora`).
        loss: ``"ce"`` (labels), ``"kl"`` (distil the float model's soft outputs) or a
            callable ``loss(output, float_output, labels) -> scalar``.
        quantize_linear: weight-quantize nn.Linear layers at ``bits`` (no adapter).
        seed: seed of the search's random state.
        depthwise: policy for convs whose residual has rank 1 per group (depthwise):
            ``"skip"`` quantizes them with no adapter (reference code), ``"residual"``
            keeps the whole residual as a fixed rank-1 adapter at ``adapter_bits``
            (counted in the budget), ``"float"`` leaves them in float (counted as 32 bits),
            ``"int8"`` quantizes them at 8 bits per channel, min-max (counted as 8 bits).
        rounding: ``"nearest"`` (paper) or ``"gptq"``: output-error-compensating rounding of
            the main weights from calibration data (rounding.py), done by `search_ranks`.
        svd: ``"weight"`` (paper: best rank-r approximation of dW) or ``"activation"``:
            adapters that minimize the conv's output error on calibration data.
        rounding_batches: calibration batches used to estimate the inputs' second moments
            for ``rounding="gptq"`` / ``svd="activation"``.
        rounding_inputs: whose inputs those moments describe: ``"float"`` (the float model's,
            one pass) or ``"quantized"`` (a second pass over the model already rounded once,
            with heuristic-rank adapters, so each layer sees the inputs it will see deployed).
        bn_correction: after the search, correct the BatchNorm statistics on this many
            calibration batches (`correct_batchnorm`); 0 (paper) leaves them alone.
        finetune_iterations: after the search, train A_r, B_r (fake-quantized) and per-channel
            scale factors for this many Adam steps on the task loss (`finetune`, an extension;
            0, the paper, skips it). Ranks, codes and bits are unchanged.
        finetune_lr: Adam learning rate of that fine-tuning.
        adapter_form: how `convert_cora` lowers an adapter: ``"parallel"`` (paper, METHOD.md
            s.2: conv(x, [W]_n) + conv(conv(x, A), B)) or ``"folded"`` (s.4: one conv whose
            weight dequant([W]_n) + fold(B o A) is computed from the stored codes in the
            graph; same artifact bytes, the float model's conv FLOPs, and constant-folded
            away by ``torch.compile`` with inductor freezing).
        layer_bits: per-layer overrides of the main weight's bit-width, ``{qualified name of a
            Conv2d or Linear: bits}`` (mixed precision, an extension; `allocate_bits` chooses
            one for a target equivalent bit-width). A named depthwise conv takes these bits
            instead of its policy's (8 with ``depthwise="int8"``); unknown names raise in
            `prepare_cora`. Empty (the paper): every layer at ``bits``.
    """

    bits: int = 4
    adapter_bits: Optional[int] = 8
    granularity: str = "per_tensor"
    clipping: Union[str, Callable[..., Any]] = "normal"
    k: float = 4.0
    budget: float = 0.05
    nbk_order: float = 4.0
    penalty: float = 1.0
    lr: float = 0.01
    iterations: int = 250
    grad_clip: float = 0.2
    init_rank: float = 0.9
    loss: Union[str, LossFn] = "ce"
    quantize_linear: bool = True
    seed: int = 0
    depthwise: str = "skip"
    bn_correction: int = 0
    rounding: str = "nearest"
    svd: str = "weight"
    rounding_batches: int = 8
    rounding_inputs: str = "float"
    finetune_iterations: int = 0
    finetune_lr: float = 1e-3
    adapter_form: str = "parallel"
    layer_bits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"CoRaConfig.{field}={getattr(self, field)!r}: {why}")

        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise bad("bits", "must be an integer in 2..8")
        if self.adapter_bits is not None and (
            not _is_int(self.adapter_bits) or not 2 <= self.adapter_bits <= 8
        ):
            raise bad("adapter_bits", "must be an integer in 2..8 or None (float adapters)")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"must be one of {GRANULARITIES}")
        if isinstance(self.clipping, str):
            if self.clipping not in CLIPPINGS:
                raise bad("clipping", f"must be one of {CLIPPINGS} or a torch.ao observer class/factory")
        elif not callable(self.clipping):
            raise bad("clipping", "must be a string or a torch.ao observer class/factory")
        if not _is_number(self.k) or self.k <= 0:
            raise bad("k", "must be a positive number")
        if not _is_number(self.budget) or not 0 < self.budget <= 1:
            raise bad("budget", "must be in (0, 1]")
        if not _is_number(self.nbk_order) or self.nbk_order <= 0:
            raise bad("nbk_order", "must be a positive number")
        if not _is_number(self.penalty) or self.penalty < 0:
            raise bad("penalty", "must be >= 0")
        if not _is_number(self.lr) or self.lr <= 0:
            raise bad("lr", "must be > 0")
        if not _is_int(self.iterations) or self.iterations < 0:
            raise bad("iterations", "must be an integer >= 0")
        if not _is_number(self.grad_clip) or self.grad_clip <= 0:
            raise bad("grad_clip", "must be > 0")
        if not _is_number(self.init_rank) or not 0 < self.init_rank <= 1:
            raise bad("init_rank", "must be in (0, 1]")
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise bad("loss", f"must be one of {LOSSES} or a callable loss(output, float_output, labels)")
        elif not callable(self.loss):
            raise bad("loss", "must be a string or a callable")
        if not isinstance(self.quantize_linear, bool):
            raise bad("quantize_linear", "must be a bool")
        if not _is_int(self.seed):
            raise bad("seed", "must be an integer")
        if not _is_int(self.bn_correction) or self.bn_correction < 0:
            raise bad("bn_correction", "must be an integer >= 0 (number of calibration batches)")
        if self.rounding not in ROUNDINGS:
            raise bad("rounding", f"must be one of {ROUNDINGS}")
        if self.svd not in SVDS:
            raise bad("svd", f"must be one of {SVDS}")
        if self.rounding_inputs not in ROUNDING_INPUTS:
            raise bad("rounding_inputs", f"must be one of {ROUNDING_INPUTS}")
        if not _is_int(self.finetune_iterations) or self.finetune_iterations < 0:
            raise bad("finetune_iterations", "must be an integer >= 0")
        if not _is_number(self.finetune_lr) or self.finetune_lr <= 0:
            raise bad("finetune_lr", "must be > 0")
        if self.adapter_form not in ADAPTER_FORMS:
            raise bad("adapter_form", f"must be one of {ADAPTER_FORMS}")
        if not _is_int(self.rounding_batches) or self.rounding_batches < 1:
            raise bad("rounding_batches", "must be an integer >= 1")
        if self.depthwise not in DEPTHWISE_POLICIES:
            raise bad("depthwise", f"must be one of {DEPTHWISE_POLICIES}")
        if not isinstance(self.layer_bits, Mapping):
            raise bad("layer_bits", "must be a dict {layer name: bits}")
        for name, bits in self.layer_bits.items():
            if not isinstance(name, str) or not _is_int(bits) or not 2 <= bits <= 8:
                raise bad("layer_bits", f"entry {name!r}: {bits!r} must map a layer name (str) to an integer in 2..8")
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))  # a private copy: the config stays frozen

    def __hash__(self) -> int:  # frozen and hashable although layer_bits is a dict
        return hash(tuple(sorted(self.layer_bits.items())) if f.name == "layer_bits" else getattr(self, f.name)
                    for f in dataclasses.fields(self))

    def bits_for(self, name: str, default: Optional[int] = None) -> int:
        """The main-weight bit-width of layer ``name``: its `layer_bits` entry, else ``default`` or `bits`."""
        return self.layer_bits.get(name, self.bits if default is None else default)

    @classmethod
    def recommended(cls, bits: int = 4, **changes: Any) -> "CoRaConfig":
        """The configuration that measured best in benchmarks/RESULTS.md (MobileNetV2, ImageNet).

        Per-channel MSE-optimal ranges (searched, against min-max: 74.86 vs 72.71 top-1 at W3,
        79.43 vs 79.29 and +2.6 points of tiny64 agreement at W4), depthwise convs at 8 bits,
        GPTQ base rounding whose residual the adapters reclaim (the paper's future work),
        output-aware adapters, label-free KL search; the adapter budget keeps MobileNetV2 at or
        below ``bits + 0.5`` equivalent bits with its depthwise convs counted at 8 bits;
        adapters lowered in the folded form (one conv per layer: the float model's compiled
        latency). No BatchNorm correction (after GPTQ it measured neutral at W4 and harmful at
        W3) and no `finetune` after the search (it measured +0.6 top-1 at W3, within the noise,
        and cost 8.5 points of tiny64 agreement at W4; RESULTS.md). ``CoRaConfig()`` remains
        the paper's settings.
        """
        budget = {2: 0.03, 3: 0.044, 4: 0.045}.get(bits, 0.05)
        base = cls(bits=bits, budget=budget, granularity="per_channel", clipping="mse", depthwise="int8",
                   rounding="gptq", svd="activation", loss="kl", rounding_batches=8, adapter_form="folded")
        return base.replace(**changes) if changes else base

    def replace(self, **changes: Any) -> "CoRaConfig":
        """A validated copy with ``changes`` applied (unknown names raise ValueError)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"CoRaConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    @property
    def needs_rounding_data(self) -> bool:
        """True when the base rounding or the residual factors depend on calibration data."""
        return self.rounding != "nearest" or self.svd != "weight"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
