"""Triton kernels (CUDA) for the perturbation engine, generating the stream that ``zoscale.rng``
defines: element i uses Philox4x32-10 at counter (i // 4 as two words, stream, 0), lane i % 4.

One launch covers many tensors (segments): a table on the device holds each segment's pointers,
size, global start and stream, and each program finds its row from a per-block owner array. A
launch per parameter costs more than the pass itself on models with hundreds of small tensors
(OPT-1.3B: 14 ms per pass launched per tensor, 4 ms from a table, on an H100). Each program covers
BLOCK consecutive global element indices aligned to 4, so every Philox call yields four values that
are all used; loads and stores are 1-D and, when the segment starts on a multiple of 4 and its
pointers on 16 bytes, carry that alignment as a hint so the compiler can vectorise them. Only
scalars are 64-bit: shards beyond 2**31 elements and global offsets beyond 2**32 are routine at 13B+.

    affine_noise_(segments, ...)  out = alpha * src + sum_i c_i * z(seed_i) [+ beta * buf], one pass
    dot_noise(segments, ...)      sum(x * z(seed)) (or sum(z**2)), fp32 per block, fp64 across blocks

On a GPU Box-Muller uses the fast (approximate) log, cos and sin: the integer stream is the same,
the normals differ from rng.py's by a few 1e-6 at most. Tests run these on CPU under
TRITON_INTERPRET=1 (precise functions there) and compare with rng.py.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from zoscale import rng

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU installs without triton use rng.py only
    triton = None

BLOCK = 4096  # elements per program: 32 a thread at 4 warps, 8 Philox calls in flight each
NUM_WARPS = 4
# v2: a panel per program (rng.V2_SLOTS x rng.V2_CALLS elements); rows of slots per tile, warps
V2_ROWS = {"gaussian": 8, "rademacher": 32}
V2_WARPS = {"gaussian": 4, "rademacher": 1}


def available() -> bool:
    return triton is not None


if triton is not None:

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
    def _affine_noise_kernel(table_ptr, owner_ptr, key_ptr, coef_ptr, alpha, beta, advance_ptr, gamma, partial_ptr,
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
    def _dot_noise_kernel(partial_ptr, table_ptr, owner_ptr, key_ptr, X: tl.constexpr, SQUARE: tl.constexpr,
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

    # -- stream v2: a program per panel of SLOTS x Q elements (rng.py); element (slot s, call j)
    # sits at s * Q + j, so a tile of ROWS slots by Q calls gives each thread runs of contiguous
    # elements whose values come from its own calls: no value moves between threads
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
    def _affine_noise_v2_kernel(table_ptr, owner_ptr, key_ptr, coef_ptr, alpha, beta, advance_ptr, gamma,
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
    def _dot_noise_v2_kernel(partial_ptr, table_ptr, owner_ptr, key_ptr, X: tl.constexpr, SQUARE: tl.constexpr,
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

    _DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
               torch.float64: tl.float64}


def _fast() -> bool:
    # The interpreter has no libdevice; it runs the precise Box-Muller of rng.py.
    return os.environ.get("TRITON_INTERPRET") != "1"


class Segment(NamedTuple):
    """Global elements [start, start + out.numel()) of one stream, laid out in ``out`` (flat and
    contiguous). ``src`` (default ``out``) is read; ``buf``, when given, is added times beta."""

    out: torch.Tensor
    start: int
    stream: int
    src: torch.Tensor | None = None
    buf: torch.Tensor | None = None


class Terms:
    """(seed, coefficient) pairs staged on a device once per pass and shared by every launch.
    Seeds go as two uint32 words each (stored in int64), so all 64-bit seeds pass unchanged."""

    def __init__(self, terms, device):
        terms = list(terms)
        self.count = len(terms)
        words = [w for seed, _ in terms for w in (seed & 0xFFFFFFFF, seed >> 32)] or [0, 0]
        self.keys = torch.tensor(words, dtype=torch.int64, device=device)
        self.coefs = torch.tensor([float(c) for _, c in terms] or [0.0], dtype=torch.float32, device=device)


class _Launch(NamedTuple):
    table: torch.Tensor
    owner: torch.Tensor
    head: int
    aligned: bool
    masked: bool
    dtypes: tuple  # out, src, buf (None without a buffer)


# segment layout -> its launches, with their tables already on the device: a pass over the same
# shards (every pass of a run) copies nothing from the host but the seed terms
_plans: dict = {}


def _layout(segments) -> tuple:
    return tuple((seg.out.data_ptr(), (seg.out if seg.src is None else seg.src).data_ptr(),
                  0 if seg.buf is None else seg.buf.data_ptr(), seg.out.numel(), seg.start, seg.stream,
                  seg.out.dtype, (seg.out if seg.src is None else seg.src).dtype, None if seg.buf is None
                  else seg.buf.dtype, str(seg.out.device)) for seg in segments)


def _plan(segments, panel: int = 0) -> list[_Launch]:
    key = (_layout(segments), panel)
    if key not in _plans:
        if len(_plans) >= 64:
            _plans.pop(next(iter(_plans)))
        _plans[key] = _build_plan(segments, panel)
    return _plans[key]


def _panel_size(version: str, distribution: str) -> int:
    """0 for v1 (blocks of BLOCK from a multiple of 4), else v2's panel."""
    return 0 if version == "v1" else rng.V2_SLOTS[distribution] * rng.V2_CALLS[distribution]


