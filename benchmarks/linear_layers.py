"""What GPTQ rounding and adapters buy on Linear layers, side by side in one run.

    python -m benchmarks.linear_layers                      # MobileNetV2 (classifier: 1.28 M of 3.5 M weights)
    python -m benchmarks.linear_layers --models ppocr-rec   # the gallery's OCR recognizer (SVTR neck, CTC head)

Three rows per model, all ``CoRaConfig.recommended(4)`` with the same calibration data:

- ``linear rtn``: every Linear layer rounded to nearest (what cora_fx did before Linear layers became 1x1 convs),
  the convs rounded by GPTQ as usual;
- ``linear gptq``: the Linear layers rounded by GPTQ too (the default);
- ``linear gptq + adapters``: ``adapter.linear=True``, Linear adapters searched under the same budget.

MobileNetV2 is scored on the shared split (top-1 on the 700 evaluation images; agreement with float and KL on the
10,000 tiny64 images, paired image by image against the ``linear rtn`` row); a gallery model with its own metric
and agreement with float. Results go to ``benchmarks/results/linear_layers.json`` (RESULTS.md: report.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import batches, data_paths, load_split, mobilenet_v2, normalize, uniform
from benchmarks.frontier import outputs, samples, scores, versus
from cora_fx import calibrate_rounding, convert_cora, prepare_cora, search_ranks, summary
from cora_fx.quant.residual import ResidualFactors

RESULTS = Path(__file__).resolve().parent / "results" / "linear_layers.json"
ROWS = ("linear rtn", "linear gptq", "linear gptq + adapters")


def round_linears_to_nearest(prepared: torch.fx.GraphModule, nearest: dict) -> None:
    """Put back the round-to-nearest codes ``nearest`` (layer -> QuantizedWeight) of the Linear layers after
    `calibrate_rounding`, with their residual factors: the ``linear rtn`` row."""
    for name, qw in nearest.items():
        layer = prepared.get_submodule(name)
        factors = layer.adapter.factors
        weight = layer.quantized.weight + factors.folded_delta(torch.ones_like(factors.S[0]))
        layer.quantized.set_quantized(qw)
        layer.adapter.set_factors(ResidualFactors((weight - qw.dequantize()).float(), layer.quantized.spec.groups))


def quantize(model: torch.nn.Module, row: str, calib: list, example: tuple, loss: str = "kl",
             loss_dim: int = 1, leaf_modules: list | None = None) -> tuple[torch.fx.GraphModule, dict]:
    config = uniform(4, loss=loss, loss_dim=loss_dim).replace(adapter_linear=row.endswith("adapters"))
    start = time.perf_counter()
    prepared = prepare_cora(model, config, example_inputs=example, leaf_modules=leaf_modules or ())
    linears = {n: m for n, m in prepared.named_modules() if getattr(m, "kind", None) == "linear"}
    nearest = {n: m.quantized.quantized_weight() for n, m in linears.items()}
    calibrate_rounding(prepared, calib)
    if row == "linear rtn":
        round_linears_to_nearest(prepared, nearest)
    search_ranks(prepared, calib)
    converted = convert_cora(prepared)
    report = summary(converted)
    info = {"seconds": round(time.perf_counter() - start, 1), "equivalent_bits": report.equivalent_bits,
            "linear_equivalent_bits": report.linear_equivalent_bits, "linear_params": report.linear_params,
            "linear_ranks": {layer.name: layer.rank for layer in report.layers if layer.kind == "linear"},
            "adapter_params": report.adapter_params}
    return converted, info


def run_mobilenet(args) -> dict:
    labels_csv, tiny_csv = data_paths(args.data)
    model = mobilenet_v2(labels_csv)
    calib = batches(*load_split(labels_csv, "calib"), 32)
    eval_images, eval_labels = load_split(labels_csv, "eval")
    tiny = load_split(tiny_csv, None, image_size=64, resize=64, limit=args.tiny_limit)[0]
    float_tiny = outputs(model, tiny)
    rows, per_image = {"float": scores(samples(model, eval_images, eval_labels, tiny, float_tiny), eval_labels)}, {}
    for row in args.rows:
        print(f"== mobilenet_v2: {row}", flush=True)
        converted, info = quantize(model, row, calib, (normalize(eval_images[:2]),))
        per_image[row] = samples(converted, eval_images, eval_labels, tiny, float_tiny)
        rows[row] = {**info, **scores(per_image[row], eval_labels)}
        if row != ROWS[0] and ROWS[0] in per_image:
            rows[row]["vs_rtn"] = versus(per_image[row], per_image[ROWS[0]])
        print(f"   {json.dumps({k: v for k, v in rows[row].items() if not isinstance(v, dict)})}", flush=True)
    return rows


def run_gallery(name: str, args) -> dict:
    from benchmarks import gallery

    entry = gallery.MODELS[name]
    model = entry.load()
    calib = [(chunk, None) for chunk in entry.inputs("calib", args.gallery_calib, 0).split(16)]
    x = entry.inputs("eval", args.gallery_eval, 0)
    rows = {"float": {"scores": entry.score(model, model, x)}}
    for row in args.rows:
        print(f"== {name}: {row}", flush=True)
        converted, info = quantize(model, row, calib, (calib[0][0][:2],), loss=entry.objective,
                                   loss_dim=1, leaf_modules=gallery.leaf_modules(model))
        rows[row] = {**info, "scores": entry.score(converted, model, x)}
        print(f"   {json.dumps(rows[row]['scores'])} bits {info['equivalent_bits']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2", help="mobilenet_v2 and/or gallery names, comma-separated")
    parser.add_argument("--data", default=None, help="data folder (default: $CORA_FX_DATA or ../shared/data)")
    parser.add_argument("--tiny-limit", type=int, default=None, help="use only the first N tiny64 images")
    parser.add_argument("--gallery-calib", type=int, default=256, help="calibration inputs of a gallery model")
    parser.add_argument("--gallery-eval", type=int, default=400, help="evaluation inputs of a gallery model")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated (default: {ROWS})")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.rows or set(args.rows) - set(ROWS):
        parser.error(f"--rows: choose among {ROWS}")
    torch.manual_seed(0)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in [m for m in args.models.split(",") if m]:
        rows = run_mobilenet(args) if name == "mobilenet_v2" else run_gallery(name, args)
        results[name] = {"rows": rows, "command": "python -m benchmarks.linear_layers " + " ".join(argv),
                         "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
                         "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
