"""Passes over tensors in host memory: the CPU's fast path of the streams, and the engine's passes
over host tensors (chunks of at most ``chunk_numel`` elements, small tensors merged into one
generator call), directly or staged through the GPU kernels for offloaded shards.

``generate_segments`` gives exactly the values of ``rng.py``'s definition (tests compare them):
many slices in one vectorised pass over their Philox counters, a cache-sized chunk at a time, the
rounds compiled for long passes, and small results kept (a MeZO step reads the same z three times).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import torch

from zoscale.engine import kernels, rng
from zoscale.engine.rng import _MASK32

# Counters per chunk: large enough for both threads and little dispatch per element, small enough
# for the int64 temporaries of a Philox round to stay in cache (2-core development machine: 128K
# counters gave 4x the throughput of 4M-element whole-tensor rounds, and 1.7x that of 16K).
_CHUNK_COUNTERS = 1 << 17


# Passes over at least this many counters (4M elements: a full engine chunk) generate their Philox
# words with a compiled kernel on the CPU: eager, the ten rounds are ~100 separate int64 tensor ops
# (~87 ns per call of four values on a 2-core machine), compiled one loop (~19x faster). The
# integers are the same, and Box-Muller stays eager, so every value is
# identical whichever path runs. Compiling takes ~10 s once per process (less with inductor's disk
# cache); smaller models never compile. ZOSCALE_COMPILE=0 turns it off.
_COMPILE_MIN_COUNTERS = 1 << 20
_compiled_philox = None  # built on first use; False when compilation is off or failed


def _philox_words(seed: int, block: torch.Tensor, stream: torch.Tensor, compiled: bool) -> tuple[torch.Tensor, ...]:
    """The Philox words of a chunk of v1 counters (``block``: counter indices, ``stream`` per counter)."""
    global _compiled_philox
    if compiled and block.numel() == _CHUNK_COUNTERS and block.device.type == "cpu":
        if _compiled_philox is None:
            _compiled_philox = os.environ.get("ZOSCALE_COMPILE", "1") != "0" and torch.compile(
                _philox_tensors, dynamic=False)
        if _compiled_philox:
            try:
                return _compiled_philox(torch.tensor(seed & _MASK32), torch.tensor(seed >> 32), block, stream)
            except Exception as e:  # no C++ compiler, an unsupported platform: the eager path is the same stream
                print(f"zoscale: compiling the CPU Philox failed ({type(e).__name__}); generating eagerly",
                      file=sys.stderr)
                _compiled_philox = False
    return rng.philox4x32(seed, block & _MASK32, block >> 32, stream)


def _philox_tensors(k0: torch.Tensor, k1: torch.Tensor, block: torch.Tensor, stream: torch.Tensor):
    """philox4x32 with the key as tensors (one compiled graph serves every seed)."""
    c0, c1, c2, c3 = block & _MASK32, block >> 32, stream, torch.zeros_like(block)
    for _ in range(rng.PHILOX_ROUNDS):
        a, b = c0 * rng._ROUND_A, c2 * rng._ROUND_B
        c0 = ((b >> 32) ^ c1 ^ k0) & _MASK32
        c2 = ((a >> 32) ^ c3 ^ k1) & _MASK32
        c1, c3 = b, a
        k0 = (k0 + rng._KEY_A) & _MASK32
        k1 = (k1 + rng._KEY_B) & _MASK32
    return c0, c1 & _MASK32, c2, c3 & _MASK32


_layouts: dict = {}  # small segment lists -> their counters: the engine asks for the same ones every pass
_recent: dict = {}  # the last few small z generated (callers get copies)


def _segment_counters(segments, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox counters covering each (stream, start, numel) segment, their streams, and the
    index of each requested element in the flattened (counters * 4) words. Small layouts (a tiny
    model's whole parameter list) are kept: building them costs more than generating them."""
    key = (tuple(segments), str(device))
    if key in _layouts:
        return _layouts[key]
    layout = _build_counters(segments, device)
    if layout[0].numel() <= _CHUNK_COUNTERS:
        if len(_layouts) >= 32:
            _layouts.pop(next(iter(_layouts)))
        _layouts[key] = layout
    return layout


