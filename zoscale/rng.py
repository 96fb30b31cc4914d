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


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of a constant uint32 ``a`` and uint32 ``x``."""
    p_lo = x & 0xFFFF
    p_lo = p_lo * a  # < 2**48
    p_hi = (x >> 16) * a  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(
    seed: int,
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor | int = 0,
    c3: torch.Tensor | int = 0,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 values; ``seed`` is a 64-bit key."""
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    k0, k1 = seed & _MASK32, seed >> 32
    c2 = torch.as_tensor(c2, dtype=torch.int64, device=c0.device).expand_as(c0)
    c3 = torch.as_tensor(c3, dtype=torch.int64, device=c0.device).expand_as(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _check_range(stream: int, start: int, numel: int) -> None:
    if start < 0 or numel < 0 or start + numel > 2**63:
        raise ValueError(f"element range [{start}, {start + numel}) outside [0, 2**63)")
    if not 0 <= stream <= _MASK32:
        raise ValueError(f"stream must be a uint32, got {stream}")


def _segment_words(seed: int, segments, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox words for the blocks covering each (stream, start, numel) segment, all in one call,
    and the index of each requested element in the flattened (blocks * 4) words."""
    blocks, streams, picks, base = [], [], [], 0
    for stream, start, numel in segments:
        _check_range(stream, start, numel)
        first, last = start >> 2, (start + numel + 3) >> 2
        blocks.append(torch.arange(first, last, dtype=torch.int64, device=device))
        streams.append(torch.full((last - first,), stream, dtype=torch.int64, device=device))
        skip = base + start - 4 * first
        picks.append(torch.arange(skip, skip + numel, device=device))
        base += 4 * (last - first)
    block, stream = torch.cat(blocks), torch.cat(streams)
    words = philox4x32(seed, block & _MASK32, block >> 32, stream)
    return torch.stack(words, dim=1), torch.cat(picks)


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> float32 in [0, 1): fold the signed value onto [0, 2**31) and scale."""
    folded = torch.where(word >= 2**31, _MASK32 - word, word)  # == ~int32(word) for the negatives
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def _box_muller(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(_uniform(w1), _U1_FLOOR)
    theta = torch.tensor(_TWO_PI, dtype=torch.float32) * _uniform(w2)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def generate_segments(distribution: str, seed: int, segments, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The concatenation of several (stream, start, numel) slices of one seed's streams, generated
    in a single vectorised pass (what the engine uses: per-tensor calls cost too many small ops)."""
    words, picks = _segment_words(seed, segments, device)
    if distribution == "gaussian":
        n0, n1 = _box_muller(words[:, 0], words[:, 1])
        n2, n3 = _box_muller(words[:, 2], words[:, 3])
        values = torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)
    elif distribution == "rademacher":
        values = 1.0 - 2.0 * (words.reshape(-1) >> 31).to(torch.float32)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    return values[picks].to(dtype)


def gaussian(seed: int, stream: int, start: int, numel: int, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [start, start+numel) of the N(0, 1) stream keyed by (seed, stream)."""
    return generate_segments("gaussian", seed, [(stream, start, numel)], device, dtype)


def rademacher(seed: int, stream: int, start: int, numel: int, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [start, start+numel) of the +-1 stream keyed by (seed, stream)."""
    return generate_segments("rademacher", seed, [(stream, start, numel)], device, dtype)
