"""Counter-based perturbations: the reference definition, in pure torch.

Element ``i`` of the stream keyed by ``(seed, stream)`` is a pure function of those three numbers,
so any rank can generate exactly the slice ``[a, b)`` it owns. Two versions exist; a run keeps the
one it started with (optimizer option ``stream``, recorded with the run).

v1 (four values per Philox call):

    block j = i // 4, lane = i % 4
    words   = Philox4x32-10(counter=(j_lo, j_hi, stream, 0), key=(seed_lo, seed_hi))
    gaussian:   Box-Muller on the pairs (words[0], words[1]) and (words[2], words[3])
    rademacher: +1 if the top bit of words[lane] is 0, else -1

With ``stream == 0`` this is Triton's ``tl.randint4x`` / ``tl.randn4x`` at offset ``j`` (element
``4j + k`` is output ``k``), which ``tests/test_rng.py`` checks against vectors recorded on an H100.

v2 (every bit of a call used: 8 normals or 128 signs), in panels of SLOTS x Q elements:

    panel P = i // (SLOTS * Q), slot s = (i % (SLOTS * Q)) // Q, j = i % Q
    words   = Philox4x32-10(counter=(c_lo, c_hi, stream, 2), key=seed), c = P * Q + j
    gaussian (SLOTS 8, Q 512): word s // 2 gives u1 = (high 16 bits + 0.5) / 2**16 and u2 from its
                low 16 bits; slot s is sqrt(-2 ln u1) times cos(2 pi u2) (s even) or sin (s odd)
    rademacher (SLOTS 128, Q 128): +1 if bit s % 32 of word s // 32 is 0, else -1

Consecutive elements come from consecutive calls, so a GPU thread's contiguous elements share no
call and every call's values are used without moving them between threads. The counter's last
word (v1: 0, v2: 2) keeps the two versions' values apart. The v2 normals are exactly those of
16-bit uniforms: |z| <= 4.85 and E z^2 = 1 - 5e-6 (docs/numerics.md).

This module is the definition, written for clarity. The engine generates the same values faster:
``zoscale.engine.host`` on the CPU (chunked, the Philox rounds compiled), ``zoscale.engine.kernels``
on a GPU (the same integers; normals within a few 1e-6, from the fast approximate log/cos/sin).

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
STREAMS = ("v1", "v2")
V2_DOMAIN = 2  # the counter's last word under v2 (v1: 0)
V2_SLOTS = {"gaussian": 8, "rademacher": 128}  # values per Philox call
V2_CALLS = {"gaussian": 512, "rademacher": 128}  # Q: calls per panel
_V2_CHUNK_CALLS = 1 << 17  # calls a long v2 slice generates at once (bounds its int64 temporaries)


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


def _v2_values(distribution: str, words: tuple[torch.Tensor, ...], slot: int | None = None) -> torch.Tensor:
    """(calls, SLOTS) values of v2 calls, or the (calls,) values of one slot."""
    if distribution == "rademacher":
        if slot is not None:
            return 1.0 - 2.0 * ((words[slot // 32] >> (slot % 32)) & 1).to(torch.float32)
        bits = torch.stack(words, 1).unsqueeze(2) >> torch.arange(32, device=words[0].device)  # (calls, 4, 32)
        return (1.0 - 2.0 * (bits & 1).to(torch.float32)).flatten(1)
    chosen = range(4) if slot is None else [slot // 2]
    pairs = []
    for k in chosen:
        u1 = ((words[k] >> 16).to(torch.float32) + 0.5).mul_(1.0 / 65536.0)
        u2 = ((words[k] & 0xFFFF).to(torch.float32) + 0.5).mul_(1.0 / 65536.0)
        radius = u1.log_().mul_(-2.0).sqrt_()
        theta = u2.mul_(_TWO_PI_F32)
        if slot is not None:
            return radius.mul_(torch.cos(theta) if slot % 2 == 0 else torch.sin(theta))
        pairs += [torch.cos(theta).mul_(radius), torch.sin(theta).mul_(radius)]
    return torch.stack(pairs, 1)


def _v2_slice(distribution: str, seed: int, stream: int, start: int, numel: int, device) -> torch.Tensor:
    """Elements [start, start + numel) of a v2 stream: a range inside one slot takes one call per
    element; longer ranges generate whole panels (a cache-sized chunk of calls at a time) and cut."""
    _check_range(stream, start, numel)
    slots, q = V2_SLOTS[distribution], V2_CALLS[distribution]
    panel = slots * q
    if numel == 0:
        return torch.empty(0, device=device)
    first, last = start // panel, (start + numel - 1) // panel
    if first == last and (start % panel) // q == ((start + numel - 1) % panel) // q:
        call = first * q + start % q + torch.arange(numel, dtype=torch.int64, device=device)
        words = philox4x32(seed, call & _MASK32, call >> 32, stream, V2_DOMAIN)
        return _v2_values(distribution, words, (start % panel) // q)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    per_chunk = max(1, _V2_CHUNK_CALLS // q)  # panels a chunk
    for lo in range(first, last + 1, per_chunk):
        hi = min(last + 1, lo + per_chunk)
        call = torch.arange(lo * q, hi * q, dtype=torch.int64, device=device)
        words = philox4x32(seed, call & _MASK32, call >> 32, stream, V2_DOMAIN)
        ordered = _v2_values(distribution, words).view(hi - lo, q, slots).transpose(1, 2).reshape(-1)
        begin, end = max(start, lo * panel), min(start + numel, hi * panel)
        out[begin - start : end - start] = ordered[begin - lo * panel : end - lo * panel]
    return out


def _v1_slice(distribution: str, seed: int, stream: int, start: int, numel: int, device) -> torch.Tensor:
    """Elements [start, start + numel) of a v1 stream: the Philox calls covering them, four values each."""
    _check_range(stream, start, numel)
    first, last = start >> 2, (start + numel + 3) >> 2
    block = torch.arange(first, last, dtype=torch.int64, device=device)
    words = philox4x32(seed, block & _MASK32, block >> 32, stream)
    if distribution == "gaussian":
        values = [*_box_muller(words[0], words[1]), *_box_muller(words[2], words[3])]
    else:  # +1 where the top bit is 0, else -1
        values = [torch.sub(1.0, (w >> 31).to(torch.float32), alpha=2.0) for w in words]
    skip = start - 4 * first
    return torch.stack(values, 1).reshape(-1)[skip : skip + numel]


def _slice(distribution: str, seed: int, stream: int, start: int, numel: int, device, dtype: torch.dtype,
           version: str) -> torch.Tensor:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if version not in STREAMS:
        raise ValueError(f"unknown stream version {version!r}; choose one of {STREAMS}")
    values = (_v1_slice if version == "v1" else _v2_slice)(distribution, seed, stream, start, numel, device)
    return values.to(dtype)


def gaussian(seed: int, stream: int, start: int, numel: int, device=None,
             dtype: torch.dtype = torch.float32, version: str = "v1") -> torch.Tensor:
    """Elements [start, start+numel) of the N(0, 1) stream keyed by (seed, stream)."""
    return _slice("gaussian", seed, stream, start, numel, device, dtype, version)


def rademacher(seed: int, stream: int, start: int, numel: int, device=None,
               dtype: torch.dtype = torch.float32, version: str = "v1") -> torch.Tensor:
    """Elements [start, start+numel) of the +-1 stream keyed by (seed, stream)."""
    return _slice("rademacher", seed, stream, start, numel, device, dtype, version)
