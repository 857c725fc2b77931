"""Time and peak memory of `calibrate_rounding` (GPTQ + activation-aware SVD) on single wide convs.

Each case is one Conv2d with a 4x4 kernel (fan-in = in_channels x 16) on 8x8 inputs whose channels are
correlated (a low-rank channel mix plus noise, smoothed in space), quantized with
``CoRaConfig.recommended(4)`` and calibrated on 8 batches of 8 inputs, run in its own process so the
peak resident memory is that case's. ``max_block`` sets how many weight columns keep their whole second
moment; ``exact`` rows keep the whole fan-in (the reference, where it fits). The accuracy column is the
conv's relative output error ||y_q - y||^2 / ||y||^2 on 64 held-out inputs with heuristic-rank adapters.

    python -m benchmarks.rounding_scale                 # every case, results/rounding_scale.json
    python -m benchmarks.rounding_scale --cases 1k 4k   # a subset (rows are merged into the file)
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "rounding_scale.json"
#: name -> (in_channels, out_channels, max_block); fan-in = in_channels * 16.
CASES = {
    "1k": (64, 256, 4096), "4k": (256, 256, 4096), "4k-blocks1k": (256, 256, 1024),
    "16k": (1024, 256, 4096), "16k-exact": (1024, 256, 16384), "64k": (4096, 256, 4096),
    "64k-2048ch": (4096, 2048, 4096),
}


def _inputs(channels: int, count: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, 16, generator=torch.Generator().manual_seed(0)) / 4
    x = torch.einsum("cr,brhw->bchw", mix, torch.randn(count, 16, 8, 8, generator=g))
    x = x + 0.3 * torch.randn(count, channels, 8, 8, generator=g)
    return F.avg_pool2d(x, 3, stride=1, padding=1)


def run_case(name: str) -> dict:
    """One case in this process: time, peak extra resident memory, output error."""
    import torch
    from torch import nn

    from benchmarks.common import uniform
    from cora_fx import calibrate_rounding, prepare_cora, set_ranks, summary

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cin, cout, block = CASES[name]
    model = nn.Sequential(nn.Conv2d(cin, cout, 4, padding=2)).eval()
    batches = [(x, None) for x in _inputs(cin, 64, 1).split(8)]
    held_out = _inputs(cin, 64, 2)
    prepare_start = time.perf_counter()
    prepared = prepare_cora(model, uniform(4).replace(max_block=block, quantize_linear=False))
    prepare_s = time.perf_counter() - prepare_start
    before = _rss_bytes()
    start = time.perf_counter()
    calibrate_rounding(prepared, batches, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    set_ranks(prepared, "heuristic")
    with torch.no_grad():
        y = model(held_out)
        error = ((prepared(held_out) - y).pow(2).sum() / y.pow(2).sum()).item()
    notes = summary(prepared).rounding_notes
    return {"fan_in": cin * 16, "out_channels": cout, "max_block": block, "blocks": _blocks(notes),
            "calibrate_s": round(seconds, 1), "prepare_s": round(prepare_s, 1),
            "peak_extra_gb": round(peak / 2**30, 2), "relative_output_error": error}


def _blocks(notes: dict) -> int:
    text = next(iter(notes.values()), "")
    return int(text.split(" diagonal blocks")[0].rsplit(" ", 1)[-1]) if text else 1


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--one", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one)))
        return 0
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.cases:
        done = subprocess.run([sys.executable, "-m", "benchmarks.rounding_scale", "--one", name],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"case {name} failed:\n{done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    results["_meta"] = {"command": "python -m benchmarks.rounding_scale", "machine": platform.processor()
                        or platform.machine(), "threads": 2, "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
