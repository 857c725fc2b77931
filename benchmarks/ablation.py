"""Ablation on MobileNetV2 (shared weights, 700 eval images): heuristic ranks on top of a base quantizer.

    python -m benchmarks.ablation --bits 4 --budget 0.045 --variant base   # per-channel min-max, depthwise int8
    python -m benchmarks.ablation --bits 4 --budget 0.045 --variant gptq   # + GPTQ rounding, activation SVD
    python -m benchmarks.ablation --bits 3 --budget 0.044 --variant gptq --rounding-batches 8 --tiny --no-bn-correction

Prints top-1 with heuristic ranks floor(b*R) (with ``--tiny`` also the top-1 agreement with the float
model on the 10,000 tiny64 images), then after each later step of `run_pipeline` (`correct_batchnorm` on 8
calibration batches unless ``--no-bn-correction``, `finetune` with ``--finetune N``). No search: this isolates
what the base rounding and the adapters' factorization bring.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import agreement, batches, data_paths, load_split, mobilenet_v2, predict, topk_with_ci
from cora_fx import CoRaConfig, prepare_cora, run_pipeline, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.045)
    parser.add_argument("--variant", choices=("base", "gptq"), default="gptq")
    parser.add_argument("--clipping", choices=("minmax", "mse"), default="minmax", help="per-channel range")
    parser.add_argument("--rounding-inputs", choices=("float", "quantized"), default="float",
                        help="GPTQ moments of the float model's inputs or of the once-rounded model's")
    parser.add_argument("--rounding-batches", type=int, default=4, help="calibration batches for the GPTQ moments")
    parser.add_argument("--adapter-bits", type=int, default=8, help="bits of the adapters' A and B (8 in the paper)")
    parser.add_argument("--tiny", action="store_true", help="also report top-1 agreement with float on tiny64")
    parser.add_argument("--finetune", type=int, default=0, help="then `finetune` this many steps (KL) and score again")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--no-bn-correction", action="store_true", help="skip the BatchNorm-corrected second score")
    parser.add_argument("--data", default=None, help="data folder (default: $CORA_FX_DATA or ../shared/data)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels_csv, tiny_csv = data_paths(args.data)
    calib = batches(*load_split(labels_csv, "calib"))
    eval_images, eval_labels = load_split(labels_csv, "eval")
    model = mobilenet_v2(labels_csv)
    tiny = load_split(tiny_csv, None, image_size=64, resize=64)[0] if args.tiny else None
    float_tiny = predict(model, tiny)[:, 0] if tiny is not None else None

    def score() -> str:
        top1 = topk_with_ci(predict(prepared, eval_images), eval_labels)["top1"]
        return f"top-1 {top1:.2f}" + ("" if tiny is None
                                      else f" | tiny64 agreement {agreement(prepared, float_tiny, tiny):.2f}")

    start = time.time()
    kw = dict(bits=args.bits, budget=args.budget, granularity="per_channel", clipping=args.clipping, depthwise="int8",
              rounding_inputs=args.rounding_inputs, loss="kl", adapter_bits=args.adapter_bits)
    if args.variant == "gptq":
        kw.update(rounding="gptq", svd="activation", rounding_batches=args.rounding_batches)
    kw.update(bn_correction=0 if args.no_bn_correction else 8, finetune_iterations=args.finetune,
              finetune_lr=args.finetune_lr)
    prepared = prepare_cora(model, CoRaConfig().replace(**kw))
    done: list[str] = []

    def report(next_step: str) -> None:
        """Score the model after each step of the pipeline, before the next one runs."""
        if "set_ranks" in done:
            s = summary(prepared)
            print(f"W{args.bits} {args.variant} {' + '.join(done)}: {score()} | budget {s.budget:.4f} | "
                  f"equivalent bits {s.equivalent_bits:.3f} | {time.time() - start:.0f}s", flush=True)
        done.append(next_step)

    run_pipeline(prepared, calib, ranks="heuristic", on_step=report)
    report("")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
