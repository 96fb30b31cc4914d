"""Counter-based perturbations: the reference definition, in pure torch.

Element ``i`` of the stream keyed by ``(seed, stream)`` is a pure function of those three numbers,
so any rank can generate exactly the slice ``[a, b)`` it owns:

    block j = i // 4, lane = i % 4
    words   = Philox4x32-10(counter=(j_lo, j_hi, stream, 0), key=(seed_lo, seed_hi))
    gaussian:   Box-Muller on the pairs (words[0], words[1]) and (words[2], words[3])
    rademacher: +1 if the top bit of words[lane] is 0, else -1

With ``stream == 0`` this is Triton's ``tl.randint4x`` / ``tl.randn4x`` at offset ``j`` (element
``4j + k`` is output ``k``), which ``tests/test_rng.py`` checks against vectors recorded on an H100.
``zoscale.kernels`` generates the same integers on the GPU (and normals within a few 1e-6: it uses
the fast approximate log/cos/sin there).

uint32 arithmetic is emulated in int64 tensors; products are split into 16-bit halves so that no
intermediate leaves the int64 range.
"""

from __future__ import annotations

import hashlib

import torch

PHILOX_ROUNDS = 10
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# Triton's uint -> [0, 1) float scale and Box-Muller constants, kept identical so that the CPU
# and GPU paths differ only in log/sqrt/sin/cos (precise here, fast approximations on a GPU).
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U1_FLOOR = 1.0e-7
_TWO_PI_F32 = torch.tensor(_TWO_PI, dtype=torch.float32)

DISTRIBUTIONS = ("gaussian", "rademacher")


def stream_id(name: str) -> int:
    """A stable 32-bit stream id for a parameter's canonical fully qualified name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def mix_seed(*values: int) -> int:
    """Hash integers (run seed, step, direction, ...) into a 64-bit Philox key (splitmix64 chain)."""
    state = 0x243F6A8885A308D3
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def philox4x32(
    seed: int,
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor | int = 0,
    c3: torch.Tensor | int = 0,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 values; ``seed`` is a 64-bit key.

    A product of two uint32 values fits 64 bits: int64 multiplication wraps modulo 2**64 and keeps
    exactly those bits, so its high word is ``(p >> 32) & MASK`` and its low word ``p & MASK``. The
    low words are kept unmasked (they are only XORed into the next high words, which are masked
    before they are multiplied again) and masked once at the end."""
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    k0, k1 = seed & _MASK32, seed >> 32
    c2 = torch.as_tensor(c2, dtype=torch.int64, device=c0.device).expand_as(c0)
    c3 = torch.as_tensor(c3, dtype=torch.int64, device=c0.device).expand_as(c0)
    for _ in range(rounds):
        a, b = c0 * _ROUND_A, c2 * _ROUND_B
        c0 = (b >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        c2 = (a >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, c3 = b, a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1 & _MASK32, c2, c3 & _MASK32


def _check_range(stream: int, start: int, numel: int) -> None:
    if start < 0 or numel < 0 or start + numel > 2**63:
        raise ValueError(f"element range [{start}, {start + numel}) outside [0, 2**63)")
    if not 0 <= stream <= _MASK32:
        raise ValueError(f"stream must be a uint32, got {stream}")


# Counters per chunk: large enough for both threads and little dispatch per element, small enough
# for the int64 temporaries of a Philox round to stay in cache (2-core development machine: 128K
# counters gave 4x the throughput of 4M-element whole-tensor rounds, and 1.7x that of 16K).
_CHUNK_COUNTERS = 1 << 17


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
        _check_range(stream, start, numel)
        first, last = start >> 2, (start + numel + 3) >> 2
        blocks.append(torch.arange(first, last, dtype=torch.int64, device=device))
        streams.append(torch.full((last - first,), stream, dtype=torch.int64, device=device))
        skip = base + start - 4 * first
        picks.append(torch.arange(skip, skip + numel, device=device))
        base += 4 * (last - first)
    return torch.cat(blocks), torch.cat(streams), torch.cat(picks)


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> float32 in [0, 1): the word as an int32 (a wrap), ~x for negatives, scaled."""
    x = word.to(torch.int32)
    return x.bitwise_xor_(x >> 31).to(torch.float32).mul_(_UNIFORM_SCALE)


def _box_muller(w1: torch.Tensor, w2: torch.Tensor, out1: torch.Tensor | None = None,
                out2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r cos theta, r sin theta) from two words, written into out1 and out2 when given."""
    radius = _uniform(w1).clamp_min_(_U1_FLOOR).log_().mul_(-2.0).sqrt_()
    theta = _uniform(w2).mul_(_TWO_PI_F32)
    out1 = torch.cos(theta, out=out1)
    out2 = torch.sin(theta, out=out2)
    return out1.mul_(radius), out2.mul_(radius)


def generate_segments(distribution: str, seed: int, segments, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The concatenation of several (stream, start, numel) slices of one seed's streams, generated
    in one vectorised pass over all their counters, a cache-sized chunk at a time (what the engine
    uses: per-tensor calls cost too many small ops)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    key = (distribution, seed, tuple(segments), str(device))
    if key in _recent:  # a MeZO step reads the same small z three times
        return _recent[key].to(dtype, copy=True)
    counters, streams, picks = _segment_counters(segments, device)
    values = torch.empty((counters.numel(), 4), dtype=torch.float32, device=device)
    lanes = torch.empty((4, min(counters.numel(), _CHUNK_COUNTERS)), dtype=torch.float32, device=device)
    for lo in range(0, counters.numel(), _CHUNK_COUNTERS):
        block, stream = counters[lo : lo + _CHUNK_COUNTERS], streams[lo : lo + _CHUNK_COUNTERS]
        words = philox4x32(seed, block & _MASK32, block >> 32, stream)
        lane = lanes[:, : block.numel()]
        if distribution == "gaussian":
            _box_muller(words[0], words[1], lane[0], lane[1])
            _box_muller(words[2], words[3], lane[2], lane[3])
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
    if counters.numel() <= _CHUNK_COUNTERS:
        if len(_recent) >= 4:  # a step's z, for each weight-decay group of shards
            _recent.pop(next(iter(_recent)))
        _recent[key] = values
        return values.to(dtype, copy=True)
    return values.to(dtype)


def gaussian(seed: int, stream: int, start: int, numel: int, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [start, start+numel) of the N(0, 1) stream keyed by (seed, stream)."""
    return generate_segments("gaussian", seed, [(stream, start, numel)], device, dtype)


def rademacher(seed: int, stream: int, start: int, numel: int, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [start, start+numel) of the +-1 stream keyed by (seed, stream)."""
    return generate_segments("rademacher", seed, [(stream, start, numel)], device, dtype)
