"""Property-based fuzzing: random small ConvNets through prepare -> set_ranks -> convert -> export.

Networks are stacks of blocks: plain / strided / dilated / grouped / depthwise convs (any padding
mode, bias on or off; nn.Conv2d, a subclass with its own forward, or a functional call on a registered
parameter), residual adds, two-branch concatenations, max / avg pooling, BatchNorm and
ReLU / ReLU6 / SiLU, ending in global pooling and a Linear head. On every example:

- conversion succeeds, or raises the documented CoRaError (none is expected for these nets);
- every Conv2d is rewritten (depthwise by policy) and the user's model is not mutated;
- Theorem 1: full-rank float adapters reproduce the float model (relative 1e-4);
- converted == prepared at heuristic ranks and exported == eager (relative 1e-5).

Example count: ``FUZZ_EXAMPLES`` (12 under the "ci" hypothesis profile so the default run stays
short; the profile's own count otherwise, e.g. ``HYPOTHESIS_PROFILE=thorough`` -> 500;
``CORA_FUZZ_EXAMPLES=n`` overrides both).
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cora_fx import CoRaConfig, CoRaError, convert_cora, prepare_cora, set_ranks
from cora_fx.graph.coverage import unreported_weights
from cora_fx.quant.modules import CoRaConv2d

pytestmark = pytest.mark.unit

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_EXAMPLES = int(os.environ.get("CORA_FUZZ_EXAMPLES",
                                   12 if PROFILE == "ci" else settings.get_profile(PROFILE).max_examples))
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}
EXACT = CoRaConfig().replace(adapter_bits=None, depthwise="residual", adapter_linear=True)


@st.composite
def conv_layer(draw: Any, cin: int, size: int, same: bool = False) -> tuple[nn.Conv2d, int]:
    """A Conv2d from ``cin`` channels; ``same`` keeps channels and spatial size (for residual adds)."""
    kind = draw(st.sampled_from(["plain", "plain", "grouped", "depthwise", "pointwise"]))
    groups = 1
    cout = cin if same else draw(st.integers(2, 12))
    if kind == "depthwise":
        groups, cout = cin, cin
    elif kind == "grouped":
        divisors = [g for g in (2, 3, 4) if cin % g == 0 and cout % g == 0]
        groups = draw(st.sampled_from(divisors)) if divisors else 1
    k = 1 if kind == "pointwise" else draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.sampled_from([1, 1, 2])) if k > 1 and size >= 8 else 1
    pad = dilation * (k - 1) // 2
    stride = 1 if same or size < 8 else draw(st.sampled_from([1, 1, 2]))
    mode = (draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])) if pad and pad < size
            else "zeros")
    styles = [nn.Conv2d, nn.Conv2d, OwnForwardConv] + ([FunctionalConv] if mode == "zeros" else [])
    style = draw(st.sampled_from(styles))
    conv = style(cin, cout, k, stride=stride, padding=pad, dilation=dilation, groups=groups,
                 bias=draw(st.booleans()), padding_mode=mode)
    return conv, (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


class OwnForwardConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (traced through to its F.conv2d call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class FunctionalConv(nn.Conv2d):
    """A module that calls F.conv2d on a registered parameter ``w`` (no ``weight`` of its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.w = nn.Parameter(self.weight.detach().clone())
        del self.weight

    def reset_parameters(self) -> None:
        if hasattr(self, "w"):
            nn.init.kaiming_uniform_(self.w, a=5 ** 0.5)
        if getattr(self, "bias", None) is not None:
            nn.init.uniform_(self.bias, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv_layers(net: nn.Module) -> set[str]:
    """The names cora_fx gives the convs of ``net``: a module's name, or ``<module>.w`` for a functional one."""
    return {f"{n}.w" if isinstance(m, FunctionalConv) else n for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d)}


class FuzzNet(nn.Module):
    """Runs ``blocks`` in order; a block is (kind, modules). The loop unrolls at trace time."""

    def __init__(self, blocks: list[tuple[str, nn.ModuleList]], channels: int, classes: int) -> None:
        super().__init__()
        self.kinds = [kind for kind, _ in blocks]
        self.blocks = nn.ModuleList([mods for _, mods in blocks])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, mods in zip(self.kinds, self.blocks):
            if kind == "residual":
                x = x + mods[1](mods[0](x))
            elif kind == "concat":
                x = torch.cat([mods[0](x), mods[1](x)], dim=1)
            else:
                x = mods[0](x)
        return self.head(x.mean(dim=(2, 3)))


@st.composite
def fuzz_net(draw: Any) -> tuple[FuzzNet, torch.Tensor]:
    size = input_size = draw(st.integers(8, 20))
    channels = draw(st.integers(1, 6))
    blocks: list[tuple[str, nn.ModuleList]] = []
    conv, size = draw(conv_layer(channels, size))
    blocks.append(("conv", nn.ModuleList([conv])))
    channels = conv.out_channels
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "residual", "concat", "pool", "bn", "act"]))
        if kind == "conv":
            conv, size = draw(conv_layer(channels, size))
            blocks.append((kind, nn.ModuleList([conv])))
            channels = conv.out_channels
        elif kind == "residual":
            conv, _ = draw(conv_layer(channels, size, same=True))
            act = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]()
            blocks.append((kind, nn.ModuleList([conv, act])))
        elif kind == "concat":
            left, size_left = draw(conv_layer(channels, size))
            right = nn.Conv2d(channels, draw(st.integers(1, 8)), 3, stride=left.stride, padding=1,
                              bias=draw(st.booleans()))
            if size_left != (size + 2 - 3) // left.stride[0] + 1:  # both branches must agree in size
                right = nn.Conv2d(channels, right.out_channels, 1, stride=left.stride, padding=0)
                if size_left != (size - 1) // left.stride[0] + 1:
                    continue
            blocks.append((kind, nn.ModuleList([left, right])))
            channels, size = left.out_channels + right.out_channels, size_left
        elif kind == "pool" and size >= 4:
            pool = nn.MaxPool2d(2) if draw(st.booleans()) else nn.AvgPool2d(2)
            blocks.append((kind, nn.ModuleList([pool])))
            size //= 2
        elif kind == "bn":
            bn = nn.BatchNorm2d(channels)
            with torch.no_grad():  # non-trivial running statistics, as in a trained net
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            blocks.append((kind, nn.ModuleList([bn])))
        elif kind == "act":
            blocks.append((kind, nn.ModuleList([ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]()])))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    net = FuzzNet(blocks, channels, draw(st.integers(2, 10))).eval()
    for m in net.modules():  # fresh random weights from the drawn seed (reproducible examples)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    in_channels = blocks[0][1][0].in_channels
    return net, torch.randn(2, in_channels, input_size, input_size)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max()) / (1.0 + float(ref.double().abs().max()))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(fuzz_net())
