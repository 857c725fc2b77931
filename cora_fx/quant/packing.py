"""Sub-byte storage of integer codes: 32-bit words of ``32 // field`` codes, field in {2, 4, 8} bits.

2-bit codes go sixteen to a word, 3- and 4-bit codes eight (a nibble each), 5..8-bit codes
four (a byte each). The layout is row-planar: the codes of a weight are viewed as a
``(rows, cols)`` matrix (rows = output channels), the rows are zero-padded to a multiple of
``per = 32 // field`` and cut into ``per`` blocks of ``rows / per`` rows; block ``j`` fills bits
``j * field ..`` of the words. Unpacking is then one broadcast shift against the ``per`` shifts
(`word_shifts`) and one mask, and every output row keeps a single scale and zero point, so
inductor emits one contiguous, vectorized loop per weight.

The words are stored as little-endian **bytes** (a uint8 buffer: `model.half()` leaves it
alone) and reinterpreted in the graph as ``bytes.view(float32)`` and, per weight, a slice of that
``.view(int32)``. A view between dtypes of different widths is an alias that inductor does not
fuse (it calls aten), so the generated kernel loads float32 vectors and bit-casts them in
registers; the bit-cast moves bits only, so NaN or denormal patterns survive it (tests). Loading
the int32 words directly goes through a temporary buffer in ATen's AVX2
``Vectorized<int>::loadu(ptr, count)``, several times slower; `benchmarks/unpack_speed.py` times
the layouts side by side. Each aten view costs the compiled graph's Python wrapper a few microseconds, so
`convert_cora` keeps the words of all weights in one buffer (``cora_packed_words``) and views
it once. `unpack_codes` / `unpack_words` are the reference for the ops the converted graph emits
(`lowering._Emitter.weight`).
"""
from __future__ import annotations

import sys

import torch

WORD_BITS = 32


def field_bits(bits: int) -> int:
    """Width of one code's slot in a word."""
    for field in (2, 4, 8):
        if bits <= field:
            return field
    raise ValueError(f"bits={bits}: at most 8 bits per code")


def codes_per_word(bits: int) -> int:
    """Codes of ``bits`` bits in one 32-bit word."""
    return WORD_BITS // field_bits(bits)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    numel = 1
    for size in shape:
        numel *= size
    return rows, numel // rows if rows else 0


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    """Shape of the uint8 tensor `pack_codes` returns: (ceil(rows / per), 4 * cols)."""
    rows, cols = _matrix_shape(shape)
    return -(-rows // codes_per_word(bits)), 4 * cols


def word_shifts(bits: int) -> torch.Tensor:
    """The ``per`` right shifts that unpack a word, shaped (per, 1, 1) to broadcast over (words, cols)."""
    return torch.arange(0, WORD_BITS, field_bits(bits), dtype=torch.int32).view(-1, 1, 1)


def pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (0 .. 2^bits - 1, any shape, dim 0 = rows) into little-endian word bytes."""
    if sys.byteorder != "little":
        raise RuntimeError("cora_fx's packed weights are read as little-endian words; this host is big-endian")
    per = codes_per_word(bits)
    rows, cols = _matrix_shape(tuple(unsigned.shape))
    word_rows = packed_shape(tuple(unsigned.shape), bits)[0]
    matrix = unsigned.reshape(rows, cols).to(torch.int64)
    padded = torch.cat([matrix, matrix.new_zeros(per * word_rows - rows, cols)]).reshape(per, word_rows, cols)
    words = (padded << word_shifts(bits).to(padded.device, torch.int64)).sum(dim=0)  # < 2^32: exact in int64
    byte_shifts = torch.arange(0, WORD_BITS, 8, dtype=torch.int64, device=padded.device)
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(word_rows, 4 * cols)


def unpack_codes(packed, shifts, bits: int, shape: tuple[int, ...]):
    """Inverse of `pack_codes`: int32 codes of ``shape``; ``shifts`` is `word_shifts` (bits)."""
    return unpack_words(packed.view(torch.float32), shifts, bits, shape)  # float32 view: see the module docstring


def unpack_words(words, shifts, bits: int, shape: tuple[int, ...]):
    """int32 codes of ``shape`` from the packed words seen as float32, shaped (word rows, cols).

    Also takes ``torch.fx.Proxy`` arguments: `lowering` emits exactly these ops, on a slice of
    the model's single float32 view of its packed bytes.
    """
    per = codes_per_word(bits)
    rows, cols = _matrix_shape(shape)
    codes = torch.bitwise_and(torch.bitwise_right_shift(words.view(torch.int32).unsqueeze(0), shifts),
                              (1 << field_bits(bits)) - 1)
    codes = codes.reshape(per * packed_shape(shape, bits)[0], cols)
    if rows % per:
        codes = codes[:rows]
    return codes.reshape(shape)
