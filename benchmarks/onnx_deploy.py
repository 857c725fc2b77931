"""MobileNetV2 deployed to onnxruntime: accuracy, file size and latency of float, W8A8 and W4A8 ONNX models.

    python -m benchmarks.onnx_deploy                  # rows: quantize, export, score in onnxruntime
    python -m benchmarks.onnx_deploy --latency        # latency of the ONNX files the rows wrote

Rows (every score is computed by onnxruntime's CPU execution provider on the exported file):
- ``float``: torchvision MobileNetV2 exported with torch.onnx;
- ``ort-static-w8a8-<method>``: onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations) calibrated on the shared 1,600 calibration images with MinMax, Entropy or Percentile;
- ``cora-w8a8``: ``CoRaConfig.recommended(8, act_bits=8)`` with every adapter at rank 0 (no search);
- ``cora-w4a8`` / ``cora-w3a8``: ``CoRaConfig.recommended(4 or 3, act_bits=8)`` (searched ranks), exported with
  ``export_onnx``'s default weights (``"compact"``: 4-bit codes on disk, integer kernels at run time);
- ``cora-w4a8-int8`` / ``cora-w4a8-codes``: the same W4A8 model exported with ``weights="int8"`` / ``"codes"``;
- ``cora-w4a32``: ``CoRaConfig.recommended(4)`` (weight-only), exported with the default weights.
Scores: top-1 on the 700 evaluation images with a 95% bootstrap interval, top-1 agreement with the float
ONNX model on the 10,000 tiny64 images, equivalent bits (cora_fx's `summary`), file bytes, whether
onnxruntime's optimized graph runs integer convolutions and linear layers (QLinearConv, QGemm counts), and
for cora_fx rows the torch model's top-1 on the same 700 images and its top-1 agreement with the file.
``--latency`` times each file at batch 1 and 32 with 1 and 2 intra-op threads, the models interleaved in one
process, every session with default options.
Results: benchmarks/results/onnx_deploy.json (each row with the command that wrote it); the ONNX files stay
in the benchmark cache.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from benchmarks.common import CACHE, batches, data_paths, load_split, mobilenet_v2, normalize, topk_with_ci
from cora_fx import CoRaConfig, convert_cora, export_onnx, prepare_cora, run_pipeline, summary
from cora_fx.io.onnx_export import strip_debug_info
from cora_fx.prepare import adapters

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_deploy.json"
FILES = CACHE / "onnx"
ROWS = ("float", "ort-static-w8a8-minmax", "ort-static-w8a8-entropy", "ort-static-w8a8-percentile", "cora-w8a8",
        "cora-w4a8", "cora-w4a8-int8", "cora-w4a8-codes", "cora-w3a8", "cora-w4a32")
#: Rows whose file is another export (``weights=``) of an earlier row's quantized model.
SAME_MODEL = {"cora-w4a8-int8": ("cora-w4a8", "int8"), "cora-w4a8-codes": ("cora-w4a8", "codes")}
#: quantize_static calibrations whose histograms take hours on 1,600 images on two cores (see --ort-images).
SLOW_CALIBRATION = ("entropy", "percentile")



def session(path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def integer_ops(path: Path) -> dict[str, int]:
    """QLinearConv and QGemm nodes (integer convolutions and linear layers) in onnxruntime's optimized graph."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
        return {"integer_convs": ops.count("QLinearConv"), "integer_gemms": ops.count("QGemm")}