def _build_counters(segments, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks, streams, picks, base = [], [], [], 0
    for stream, start, numel in segments:
        rng._check_range(stream, start, numel)
        first, last = start >> 2, (start + numel + 3) >> 2
        blocks.append(torch.arange(first, last, dtype=torch.int64, device=device))
        streams.append(torch.full((last - first,), stream, dtype=torch.int64, device=device))
        skip = base + start - 4 * first
        picks.append(torch.arange(skip, skip + numel, device=device))
        base += 4 * (last - first)
    return torch.cat(blocks), torch.cat(streams), torch.cat(picks)


def generate_segments(distribution: str, seed: int, segments, device=None,
                      dtype: torch.dtype = torch.float32, version: str = "v1") -> torch.Tensor:
    """The concatenation of several (stream, start, numel) slices of one seed's streams, generated
    in one vectorised pass over all their counters, a cache-sized chunk at a time (what the engine
    uses: per-tensor calls cost too many small ops). ``version``: the stream version, v1 or v2."""
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
    if version not in rng.STREAMS:
        raise ValueError(f"unknown stream version {version!r}; choose one of {rng.STREAMS}")
    key = (distribution, seed, tuple(segments), str(device), version)
    if key in _recent:  # a MeZO step reads the same small z three times
        return _recent[key].to(dtype, copy=True)
    if version == "v2":
        values = torch.cat([rng._v2_slice(distribution, seed, *segment, device) for segment in segments]) \
            if segments else torch.empty(0, device=device)
        return _remember(key, values, values.numel() <= 4 * _CHUNK_COUNTERS, dtype)
    counters, streams, picks = _segment_counters(segments, device)
    values = torch.empty((counters.numel(), 4), dtype=torch.float32, device=device)
    lanes = torch.empty((4, min(counters.numel(), _CHUNK_COUNTERS)), dtype=torch.float32, device=device)
    compiled = counters.numel() >= _COMPILE_MIN_COUNTERS
    for lo in range(0, counters.numel(), _CHUNK_COUNTERS):
        block, stream = counters[lo : lo + _CHUNK_COUNTERS], streams[lo : lo + _CHUNK_COUNTERS]
        words = _philox_words(seed, block, stream, compiled)
        lane = lanes[:, : block.numel()]
        if distribution == "gaussian":
            rng._box_muller(words[0], words[1], lane[0], lane[1])
            rng._box_muller(words[2], words[3], lane[2], lane[3])
        else:  # +1 where the top bit is 0, else -1
            for k in range(4):
                torch.sub(1.0, (words[k] >> 31).to(torch.float32), alpha=2.0, out=lane[k])
        values[lo : lo + block.numel()] = lane.T
    flat = values.reshape(-1)
    if len(segments) == 1:  # one slice: no gather
        skip = int(picks[0]) if picks.numel() else 0
        values = flat[skip : skip + picks.numel()]
    else:
        values = flat[picks]
    return _remember(key, values, counters.numel() <= _CHUNK_COUNTERS, dtype)


def _remember(key, values: torch.Tensor, small: bool, dtype: torch.dtype) -> torch.Tensor:
    if not small:
        return values.to(dtype)
    if len(_recent) >= 4:  # a step's z, for each weight-decay group of shards
        _recent.pop(next(iter(_recent)))
    _recent[key] = values
    return values.to(dtype, copy=True)




# -- the engine's passes over host tensors ------------------------------------------------------------
def chunks(items, chunk_numel: int):
    """Group (shard, out, src, bufs) into pieces (shard, out, src, bufs, lo, hi) of at most
    ``chunk_numel`` elements, merging small tensors so one generator call serves many of them."""
    chunk, size = [], 0
    for shard, out, src, bufs in items:
        lo = 0
        while lo < out.numel():
            hi = min(out.numel(), lo + chunk_numel - size)
            chunk.append((shard, out, src, bufs, lo, hi))
            size += hi - lo
            lo = hi
            if size >= chunk_numel:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def noise(chunk, seeds: Mapping[int, float], distribution: str, version: str, dtype: torch.dtype = torch.float32,
          second: Mapping[int, float] | None = None):
    """sum_s c_s z(s) over the chunk, or with ``second`` (other coefficients of the same seeds) the
    pair of sums, each z drawn once."""
    segments = [(shard.stream, shard.offset + lo, hi - lo) for shard, _, _, _, lo, hi in chunk]
    device = chunk[0][1].device if chunk[0][1].device.type != "meta" else "cpu"  # an NVMe placeholder
    totals = [None, None]
    for seed in seeds:
        z = generate_segments(distribution, seed, segments, device=device, dtype=dtype, version=version)
        for i, coef in enumerate((seeds[seed], (second or {}).get(seed, 0.0))):
            if coef != 0.0:
                totals[i] = z * coef if totals[i] is None else totals[i].add_(z, alpha=coef)
    return totals[0] if second is None else tuple(totals)


def host_pass(items, p, distribution: str, version: str, chunk_numel: int) -> float:
    """``p`` (a perturb.Pass) over (shard, out, src, bufs) items in host memory, z from
    ``generate_segments``; returns the advanced buffer's sum of squares (0 without an advance)."""
    squares = 0.0
    for chunk in chunks(items, chunk_numel):
        wide = any(src.dtype == torch.float64 for _, _, src, _, _, _ in chunk)
        compute_noise = torch.float64 if wide else torch.float32
        if p.advance is None:
            z, moved = noise(chunk, p.seeds, distribution, version, compute_noise), None
        else:
            z, moved = noise(chunk, p.seeds, distribution, version, compute_noise, p.advance)
        if p.advance is None and not p.buffers and z is not None and all(
                out.data_ptr() == src.data_ptr() and out.dtype == z.dtype for _, out, src, _, _, _ in chunk):
            # in place, one dtype: two batched ops for the whole chunk (small models are bound by
            # per-op dispatch on the CPU)
            views = [out[lo:hi] for _, out, _, _, lo, hi in chunk]
            if p.alpha != 1.0:
                torch._foreach_mul_(views, p.alpha)
            torch._foreach_add_(views, list(z.split([v.numel() for v in views])))
            continue
        pos = 0
        for _, out, src, bufs, lo, hi in chunk:
            compute = torch.promote_types(src.dtype, torch.float32)
            value = src[lo:hi].to(compute)
            if p.alpha != 1.0:
                value = value * p.alpha
            if z is not None:
                value = value + z[pos : pos + hi - lo].to(compute)
            for buf, (_, coef) in zip(bufs, p.buffers):
                value = value + coef * buf[lo:hi].to(compute)
            if p.advance is not None:  # after the parameters read the buffer's old values
                kept = bufs[0][lo:hi]
                advanced = kept.to(compute) * p.gamma
                if moved is not None:
                    advanced = advanced + moved[pos : pos + hi - lo].to(compute)
                kept.copy_(advanced)
                squares += float(torch.linalg.vector_norm(kept, dtype=torch.float64) ** 2)
            out[lo:hi].copy_(value)
            pos += hi - lo
    return squares


def staged_pass(items, p, device: torch.device, chunk_numel: int, kernel_pass) -> float:
    """``p`` over host items (offloaded shards) through the kernels on ``device``, a chunk at a
    time: copied in, written there by ``kernel_pass(items, p, terms)``, copied back."""
    terms = kernels.StagedTerms(p.seeds.items(), device)  # once, not once per chunk
    squares = 0.0
    for chunk in chunks(items, chunk_numel):
        staged = []
        for shard, out, src, bufs, lo, hi in chunk:
            moved = [b[lo:hi].to(device) for b in bufs]
            segment = kernels.Segment(torch.empty(hi - lo, dtype=out.dtype, device=device), shard.offset + lo,
                                      shard.stream, src[lo:hi].to(device), moved[0] if moved else None)
            staged.append((segment, moved[1:]))
        squares += kernel_pass(staged, p, terms)
        for (_, out, _, bufs, lo, hi), (segment, _) in zip(chunk, staged):
            out[lo:hi].copy_(segment.out)
            if p.advance is not None:
                bufs[0][lo:hi].copy_(segment.buf)
    return squares