def _build_plan(segments, panel: int = 0) -> list[_Launch]:
    """Each segment's blocks as two launches per group of what the kernel specialises on (dtypes,
    start mod 4, alignment): the interior blocks, unmasked, and the partial first and last ones.
    v1 (``panel`` 0): blocks of BLOCK elements from the multiple of 4 at or below the segment's
    start; v2: the panels it overlaps (its start within the first is read by the kernel)."""
    groups: dict = {}
    for seg in segments:
        src = seg.out if seg.src is None else seg.src
        tensors = [t for t in (seg.out, src, seg.buf) if t is not None]
        if any(not t.is_contiguous() or t.numel() != seg.out.numel() for t in tensors):
            raise ValueError("segments need contiguous tensors of equal size")
        size = panel or BLOCK
        numel, head = seg.out.numel(), seg.start % (panel or 4)
        if numel == 0:  # an empty shard (a rank with no rows of a small parameter)
            continue
        # block k holds local elements [k * size - head, (k + 1) * size - head)
        aligned = all((t.data_ptr() - head % 4 * t.element_size()) % (4 * t.element_size()) == 0 for t in tensors)
        blocks = triton.cdiv(numel + head, size)
        first_full, end_full = (1 if head else 0), (numel + head) // size
        # masked: the partial first and last blocks, and (v1) those whose counters carry into the high word
        carries = [] if panel else _carry_blocks((seg.start - head) // 4, BLOCK // 4, blocks)
        edges = sorted({k for k in (0, blocks - 1) if not first_full <= k < end_full} | set(carries))
        head = 0 if panel else head  # v2 kernels read it from the row: launches need not split by it
        # out, src, buf pointers; numel, global start, stream; first program (set below), first block
        row = [seg.out.data_ptr(), src.data_ptr(), 0 if seg.buf is None else seg.buf.data_ptr(), numel,
               seg.start, seg.stream, 0]
        dtypes = (seg.out.dtype, src.dtype, None if seg.buf is None else seg.buf.dtype)
        for lo, hi in _runs(first_full, end_full, edges):
            groups.setdefault((dtypes, head, aligned, False), []).append((row + [lo], hi - lo))
        for k in edges:
            groups.setdefault((dtypes, head, aligned, True), []).append((row + [k], 1))
    launches = []
    for (dtypes, head, aligned, masked), rows in groups.items():
        device = segments[0].out.device
        first = 0
        for row, count in rows:
            row[6] = first
            first += count
        table = torch.tensor([r for r, _ in rows], dtype=torch.int64).to(device)
        counts = torch.tensor([c for _, c in rows], device=device)
        owner = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32, device=device), counts)
        launches.append(_Launch(table, owner, head, aligned, masked, dtypes))
    return launches


