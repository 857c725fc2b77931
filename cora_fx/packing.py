"""Sub-byte storage of integer codes: 8 // field codes per uint8, field in {2, 4, 8} bits.

2-bit codes go four to a byte, 3- and 4-bit codes two to a byte (a nibble each), 5..8-bit
codes one to a byte. The layout is planar: the flat codes are cut into ``8 // field``
contiguous slices of equal length (the last one zero-padded) and slice ``j`` fills bits
``j * field ..`` of every byte, so unpacking is one constant shift and mask per slice and a
concatenation, which inductor vectorizes (an interleaved layout measured 4.4x slower to unpack
under ``torch.compile``: benchmarks/unpack_speed.py, RESULTS.md section 2). `unpack_codes` is the reference for the ops the
converted graph emits (`lowering._Emitter.weight`).
"""
from __future__ import annotations

import torch


def field_bits(bits: int) -> int:
    """Width of one code's slot in a byte."""
    for field in (2, 4, 8):
        if bits <= field:
            return field
    raise ValueError(f"bits={bits}: at most 8 bits per code")


def slice_len(numel: int, bits: int) -> int:
    """Length of each planar slice (= bytes of the packed tensor)."""
    return -(-numel // (8 // field_bits(bits)))


def pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (0 .. 2^bits - 1) into a flat uint8 tensor (planar layout)."""
    field = field_bits(bits)
    per_byte = 8 // field
    flat = unsigned.reshape(-1).to(torch.int32)
    length = slice_len(flat.numel(), bits)
    flat = torch.cat([flat, flat.new_zeros(per_byte * length - flat.numel())]).reshape(per_byte, length)
    shifts = (torch.arange(per_byte, dtype=torch.int32) * field).unsqueeze(1)
    return (flat << shifts).sum(dim=0).to(torch.uint8)


def unpack_slices(packed, bits: int) -> list:
    """The planar slices of ``packed``: ``(packed >> j * field) & mask``, constant shifts only."""
    field = field_bits(bits)
    per_byte = 8 // field
    mask = (1 << field) - 1
    out = []
    for j in range(per_byte):
        part = packed if j == 0 else torch.bitwise_right_shift(packed, j * field)
        out.append(part if j == per_byte - 1 and j > 0 else torch.bitwise_and(part, mask))
    return out


def unpack_codes(packed, bits: int, shape: tuple[int, ...]):
    """Inverse of `pack_codes`: uint8 codes of ``shape``.

    Also takes a ``torch.fx.Proxy`` of ``packed``: `lowering` emits exactly these ops.
    """
    numel = 1
    for size in shape:
        numel *= size
    if field_bits(bits) == 8:
        return packed.reshape(shape)
    codes = torch.cat(unpack_slices(packed, bits))
    if slice_len(numel, bits) * (8 // field_bits(bits)) != numel:
        codes = codes[:numel]
    return codes.reshape(shape)
