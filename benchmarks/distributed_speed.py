"""`CoRaConfig.recommended(bits)` on MobileNetV2: one process with 2 threads against two processes with one
thread each (torchrun, gloo), on the same global batches.

    python -m benchmarks.distributed_speed --bits 4

One process reads the shared split's 1,600 calibration images in batches of 32. Two processes read
batches of 16, process p every second one from p (`cora_fx.calibrate.distributed.shard`), so step t of both runs
sees the same 32 images. Each run: prepare_cora -> calibrate_rounding -> search_ranks -> convert_cora,
timed on rank 0 and scored (top-1 on the 700 evaluation images, tiny64 agreement with the float model).
Results go to benchmarks/results/distributed_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import agreement, batches, data_paths, load_split, mobilenet_v2, predict, topk_with_ci
from benchmarks.calibration_speed import timed_calibration
from cora_fx import CoRaConfig, distributed

GLOBAL_BATCH = 32


def run(bits: int, data: str | None, processes: int) -> dict:
    """One calibration in this process (one of ``processes``); scores and times on rank 0."""
    labels_csv, tiny_csv = data_paths(data)
    model = mobilenet_v2(labels_csv)
    calib = distributed.shard(batches(*load_split(labels_csv, "calib"), GLOBAL_BATCH // processes))
    seconds, result, converted = timed_calibration(model, CoRaConfig.recommended(bits, target_bits=None), calib)
    row = dict(processes=processes, threads=torch.get_num_threads(), batch_per_process=GLOBAL_BATCH // processes,
               seconds=seconds, iterations=result.iterations, ranks=result.ranks)
    if distributed.is_main_process():
        eval_images, eval_labels = load_split(labels_csv, "eval")
        tiny = load_split(tiny_csv, None, image_size=64, resize=64)[0]
        row.update(topk_with_ci(predict(converted, eval_images), eval_labels))
        row["tiny_agreement"] = agreement(converted, predict(model, tiny)[:, 0], tiny)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--data", default=None, help="folder with imagenet/ and tiny64/ (default: $CORA_FX_DATA)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed_speed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one of the torchrun processes
        torch.set_num_threads(1)
        distributed.init_from_environment()
        row = run(args.bits, args.data, distributed.world_size())
        if distributed.is_main_process():
            Path(args.out).write_text(json.dumps(row))
        torch.distributed.destroy_process_group()
        return 0
    torch.set_num_threads(2)
    single = run(args.bits, args.data, 1)
    print(f"1 process x 2 threads: {single['seconds']['total']:.0f} s, top-1 {single['top1']:.2f}", flush=True)
    partial = Path(args.out).with_suffix(".worker.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--module", "benchmarks.distributed_speed", "--worker", "--bits", str(args.bits), "--out", str(partial)]
    command += ["--data", args.data] if args.data else []
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    double = json.loads(partial.read_text())
    partial.unlink()
    print(f"2 processes x 1 thread: {double['seconds']['total']:.0f} s, top-1 {double['top1']:.2f}", flush=True)
    same = sum(single["ranks"][n] == double["ranks"][n] for n in single["ranks"])
    result = dict(bits=args.bits, single=single, double=double, ranks_equal=same, layers=len(single["ranks"]),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  command="python -m benchmarks.distributed_speed " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:]))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
