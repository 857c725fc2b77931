"""Sub-byte storage of integer codes: 8 // field codes per uint8, field in {2, 4, 8} bits.

2-bit codes go four to a byte, 3- and 4-bit codes two to a byte (a nibble each), 5..8-bit
codes one to a byte. `unpack_codes` is the reference for the ops the converted graph emits.
"""
from __future__ import annotations

import torch


def field_bits(bits: int) -> int:
    """Width of one code's slot in a byte."""
    for field in (2, 4, 8):
        if bits <= field:
            return field
    raise ValueError(f"bits={bits}: at most 8 bits per code")


def pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (0 .. 2^bits - 1) into a flat uint8 tensor."""
    field = field_bits(bits)
    per_byte = 8 // field
    flat = unsigned.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * field
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_shifts(bits: int) -> torch.Tensor:
    """The per-slot right shifts used to unpack (a uint8 buffer of the converted module)."""
    field = field_bits(bits)
    return (torch.arange(8 // field, dtype=torch.int32) * field).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of ``shape``."""
    field = field_bits(bits)
    numel = 1
    for size in shape:
        numel *= size
    if field == 8:
        return packed[:numel].reshape(shape)
    mask = (1 << field) - 1
    codes = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), unpack_shifts(bits)), mask)
    return codes.reshape(-1)[:numel].reshape(shape)
