"""The GPU check: the ``cuda`` tests, then `recommended(4)` timed on one GPU, in under 10 minutes.

    python -m benchmarks.gpu_check                        # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --device cpu --arch mobilenet_v2 --images 64 --iterations 4 --no-tests  # smoke

1. ``pytest -m cuda tests/test_devices.py``: every public step on a small net on the GPU, its tensors kept there,
   the same ranks and codes as on the CPU, no synchronizing call per search step, the CLI with ``--device cuda``.
2. For each architecture (torchvision, random weights: the cost depends on the shapes), `quantize_cora` with
   ``recommended(4)`` on ``--images`` random 224 px images at batch 32, step by step (`run_pipeline`'s
   ``on_step``), against float forward+backward steps of the same net and batch measured in the same process;
   once in float32 and once with the search under bfloat16 autocast (``search.autocast``), each with its ranks.
   Peak GPU memory from ``torch.cuda.max_memory_allocated``.

Results go to benchmarks/results/gpu_check.json, with the device's name.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from cora_fx import CoRaConfig, convert_cora, prepare_cora, run_pipeline

OUT = Path(__file__).parent / "results" / "gpu_check.json"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def float_step_seconds(model: torch.nn.Module, batch: tuple, steps: int, device: torch.device) -> float:
    """Mean seconds of a float forward+backward step (all weights trainable) at ``batch``."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()  # warm-up (cuDNN picks its kernels)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    synchronize(device)
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def timed_recommended(model: torch.nn.Module, calib: list, device: torch.device, iterations: int,
                      autocast: str | None) -> dict:
    """recommended(4) step by step on ``device``: seconds per step, ranks, peak memory."""
    cfg = CoRaConfig.recommended(4, target_bits=None).replace(iterations=iterations, autocast=autocast)
    seconds: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = [("prepare_cora", time.perf_counter())]
    prepared = prepare_cora(model, cfg, progress=False)

    def on_step(name: str) -> None:
        synchronize(device)
        marks.append((name, time.perf_counter()))

    steps = run_pipeline(prepared, calib, progress=False, on_step=on_step)
    on_step("convert_cora")
    convert_cora(prepared)
    on_step("end")
    for (name, start), (_, stop) in zip(marks, marks[1:]):
        seconds[name] = stop - start
    seconds["total"] = marks[-1][1] - marks[0][1]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(seconds=seconds, ranks=steps.search.ranks if steps.search else {}, peak_gpu_bytes=peak)


def run_tests() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_devices.py", "-q", "-rs"],
                          capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-8:]
    print("\n".join(tail), flush=True)
    return dict(returncode=done.returncode, summary=tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--images", type=int, default=1600, help="random calibration images (batches of 32)")
    parser.add_argument("--iterations", type=int, default=250, help="search steps (recommended: 250)")
    parser.add_argument("--float-steps", type=int, default=10)
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                     or platform.machine(), "torch": torch.__version__}
    if not args.no_tests:
        results["tests"] = run_tests()
    generator = torch.Generator().manual_seed(0)
    calib = [(torch.randn(32, 3, 224, 224, generator=generator), torch.randint(0, 1000, (32,), generator=generator))
             for _ in range(max(1, args.images // 32))]
    for arch in args.arch:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)().eval().to(device)
        batch = tuple(t.to(device) for t in calib[0])
        row = dict(float_step_seconds=float_step_seconds(model, batch, args.float_steps, device))
        for autocast in (None, "bfloat16"):
            run = timed_recommended(model, calib, device, args.iterations, autocast)
            run["ratio_to_250_float_steps"] = run["seconds"]["total"] / (250 * row["float_step_seconds"])
            row[autocast or "float32"] = run
            print(f"{arch} search {autocast or 'float32'}: {run['seconds']['total']:.0f} s "
                  f"({', '.join(f'{k} {v:.1f}' for k, v in run['seconds'].items() if k != 'total')}), "
                  f"float step {row['float_step_seconds'] * 1000:.0f} ms, peak {run['peak_gpu_bytes']}", flush=True)
        a, b = row["float32"]["ranks"], row["bfloat16"]["ranks"]
        row["bfloat16_rank_difference"] = dict(layers_equal=sum(a[n] == b[n] for n in a), layers=len(a),
                                              abs_sum=sum(abs(a[n] - b[n]) for n in a), rank_sum=sum(a.values()))
        results[arch] = row
    results["command"] = "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if results.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
