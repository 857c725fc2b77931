"""Compiled unpack + dequantize of sub-byte codes: the word layout against the earlier byte layouts.

The converted graph dequantizes its weights on every call unless inductor freezing folds them
(benchmarks/RESULTS.md). This times that step alone, under ``torch.compile``, for one weight
matrix (default: MobileNetV2's 1000 x 1280 classifier at 4 bits):

- ``words``: `cora_fx.quant.packing.unpack_codes` (what `convert_cora` emits): row-planar 32-bit words
  stored as bytes, read through a float32 view, one broadcast shift, one mask;
- ``words_int32_load``: the same words read straight as int32 (no float32 view in between): what
  the float32 view saves, inductor's integer vector loads;
- ``planar_bytes``: an alternative byte layout, codes cut into ``8 // field`` flat slices
  sharing each byte, unpacked with constant shifts and a concatenation;
- ``interleaved``: a nibble-interleaved layout, element 2i in the low nibble and 2i + 1 in the high
  one, unpacked by shifting against a stored shift buffer;
- ``int8``: one code per byte, no unpacking (the earlier floor);
- ``float``: the dequantize arithmetic alone on float codes (no unpacking at all).

    python -m benchmarks.unpack_speed --threads 1
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from cora_fx.quant.packing import field_bits, pack_codes, unpack_codes, word_shifts


def _best_ms(fn: Callable, args: tuple, repeats: int) -> float:
    compiled = torch.compile(fn)
    compiled(*args)
    compiled(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)  # min: robust to other jobs on the machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--cols", type=int, default=1280)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.rows, args.cols)
    numel = args.rows * args.cols
    field = field_bits(args.bits)
    per_byte = 8 // field
    codes = torch.randint(0, 2 ** args.bits, shape, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    zero_point = torch.full((args.rows, 1), 2.0 ** (args.bits - 1))
    scale = torch.rand(args.rows, 1)
    expected = (codes.float() - zero_point) * scale

    flat = torch.cat([codes.reshape(-1), codes.new_zeros((-numel) % per_byte)]).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * field
    interleaved = (flat.reshape(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)
    planar = (flat.reshape(per_byte, -1) << shifts.unsqueeze(1)).sum(dim=0).to(torch.uint8)
    shift_buffer = shifts.to(torch.uint8)
    mask = (1 << field) - 1

    def words_fn(packed, word_shift, zp, s):
        return (unpack_codes(packed, word_shift, args.bits, shape).to(torch.float32) - zp) * s

    def words_int32_load_fn(words, word_shift, zp, s):
        spread = torch.bitwise_and(torch.bitwise_right_shift(words.unsqueeze(0), word_shift), mask)
        return (spread.reshape(-1, args.cols)[:args.rows].to(torch.float32) - zp) * s

    def planar_fn(packed, zp, s):
        parts = [torch.bitwise_and(torch.bitwise_right_shift(packed, j * field), mask) for j in range(per_byte)]
        return (torch.cat(parts)[:numel].reshape(shape).to(torch.float32) - zp) * s

    def interleaved_fn(packed, shift, zp, s):
        spread = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shift), mask)
        return (spread.reshape(-1)[:numel].reshape(shape).to(torch.float32) - zp) * s

    def int8_fn(packed, zp, s):
        return (packed.reshape(shape).to(torch.float32) - zp) * s

    def float_fn(c, zp, s):
        return (c - zp) * s

    packed_words = pack_codes(codes, args.bits)
    cases = {"words": (words_fn, (packed_words, word_shifts(args.bits), zero_point, scale)),
             "words_int32_load": (words_int32_load_fn,
                                  (packed_words.view(torch.int32), word_shifts(args.bits), zero_point, scale)),
             "planar_bytes": (planar_fn, (planar, zero_point, scale)),
             "interleaved": (interleaved_fn, (interleaved, shift_buffer, zero_point, scale)),
             "int8": (int8_fn, (codes.reshape(-1).clone(), zero_point, scale)),
             "float": (float_fn, (codes.float(), zero_point, scale))}
    result = {}
    for name, (fn, fn_args) in cases.items():
        with torch.no_grad():
            assert torch.equal(fn(*fn_args), expected), name  # all decode the same weights
            result[f"{name}_ms"] = _best_ms(fn, fn_args, args.repeats)
    result["planar_bytes_over_words"] = result["planar_bytes_ms"] / result["words_ms"]
    print(json.dumps(dict(rows=args.rows, cols=args.cols, bits=args.bits, threads=torch.get_num_threads(), **result),
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
