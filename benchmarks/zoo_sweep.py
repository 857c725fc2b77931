"""Model-zoo sweep: every torchvision ConvNet through prepare -> set_ranks -> convert -> export.

For each model (random weights, small input) it checks, and reports as one table row:

- coverage: every nn.Conv2d is rewritten into a CoRa branch or listed in ``meta.skipped``
  with a reason (policy), and nothing else;
- exactness (Theorem 1): full-rank float adapters (``adapter_bits=None``, ``depthwise="residual"``,
  float Linear layers) reproduce the float model;
- conversion: ``convert_cora`` output equals the prepared model at the same heuristic ranks
  (default config: 4-bit weights, 8-bit adapters, depthwise skipped, Linear quantized);
- export: ``torch.export.export(converted)`` agrees with eager;
- the user's model is not mutated (every parameter and buffer compared).

Errors are relative: max|out - ref| / max|ref| (random-weight deep nets have tiny or huge outputs:
efficientnet_b0 at 32 px gives logits ~1e-19, so any absolute term would make the check vacuous).

Status ``pass``: all checks within tolerance; ``refused``: prepare_cora raised a CoRaError
(a clear refusal, e.g. untraceable code, naming the module); ``FAIL``: anything else.

Run the full table:  ``python -m benchmarks.zoo_sweep`` (``--fast`` for one model
per family, ``--models a,b`` for a selection). ``--coverage`` runs only the weight audit (`coverage_row`):
every weight of every model quantized or listed in ``skipped``, with the layer kinds and the float weights' share.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torchvision
from torch import nn
from torch.utils._pytree import tree_leaves

from cora_fx import CoRaConfig, CoRaError, convert_cora, prepare_cora, set_ranks, summary
from cora_fx.graph.coverage import unreported_weights
from cora_fx.quant.modules import CoRaConv2d

#: Tolerances on the relative error max|out - ref| / max|ref|.
#: Full rank: [W]_n + U S V^T is rebuilt in float32 (per weight ~1e-7 relative) and the two-conv
#: form sums in another order than one conv; over ~100 layers that compounds to ~1e-6..1e-5.
FULL_RANK_TOL = 1e-4
#: Converted vs prepared and exported vs eager run the same float32 weights: rounding only.
CONVERT_TOL = 1e-5
EXPORT_TOL = 1e-5
#: Models above this many parameters are not run by default (RAM/time on a 2-core CPU).
MAX_PARAMS = 150_000_000

CLASSES = 10


@dataclass(frozen=True)
class ZooModel:
    """One sweep entry: ``family``, a builder (random weights) and the input side in pixels."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    size: int = 32


def _size(name: str) -> int:
    """Input side in pixels: 32, unless the architecture needs another."""
    return {"inception_v3": 75, "maxvit_t": 224, "alexnet": 64, "vit_h_14": 28}.get(name, 32)


def _classifier(name: str) -> Callable[[], nn.Module]:
    kwargs: dict[str, Any] = {"weights": None, "num_classes": CLASSES}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    if name.startswith("vit_"):
        kwargs.update(image_size=_size(name))  # a multiple of the patch size (14 for vit_h_14)
    if name == "maxvit_t":
        kwargs.update(input_size=(224, 224))  # partition size 7 needs side/32 divisible by 7
    return lambda: torchvision.models.get_model(name, **kwargs)


def _segmentation(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5,
                                                aux_loss=False)


def _fpn_backbone(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
        if arch.startswith("resnet"):
            return resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=5)
        return mobilenet_backbone(backbone_name=arch, weights=None, fpn=True, trainable_layers=6)
    return build


FAMILIES = {
    "resnet": "resnet", "resnext": "resnext", "wide_resnet": "wide_resnet", "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3", "efficientnet_v2": "efficientnet_v2", "efficientnet": "efficientnet",
    "regnet": "regnet", "densenet": "densenet", "googlenet": "googlenet", "inception": "inception",
    "shufflenet": "shufflenet_v2", "squeezenet": "squeezenet", "vgg": "vgg", "mnasnet": "mnasnet",
    "convnext": "convnext", "alexnet": "alexnet", "swin": "swin", "vit": "vit", "maxvit": "maxvit",
}


def _family(name: str) -> str:
    for prefix, family in FAMILIES.items():
        if name.startswith(prefix):
            return family
    return name


