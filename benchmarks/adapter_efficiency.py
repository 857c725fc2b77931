"""Output error removed per stored bit: a rank-1 adapter against one more bit of precision, per conv.

For every searchable conv of MobileNetV2 rounded as `recommended(n)` does (GPTQ, per-channel MSE ranges) at n and
n + 1 bits, with activation-aware factors (docs/method.md section 6): E(n) is the conv's output error on the
calibration inputs (the sum of the squared whitened singular values of its residual). One more bit removes
E(n) - E(n + 1) for P bits (P weights); a rank-1 adapter removes S_1^2 for adapter_bits x (params per rank)
bits. The ratio of the two rates says which buys more (docs/method.md section 8, "Bits and ranks together").

    python -m benchmarks.adapter_efficiency            # n = 4: about 1.5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks.common import batches, data_paths, load_split, mobilenet_v2
from cora_fx import CoRaConfig, calibrate_rounding, prepare_cora
from cora_fx.prepare import adapters

OUT = Path(__file__).resolve().parent / "results" / "adapter_efficiency.json"


def singular_values(model, calib: list, bits: int) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Per searchable conv: (whitened singular values, weight count, adapter params per rank) at ``bits``."""
    cfg = CoRaConfig.recommended(bits, target_bits=None)
    prepared = prepare_cora(model, cfg, example_inputs=(calib[0][0][:1],), progress=False)
    calibrate_rounding(prepared, calib, progress=False)
    return {n: (a.factors.S.double().flatten(), math.prod(a.factors.weight_shape), a.factors.params_per_rank)
            for n, a in adapters(prepared).items() if a.searchable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--data", default=None, help="data folder (default: $CORA_FX_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    labels_csv, _ = data_paths(args.data)
    model = mobilenet_v2(labels_csv)
    calib = batches(*load_split(labels_csv, "calib"), 32)
    low, high = singular_values(model, calib, args.bits), singular_values(model, calib, args.bits + 1)
    adapter_bits = CoRaConfig.recommended(args.bits).adapter.bits
    rows = {}
    for name, (s, params, per_rank) in low.items():
        error, error_high = float(s.square().sum()), float(high[name][0].square().sum())
        per_bit_precision = (error - error_high) / params
        per_bit_rank1 = float(s[0] ** 2) / (adapter_bits * per_rank)
        rows[name] = dict(error_ratio=error / error_high, rank1_share=float(s[0] ** 2) / error,
                          rank1_vs_bit=per_bit_rank1 / per_bit_precision)
        print(f"{name:24s} E(n)/E(n+1) {rows[name]['error_ratio']:5.2f}  rank-1 share {rows[name]['rank1_share']:.3f}"
              f"  rank-1 / bit {rows[name]['rank1_vs_bit']:5.2f}", flush=True)
    ratios = [r["rank1_vs_bit"] for r in rows.values()]
    summary = dict(bits=args.bits, layers=len(rows), rank1_wins=sum(r > 1 for r in ratios),
                   command="python -m benchmarks.adapter_efficiency" + (" " + " ".join(argv) if argv else ""))
    print(json.dumps(summary))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"summary": summary, "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