def _carry_blocks(first_quad: int, quads: int, blocks: int) -> list[int]:
    """The blocks k (of ``blocks``, ``quads`` counters each from ``first_quad``) whose counters cross
    a multiple of 2**32: once every 2**32 counters, so at most a few per segment."""
    out, boundary = [], (first_quad >> 32) + 1 << 32
    while boundary < first_quad + blocks * quads:
        k = (boundary - first_quad) // quads
        if (boundary - first_quad) % quads:
            out.append(k)
        boundary += 1 << 32
    return out


def _runs(begin: int, end: int, holes) -> list[tuple[int, int]]:
    """[begin, end) without the blocks in ``holes``, as contiguous (lo, hi) runs."""
    runs, lo = [], begin
    for k in sorted(h for h in holes if begin <= h < end):
        if k > lo:
            runs.append((lo, k))
        lo = k + 1
    return runs + ([(lo, end)] if end > lo else [])


def affine_noise_(segments, *, distribution: str, terms, alpha: float = 1.0, beta: float = 0.0,
                  version: str = "v1", advance: tuple[float, list[float]] | None = None) -> torch.Tensor | None:
    """out = alpha * src + sum(c * z(s) for s, c in terms) [+ beta * buf], for every segment, in
    two launches per group. ``out`` may be ``src``. ``terms`` is a list of (seed, coefficient) or a
    ``Terms`` already on the device. ``version``: the stream (rng.py).

    ``advance`` = (gamma, [e_i per term]): every segment's ``buf`` becomes gamma * buf + sum_i
    e_i z(s_i) in the same pass (the noise drawn once for both), and the sum of its squares comes
    back as a float64 scalar tensor on the device."""
    segments = list(segments)
    if not segments:
        return None
    device = segments[0].out.device
    staged = terms if isinstance(terms, Terms) else Terms(terms, device)
    gamma, advance_coefs = (0.0, staged.coefs) if advance is None else \
        (float(advance[0]), torch.tensor([float(e) for e in advance[1]], dtype=torch.float32, device=device))
    if advance is not None and any(seg.buf is None for seg in segments):
        raise ValueError("advance needs every segment's buf")
    total = None if advance is None else torch.zeros((), dtype=torch.float64, device=device)
    panel = _panel_size(version, distribution)
    for launch in _plan(segments, panel):
        out, src, buf = launch.dtypes
        programs = launch.owner.numel()
        partial = staged.coefs if advance is None else torch.empty(programs, dtype=torch.float32, device=device)
        common = dict(OUT=_DTYPES[out], SRC=_DTYPES[src], BUF=_DTYPES[buf or out], HAS_BUF=buf is not None,
                      UNIT=alpha == 1.0, TERMS=staged.count, ALIGNED=launch.aligned, MASKED=launch.masked,
                      GAUSSIAN=distribution == "gaussian", FAST=_fast(), ADVANCE=advance is not None)
        arguments = (launch.table, launch.owner, staged.keys, staged.coefs, float(alpha), float(beta), advance_coefs,
                     gamma, partial)
        if panel:
            _affine_noise_v2_kernel[(programs,)](*arguments, **common, **_v2_shape(distribution))
        else:
            _affine_noise_kernel[(programs,)](*arguments, **common, HEAD=launch.head, BLOCK=BLOCK,
                                              num_warps=NUM_WARPS)
        if total is not None:
            total += partial.double().sum()
    return total


def _v2_shape(distribution: str) -> dict:
    return {"Q": rng.V2_CALLS[distribution], "SLOTS": rng.V2_SLOTS[distribution], "ROWS": V2_ROWS[distribution],
            "num_warps": V2_WARPS[distribution]}


