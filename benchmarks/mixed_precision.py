"""The rank search under bfloat16 autocast against float32, on MobileNetV2 (RESULTS.md "Mixed precision").

    python -m benchmarks.mixed_precision --threads 2

`quantize_cora` with ``recommended(4)`` on the shared split's 1,600 calibration images (batch 32), once as it
ships (float32 search) and once with ``search.autocast="bfloat16"`` (the float teacher's and the soft model's
forward passes under ``torch.autocast``; ranks and their gradients float32). Both are scored as the frontier
scores its rows (eval700 top-1, tiny64 agreement and KL with the float model) and compared image by image
(paired bootstrap intervals of bfloat16 minus float32); the ranks are compared layer by layer; the search's
seconds are divided by a float forward+backward step at batch 32 measured in the same process. bfloat16 pays
on hardware that computes it natively (GPUs, CPUs with AVX512-BF16 or AMX): elsewhere autocast emulates it.
Results go to benchmarks/results/mixed_precision.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.calibration_speed import float_steps
from benchmarks.frontier import load_data, samples, scores, versus
from cora_fx import CoRaConfig, quantize_cora, summary

OUT = Path(__file__).parent / "results" / "mixed_precision.json"


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as /proc/cpuinfo says."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="folder with imagenet/ and tiny64/ (default: $CORA_FX_DATA)")
    parser.add_argument("--tiny-limit", type=int, default=None)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, calib, example, data = load_data(args)
    float_steps(model, calib[0], 1)  # warm-up
    rows, kept = {}, {}
    for precision in (None, "bfloat16"):
        before = float_steps(model, calib[0], 3)
        config = CoRaConfig.recommended(4, target_bits=None).replace(autocast=precision)
        start = time.perf_counter()
        converted = quantize_cora(model, calib, config, progress=False)
        seconds = time.perf_counter() - start
        state = converted.meta["cora_fx"]
        step = (before + float_steps(model, calib[0], 3)) / 2
        kept[precision] = samples(converted, data["eval_images"], data["eval_labels"], data["tiny"],
                                  data["float_tiny"])
        search = state.search_result
        rows[precision or "float32"] = dict(
            seconds=seconds, search_seconds=search.seconds, iterations=search.iterations,
            float_step_seconds=step, search_step_ratio=search.seconds / search.iterations / step,
            ranks=search.ranks, equivalent_bits=summary(converted).equivalent_bits,
            **scores(kept[precision], data["eval_labels"]))
        row = rows[precision or "float32"]
        print(f"{precision or 'float32'}: search {search.seconds:.0f} s ({row['search_step_ratio']:.2f} float steps "
              f"per step), top-1 {row['top1']:.2f}, tiny64 {row['tiny_agreement']:.2f}, KL {row['tiny_kl']:.4f}",
              flush=True)
    a, b = rows["float32"]["ranks"], rows["bfloat16"]["ranks"]
    rows["bfloat16"]["vs_float32"] = versus(kept["bfloat16"], kept[None])
    rows["bfloat16"]["ranks_vs_float32"] = dict(layers=len(a), equal=sum(a[n] == b[n] for n in a),
                                                max_abs=max(abs(a[n] - b[n]) for n in a),
                                                sum_float32=sum(a.values()), sum_bfloat16=sum(b.values()))
    print(f"paired bfloat16 - float32: {rows['bfloat16']['vs_float32']}; ranks {rows['bfloat16']['ranks_vs_float32']}")
    rows["_meta"] = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                         machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
                                 f"native bfloat16: {cpu_has_bf16()}",
                         command="python -m benchmarks.mixed_precision "
                                 + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