def onnx_predict(path: Path, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """Top-5 classes of ``images`` (uint8) from onnxruntime."""
    run = session(path)
    name = run.get_inputs()[0].name
    out = [torch.from_numpy(run.run(None, {name: normalize(images[i:i + batch_size]).numpy()})[0]).topk(5, 1).indices
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def export_float(model: torch.nn.Module, path: Path) -> None:
    example = (torch.randn(1, 3, 224, 224),)
    shapes = ({0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("h", min=2), 3: torch.export.Dim("w", min=2)},)
    program = torch.onnx.export(model, example, dynamo=True, opset_version=21, dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    strip_debug_info(proto)  # as export_onnx does: the file sizes compare weights, not exporter metadata
    onnx.save(proto, str(path))


def ort_static(float_path: Path, path: Path, method: str, calib_images: torch.Tensor) -> None:
    """onnxruntime's quantize_static: QDQ, per-channel int8 weights, uint8 activations (its defaults)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(range(0, len(calib_images), 32))

        def get_next(self) -> Any:
            i = next(self.chunks, None)
            return None if i is None else {"x": normalize(calib_images[i:i + 32]).numpy()}

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(pre))
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=methods[method])
    pre.unlink()


def cora_row(row: str, model: torch.nn.Module, calib: list, path: Path, done: dict) -> dict:
    """Quantize with cora_fx's public API (or reuse the model of `SAME_MODEL`), export to ONNX."""
    example = (torch.randn(1, 3, 224, 224),)
    if row in SAME_MODEL:
        source, weights = SAME_MODEL[row]
        converted = done[source]
        export_onnx(converted, example, path, weights=weights, dynamic_size=True)
        return {"equivalent_bits": summary(converted).equivalent_bits, "weights": weights, "converted": converted}
    bits = int(row.split("-w")[1][0])
    act_bits = None if row.endswith("a32") else 8
    config = CoRaConfig.recommended(bits, act_bits=act_bits, target_bits=None)
    start = time.perf_counter()
    prepared = prepare_cora(model, config, progress=False)
    zero = {name: 0 for name, adapter in adapters(prepared).items() if adapter.searchable}
    run_pipeline(prepared, calib, ranks=zero if row == "cora-w8a8" else "search", progress=False)
    converted = convert_cora(prepared)
    seconds = time.perf_counter() - start
    export_onnx(converted, example, path, dynamic_size=True)
    done[row] = converted
    return {"equivalent_bits": summary(converted).equivalent_bits, "quantize_seconds": round(seconds, 1),
            "weights": "compact", "converted": converted}


def versus_torch(converted: torch.nn.Module, path: Path, eval_data: tuple, batch_size: int = 50) -> dict:
    """The torch model's top-1 on the evaluation images, and its top-1 agreement and largest logit difference
    with the ONNX file in onnxruntime (default session)."""
    run = session(path)
    agree, hits, diff = 0, 0, 0.0
    for i in range(0, len(eval_data[0]), batch_size):
        x = normalize(eval_data[0][i:i + batch_size])
        with torch.no_grad():
            reference = converted(x).numpy()
        out = run.run(None, {"x": x.numpy()})[0]
        agree += int((out.argmax(1) == reference.argmax(1)).sum())
        hits += int((reference.argmax(1) == eval_data[1][i:i + batch_size].numpy()).sum())
        diff = max(diff, float(np.abs(out - reference).max()))
    count = len(eval_data[0])
    return {"torch_top1": round(100.0 * hits / count, 2), "top1_agreement_vs_torch": round(100.0 * agree / count, 2),
            "max_abs_diff_vs_torch": diff}


def score(path: Path, eval_data: tuple, tiny: torch.Tensor, float_tiny: torch.Tensor) -> dict:
    top5 = onnx_predict(path, eval_data[0])
    out = {k: round(v, 2) for k, v in topk_with_ci(top5, eval_data[1]).items() if k.startswith("top1")}
    out["tiny_agreement"] = round(100.0 * float((onnx_predict(path, tiny)[:, 0] == float_tiny).float().mean()), 2)
    out["file_bytes"] = path.stat().st_size
    out.update(integer_ops(path))
    return out


def run_rows(args: argparse.Namespace) -> dict:
    labels_csv, tiny_csv = data_paths(args.data)
    model = mobilenet_v2(labels_csv)
    calib_images, calib_labels = load_split(labels_csv, "calib")
    calib = batches(calib_images, calib_labels, 32)
    eval_data = load_split(labels_csv, "eval")
    tiny = load_split(tiny_csv, None, image_size=64, resize=64)[0]
    FILES.mkdir(parents=True, exist_ok=True)
    float_path = FILES / "float.onnx"
    export_float(model, float_path)
    float_tiny = onnx_predict(float_path, tiny)[:, 0]
    results = json.loads(RESULTS.read_text()).get("rows", {}) if RESULTS.is_file() else {}
    done: dict = {}
    for row in args.rows:
        path = FILES / f"{row}.onnx"
        extra: dict = {}
        if row.startswith("ort-static"):
            method = row.rsplit("-", 1)[1]
            images = calib_images[:args.ort_images] if method in SLOW_CALIBRATION else calib_images
            if len(images) < len(calib_images):
                row = f"{row}-{len(images)}img"
                path = FILES / f"{row}.onnx"
            start = time.perf_counter()
            ort_static(float_path, path, method, images)
            extra = {"equivalent_bits": 8.0, "quantize_seconds": round(time.perf_counter() - start, 1),
                     "calibration_images": len(images)}
        elif row.startswith("cora"):
            extra = cora_row(row, model, calib, path, done)
            extra.update(versus_torch(extra.pop("converted"), path, eval_data))
        else:
            extra = {"equivalent_bits": 32.0}
        command = "python -m benchmarks.onnx_deploy " + " ".join(sys.argv[1:])
        results[row] = {**score(path, eval_data, tiny, float_tiny), **extra, "command": command.strip()}
        print(row, results[row], flush=True)
    return results


def interleaved(paths: dict[str, Path], batch: int, threads: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per run of each file, the files taking turns."""
    sessions = {row: session(p, threads) for row, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    run: Callable = lambda s: s.run(None, {s.get_inputs()[0].name: x})  # noqa: E731
    for s in sessions.values():
        run(s)
        run(s)
    times: dict[str, list[float]] = {row: [] for row in sessions}
    for _ in range(repeats):
        for row, s in sessions.items():
            start = time.perf_counter()
            run(s)
            times[row].append(1000 * (time.perf_counter() - start))
    return {row: round(statistics.median(t), 2) for row, t in times.items()}


def run_latency(rows: list[str], repeats: int) -> dict:
    files = [path for row in rows for path in (FILES / f"{row}.onnx", *sorted(FILES.glob(f"{row}-*img.onnx")))]
    paths = {path.stem: path for path in files if path.is_file()}
    out = {}
    for batch in (1, 32):
        for threads in (1, 2):
            key = f"batch{batch}_threads{threads}"
            out[key] = interleaved(paths, batch, threads, repeats if batch == 1 else max(5, repeats // 10))
            print(key, out[key], flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--data", default=None, help="folder with imagenet/ and tiny64/ (default: $CORA_FX_DATA)")
    parser.add_argument("--latency", action="store_true", help="time the ONNX files the rows wrote")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per file at batch 1")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while quantizing")
    parser.add_argument("--ort-images", type=int, default=1600,
                        help="calibration images for the Entropy / Percentile rows (row name says the count)")
    args = parser.parse_args(argv)
    for index, row in enumerate(args.rows):
        if not args.latency and row in SAME_MODEL and SAME_MODEL[row][0] not in args.rows[:index]:
            parser.error(f"--rows: {row} exports the model of {SAME_MODEL[row][0]}; list that row before it")
    torch.set_num_threads(args.threads)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    import onnxruntime

    saved["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__}
    if args.latency:
        saved["latency_ms"] = run_latency(args.rows, args.repeats)
        saved["latency_command"] = "python -m benchmarks.onnx_deploy " + " ".join(sys.argv[1:])
    else:
        saved["rows"] = run_rows(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
