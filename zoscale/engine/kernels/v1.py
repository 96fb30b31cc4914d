"""Triton kernels of stream v1 (rng.py: four values per Philox call at counter (i // 4, stream, 0))
and the device helpers both versions share.

Each program covers BLOCK consecutive global element indices aligned to 4, so every Philox call
yields four values that are all used; loads and stores are 1-D and, when the segment starts on a
multiple of 4 and its pointers on 16 bytes, carry that alignment as a hint so the compiler can
vectorise them. Only scalars are 64-bit: shards beyond 2**31 elements and global offsets beyond
2**32 are routine at 13B+. A program finds its segment's row (pointers, size, global start, stream)
in a table that ``launch.py`` builds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 4096  # elements per program: 32 a thread at 4 warps, 8 Philox calls in flight each
NUM_WARPS = 4

@triton.jit
def _philox(seed, c0, c1, c2, c3):
    """Philox4x32-10, the words of tl.philox(seed, c0, c1, c2, c3): each round's two 32x32-bit
    products are one widening multiply each (IMAD.WIDE.U32), where tl.philox issues a high and
    a low multiply."""
    k0, k1 = (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        a = c0.to(tl.uint64) * 0xD2511F53
        b = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1 = (b >> 32).to(tl.uint32) ^ c1 ^ k0, b.to(tl.uint32)
        c2, c3 = (a >> 32).to(tl.uint32) ^ c3 ^ k1, a.to(tl.uint32)
        k0 += 0x9E3779B9  # uint32: wraps
        k1 += 0xBB67AE85
    return c0, c1, c2, c3

@triton.jit
def _folded(word):
    """tl.uint_to_uniform_float's integer before its scaling: the word as int32, ~x for negatives."""
    x = word.to(tl.int32, bitcast=True)
    return (x ^ (x >> 31)).to(tl.float32)

@triton.jit
def _noise(seed, quad, stream, scale, QUADS: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr,
           CARRY: tl.constexpr):
    """scale * z as a (QUADS, 4) tile: element 4 * (quad + q) + k of the stream at [q, k]. The
    lanes are picked from the four (QUADS, 1) columns by a constant column index, so each
    thread's four words of a Philox call land in its own four elements: no shuffle, no shared
    memory."""
    n0, n1, n2, n3 = _noise_columns(seed, quad, stream, scale, QUADS, GAUSSIAN, FAST, CARRY)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))

@triton.jit
def _noise_columns(seed, quad, stream, scale, QUADS: tl.constexpr, GAUSSIAN: tl.constexpr,
                   FAST: tl.constexpr, CARRY: tl.constexpr):
    """Lanes 0-3 of counters quad, quad + 1, ...: four (QUADS, 1) columns of scale * z. The
    scale rides on the Box-Muller radius (one multiply per pair)."""
    q_lo, q_hi = (quad & 0xFFFFFFFF).to(tl.uint32), (quad >> 32).to(tl.uint32)
    lo = q_lo + tl.arange(0, QUADS)[:, None].to(tl.uint32)
    if CARRY:  # the block's counters cross a multiple of 2**32 (only MASKED blocks do: see _plan)
        hi = q_hi + (lo < q_lo).to(tl.uint32)
    else:
        hi = lo * 0 + q_hi
    w0, w1, w2, w3 = _philox(seed, lo, hi, stream.to(tl.uint32), lo * 0)
    if GAUSSIAN:
        if FAST:  # Triton's uniform (scale 4.6566127342e-10), with 2 pi folded into the angle's
            r0 = scale * tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, _folded(w0) * 4.6566127342e-10)))
            r2 = scale * tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, _folded(w2) * 4.6566127342e-10)))
            t1 = _folded(w1) * 2.92583607127508e-09
            t3 = _folded(w3) * 2.92583607127508e-09
            n0, n1 = r0 * libdevice.fast_cosf(t1), r0 * libdevice.fast_sinf(t1)
            n2, n3 = r2 * libdevice.fast_cosf(t3), r2 * libdevice.fast_sinf(t3)
        else:
            n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
            n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
            n0, n1, n2, n3 = scale * n0, scale * n1, scale * n2, scale * n3
    else:  # +scale where the word's top bit is 0, else -scale: the bit moved onto the sign
        bits = scale.to(tl.uint32, bitcast=True)
        n0 = ((w0 & 0x80000000) ^ bits).to(tl.float32, bitcast=True)
        n1 = ((w1 & 0x80000000) ^ bits).to(tl.float32, bitcast=True)
        n2 = ((w2 & 0x80000000) ^ bits).to(tl.float32, bitcast=True)
        n3 = ((w3 & 0x80000000) ^ bits).to(tl.float32, bitcast=True)
    return n0, n1, n2, n3

@triton.jit
def _block(table_ptr, owner_ptr, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's table row, the local offset of its first element (its global index is a
    multiple of 4: HEAD is the segment's start mod 4), its first Philox counter, its stream and
    the segment's size. A row is 8 int64 words (see _plan)."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(owner_ptr + pid).to(tl.int64) * 8
    numel, start, stream = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
    block = pid.to(tl.int64) - tl.load(row + 6) + tl.load(row + 7)
    base = block * BLOCK - HEAD
    return row, base, (start + base) // 4, stream, numel

@triton.jit
def _tile(BLOCK: tl.constexpr):
    return tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]

