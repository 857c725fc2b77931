"""How many calibration batches `allocate_bits` needs: per-batch sensitivities, and the plans they give.

`allocate_bits` ranks MobileNetV2's convs by the KL growth of the output when one conv drops from 4
to 3 bits (heuristic-rank adapter added back; cora_fx/allocation/bits.py). This script measures that
growth separately on each of the first N calibration batches, then forms the plan from the mean of
the first k batches for several k, and scores each distinct plan with heuristic ranks (no search):
top-1 on the 700 eval images and top-1 agreement with float on the tiny64 images.

    python -m benchmarks.allocation_noise measure --budget 0.045 --batches 12 --out OUT   # ~18 min, 1 thread
    python -m benchmarks.allocation_noise evaluate --budget 0.045 --ks 1,2,12 --out OUT  # ~5 min per plan

`measure` writes OUT/kl_b{budget}.json; `evaluate` reads it and writes OUT/eval_b{budget}.json.
Results: benchmarks/RESULTS.md and `cora_fx.allocation.bits.ALLOCATION_BATCHES`.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import (agreement, batches, data_paths, load_split, mobilenet_v2, normalize, predict,
                               topk_with_ci)
from benchmarks.methods import cora
from cora_fx import CoRaConfig
from cora_fx.allocation.bits import batch_sensitivities, cheapest_demotions, demotion_candidates, planned_bits
from cora_fx.prepare import prepare_cora

TARGET_BITS = 4.0


def _model_and_calib(data: str | None):
    labels_csv, tiny_csv = data_paths(data)
    model = mobilenet_v2(labels_csv)
    images, labels = load_split(labels_csv, "calib")
    return model, batches(images, labels, 32), labels_csv, tiny_csv


def measure(budget: float, n_batches: int, out: Path, data: str | None) -> None:
    """KL growth of each candidate conv on each of the first ``n_batches`` calibration batches."""
    model, calib, _, _ = _model_and_calib(data)
    cfg = CoRaConfig.recommended(4, budget=budget, target_bits=None)
    prepared = prepare_cora(model, cfg)
    start = planned_bits(prepared, dict(cfg.quant.layer_bits), cfg.search.budget)
    candidates, saved = demotion_candidates(prepared, cfg, 3, start)
    reference_model = copy.deepcopy(model).eval()  # as allocate_bits: weights are swapped in a copy
    inputs = [(calib[i][0],) for i in range(n_batches)]
    with torch.no_grad():
        reference = [reference_model(*x).float() for x in inputs]
    per_batch = batch_sensitivities(reference_model, prepared, candidates, cfg, 3, inputs, reference, progress=True)
    result = {"start": start, "saved": saved,
              "kl": {name: [d - r for r, d in zip(kept, demoted)] for name, (kept, demoted) in per_batch.items()}}
    (out / f"kl_b{budget}.json").write_text(json.dumps(result))


def plans(measured: dict, ks: list[int]) -> dict[int, tuple[str, ...]]:
    """The demoted set from the mean KL growth of the first k batches, for each k."""
    need = (measured["start"] - TARGET_BITS) * (1 + 1e-9)  # as allocate_bits
    out = {}
    for k in ks:
        loss = {n: sum(v[:k]) / k for n, v in measured["kl"].items()}
        out[k] = tuple(sorted(cheapest_demotions(loss, measured["saved"], need)))
    return out


def evaluate(budget: float, ks: list[int], out: Path, data: str | None) -> None:
    """Each distinct plan's heuristic-rank CoRa model: top-1 on eval, tiny64 agreement with float."""
    measured = json.loads((out / f"kl_b{budget}.json").read_text())
    everything = len(next(iter(measured["kl"].values())))
    mean_all = {n: statistics.mean(v) for n, v in measured["kl"].items()}
    model, calib, labels_csv, tiny_csv = _model_and_calib(data)
    eval_images, eval_labels = load_split(labels_csv, "eval")
    tiny = load_split(tiny_csv, None, image_size=64, resize=64)[0]
    float_tiny = predict(model, tiny)[:, 0]
    cfg = CoRaConfig.recommended(4, budget=budget, target_bits=None)
    results, seen = {}, {}
    for k, plan in plans(measured, ks).items():
        estimate = sum(max(mean_all[n], 0.0) for n in plan)  # the plan's loss on all measured batches
        print(k, plan, f"loss on all {everything} batches {estimate:.4f}", flush=True)
        if plan in seen:
            results[k] = dict(results[seen[plan]], same_as=seen[plan])
            continue
        seen[plan] = k
        run = cora(f"k{k}", model, cfg.replace(layer_bits={n: 3 for n in plan}), calib, normalize(eval_images[:2]),
                   ranks="heuristic")
        scores = topk_with_ci(predict(run.model, eval_images), eval_labels)
        results[k] = dict(plan=plan, loss_all_batches=estimate, top1=scores["top1"],
                          tiny=agreement(run.model, float_tiny, tiny), bits=run.equivalent_bits)
        print(k, results[k], flush=True)
        (out / f"eval_b{budget}.json").write_text(json.dumps(results, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("measure", "evaluate"))
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--batches", type=int, default=12, help="measure: calibration batches of 32")
    parser.add_argument("--ks", default="1,2,4,8,12", help="evaluate: plans from the first k batches")
    parser.add_argument("--out", default="allocation_noise")
    parser.add_argument("--data", default=None, help="data folder (default: $CORA_FX_DATA or ../shared/data)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step == "measure":
        measure(args.budget, args.batches, out, args.data)
    else:
        evaluate(args.budget, [int(k) for k in args.ks.split(",")], out, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