def zoo() -> dict[str, ZooModel]:
    """Every torchvision classification model (all have Conv2d layers) + segmentation + FPN backbones."""
    models: dict[str, ZooModel] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        models[name] = ZooModel(name, _family(name), _classifier(name), _size(name))
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        models[name] = ZooModel(name, "segmentation", _segmentation(name), 64)
    for arch in ("resnet18", "resnet50", "mobilenet_v3_large"):
        models[f"fpn_backbone_{arch}"] = ZooModel(f"fpn_backbone_{arch}", "detection_backbone", _fpn_backbone(arch), 64)
    return models


#: One model per family of the issue (resnet/resnext/wide_resnet, mobilenet, efficientnet, regnet,
#: densenet, googlenet, inception, shufflenet, squeezenet, vgg, mnasnet, convnext, segmentation,
#: detection backbone): the fast CI subset of tests/test_zoo.py. The cheapest member is taken;
#: regnet_x_400mf brings grouped convs, mobilenet_v3_small depthwise + squeeze-excitation.
FAST = (
    "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "densenet121", "googlenet",
    "inception_v3", "shufflenet_v2_x0_5", "squeezenet1_1", "vgg11", "mnasnet0_5", "convnext_tiny",
    "lraspp_mobilenet_v3_large", "fpn_backbone_resnet18",
)


@dataclass
class ZooRow:
    """One model's sweep result (errors relative, see module docstring)."""

    model: str
    family: str
    params: int = 0
    convs: int = 0
    rewritten: int = 0
    skipped: int = 0
    full_rank_err: Optional[float] = None
    convert_err: Optional[float] = None
    export_err: Optional[float] = None
    seconds: float = 0.0
    status: str = "FAIL"
    reason: str = ""


def rel_err(out: Any, ref: Any) -> float:
    """max|out - ref| / max|ref| over every tensor of (possibly nested) outputs."""
    outs, refs = tree_leaves(out), tree_leaves(ref)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return float("inf")
        o, r = o.detach().double(), r.detach().double()
        scale = float(r.abs().max())
        worst = max(worst, float((o - r).abs().max()) / (scale if scale > 0 else 1.0))
    return worst


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:220]


def sweep_model(entry: ZooModel, seed: int = 0) -> ZooRow:
    """Run all checks on one model; never raises (the row carries the status and reason)."""
    row = ZooRow(entry.name, entry.family)
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's init/deprecation notes
            model = entry.build().eval()
        row.params = sum(p.numel() for p in model.parameters())
        if row.params > MAX_PARAMS:
            row.status, row.reason = ("not run",
                                      f"{row.params / 1e6:.0f}M parameters > sweep cap {MAX_PARAMS / 1e6:.0f}M")
            return row
        _check(model, entry, row)
    except Exception as err:  # the row records it; the test asserts on status
        row.reason = row.reason or _short(err)
    finally:
        row.seconds = time.perf_counter() - start
    return row


def _check(model: nn.Module, entry: ZooModel, row: ZooRow) -> None:
    x = torch.randn(2, 3, entry.size, entry.size)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    row.convs = len(convs)
    before = _snapshot(model)
    with torch.no_grad():
        reference = model(x)

    # 1) exactness: full-rank float adapters, depthwise residual kept, Linear float
    exact_cfg = CoRaConfig().replace(adapter_bits=None, depthwise="residual", quantize_linear=False)
    try:
        prepared = prepare_cora(model, exact_cfg)
    except CoRaError as err:
        row.status, row.reason = "refused", _short(err)
        return
    set_ranks(prepared, "full")
    with torch.no_grad():
        row.full_rank_err = rel_err(prepared(x), reference)
    del prepared

    # 2) coverage + convert vs prepared at heuristic ranks, default config
    prepared = prepare_cora(model, CoRaConfig())
    rewritten = {n for n, m in prepared.named_modules() if isinstance(m, CoRaConv2d) and n in convs}
    skipped = prepared.meta["cora_fx"].skipped
    unreported = unreported_weights(prepared, model)
    row.rewritten, row.skipped = len(rewritten), len(set(skipped) & convs)
    set_ranks(prepared, "heuristic")
    converted = convert_cora(prepared)
    with torch.no_grad():
        expected = prepared(x)
        eager = converted(x)
    row.convert_err = rel_err(eager, expected)

    # 3) export vs eager
    exported = torch.export.export(converted, (x,))
    with torch.no_grad():
        row.export_err = rel_err(exported.module()(x), eager)

    problems = []
    if rewritten | (set(skipped) & convs) != convs or rewritten & set(skipped):
        problems.append(f"coverage: {len(convs - rewritten - set(skipped))} Conv2d neither rewritten nor skipped")
    if unreported:
        problems.append(f"weights neither quantized nor reported: {', '.join(unreported[:4])}")
    if not row.full_rank_err <= FULL_RANK_TOL:
        problems.append(f"full-rank error {row.full_rank_err:.2e} > {FULL_RANK_TOL}")
    if not row.convert_err <= CONVERT_TOL:
        problems.append(f"convert error {row.convert_err:.2e} > {CONVERT_TOL}")
    if not row.export_err <= EXPORT_TOL:
        problems.append(f"export error {row.export_err:.2e} > {EXPORT_TOL}")
    if not _unchanged(before, model):
        problems.append("the input model was mutated")
    row.status = "FAIL" if problems else "pass"
    reasons = sorted(set(skipped.values()))
    row.reason = "; ".join(problems) if problems else (f"skipped: {'; '.join(reasons)}" if reasons else "")