@triton.jit
def _pointer(row, column, base, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The block's first element in the row's tensor ``column``; ALIGNED: on 4 elements, so
    each thread's four contiguous elements are one 8- or 16-byte access."""
    pointer = (tl.load(row + column) + base * DTYPE.primitive_bitwidth // 8).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, DTYPE.primitive_bitwidth // 2)
    return pointer

@triton.jit
def _load(row, column, base, tile, numel, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    pointer = _pointer(row, column, base, DTYPE, ALIGNED) + tile
    if MASKED:
        return tl.load(pointer, mask=(tile >= -base) & (tile < numel - base), other=0.0).to(tl.float32)
    return tl.load(pointer).to(tl.float32)

@triton.jit
def _read(row, base, tile, numel, alpha, beta, gamma, SRC: tl.constexpr, BUF: tl.constexpr,
          HAS_BUF: tl.constexpr, UNIT: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """(alpha * src + beta * buf, gamma * buf): what a pass starts from, and an advancing
    pass's buffer before its noise (unused otherwise, and then not computed)."""
    y = _load(row, 1, base, tile, numel, SRC, ALIGNED, MASKED)
    if not UNIT:
        y = alpha * y
    m = y * 0.0
    if HAS_BUF:
        b = _load(row, 2, base, tile, numel, BUF, ALIGNED, MASKED)
        y += beta * b
        m = gamma * b
    return y, m

@triton.jit
def _store(row, column, base, tile, numel, y, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Write y into the row's tensor ``column``; returns it as stored (rounded to DTYPE)."""
    stored = y.to(DTYPE)
    pointer = _pointer(row, column, base, DTYPE, ALIGNED) + tile
    if MASKED:
        tl.store(pointer, stored, mask=(tile >= -base) & (tile < numel - base))
    else:
        tl.store(pointer, stored)
    return stored

@triton.jit
def _store_advanced(row, base, tile, numel, m, BUF: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Write the advanced buffer; returns the sum of its squares as stored."""
    stored = _store(row, 2, base, tile, numel, m, BUF, ALIGNED, MASKED).to(tl.float32)
    square = stored * stored
    if MASKED:
        square = tl.where((tile >= -base) & (tile < numel - base), square, 0.0)
    return tl.sum(tl.sum(square, axis=1), axis=0)

@triton.jit(do_not_specialize=["alpha", "beta", "gamma"])
def affine_noise(table_ptr, owner_ptr, key_ptr, coef_ptr, alpha, beta, advance_ptr, gamma, partial_ptr,
                         OUT: tl.constexpr, SRC: tl.constexpr, BUF: tl.constexpr, HAS_BUF: tl.constexpr,
                         UNIT: tl.constexpr, TERMS: tl.constexpr, HEAD: tl.constexpr, ALIGNED: tl.constexpr,
                         MASKED: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr,
                         BLOCK: tl.constexpr, ADVANCE: tl.constexpr):
    """out = alpha * src + sum_i coef[i] * z(key[i]) (+ beta * buf): one read and one write.
    Interior blocks run unmasked; a segment's partial first and last blocks, MASKED. UNIT:
    alpha is 1 (every pass without weight decay), so src needs no multiply. ADVANCE: in the same
    pass, buf = gamma * buf + sum_i advance[i] * z(key[i]) and partial[program] = sum(buf**2)
    (ConMeZO's momentum and its norm, from the noise the parameters get)."""
    row, base, quad, stream, numel = _block(table_ptr, owner_ptr, HEAD, BLOCK)
    tile = _tile(BLOCK)
    y, m = _read(row, base, tile, numel, alpha, beta, gamma, SRC, BUF, HAS_BUF, UNIT, ALIGNED, MASKED)
    one = tl.full([], 1.0, tl.float32)
    for t in tl.static_range(TERMS):
        seed = (tl.load(key_ptr + 2 * t + 1).to(tl.uint64) << 32) | tl.load(key_ptr + 2 * t).to(tl.uint64)
        if ADVANCE:
            z = _noise(seed, quad, stream, one, BLOCK // 4, GAUSSIAN, FAST, MASKED)
            y += tl.load(coef_ptr + t) * z
            m += tl.load(advance_ptr + t) * z
        else:
            y += _noise(seed, quad, stream, tl.load(coef_ptr + t), BLOCK // 4, GAUSSIAN, FAST, MASKED)
    _store(row, 0, base, tile, numel, y, OUT, ALIGNED, MASKED)
    if ADVANCE:
        tl.store(partial_ptr + tl.program_id(0), _store_advanced(row, base, tile, numel, m, BUF, ALIGNED, MASKED))

@triton.jit
def dot_noise(partial_ptr, table_ptr, owner_ptr, key_ptr, X: tl.constexpr, SQUARE: tl.constexpr,
                      HEAD: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, GAUSSIAN: tl.constexpr,
                      FAST: tl.constexpr, BLOCK: tl.constexpr):
    """partial[program] = sum over its block of x * z (SQUARE: z * z)."""
    row, base, quad, stream, numel = _block(table_ptr, owner_ptr, HEAD, BLOCK)
    tile = _tile(BLOCK)
    seed = (tl.load(key_ptr + 1).to(tl.uint64) << 32) | tl.load(key_ptr).to(tl.uint64)
    one = tl.full([], 1.0, tl.float32)
    if SQUARE and not MASKED:  # the columns' squares: no tile, no layout change
        n0, n1, n2, n3 = _noise_columns(seed, quad, stream, one, BLOCK // 4, GAUSSIAN, FAST, MASKED)
        value = n0 * n0 + n1 * n1 + n2 * n2 + n3 * n3
    elif SQUARE:
        z = _noise(seed, quad, stream, one, BLOCK // 4, GAUSSIAN, FAST, MASKED)
        value = tl.where((tile >= -base) & (tile < numel - base), z * z, 0.0)
    else:
        z = _noise(seed, quad, stream, one, BLOCK // 4, GAUSSIAN, FAST, MASKED)
        value = _load(row, 0, base, tile, numel, X, ALIGNED, MASKED) * z
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(value, axis=1), axis=0))


DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
           torch.float64: tl.float64}

