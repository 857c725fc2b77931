"""Per-layer report and the budget / equivalent bit-width accounting (docs/method.md section 3)."""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from torch import nn

from cora_fx.quant.modules import CONV_KINDS, LINEAR, CoRaConv2d
from cora_fx.state import CONVERTED, CoRaState, get_state


@dataclass(frozen=True)
class LayerInfo:
    """One quantized layer: ``bits`` of the main weight, ``max_rank`` R, chosen ``rank``.

    ``kind`` is ``"conv"`` (Conv2d), ``"conv1d"`` or ``"linear"`` (both run as a Conv2d, docs/method.md s.12;
    ``weight_shape`` is that conv's); ``policy`` is the adapter policy (``search``, ``fixed`` for depthwise
    residuals, ``off``).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    bits: int
    max_rank: int
    rank: int
    adapter_params: int
    policy: str

    @property
    def params(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n


def layer_infos(prepared: fx.GraphModule) -> list[LayerInfo]:
    """Records of every quantized layer of a prepared model, in module order."""
    out = []
    for name, m in prepared.named_modules():
        if isinstance(m, CoRaConv2d):
            a = m.adapter
            out.append(LayerInfo(name, m.kind, tuple(m.quantized.weight.shape), m.quantized.bits, a.max_rank,
                                 int(a.hard_rank), a.parameter_count(), a.policy))
    return out


@dataclass(frozen=True)
class Accounting:
    conv_params: int
    adapter_params: int
    budget: float
    equivalent_bits: float
    linear_params: int = 0
    linear_equivalent_bits: float = 0.0


def is_conv(kind: str) -> bool:
    """Whether a `LayerInfo.kind` counts in the conv accounting (Conv2d and Conv1d)."""
    return kind in CONV_KINDS


def accounting(layers: list[LayerInfo], state: CoRaState) -> Accounting:
    """Budget b = adapter params / conv params; equivalent bits = weight bits per conv param.

    Equivalent bits = (n * quantized conv params + adapter_bits * conv adapter params + float conv bits)
    / conv params, which is n + m*b when every conv is quantized (docs/method.md section 3). Every conv weight
    of the model is counted: one left float (leaves, depthwise='float', unsupported) at the bits it is stored
    in (32, or 16 for half types), so the figure never claims fewer bits than the file holds. Linear layers
    get the same figure of their own (``linear_equivalent_bits``); the budget b counts every adapter,
    Linear ones included (they are searched under the same budget).
    """
    cfg = state.config
    adapter_bits = 32 if cfg.adapter.bits is None else cfg.adapter.bits
    adapter_params = sum(layer.adapter_params for layer in layers)

    def bits_per_param(group: list[LayerInfo], total: int, float_bits: int) -> float:
        bits = sum(layer.bits * layer.params + adapter_bits * layer.adapter_params for layer in group) + float_bits
        return bits / max(total, 1)

    convs = [layer for layer in layers if is_conv(layer.kind)]
    linears = [layer for layer in layers if layer.kind == LINEAR]
    return Accounting(state.conv_params, adapter_params, adapter_params / max(state.conv_params, 1),
                      bits_per_param(convs, state.conv_params, state.float_conv_bits), state.linear_params,
                      bits_per_param(linears, state.linear_params, state.float_linear_bits))


@dataclass
class CoRaSummary:
    """What `summary` reports: ``layers`` plus totals; ``str()`` is a table.

    ``budget`` is the achieved adapter fraction, ``target_budget`` the config's b,
    ``nbytes`` the size of the serialized state dict, ``config`` the `CoRaConfig.to_dict` of the
    config that made the model (``CoRaConfig.from_dict(report.config)`` rebuilds it), ``capture`` how
    the model was captured (``"symbolic"`` or ``"export"``), ``concrete_args`` the forward arguments
    fixed then, ``rounding_notes`` the layers whose calibrated rounding took a fallback (e.g. a
    block-diagonal second moment above ``rounding.max_block``).
    """

    layers: list[LayerInfo]
    conv_params: int
    adapter_params: int
    budget: float
    equivalent_bits: float
    nbytes: int
    skipped: dict[str, str] = field(default_factory=dict)
    linear_params: int = 0
    linear_equivalent_bits: float = 0.0
    stage: str = "prepared"
    target_budget: float = 0.05
    config: dict = field(default_factory=dict)
    capture: str = "symbolic"
    concrete_args: dict = field(default_factory=dict)
    rounding_notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def config_lines(self) -> list[str]:
        """The recorded `CoRaConfig`, one line per group (``CoRaConfig.to_dict`` form)."""
        groups = [(k, v) for k, v in self.config.items() if isinstance(v, dict)]
        version = self.config.get("version", "-")
        return [f"config (version {version}):"] + [
            f"  {name}: " + ", ".join(f"{k}={v!r}" for k, v in fields.items()) for name, fields in groups]

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        head = (f"{'layer':<{width}}  {'kind':<6} {'weight shape':<18} {'bits':>4} {'R':>5} {'rank':>5} "
                f"{'adapter params':>14}  policy")
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            shape = "x".join(map(str, layer.weight_shape))
            rows.append(f"{layer.name:<{width}}  {layer.kind:<6} {shape:<18} {layer.bits:>4} {layer.max_rank:>5} "
                        f"{layer.rank:>5} "
                        f"{layer.adapter_params:>14,}  {layer.policy}")
        for name, why in self.skipped.items():
            rows.append(f"{name:<{width}}  skipped: {why}")
        for name, note in self.rounding_notes.items():
            rows.append(f"{name:<{width}}  rounding: {note}")
        rows += [
            "-" * len(head),
            f"conv params {self.conv_params:,} | adapter params {self.adapter_params:,} | budget {self.budget:.4f}"
            f" | equivalent bits {self.equivalent_bits:.3f} | serialized {self.nbytes:,} bytes ({self.stage})",
        ]
        if self.linear_params:
            rows.append(f"linear params {self.linear_params:,} | linear equivalent bits "
                        f"{self.linear_equivalent_bits:.3f}")
        fixed = ", ".join(f"{k}={v!r}" for k, v in self.concrete_args.items())
        rows.append(f"captured by {'torch.export' if self.capture == 'export' else 'symbolic tracing'}"
                    + (f" with {fixed}" if fixed else ""))
        if self.config:
            rows += self.config_lines()
        return "\n".join(rows)


def serialized_nbytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def summary(model: fx.GraphModule) -> CoRaSummary:
    """Per-layer and total report of a prepared or converted model, with the config that made it."""
    state = get_state(model)
    layers = state.layers if state.stage == CONVERTED else layer_infos(model)
    acc = accounting(layers, state)
    return CoRaSummary(layers, acc.conv_params, acc.adapter_params, acc.budget, acc.equivalent_bits,
                       serialized_nbytes(model), dict(state.skipped), acc.linear_params, acc.linear_equivalent_bits,
                       state.stage, state.config.search.budget,
                       state.config.to_dict(strict=False), state.capture, _json_values(state.concrete_args),
                       dict(state.rounding_notes))


def _json_values(values: dict) -> dict:
    """Plain JSON values kept as they are, anything else as its repr."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in values.items()}
