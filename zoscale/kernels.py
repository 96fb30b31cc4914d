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

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU installs without triton use rng.py only
    triton = None

BLOCK = 1024  # elements per program; 1024 with 4 warps was the fastest on an H100 (profiling/kernel_variants.py)
NUM_WARPS = 4


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _noise(seed, lo, hi, stream, GAUSSIAN: tl.constexpr, FAST: tl.constexpr):
        """Four values per counter (lo, hi): shape (len(lo), 4), element 4*quad + k in column k."""
        w0, w1, w2, w3 = tl.philox(seed, lo, hi, lo * 0 + stream.to(tl.uint32), lo * 0)
        if GAUSSIAN:
            if FAST:
                r0 = tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w0))))
                r2 = tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w2))))
                t1 = 6.283185307179586 * tl.uint_to_uniform_float(w1)
                t3 = 6.283185307179586 * tl.uint_to_uniform_float(w3)
                n0, n1 = r0 * libdevice.fast_cosf(t1), r0 * libdevice.fast_sinf(t1)
                n2, n3 = r2 * libdevice.fast_cosf(t3), r2 * libdevice.fast_sinf(t3)
            else:
                n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
                n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
        else:
            n0 = 1.0 - 2.0 * (w0 >> 31).to(tl.float32)
            n1 = 1.0 - 2.0 * (w1 >> 31).to(tl.float32)
            n2 = 1.0 - 2.0 * (w2 >> 31).to(tl.float32)
            n3 = 1.0 - 2.0 * (w3 >> 31).to(tl.float32)
        # join stacks along a new last axis: (n0|n2, n1|n3) flattens to n0, n1, n2, n3.
        return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (lo.shape[0], 4))

    @triton.jit
    def _block(table_ptr, owner_ptr, HEAD: tl.constexpr, BLOCK: tl.constexpr):
        """This program's table row, the local offset of its first element (global start - HEAD is
        a multiple of 4), the in-block bounds, the Philox counters of its quads, and its stream."""
        pid = tl.program_id(0)
        row = table_ptr + tl.load(owner_ptr + pid).to(tl.int64) * 8  # 8 int64 words a row: see _launches
        numel, start, stream, first = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
        base = (pid.to(tl.int64) - first) * BLOCK - HEAD
        lower = tl.maximum(-base, 0).to(tl.int32)
        upper = tl.minimum(numel - base, BLOCK).to(tl.int32)
        quad = (start + base) // 4  # 64-bit; the per-element counters are 32-bit words with a carry
        q_lo, q_hi = (quad & 0xFFFFFFFF).to(tl.uint32), (quad >> 32).to(tl.uint32)
        lo = q_lo + tl.arange(0, BLOCK // 4).to(tl.uint32)
        hi = q_hi + (lo < q_lo).to(tl.uint32)
        return row, base, lower, upper, lo, hi, stream

    @triton.jit
    def _pointer(row, column, base, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        address = tl.load(row + column)
        if ALIGNED:
            address = tl.multiple_of(address, 16)
        return address.to(tl.pointer_type(DTYPE)) + base

    @triton.jit(do_not_specialize=["n_terms", "alpha", "beta"])
    def _affine_noise_kernel(table_ptr, owner_ptr, key_ptr, coef_ptr, n_terms, alpha, beta,
                             OUT: tl.constexpr, SRC: tl.constexpr, BUF: tl.constexpr, HAS_BUF: tl.constexpr,
                             HEAD: tl.constexpr, ALIGNED: tl.constexpr, GAUSSIAN: tl.constexpr,
                             FAST: tl.constexpr, BLOCK: tl.constexpr):
        """out = alpha * src + sum_i coef[i] * z(key[i]) (+ beta * buf): one read and one write."""
        row, base, lower, upper, lo, hi, stream = _block(table_ptr, owner_ptr, HEAD, BLOCK)
        i = tl.arange(0, BLOCK)
        mask = (i >= lower) & (i < upper)
        out = _pointer(row, 0, base, OUT, ALIGNED)
        y = alpha * tl.load(_pointer(row, 1, base, SRC, ALIGNED) + i, mask=mask, other=0.0).to(tl.float32)
        if HAS_BUF:
            y += beta * tl.load(_pointer(row, 2, base, BUF, ALIGNED) + i, mask=mask, other=0.0).to(tl.float32)
        for t in range(n_terms):
            seed = (tl.load(key_ptr + 2 * t + 1).to(tl.uint64) << 32) | tl.load(key_ptr + 2 * t).to(tl.uint64)
            y += tl.load(coef_ptr + t) * tl.reshape(_noise(seed, lo, hi, stream, GAUSSIAN, FAST), (BLOCK,))
        tl.store(out + i, y.to(OUT), mask=mask)

    @triton.jit
    def _dot_noise_kernel(partial_ptr, table_ptr, owner_ptr, key_ptr, X: tl.constexpr, SQUARE: tl.constexpr,
                          HEAD: tl.constexpr, ALIGNED: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr,
                          BLOCK: tl.constexpr):
        row, base, lower, upper, lo, hi, stream = _block(table_ptr, owner_ptr, HEAD, BLOCK)
        i = tl.arange(0, BLOCK)
        mask = (i >= lower) & (i < upper)
        seed = (tl.load(key_ptr + 1).to(tl.uint64) << 32) | tl.load(key_ptr).to(tl.uint64)
        z = tl.reshape(_noise(seed, lo, hi, stream, GAUSSIAN, FAST), (BLOCK,))
        if SQUARE:
            value = tl.where(mask, z * z, 0.0)
        else:
            value = tl.load(_pointer(row, 0, base, X, ALIGNED) + i, mask=mask, other=0.0).to(tl.float32) * z
        tl.store(partial_ptr + tl.program_id(0), tl.sum(value))

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
    dtypes: tuple  # out, src, buf (None without a buffer)


# (device, block counts) -> owner array (an int32 per block: 0.2% of bf16 parameters), shared by
# every table of that layout (parameters, momentum, ...)
_owners: dict = {}


def _owner(device, counts: tuple[int, ...]) -> torch.Tensor:
    key = (str(device), counts)
    if key not in _owners:
        if len(_owners) >= 16:
            _owners.pop(next(iter(_owners)))
        rows = torch.arange(len(counts), dtype=torch.int32, device=device)
        _owners[key] = torch.repeat_interleave(rows, torch.tensor(counts, device=device))
    return _owners[key]


def _launches(segments) -> list[_Launch]:
    """Segments grouped by what the kernel specialises on: dtypes, start mod 4, alignment."""
    groups: dict = {}
    for seg in segments:
        src = seg.out if seg.src is None else seg.src
        tensors = [t for t in (seg.out, src, seg.buf) if t is not None]
        if any(not t.is_contiguous() or t.numel() != seg.out.numel() for t in tensors):
            raise ValueError("segments need contiguous tensors of equal size")
        head = seg.start % 4
        aligned = head == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)
        key = (seg.out.dtype, src.dtype, None if seg.buf is None else seg.buf.dtype, head, aligned)
        blocks = triton.cdiv(seg.out.numel() + head, BLOCK)
        # out, src, buf pointers; numel, global start, stream; first block (set below); unused
        row = [seg.out.data_ptr(), src.data_ptr(), 0 if seg.buf is None else seg.buf.data_ptr(),
               seg.out.numel(), seg.start, seg.stream, 0, 0]
        groups.setdefault(key, []).append((row, blocks))
    device = segments[0].out.device
    launches = []
    for (out, src, buf, head, aligned), rows in groups.items():
        if not any(blocks for _, blocks in rows):  # empty shards (a rank with no rows of a small parameter)
            continue
        first = 0
        for row, blocks in rows:
            row[6] = first
            first += blocks
        table = torch.tensor([r for r, _ in rows], dtype=torch.int64).to(device)
        owner = _owner(device, tuple(b for _, b in rows))
        launches.append(_Launch(table, owner, head, aligned, (out, src, buf)))
    return launches


def affine_noise_(segments, *, distribution: str, terms, alpha: float = 1.0, beta: float = 0.0) -> None:
    """out = alpha * src + sum(c * z(s) for s, c in terms) [+ beta * buf], for every segment, in
    one launch per group. ``out`` may be ``src``. ``terms`` is a list of (seed, coefficient) or a
    ``Terms`` already on the device."""
    segments = list(segments)
    if not segments:
        return
    staged = terms if isinstance(terms, Terms) else Terms(terms, segments[0].out.device)
    for launch in _launches(segments):
        out, src, buf = launch.dtypes
        _affine_noise_kernel[(launch.owner.numel(),)](
            launch.table, launch.owner, staged.keys, staged.coefs, staged.count, float(alpha), float(beta),
            OUT=_DTYPES[out], SRC=_DTYPES[src], BUF=_DTYPES[buf or out], HAS_BUF=buf is not None,
            HEAD=launch.head, ALIGNED=launch.aligned, GAUSSIAN=distribution == "gaussian", FAST=_fast(),
            BLOCK=BLOCK, num_warps=NUM_WARPS)


def dot_noise(segments, *, distribution: str, seed: int, square: bool = False) -> torch.Tensor:
    """sum(out * z(seed)) over all segments (``square``: sum(z**2), ``out`` only gives the size),
    as a float64 scalar tensor on the segments' device: no host synchronisation."""
    segments = list(segments)
    device = segments[0].out.device
    keys = Terms([(seed, 1.0)], device).keys
    total = torch.zeros((), dtype=torch.float64, device=device)
    for launch in _launches(segments):
        partial = torch.empty(launch.owner.numel(), dtype=torch.float32, device=device)
        _dot_noise_kernel[(launch.owner.numel(),)](
            partial, launch.table, launch.owner, keys, X=_DTYPES[launch.dtypes[0]], SQUARE=square,
            HEAD=launch.head, ALIGNED=launch.aligned, GAUSSIAN=distribution == "gaussian", FAST=_fast(),
            BLOCK=BLOCK, num_warps=NUM_WARPS)
        total += partial.double().sum()
    return total
