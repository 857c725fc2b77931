"""Cost of one rank-search step against one float training step, measured side by side.

    python -m benchmarks.search_speed --arch mobilenet_v2 --batch 32 --steps 6 --threads 2

Alternates blocks of float forward+backward steps (all weights trainable, gradients only) with blocks of
search steps (the recommended search settings, KL objective, two random batches cycled), and prints the
per-step means. Each search speed-up is then taken back one at a time, cumulatively, to show its share:
the float outputs computed once per listed batch (off: batches from a generator), BatchNorm merged into
the search's convs (off: the plain folded copy), channels-last inputs, micro-batches. The first variant is
the search loop of cora_fx 0.3. Results go to benchmarks/results/search_speed.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
import torchvision

from cora_fx import CoRaConfig, prepare_cora, search_ranks
from cora_fx.calibrate import rank_search
from cora_fx.graph.passes import folded_copy

#: (name, search overrides, cached float outputs, BatchNorm merged): each row adds one speed-up.
VARIANTS = [
    ("0.3 search loop", {"micro_batch": None, "channels_last": False}, False, False),
    ("+ float outputs once per batch", {"micro_batch": None, "channels_last": False}, True, False),
    ("+ BatchNorm merged into the convs", {"micro_batch": None, "channels_last": False}, True, True),
    ("+ channels-last inputs", {"micro_batch": None, "channels_last": True}, True, True),
    ("+ micro-batches (auto: 8 images)", {"micro_batch": "auto", "channels_last": True}, True, True),
]


def endless(batches: list) -> Iterator:
    """The batches, cycled by a generator: the search cannot tell that they repeat, so it caches nothing."""
    while True:
        yield from batches


@contextlib.contextmanager
def batchnorm_merged(enabled: bool) -> Iterator[None]:
    """The search's copy with (default) or without BatchNorm merged into its convs."""
    original = rank_search.search_copy
    if not enabled:
        rank_search.search_copy = folded_copy
    try:
        yield
    finally:
        rank_search.search_copy = original


def float_step(model: torch.nn.Module, batch: tuple, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    return (time.perf_counter() - start) / steps


def search_step(prepared, batches: list, steps: int, overrides: dict, cached: bool, merged: bool) -> float:
    data = batches if cached else endless(batches)
    with batchnorm_merged(merged):
        search_ranks(prepared, data, iterations=len(batches), progress=False, **overrides)  # warm: outputs cached
        start = time.perf_counter()
        search_ranks(prepared, data, iterations=steps, progress=False, **overrides)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_speed.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)().eval()
    batches = [(torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 1000, (args.batch,)))
               for _ in range(2)]
    cfg = CoRaConfig.recommended(4, target_bits=None).replace(rounding="nearest", svd="weight")
    prepared = prepare_cora(model, cfg, progress=False)
    float_step(model, batches[0], 1)
    rows = []
    for name, overrides, cached, merged in VARIANTS:
        before = float_step(model, batches[0], args.steps)
        search = search_step(prepared, batches, args.steps, overrides, cached, merged)
        after = float_step(model, batches[0], args.steps)
        reference = statistics.mean([before, after])
        rows.append(dict(variant=name, search_step_seconds=search, float_step_seconds=reference,
                         ratio=search / reference))
        print(f"{name:<36} search {search:.2f} s/step, float fwd+bwd {reference:.2f} s/step, "
              f"ratio {search / reference:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, arch=args.arch, batch=args.batch, size=args.size, steps=args.steps,
                                   threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime()),
                                   command="python -m benchmarks.search_speed "
                                           + " ".join(argv if argv is not None else sys.argv[1:])), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