def test_random_convnets_convert_exactly_or_refuse_clearly(case):
    net, x = case
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convs = conv_layers(net)
    with torch.no_grad():
        reference = net(x)
    try:
        exact = prepare_cora(net, EXACT, example_inputs=(x,))
    except CoRaError:  # the documented refusal; none is expected for these nets
        raise AssertionError("a traceable ConvNet of supported layers was refused")
    rewritten = {n for n, m in exact.named_modules() if isinstance(m, CoRaConv2d)}
    assert rewritten == convs | {"head"} and not exact.meta["cora_fx"].skipped
    set_ranks(exact, "full")
    with torch.no_grad():
        assert rel_err(exact(x), reference) <= 1e-4
    prepared = prepare_cora(net, CoRaConfig().replace(budget=0.2))
    assert ({n for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d) and m.kind == "conv"}
            | set(prepared.meta["cora_fx"].skipped)) == convs
    assert not unreported_weights(prepared, net)
    set_ranks(prepared, "heuristic")
    converted = convert_cora(prepared)
    with torch.no_grad():
        eager = converted(x)
        assert rel_err(eager, prepared(x)) <= 1e-5
        assert rel_err(torch.export.export(converted, (x,)).module()(x), eager) <= 1e-5
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@st.composite
def conv1d_net(draw: Any) -> tuple[nn.Sequential, torch.Tensor]:
    """A random Conv1d stack over (N, C, L) with a Linear head (audio and time-series models)."""
    length = input_length = draw(st.integers(8, 32))
    channels = draw(st.integers(1, 6))
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.sampled_from([1, 3, 5]))
        cout = draw(st.integers(2, 10))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and cout % g == 0]))
        stride = draw(st.sampled_from([1, 2])) if length >= 8 else 1
        mode = draw(st.sampled_from(["zeros", "reflect"])) if k // 2 < length else "zeros"
        layers += [nn.Conv1d(channels, cout, k, stride=stride, padding=k // 2, groups=groups, padding_mode=mode,
                             bias=draw(st.booleans())), nn.ReLU()]
        channels, length = cout, (length + 2 * (k // 2) - k) // stride + 1
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * length, 3)).eval()
    return net, torch.randn(2, layers[0].in_channels, input_length)


@settings(max_examples=max(FUZZ_EXAMPLES // 2, 4), deadline=None)
@given(conv1d_net())
def test_random_conv1d_stacks_are_quantized_exactly_and_convert(case):
    net, x = case
    with torch.no_grad():
        reference = net(x)
    exact = prepare_cora(net, EXACT, example_inputs=(x,))
    assert {m.kind for m in exact.modules() if isinstance(m, CoRaConv2d)} == {"conv1d", "linear"}
    assert not exact.meta["cora_fx"].skipped and not unreported_weights(exact, net)
    set_ranks(exact, "full")
    with torch.no_grad():
        assert rel_err(exact(x), reference) <= 1e-4
    prepared = prepare_cora(net, CoRaConfig().replace(budget=0.2), example_inputs=(x,))
    set_ranks(prepared, "heuristic")
    converted = convert_cora(prepared)
    with torch.no_grad():
        assert rel_err(converted(x), prepared(x)) <= 1e-5
