"""Triton kernels (CUDA) for the perturbation engine, generating the stream that ``zoscale.rng``
defines: element i uses Philox4x32-10 at counter (i // 4 as two words, stream, 0), lane i % 4.

One program handles BLOCK consecutive *global* element indices aligned to 4, so each Philox call
yields four values that are all used (Triton's randn4x layout). Indices are int64 throughout:
shards of more than 2**31 elements and global offsets beyond 2**32 are routine at 13B+.

    affine_noise_(out, src, ...)   out = alpha * src + a * z(seed_a) [+ b * z(seed_b)], fp32 math
    dot_noise(x, ...)              sum(x * z(seed)), fp32 per block, fp64 across blocks

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

    @triton.jit(do_not_specialize=["numel", "start", "seed_a", "seed_b", "stream", "alpha", "coef_a", "coef_b"])
    def _affine_noise_kernel(out_ptr, src_ptr, numel, start, stream, seed_a, coef_a, seed_b, coef_b, alpha,
                             HAS_B: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
        quad, local, mask = _block_indices(start, numel, BLOCK)
        y = alpha * tl.load(src_ptr + local, mask=mask, other=0.0).to(tl.float32)
        y += coef_a * _noise(seed_a, quad, stream, GAUSSIAN)
        if HAS_B:
            y += coef_b * _noise(seed_b, quad, stream, GAUSSIAN)
        tl.store(out_ptr + local, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["numel", "start", "seed", "stream"])
    def _dot_noise_kernel(partial_ptr, x_ptr, numel, start, stream, seed,
                          GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
        quad, local, mask = _block_indices(start, numel, BLOCK)
        x = tl.load(x_ptr + local, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + tl.program_id(0), tl.sum(x * _noise(seed, quad, stream, GAUSSIAN)))


def _grid(start: int, numel: int) -> tuple[int]:
    covered = start % 4 + numel
    return (max(1, triton.cdiv(covered, BLOCK)),)


def affine_noise_(out: torch.Tensor, src: torch.Tensor, *, distribution: str, stream: int, start: int,
                  terms, alpha: float = 1.0) -> None:
    """out = alpha * src + sum(c * z(s) for s, c in terms), over global elements [start, start+numel).

    ``out`` and ``src`` are contiguous with the same number of elements; they may be the same tensor.
    Terms are applied two per pass; with no terms this is a plain (scaled) copy."""
    if not (out.is_contiguous() and src.is_contiguous()) or out.numel() != src.numel():
        raise ValueError("affine_noise_ needs contiguous tensors of equal size")
    gaussian = distribution == "gaussian"
    terms = list(terms) or [(0, 0.0)]
    numel = out.numel()
    for i in range(0, len(terms), 2):
        (seed_a, coef_a), *rest = terms[i : i + 2]
        seed_b, coef_b = rest[0] if rest else (0, 0.0)
        _affine_noise_kernel[_grid(start, numel)](
            out, src if i == 0 else out, numel, start, stream, seed_a, float(coef_a), seed_b, float(coef_b),
            float(alpha) if i == 0 else 1.0, HAS_B=bool(rest), GAUSSIAN=gaussian, BLOCK=BLOCK)


def dot_noise(x: torch.Tensor, *, distribution: str, stream: int, start: int, seed: int) -> torch.Tensor:
    """sum(x * z(seed)) over global elements [start, start+numel), as a float64 scalar tensor."""
    if not x.is_contiguous():
        raise ValueError("dot_noise needs a contiguous tensor")
    grid = _grid(start, x.numel())
    partial = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    _dot_noise_kernel[grid](partial, x, x.numel(), start, stream, seed,
                            GAUSSIAN=distribution == "gaussian", BLOCK=BLOCK)
    return partial.double().sum()
