"""Triton kernels of stream v2 (rng.py: 8 normals or 128 signs per Philox call, in panels).

A program per panel of SLOTS x Q elements; element (slot s, call j) sits at s * Q + j, so a tile
of ROWS slots by Q calls gives each thread runs of contiguous elements whose values come from its
own calls: no value moves between threads. Loads, stores and Philox are v1's helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from zoscale.engine.kernels.v1 import _load, _philox, _read, _store, _store_advanced

# rows of slots per tile, and warps, per distribution
ROWS = {"gaussian": 8, "rademacher": 32}
WARPS = {"gaussian": 4, "rademacher": 1}

@triton.jit
def _panel(table_ptr, owner_ptr, PANEL: tl.constexpr, Q: tl.constexpr):
    """This program's row, the local offset of its panel's first element (negative for a
    segment's first panel when it starts inside one), the panel's first call, stream, size."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(owner_ptr + pid).to(tl.int64) * 8
    numel, start, stream = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
    block = pid.to(tl.int64) - tl.load(row + 6) + tl.load(row + 7)
    head = start % PANEL
    return row, block * PANEL - head, ((start - head) // PANEL + block) * Q, stream, numel

@triton.jit
def _v2_words(key_ptr, t, call, stream, Q: tl.constexpr):
    """Term t's four words for calls call + [0, Q): Q divides 2**32 and call, so no carry."""
    seed = (tl.load(key_ptr + 2 * t + 1).to(tl.uint64) << 32) | tl.load(key_ptr + 2 * t).to(tl.uint64)
    lo = (call & 0xFFFFFFFF).to(tl.uint32) + tl.arange(0, Q).to(tl.uint32)
    return _philox(seed, lo, lo * 0 + (call >> 32).to(tl.uint32), stream.to(tl.uint32), lo * 0 + 2)

@triton.jit
def _v2_gaussian_pair(word, scale, FAST: tl.constexpr):
    """scale * (r cos, r sin) from the 16-bit halves of one word (never 0: no floor needed)."""
    u1 = ((word >> 16).to(tl.float32) + 0.5) * (1.0 / 65536.0)
    t = ((word & 0xFFFF).to(tl.float32) + 0.5) * 9.587379924285257e-05  # 2 pi / 2**16
    if FAST:
        r = scale * tl.sqrt(-2.0 * libdevice.fast_logf(u1))
        return r * libdevice.fast_cosf(t), r * libdevice.fast_sinf(t)
    r = scale * tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(t), r * tl.sin(t)

@triton.jit
def _v2_noise(w0, w1, w2, w3, scale, group, GAUSSIAN: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr):
    """scale * z for slots group * ROWS + [0, ROWS) as a (ROWS, Q) tile. Gaussian: ROWS 8, the
    whole panel, each slot picked by a constant row index; Rademacher: ROWS 32, the bits of one
    word, each moved onto the sign of scale."""
    rows = tl.arange(0, ROWS)[:, None]
    if GAUSSIAN:
        a0, a1 = _v2_gaussian_pair(w0, scale, FAST)
        b0, b1 = _v2_gaussian_pair(w1, scale, FAST)
        c0, c1 = _v2_gaussian_pair(w2, scale, FAST)
        d0, d1 = _v2_gaussian_pair(w3, scale, FAST)
        return tl.where(rows == 0, a0[None, :], tl.where(rows == 1, a1[None, :], tl.where(
            rows == 2, b0[None, :], tl.where(rows == 3, b1[None, :], tl.where(
                rows == 4, c0[None, :], tl.where(rows == 5, c1[None, :], tl.where(
                    rows == 6, d0[None, :], d1[None, :])))))))
    if group == 0:
        word = w0
    elif group == 1:
        word = w1
    elif group == 2:
        word = w2
    else:
        word = w3
    bits = scale.to(tl.uint32, bitcast=True)
    return (((word[None, :] << (31 - rows).to(tl.uint32)) & 0x80000000) ^ bits).to(tl.float32, bitcast=True)

@triton.jit(do_not_specialize=["alpha", "beta", "gamma"])
def affine_noise(table_ptr, owner_ptr, key_ptr, coef_ptr, alpha, beta, advance_ptr, gamma,
                            partial_ptr, OUT: tl.constexpr, SRC: tl.constexpr, BUF: tl.constexpr,
                            HAS_BUF: tl.constexpr, UNIT: tl.constexpr, TERMS: tl.constexpr,
                            ALIGNED: tl.constexpr, MASKED: tl.constexpr, GAUSSIAN: tl.constexpr,
                            FAST: tl.constexpr, Q: tl.constexpr, SLOTS: tl.constexpr, ROWS: tl.constexpr,
                            ADVANCE: tl.constexpr):
    """The v1 kernel (ADVANCE included) on the v2 stream, a panel per program, ROWS slots at a
    time. One seed term: its words are drawn once for the whole panel; with more, once per
    group of rows."""
    row, base, call, stream, numel = _panel(table_ptr, owner_ptr, SLOTS * Q, Q)
    columns = tl.arange(0, Q)[None, :]
    one = tl.full([], 1.0, tl.float32)
    if TERMS == 1:
        w0, w1, w2, w3 = _v2_words(key_ptr, 0, call, stream, Q)
        coef = tl.load(coef_ptr)
    square = tl.zeros([], tl.float32)
    for group in tl.static_range(SLOTS // ROWS):
        tile = (group * ROWS + tl.arange(0, ROWS))[:, None] * Q + columns
        y, m = _read(row, base, tile, numel, alpha, beta, gamma, SRC, BUF, HAS_BUF, UNIT, ALIGNED, MASKED)
        if ADVANCE and TERMS == 1:
            z = _v2_noise(w0, w1, w2, w3, one, group, GAUSSIAN, ROWS, FAST)
            y += coef * z
            m += tl.load(advance_ptr) * z
        elif ADVANCE:
            for t in tl.static_range(TERMS):
                v0, v1, v2, v3 = _v2_words(key_ptr, t, call, stream, Q)
                z = _v2_noise(v0, v1, v2, v3, one, group, GAUSSIAN, ROWS, FAST)
                y += tl.load(coef_ptr + t) * z
                m += tl.load(advance_ptr + t) * z
        elif TERMS == 1:
            y += _v2_noise(w0, w1, w2, w3, coef, group, GAUSSIAN, ROWS, FAST)
        else:
            for t in tl.static_range(TERMS):
                v0, v1, v2, v3 = _v2_words(key_ptr, t, call, stream, Q)
                y += _v2_noise(v0, v1, v2, v3, tl.load(coef_ptr + t), group, GAUSSIAN, ROWS, FAST)
        _store(row, 0, base, tile, numel, y, OUT, ALIGNED, MASKED)
        if ADVANCE:
            square += _store_advanced(row, base, tile, numel, m, BUF, ALIGNED, MASKED)
    if ADVANCE:
        tl.store(partial_ptr + tl.program_id(0), square)

@triton.jit
def dot_noise(partial_ptr, table_ptr, owner_ptr, key_ptr, X: tl.constexpr, SQUARE: tl.constexpr,
                         ALIGNED: tl.constexpr, MASKED: tl.constexpr, GAUSSIAN: tl.constexpr,
                         FAST: tl.constexpr, Q: tl.constexpr, SLOTS: tl.constexpr, ROWS: tl.constexpr):
    """partial[program] = sum over its panel of x * z (SQUARE: z * z), on the v2 stream."""
    row, base, call, stream, numel = _panel(table_ptr, owner_ptr, SLOTS * Q, Q)
    columns = tl.arange(0, Q)[None, :]
    w0, w1, w2, w3 = _v2_words(key_ptr, 0, call, stream, Q)
    one = tl.full([], 1.0, tl.float32)
    total = tl.zeros([], tl.float32)
    for group in tl.static_range(SLOTS // ROWS):
        tile = (group * ROWS + tl.arange(0, ROWS))[:, None] * Q + columns
        z = _v2_noise(w0, w1, w2, w3, one, group, GAUSSIAN, ROWS, FAST)
        if SQUARE:
            value = z * z
            if MASKED:
                value = tl.where((tile >= -base) & (tile < numel - base), value, 0.0)
        else:
            value = _load(row, 0, base, tile, numel, X, ALIGNED, MASKED) * z
        total += tl.sum(tl.sum(value, axis=1), axis=0)
    tl.store(partial_ptr + tl.program_id(0), total)

