"""Cost of one rank-search step against one float training step, measured side by side.

    python benchmarks/search_speed.py --arch resnet18 --batch 32 --size 224 --steps 5

Alternates blocks of float forward+backward steps (all weights trainable, gradients only) and a
cora_fx search of as many iterations (folded form, docs/method.md section 4, its setup included) on
the same random batch, twice; prints the per-step means of each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from cora_fx import CoRaConfig, prepare_cora, search_ranks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)().eval()
    batch = (torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 1000, (args.batch,)))
    prepared = prepare_cora(model, CoRaConfig().replace(loss=args.loss))
    float_times, search_times = [], []
    for block in range(3):  # block 0 warms up
        start = time.perf_counter()
        for _ in range(args.steps):
            model.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        float_times.append((time.perf_counter() - start) / args.steps)
        start = time.perf_counter()
        search_ranks(prepared, [batch], iterations=args.steps, progress=False)
        search_times.append((time.perf_counter() - start) / args.steps)
    f, s = statistics.mean(float_times[1:]), statistics.mean(search_times[1:])
    print(f"{args.arch} batch {args.batch} at {args.size}px, loss {args.loss}: float fwd+bwd {f:.2f} s/step, "
          f"search {s:.2f} s/step, ratio {s / f:.2f} "
          f"({args.steps} steps x 2 blocks, threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
