"""W4A8 MobileNetV2: what each activation-quantization lever gives, scored on the converted torch model.

    python -m benchmarks.activation_levers                       # every lever, one after the other
    python -m benchmarks.activation_levers --levers base bias-correction

Each lever is ``CoRaConfig.recommended(4, act_bits=8)`` with one change (searched ranks, 1,600 calibration
images); the converted model computes what onnxruntime's integer kernels compute (`cora_fx.quant.integer`), so
its scores are the shipped file's. Scores: top-1 on the 700 evaluation images (95% bootstrap interval), top-1
agreement with the float model on the 10,000 tiny64 images, equivalent bits. Results:
benchmarks/results/activation_levers.json (each lever with the command that wrote it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import agreement, batches, data_paths, load_split, mobilenet_v2, predict, topk_with_ci, uniform
from cora_fx import convert_cora, prepare_cora, run_pipeline, summary

RESULTS = Path(__file__).resolve().parent / "results" / "activation_levers.json"
#: Lever -> the changes to ``CoRaConfig.recommended(4, act_bits=8)`` it measures.
LEVERS: dict[str, dict] = {
    "base": {},
    "minmax-ranges": {"act_observer": "minmax"},
    "bias-correction": {"bn_correction": 8},
    "first-last-8bit": {"layer_bits": {"features.0.0": 8, "classifier.1": 8}},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="*", default=list(LEVERS), choices=LEVERS)
    parser.add_argument("--data", default=None, help="folder with imagenet/ and tiny64/ (default: $CORA_FX_DATA)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels_csv, tiny_csv = data_paths(args.data)
    model = mobilenet_v2(labels_csv)
    calib = batches(*load_split(labels_csv, "calib"))
    eval_images, eval_labels = load_split(labels_csv, "eval")
    tiny = load_split(tiny_csv, None, image_size=64, resize=64)[0]
    float_tiny = predict(model, tiny)[:, 0]
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    command = "python -m benchmarks.activation_levers " + " ".join(sys.argv[1:] if argv is None else argv)
    for lever in args.levers:
        start = time.perf_counter()
        prepared = prepare_cora(model, uniform(4, act_bits=8).replace(**LEVERS[lever]), progress=False)
        run_pipeline(prepared, calib, progress=False)
        converted = convert_cora(prepared)
        seconds = time.perf_counter() - start
        scores = {k: round(v, 2) for k, v in topk_with_ci(predict(converted, eval_images), eval_labels).items()
                  if k.startswith("top1")}
        saved[lever] = {**scores, "tiny_agreement": round(agreement(converted, float_tiny, tiny), 2),
                        "equivalent_bits": round(summary(converted).equivalent_bits, 4), "changes": LEVERS[lever],
                        "quantize_seconds": round(seconds, 1), "command": command.strip()}
        print(lever, saved[lever], flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
