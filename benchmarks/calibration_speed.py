"""Wall time of `CoRaConfig.recommended(bits)` on MobileNetV2, step by step, against float training steps.

    python -m benchmarks.calibration_speed --bits 4 3 --threads 2

Each row runs the public API on the shared split's 1,600 calibration images at batch 32
(prepare_cora -> run_pipeline's steps -> convert_cora), times every step, and scores the
result: top-1 on the 700 evaluation images with its bootstrap interval and top-1 agreement with the float
model on the tiny64 images. Blocks of float forward+backward steps (batch 32, all weights trainable) run
before and after each row in the same process; the row's wall time is reported as a ratio to 250 of
them. ``--schedule`` picks search settings (see SCHEDULES); ``--profile`` adds a cProfile of one search
step and of the rounding. Results go to benchmarks/results/calibration_speed.json.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import platform
import pstats
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

from benchmarks.common import agreement, batches, data_paths, load_split, mobilenet_v2, predict, topk_with_ci
from cora_fx import CoRaConfig, convert_cora, prepare_cora, run_pipeline, search_ranks, summary
from cora_fx.calibrate.rounding import calibrate_rounding

#: Search settings per schedule name: ``recommended`` is what `CoRaConfig.recommended` ships (its joint plan; with
#: ``target_bits=None``, 250 search steps from init_rank 0.9); ``start-budget-200`` starts every rank on the budget
#: and stops after 200 steps (a searched schedule).
SCHEDULES = {
    "recommended": {},
    "start-budget-200": {"init_rank": "budget", "iterations": 200},
}


def float_steps(model: torch.nn.Module, batch: tuple, steps: int) -> float:
    """Mean seconds of one float forward+backward step (all weights trainable) on ``batch``."""
    model = model.train(False)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.mean(times)


def profile_top(fn, calls: int = 1, lines: int = 8) -> list[list]:
    """The ``lines`` functions of ``fn()`` with the most own time, as [name, seconds per call of fn / calls]."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:lines]
    return [[_label(key), value[2] / calls] for key, value in top]


def _label(key: tuple) -> str:
    """``run_backward``, ``conv2d``, ``rounding.py:__call__``: a cProfile key, short."""
    path, _, name = key
    if path == "~":
        return re.sub(r"^<(built-in )?(method|function) '?([\w.]+)'?.*$", r"\3", name)
    return f"{Path(path).name}:{name}"


def prepare_seconds(arch: str) -> dict:
    """Wall time of `prepare_cora` (default config) on a torchvision model, and its residual SVDs' share."""
    model = getattr(torchvision.models, arch)().eval()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    prepare_cora(model, CoRaConfig(), progress=False)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    svd = sum(v[2] for k, v in stats.items() if "linalg_svd" in k[2] or "linalg_eigh" in k[2])
    return dict(seconds=total, svd_seconds=svd)


def timed_calibration(model: torch.nn.Module, cfg: CoRaConfig, calib: list) -> tuple[dict, Any, torch.nn.Module]:
    """prepare_cora -> run_pipeline (each of its steps timed) -> convert_cora: seconds per step and in all, the
    pipeline's result and the converted model."""
    seconds = {}
    start = time.perf_counter()
    prepared = prepare_cora(model, cfg, progress=False)
    seconds["prepare_cora"] = time.perf_counter() - start
    marks: list[tuple[str, float]] = []
    result = run_pipeline(prepared, calib, progress=False,
                          on_step=lambda step: marks.append((step, time.perf_counter())))
    marks.append(("", time.perf_counter()))
    seconds.update({step: end - begin for (step, begin), (_, end) in zip(marks, marks[1:])})
    mark = time.perf_counter()
    converted = convert_cora(prepared)
    seconds["convert_cora"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start
    return seconds, result, converted


def run_row(model: torch.nn.Module, bits: int, schedule: str, calib: list) -> tuple[dict, torch.nn.Module]:
    """recommended(bits) with the schedule's search settings; seconds per step and in all."""
    cfg = CoRaConfig.recommended(bits, **({} if schedule == "recommended" else {"target_bits": None}))
    cfg = cfg.replace(search=dataclasses.replace(cfg.search, **SCHEDULES[schedule]))
    seconds, result, converted = timed_calibration(model, cfg, calib)
    row = dict(bits=bits, schedule=schedule, search=dict(SCHEDULES[schedule]), seconds=seconds,
               iterations=result.search.iterations if result.search is not None else 0,
               steps=result.steps, equivalent_bits=summary(converted).equivalent_bits)
    return row, converted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    parser.add_argument("--schedule", nargs="+", default=["recommended"], choices=sorted(SCHEDULES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float-steps", type=int, default=5, help="float steps per block (two blocks per row)")
    parser.add_argument("--data", default=None, help="folder with imagenet/ and tiny64/ (default: $CORA_FX_DATA)")
    parser.add_argument("--profile", action="store_true", help="cProfile one search step and the rounding")
    parser.add_argument("--prepare", nargs="*", default=["resnet18", "mobilenet_v2"],
                        help="torchvision models whose prepare_cora (default config) is timed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibration_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    labels_csv, tiny_csv = data_paths(args.data)
    model = mobilenet_v2(labels_csv)
    calib = batches(*load_split(labels_csv, "calib"), 32)
    eval_images, eval_labels = load_split(labels_csv, "eval")
    tiny = load_split(tiny_csv, None, image_size=64, resize=64)[0]
    float_tiny = predict(model, tiny)[:, 0]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    float_steps(model, calib[0], 1)  # warm-up
    for bits in args.bits:
        for schedule in args.schedule:
            before = float_steps(model, calib[0], args.float_steps)
            row, converted = run_row(model, bits, schedule, calib)
            after = float_steps(model, calib[0], args.float_steps)
            row["float_step_seconds"] = (before + after) / 2
            row["ratio_to_250_float_steps"] = row["seconds"]["total"] / (250 * row["float_step_seconds"])
            row.update(topk_with_ci(predict(converted, eval_images), eval_labels))
            row["tiny_agreement"] = agreement(converted, float_tiny, tiny)
            name = f"recommended({bits}) {schedule}"
            results[name] = row
            print(f"{name}: {row['seconds']['total']:.0f} s "
                  f"({', '.join(f'{k} {v:.1f}' for k, v in row['seconds'].items() if k != 'total')}), "
                  f"ratio {row['ratio_to_250_float_steps']:.2f}, top-1 {row['top1']:.2f}, "
                  f"tiny64 {row['tiny_agreement']:.2f}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    for arch in args.prepare:
        results[f"prepare_cora {arch}"] = prepare_seconds(arch)
        print(f"prepare_cora {arch}: {results[f'prepare_cora {arch}']}", flush=True)
    if args.profile:
        searched = CoRaConfig.recommended(args.bits[0] if args.bits else 4, target_bits=None)
        prepared = prepare_cora(model, searched, progress=False)
        rounding = profile_top(lambda: calibrate_rounding(prepared, calib, progress=False))
        search_ranks(prepared, calib[:2], iterations=2, progress=False)  # the float outputs of both batches cached
        search = profile_top(lambda: search_ranks(prepared, calib[:2], iterations=8, progress=False), 8)
        results["_profile"] = dict(calibrate_rounding=rounding, search_step=search)
    command = "python -m benchmarks.calibration_speed " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = [c for c in results.get("_meta", {}).get("commands", []) if c != command] + [command]
    results["_meta"] = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                            torch=torch.__version__, calib_images=sum(len(b[0]) for b in calib), commands=commands)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
