"""Interleaved latency of a converted model against its float model (eager and torch.compile).

Runs float and quantized alternately in the same process, so a noisy machine affects both
alike; reports medians and the quantized / float ratio per mode and batch size.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _timed(fn: Callable, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


@torch.no_grad()
def interleaved(float_model: torch.nn.Module, quantized: torch.nn.Module, batch_sizes=(1, 32), repeats: int = 20,
                image_size: int = 224, compile_modes=("eager", "compile")) -> dict:
    out = {}
    for mode in compile_modes:
        f, q = float_model, quantized
        if mode == "compile":
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
