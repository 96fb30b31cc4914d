"""Triton kernels (CUDA) for the perturbation engine, generating the stream that ``zoscale.rng``
defines: element i uses Philox4x32-10 at counter (i // 4 as two words, stream, 0), lane i % 4.

One program handles BLOCK consecutive *global* element indices aligned to 4, so each Philox call
yields four values that are all used (Triton's randn4x layout). Indices are int64 throughout:
shards of more than 2**31 elements and global offsets beyond 2**32 are routine at 13B+.

    affine_noise_(out, src, ...)   out = alpha * src + sum_i c_i * z(seed_i), fp32 math, one pass
    dot_noise(x, ...)              sum(x * z(seed)) (or sum(z**2)), fp32 per block, fp64 across blocks

Tests run these on CPU under TRITON_INTERPRET=1 and compare with rng.py.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use rng.py only
    triton = None

BLOCK = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _noise(seed, quad, stream, GAUSSIAN: tl.constexpr):
        """Four values per counter: shape (len(quad), 4), element 4*quad + k in column k."""
        lo = (quad & 0xFFFFFFFF).to(tl.uint32)
        hi = (quad >> 32).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, lo, hi, lo * 0 + stream.to(tl.uint32), lo * 0)
        if GAUSSIAN:
            n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
            n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
        else:
            n0 = 1.0 - 2.0 * (w0 >> 31).to(tl.float32)
            n1 = 1.0 - 2.0 * (w1 >> 31).to(tl.float32)
            n2 = 1.0 - 2.0 * (w2 >> 31).to(tl.float32)
            n3 = 1.0 - 2.0 * (w3 >> 31).to(tl.float32)
        # join stacks along a new last axis: (n0|n2, n1|n3) flattens to n0, n1, n2, n3.
        return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (quad.shape[0], 4))

    @triton.jit
    def _block_indices(start, numel, BLOCK: tl.constexpr):
        quad = start // 4 + tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        local = quad[:, None] * 4 + tl.arange(0, 4)[None, :] - start
        return quad, local, (local >= 0) & (local < numel)

    @triton.jit(do_not_specialize=["numel", "start", "stream", "n_terms", "alpha"])
    def _affine_noise_kernel(out_ptr, src_ptr, numel, start, stream, key_ptr, coef_ptr, n_terms, alpha,
                             GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
        """out = alpha * src + sum_i coef[i] * z(key[i]): one read and one write for any number of terms."""
        quad, local, mask = _block_indices(start, numel, BLOCK)
        y = alpha * tl.load(src_ptr + local, mask=mask, other=0.0).to(tl.float32)
        for i in range(n_terms):
            seed = (tl.load(key_ptr + 2 * i + 1).to(tl.uint64) << 32) | tl.load(key_ptr + 2 * i).to(tl.uint64)
            y += tl.load(coef_ptr + i) * _noise(seed, quad, stream, GAUSSIAN)
        tl.store(out_ptr + local, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["numel", "start", "stream"])
    def _dot_noise_kernel(partial_ptr, x_ptr, numel, start, stream, key_ptr,
                          GAUSSIAN: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
        quad, local, mask = _block_indices(start, numel, BLOCK)
        seed = (tl.load(key_ptr + 1).to(tl.uint64) << 32) | tl.load(key_ptr).to(tl.uint64)
        z = _noise(seed, quad, stream, GAUSSIAN)
        if SQUARE:
            value = tl.where(mask, z * z, 0.0)
        else:
            value = tl.load(x_ptr + local, mask=mask, other=0.0).to(tl.float32) * z
        tl.store(partial_ptr + tl.program_id(0), tl.sum(value))


def _grid(start: int, numel: int) -> tuple[int]:
    covered = start % 4 + numel
    return (max(1, triton.cdiv(covered, BLOCK)),)


class Terms:
    """(seed, coefficient) pairs staged on a device once per pass and shared by every shard's launch.
    Seeds go as two uint32 words each (stored in int64), so all 64-bit seeds pass unchanged."""

    def __init__(self, terms, device):
        terms = list(terms)
        self.count = len(terms)
        words = [w for seed, _ in terms for w in (seed & 0xFFFFFFFF, seed >> 32)] or [0, 0]
        self.keys = torch.tensor(words, dtype=torch.int64, device=device)
        self.coefs = torch.tensor([float(c) for _, c in terms] or [0.0], dtype=torch.float32, device=device)


def affine_noise_(out: torch.Tensor, src: torch.Tensor, *, distribution: str, stream: int, start: int,
                  terms, alpha: float = 1.0) -> None:
    """out = alpha * src + sum(c * z(s) for s, c in terms), over global elements [start, start+numel).

    ``out`` and ``src`` are contiguous with the same number of elements; they may be the same tensor.
    ``terms`` is a list of (seed, coefficient) or a ``Terms`` already on the device."""
    if not (out.is_contiguous() and src.is_contiguous()) or out.numel() != src.numel():
        raise ValueError("affine_noise_ needs contiguous tensors of equal size")
    staged = terms if isinstance(terms, Terms) else Terms(terms, out.device)
    numel = out.numel()
    _affine_noise_kernel[_grid(start, numel)](
        out, src, numel, start, stream, staged.keys, staged.coefs, staged.count, float(alpha),
        GAUSSIAN=distribution == "gaussian", BLOCK=BLOCK)


def dot_noise(x: torch.Tensor | None, *, distribution: str, stream: int, start: int, seed: int,
              numel: int | None = None) -> torch.Tensor:
    """sum(x * z(seed)) over global elements [start, start+numel), as a float64 scalar tensor; with
    ``x=None``, sum(z**2) over ``numel`` elements."""
    if x is not None and not x.is_contiguous():
        raise ValueError("dot_noise needs a contiguous tensor")
    numel = x.numel() if x is not None else numel
    device = x.device if x is not None else torch.device("cuda")
    grid = _grid(start, numel)
    partial = torch.empty(grid[0], dtype=torch.float32, device=device)
    keys = Terms([(seed, 1.0)], device).keys
    _dot_noise_kernel[grid](partial, partial if x is None else x, numel, start, stream, keys,
                            GAUSSIAN=distribution == "gaussian", SQUARE=x is None, BLOCK=BLOCK)
    return partial.double().sum()