def dot_noise(segments, *, distribution: str, seed: int, square: bool = False, version: str = "v1") -> torch.Tensor:
    """sum(out * z(seed)) over all segments (``square``: sum(z**2), ``out`` only gives the size),
    as a float64 scalar tensor on the segments' device: no host synchronisation."""
    segments = list(segments)
    device = segments[0].out.device
    keys = Terms([(seed, 1.0)], device).keys
    total = torch.zeros((), dtype=torch.float64, device=device)
    panel = _panel_size(version, distribution)
    for launch in _plan(segments, panel):
        partial = torch.empty(launch.owner.numel(), dtype=torch.float32, device=device)
        if panel:
            _dot_noise_v2_kernel[(launch.owner.numel(),)](
                partial, launch.table, launch.owner, keys, X=_DTYPES[launch.dtypes[0]], SQUARE=square,
                ALIGNED=launch.aligned, MASKED=launch.masked, GAUSSIAN=distribution == "gaussian", FAST=_fast(),
                **_v2_shape(distribution))
            total += partial.double().sum()
            continue
        _dot_noise_kernel[(launch.owner.numel(),)](
            partial, launch.table, launch.owner, keys, X=_DTYPES[launch.dtypes[0]], SQUARE=square,
            HEAD=launch.head, ALIGNED=launch.aligned, MASKED=launch.masked, GAUSSIAN=distribution == "gaussian",
            FAST=_fast(), BLOCK=BLOCK, num_warps=NUM_WARPS)
        total += partial.double().sum()
    return total


class SassTarget(NamedTuple):
    """One kernel specialisation as the engine launches it, for profiling/sass_count.py."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    elements_per_program: int
    record: dict


def sass_targets() -> list[SassTarget]:
    """The interior-block specialisations a run launches, for both stream versions: per
    distribution and dtype, the affine pass with 1 to 3 seed terms (MeZO's passes: 1; its deferred
    update and n-SPSA: 2 and more), with a buffer (ConMeZO's momentum), and the dot and square
    reductions."""
    affine_args = {"table_ptr": "*i64", "owner_ptr": "*i32", "key_ptr": "*i64", "coef_ptr": "*fp32", "alpha": "fp32",
                   "beta": "fp32", "advance_ptr": "*fp32", "gamma": "fp32", "partial_ptr": "*fp32"}
    dot_args = {"partial_ptr": "*fp32", "table_ptr": "*i64", "owner_ptr": "*i32", "key_ptr": "*i64"}
    names = {tl.bfloat16: "bfloat16", tl.float16: "float16", tl.float32: "float32"}
    targets = []
    for version in rng.STREAMS:
        for distribution in ("gaussian", "rademacher"):
            if version == "v1":
                affine, dot, warps, elements = _affine_noise_kernel, _dot_noise_kernel, NUM_WARPS, BLOCK
                common = {"HEAD": 0, "ALIGNED": True, "MASKED": False, "FAST": True, "BLOCK": BLOCK}
            else:
                shape = _v2_shape(distribution)
                affine, dot, warps = _affine_noise_v2_kernel, _dot_noise_v2_kernel, shape.pop("num_warps")
                elements = _panel_size(version, distribution)
                common = {"ALIGNED": True, "MASKED": False, "FAST": True, **shape}
            suffix = "" if version == "v1" else "-v2"
            for dtype, dtype_name in names.items():
                # ConMeZO's passes: a buffer read (the direction), then also written (the momentum's advance)
                cases = [(terms, False, False) for terms in (1, 2, 3)] + [(1, True, False), (1, True, True)]
                for terms, buffer, advance in cases:
                    constexprs = {"OUT": dtype, "SRC": dtype, "BUF": tl.float32, "HAS_BUF": buffer, "UNIT": True,
                                  "TERMS": terms, "GAUSSIAN": distribution == "gaussian", "ADVANCE": advance, **common}
                    kind = "-advance" if advance else "-buffer" if buffer else ""
                    targets.append(SassTarget(
                        f"affine-{distribution}-{dtype_name}-{terms}{kind}{suffix}", affine,
                        {**affine_args, **{k: "constexpr" for k in constexprs}}, constexprs, warps, elements,
                        {"kernel": "affine-advance" if advance else "affine", "stream": version,
                         "distribution": distribution, "dtype": dtype_name, "terms": terms, "buffer": buffer}))
                for square in (False, True):
                    constexprs = {"X": dtype, "SQUARE": square, "GAUSSIAN": distribution == "gaussian", **common}
                    targets.append(SassTarget(
                        f"{'square' if square else 'dot'}-{distribution}-{dtype_name}{suffix}", dot,
                        {**dot_args, **{k: "constexpr" for k in constexprs}}, constexprs, warps, elements,
                        {"kernel": "square" if square else "dot", "stream": version, "distribution": distribution,
                         "dtype": dtype_name, "terms": 1, "buffer": False}))
    return targets
