"""Launching the perturbation kernels (CUDA): one launch covers many tensors (segments).

A table on the device holds each segment's pointers, size, global start and stream, and each
program finds its row from a per-block owner array. A launch per parameter costs more than the
pass itself on models with hundreds of small tensors (OPT-1.3B on an H100: 14 ms per pass launched
per tensor, 4 ms from a table). Each segment's blocks go in two launches: the interior ones
unmasked, the partial first and last ones masked.

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

from zoscale.engine import rng

try:
    from zoscale.engine.kernels import v1, v2
except ImportError:  # CPU installs without triton generate on the host only
    v1 = v2 = None


def available() -> bool:
    return v1 is not None


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


class StagedTerms:
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
        size = panel or v1.BLOCK
        numel, head = seg.out.numel(), seg.start % (panel or 4)
        if numel == 0:  # an empty shard (a rank with no rows of a small parameter)
            continue
        # block k holds local elements [k * size - head, (k + 1) * size - head)
        aligned = all((t.data_ptr() - head % 4 * t.element_size()) % (4 * t.element_size()) == 0 for t in tensors)
        blocks = -(-(numel + head) // size)
        first_full, end_full = (1 if head else 0), (numel + head) // size
        # masked: the partial first and last blocks, and (v1) those whose counters carry into the high word
        carries = [] if panel else _carry_blocks((seg.start - head) // 4, v1.BLOCK // 4, blocks)
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
    staged = terms if isinstance(terms, StagedTerms) else StagedTerms(terms, device)
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
        common = dict(OUT=v1.DTYPES[out], SRC=v1.DTYPES[src], BUF=v1.DTYPES[buf or out], HAS_BUF=buf is not None,
                      UNIT=alpha == 1.0, TERMS=staged.count, ALIGNED=launch.aligned, MASKED=launch.masked,
                      GAUSSIAN=distribution == "gaussian", FAST=_fast(), ADVANCE=advance is not None)
        arguments = (launch.table, launch.owner, staged.keys, staged.coefs, float(alpha), float(beta), advance_coefs,
                     gamma, partial)
        if panel:
            v2.affine_noise[(programs,)](*arguments, **common, **_v2_shape(distribution))
        else:
            v1.affine_noise[(programs,)](*arguments, **common, HEAD=launch.head, BLOCK=v1.BLOCK,
                                              num_warps=v1.NUM_WARPS)
        if total is not None:
            total += partial.double().sum()
    return total


def _v2_shape(distribution: str) -> dict:
    return {"Q": rng.V2_CALLS[distribution], "SLOTS": rng.V2_SLOTS[distribution], "ROWS": v2.ROWS[distribution],
            "num_warps": v2.WARPS[distribution]}


def dot_noise(segments, *, distribution: str, seed: int, square: bool = False, version: str = "v1") -> torch.Tensor:
    """sum(out * z(seed)) over all segments (``square``: sum(z**2), ``out`` only gives the size),
    as a float64 scalar tensor on the segments' device: no host synchronisation."""
    segments = list(segments)
    device = segments[0].out.device
    keys = StagedTerms([(seed, 1.0)], device).keys
    total = torch.zeros((), dtype=torch.float64, device=device)
    panel = _panel_size(version, distribution)
    for launch in _plan(segments, panel):
        partial = torch.empty(launch.owner.numel(), dtype=torch.float32, device=device)
        if panel:
            v2.dot_noise[(launch.owner.numel(),)](
                partial, launch.table, launch.owner, keys, X=v1.DTYPES[launch.dtypes[0]], SQUARE=square,
                ALIGNED=launch.aligned, MASKED=launch.masked, GAUSSIAN=distribution == "gaussian", FAST=_fast(),
                **_v2_shape(distribution))
            total += partial.double().sum()
            continue
        v1.dot_noise[(launch.owner.numel(),)](
            partial, launch.table, launch.owner, keys, X=v1.DTYPES[launch.dtypes[0]], SQUARE=square,
            HEAD=launch.head, ALIGNED=launch.aligned, MASKED=launch.masked, GAUSSIAN=distribution == "gaussian",
            FAST=_fast(), BLOCK=v1.BLOCK, num_warps=v1.NUM_WARPS)
        total += partial.double().sum()
    return total