COVERAGE_HEADER = ("| model | params (M) | quantized conv / conv1d / linear | reported float | float weights (M) "
                   "| unreported | seconds |\n|" + "---|" * 7)


def coverage_row(entry: ZooModel) -> tuple[str, bool]:
    """One model through `prepare_cora` with the default config: what was quantized, what is reported float,
    and the weights neither (must be none). Returns the markdown row and whether it holds."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = entry.build().eval()
        params = sum(p.numel() for p in model.parameters())
        if params > MAX_PARAMS:
            return f"| {entry.name} | {params / 1e6:.1f} | not run (above the cap) | | | | |", True
        prepared = prepare_cora(model, CoRaConfig(), progress=False)
    report = summary(prepared)
    kinds = [sum(layer.kind == k for layer in report.layers) for k in ("conv", "conv1d", "linear")]
    state = prepared.meta["cora_fx"]
    float_params = sum(p.numel() for n, p in model.named_parameters()
                       if any(n == k or n.startswith(k + ".") for k in report.skipped))
    missing = unreported_weights(prepared, model)
    return (f"| {entry.name} | {params / 1e6:.1f} | {' / '.join(map(str, kinds))} | {len(report.skipped)} "
            f"{'(' + '; '.join(sorted(set(report.skipped.values())))[:80] + ')' if report.skipped else ''} | "
            f"{float_params / 1e6:.2f} | {', '.join(missing[:3]) or 0} | {time.perf_counter() - start:.1f} |",
            not missing and state is not None)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


HEADER = ("| model | family | params (M) | Conv2d | rewritten | skipped | full-rank err | convert err "
          "| export err | seconds | status | reason |\n|" + "---|" * 12)


def markdown_row(r: ZooRow) -> str:
    return (f"| {r.model} | {r.family} | {r.params / 1e6:.1f} | {r.convs} | {r.rewritten} | {r.skipped} | "
            f"{_fmt(r.full_rank_err)} | {_fmt(r.convert_err)} | {_fmt(r.export_err)} | {r.seconds:.1f} | "
            f"{r.status} | {r.reason.replace('|', '/')} |")


def totals(rows: list[ZooRow]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "refused", "FAIL", "not run")}
    return f"{len(rows)} models: " + ", ".join(f"{v} {k}" for k, v in counts.items())


def markdown(rows: list[ZooRow]) -> str:
    return "\n".join([HEADER] + [markdown_row(r) for r in rows] + ["", totals(rows)])


#: Run last by the script (slowest: largest convs / parameter counts).
LARGE = ("vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2", "regnet_x_32gf", "regnet_y_32gf",
         "convnext_large", "vit_l_16", "vit_l_32", "vit_h_14", "regnet_y_128gf")


def sweep_order(entries: dict[str, ZooModel]) -> list[str]:
    """The fast subset first, then the rest, the largest models last."""
    rest = [n for n in entries if n not in FAST and n not in LARGE]
    return list(FAST) + rest + [n for n in LARGE if n in entries]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one model per family (the CI subset)")
    parser.add_argument("--models", default="", help="comma-separated model names")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--coverage", action="store_true", help="only the weight audit of every model (fast)")
    args = parser.parse_args(argv)
    entries = zoo()
    names = args.models.split(",") if args.models else (list(FAST) if args.fast else sweep_order(entries))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.coverage:
        print(COVERAGE_HEADER, flush=True)
        holds = []
        for name in names:
            row, ok = coverage_row(entries[name])
            print(row, flush=True)
            holds.append(ok)
        print(f"\n{len(names)} models: {sum(holds)} with every weight quantized or reported")
        return 0 if all(holds) else 1
    rows = []
    print(HEADER, flush=True)
    for name in names:  # rows are printed as they finish, so an interrupted run still has a table
        row = sweep_model(entries[name])
        print(markdown_row(row), flush=True)
        rows.append(row)
    print("\n" + totals(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
