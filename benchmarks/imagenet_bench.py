"""ImageNet benchmark: cora_fx against plain rounding and peers on one model, in one run.

    python -m benchmarks.imagenet_bench                       # MobileNetV2, shared weights and images
    python -m benchmarks.imagenet_bench --quick               # CI smoke test (< 3 minutes)
    python -m benchmarks.imagenet_bench --arch resnet18 --weights resnet18-f37072fd.pth \\
        --data /path/to/data                                  # the paper's Table 1 protocol

``--data`` is a folder with ``imagenet/labels.csv`` (path,label,split: calib / eval rows) and
optionally ``imagenet/tiny64_labels.csv``. Results (JSON, RESULTS.md tables, plots) go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision

from benchmarks.common import (agreement, batches, data_paths, load_split, mobilenet_v2, normalize, predict,
                               topk_with_ci, uniform)
from benchmarks.methods import MethodRun, cora, cora_mixed, state_dict_bytes
from cora_fx import CoRaConfig


def paper(bits: int, **kw) -> CoRaConfig:
    return CoRaConfig().replace(bits=bits, clipping="normal_paper", **kw)


def per_channel(bits: int, **kw) -> CoRaConfig:
    return CoRaConfig().replace(bits=bits, granularity="per_channel", clipping="minmax", **kw)


LATENCY_METHOD = "CoRa recommended W4"  # the --quick row whose latency the smoke test checks
#: rows whose artifact is saved (``cora_recommended_wN.pt2``, for ``benchmarks/latency.py``) and, without
#: ``--no-latency``, timed against float in the same process: the recommended configuration at each width
LATENCY_METHODS = {f"CoRa recommended W{bits}": f"cora_recommended_w{bits}.pt2" for bits in (3, 4, 5)}
MIXED_BUDGETS = (0.01, 0.02, 0.045)  # the mixed W3/W4 rows at <= 4.0 equivalent bits (allocate_bits)
LATENCY_METHODS.update({f"CoRa recommended W4 mixed @4.0 b={b}": f"cora_recommended_w4_mixed_b{b}.pt2"
                        for b in MIXED_BUDGETS})
FINETUNE = 100  # fine-tuning steps of the "+ finetune" rows (CoRaConfig.finetune_lr default, 1e-3)


def plan(quick: bool) -> list[tuple[str, int, callable]]:
    """(name, bits, runner(model, calib, example) -> MethodRun) in run order."""
    if quick:
        return [
            ("RTN per-tensor normal W4", 4,
             lambda m, c, x: cora("RTN per-tensor normal W4", m, paper(4), c, x, ranks="rtn")),
            ("CoRa heuristic per-channel W4", 4,
             lambda m, c, x: cora("CoRa heuristic per-channel W4", m, per_channel(4), c, x, ranks="heuristic")),
            ("CoRa searched per-channel W4", 4,
             lambda m, c, x: cora("CoRa searched per-channel W4", m, per_channel(4, iterations=3), c, x,
                                  ranks="search")),
            (LATENCY_METHOD, 4,
             lambda m, c, x: cora(LATENCY_METHOD, m,
                                  uniform(4).replace(iterations=3, rounding_batches=1, bn_correction=1,
                                                                    finetune_iterations=2),
                                  c, x, ranks="search")),
        ]
    runs = []
    for bits in (3, 4, 5):
        runs.append((f"RTN per-tensor normal W{bits}", bits,
                     lambda m, c, x, b=bits: cora(f"RTN per-tensor normal W{b}", m, paper(b), c, x, ranks="rtn")))
        runs.append((f"RTN per-channel min-max W{bits}", bits,
                     lambda m, c, x, b=bits:
                         cora(f"RTN per-channel min-max W{b}", m, per_channel(b), c, x, ranks="rtn")))
    for bits in (4, 3):
        for base, make in (("per-tensor", paper), ("per-channel", per_channel)):
            runs.append((f"CoRa heuristic {base} W{bits}", bits,
                         lambda m, c, x, b=bits, mk=make, n=f"CoRa heuristic {base} W{bits}":
                             cora(n, m, mk(b), c, x, ranks="heuristic")))
            runs.append((f"CoRa searched {base} W{bits}", bits,
                         lambda m, c, x, b=bits, mk=make, n=f"CoRa searched {base} W{bits}":
                             cora(n, m, mk(b, iterations=5 if quick else 250), c, x, ranks="search")))
    for bits in (4, 3, 5):  # the budget sweep without search or fine-tuning (recommended base, floor(b*R)): cheap
        for budget in (0.02, 0.05, 0.10):
            name = f"CoRa recommended heuristic-ranks W{bits} b={budget}"
            runs.append((name, bits,
                         lambda m, c, x, b=bits, bu=budget, n=name:
                             cora(n, m, uniform(b).replace(budget=bu), c, x, ranks="heuristic")))
        name = f"CoRa recommended heuristic-ranks+finetune W{bits}"  # no search, own budget, 100 fine-tuning steps
        runs.append((name, bits,
                     lambda m, c, x, b=bits, n=name:
                         cora(n, m, uniform(b, finetune_iterations=FINETUNE), c, x, ranks="heuristic")))
    for bits in (4, 3, 5):
        for budget in (0.02, 0.05, 0.10):
            name = f"CoRa recommended W{bits} b={budget}"
            runs.append((name, bits,
                         lambda m, c, x, b=bits, bu=budget, n=name:
                             cora(n, m, uniform(b).replace(budget=bu), c, x, ranks="search")))
        name = f"CoRa recommended W{bits} + finetune"  # the search, then 100 fine-tuning steps (not in recommended())
        runs.append((name, bits,
                     lambda m, c, x, b=bits, n=name:
                         cora(n, m, uniform(b, finetune_iterations=FINETUNE), c, x, ranks="search")))
        name = f"CoRa recommended W{bits}"  # its own budget: <= bits + 0.5 equivalent bits
        runs.append((name, bits,
                     lambda m, c, x, b=bits, n=name: cora(n, m, uniform(b), c, x, ranks="search")))
    for budget in MIXED_BUDGETS:  # mixed W3/W4 base (allocate_bits) at <= 4.0 equivalent bits, as the 4-bit peers
        for ranks, label in (("heuristic", "heuristic-ranks "), ("search", "")):
            name = f"CoRa recommended {label}W4 mixed @4.0 b={budget}"
            runs.append((name, 4, lambda m, c, x, bu=budget, r=ranks, n=name: cora_mixed(
                n, m, uniform(4, budget=bu), c, x, target_bits=4.0, ranks=r)))
    return runs


def selected(name: str, pattern: str) -> bool:
    """``--only`` matching: the exact method name, or a prefix followed by ``*``."""
    return name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", default=None, help="float checkpoint (default: the shared MobileNetV2 weights)")
    parser.add_argument("--data", default=None, help="data folder (default: $CORA_FX_DATA or ../shared/data)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="few images and iterations: a smoke test")
    parser.add_argument("--only", default="",
                        help="comma-separated method names to run (a trailing * matches a prefix)")
    parser.add_argument("--peers", default="torchao,brevitas,aimet")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--tiny-limit", type=int, default=None, help="use only the first N tiny64 images")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--peer-calib-images", type=int, default=None,
                        help="give the peers only the first N calibration images (default: all 1,600)")
    parser.add_argument("--ranks-from", default=None, metavar="RESULTS_JSON",
                        help="searched rows take the ranks recorded in this results.json instead of searching "
                             "(rebuilds an artifact, e.g. for latency, without the search; calibration time then "
                             "excludes it)")
    args = parser.parse_args(argv)
    if args.peer_calib_images is not None and args.peer_calib_images < 1:
        parser.error(f"--peer-calib-images must be >= 1, got {args.peer_calib_images}")
    from benchmarks.peers import peer_runs
    runs = plan(args.quick)
    peer_plan = peer_runs([p for p in args.peers.split(",") if p], args.quick)
    peers = {name for name, _, _ in peer_plan}
    runs += peer_plan
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unmatched = [s for s in only if not any(selected(name, s) for name, _, _ in runs)]
    if unmatched:
        parser.error(f"--only: no method matches {unmatched}; methods: {[name for name, _, _ in runs]}")
    if args.ranks_from:
        from benchmarks.methods import RECORDED_RANKS
        recorded = json.loads(Path(args.ranks_from).read_text())
        RECORDED_RANKS.update({n: r["extra"]["ranks"] for n, r in recorded.items() if "ranks" in r.get("extra", {})})
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels_csv, tiny_csv = data_paths(args.data)
    model = mobilenet_v2(labels_csv, weights=args.weights, arch=args.arch)
    calib_n, eval_n, tiny_n = (64, 64, 256) if args.quick else (None, None, args.tiny_limit)
    calib_images, calib_labels = load_split(labels_csv, "calib", limit=calib_n)
    eval_images, eval_labels = load_split(labels_csv, "eval", limit=eval_n)
    tiny = load_split(tiny_csv, None, image_size=64, resize=64, limit=tiny_n)[0] if tiny_csv.is_file() else None
    calib = batches(calib_images, calib_labels, 32)
    example = normalize(eval_images[:2])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / ("results_quick.json" if args.quick else "results.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() and not args.quick else {}

    float_top5 = predict(model, eval_images)
    float_tiny = predict(model, tiny)[:, 0] if tiny is not None else None
    float_bytes = state_dict_bytes(model)
    results["float"] = dict(name="float", family="float", bits=32, equivalent_bits=32.0, artifact_bytes=float_bytes,
                            deflated_bytes=state_dict_bytes(model, deflate=True),
                            calib_seconds=0.0, iterations=0, **topk_with_ci(float_top5, eval_labels),
                            tiny_agreement=100.0 if tiny is not None else None)
    peer_calib = calib if args.peer_calib_images is None else batches(calib_images[:args.peer_calib_images],
                                                                     calib_labels[:args.peer_calib_images], 32)
    for name, bits, runner in runs:
        if only and not any(selected(name, s) for s in only):
            continue
        print(f"== {name}", flush=True)
        try:
            data = peer_calib if name in peers else calib
            run: MethodRun = runner(model, data, example)
        except Exception as err:  # a peer that cannot run is reported, not fatal
            results[name] = dict(name=name, bits=bits, error=f"{type(err).__name__}: {err}".splitlines()[0][:300])
            print(f"   failed: {results[name]['error']}", flush=True)
            continue
        record = {k: v for k, v in asdict(run).items() if k != "model"}
        record["calib_images"] = sum(len(b[0]) for b in data)
        if run.model is not None:
            record.update(topk_with_ci(predict(run.model, eval_images), eval_labels))
            record["tiny_agreement"] = agreement(run.model, float_tiny, tiny) if tiny is not None else None
        results[name] = record
        if name in LATENCY_METHODS and not args.quick:  # for `python -m benchmarks.latency ARTIFACT` on a quiet machine
            import cora_fx
            cora_fx.save(run.model, out / LATENCY_METHODS[name], (example.expand(2, *example.shape[1:]),))
        if name in LATENCY_METHODS and not args.no_latency:
            from benchmarks.latency import MODES, interleaved
            record["latency"] = interleaved(model, run.model, repeats=3 if args.quick else 20,
                                            compile_modes=("eager",) if args.quick else MODES)
        print(f"   top1 {record.get('top1', float('nan')):.2f} bits {run.equivalent_bits:.3f} "
              f"calib {run.calib_seconds:.0f}s bytes {run.artifact_bytes:,}", flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                torch=torch.__version__, torchvision=torchvision.__version__, arch=args.arch, quick=args.quick,
                calib_images=len(calib_images), eval_images=len(eval_images),
                tiny_images=0 if tiny is None else len(tiny),
                command="python -m benchmarks.imagenet_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    results["_meta"] = meta
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
