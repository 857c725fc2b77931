"""Interleaved latency of a converted model against its float model (eager and torch.compile).

Runs float and quantized alternately in the same process, so a noisy machine affects both
alike; reports medians and the quantized / float ratio per mode and batch size. Modes:

- ``eager``: the modules as they are (the converted graph unpacks its codes every call);
- ``compile``: ``torch.compile`` with default settings (weights stay runtime inputs, so the
  unpack / dequantize ops run every call, fused by inductor);
- ``compile_frozen``: ``torch.compile`` under inductor's ``freezing=True`` (inference only):
  weights become constants and the dequantization is constant-folded at compile time, so the
  runtime holds float weights: the latency of "decompress at load time" deployment.

Standalone, on a saved artifact (e.g. the one the ImageNet driver keeps):

    python -m benchmarks.latency benchmarks/results/cora_recommended_w4.pt2 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Callable

import torch

import cora_fx
from benchmarks.common import data_paths, mobilenet_v2

MODES = ("eager", "compile", "compile_frozen")


def _timed(fn: Callable, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"unknown latency mode {mode!r}; choose from {MODES}")
    if mode == "compile_frozen":
        import torch._inductor.config as inductor_config
        return inductor_config.patch(freezing=True)
    return contextlib.nullcontext()


@torch.no_grad()
def interleaved(float_model: torch.nn.Module, quantized: torch.nn.Module, batch_sizes=(1, 32), repeats: int = 20,
                image_size: int = 224, compile_modes=MODES) -> dict:
    out = {}
    for mode in compile_modes:
        torch._dynamo.reset()
        with _mode(mode):
            f, q = float_model, quantized
            if mode != "eager":
                f, q = torch.compile(float_model), torch.compile(quantized)
            for batch in batch_sizes:
                x = torch.randn(batch, 3, image_size, image_size)
                for fn in (f, q):  # warm-up (and compilation)
                    fn(x)
                    fn(x)
                tf, tq = [], []
                for _ in range(repeats):
                    tf.append(_timed(f, x))
                    tq.append(_timed(q, x))
                mf, mq = statistics.median(tf), statistics.median(tq)
                out[f"{mode}_b{batch}"] = {"float_ms": 1e3 * mf, "quantized_ms": 1e3 * mq, "ratio": mq / mf}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a .pt2 written by cora_fx.save")
    parser.add_argument("--arch", default="mobilenet_v2", help="torchvision float model to compare with")
    parser.add_argument("--weights", default=None, help="float checkpoint (default: the shared MobileNetV2 weights)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = mobilenet_v2(data_paths(args.data)[0], weights=args.weights, arch=args.arch)
    quantized = cora_fx.load(args.artifact)
    result = interleaved(model.eval(), quantized, repeats=args.repeats, compile_modes=tuple(args.modes.split(",")))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
