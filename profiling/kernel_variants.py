"""The perturbation kernel's launch settings on one GPU, against the in-place floor.

    python3 profiling/kernel_variants.py OUT.json

Every parameter of OPT-1.3B and OPT-13B (bf16) in one `affine_noise_` call (one launch), for
block sizes and warp counts, Gaussian (fast and precise transcendentals) and Rademacher, with one
seed term and with two. Times are medians of 20 after a warm-up, in ms.

Then candidate streams that need less Philox work per element (the shipped pass is bound by
Philox arithmetic: README, "Measured"). They are prototypes for a versioned stream, not used by
training: 32 Rademacher signs per Philox word, Gaussian Box-Muller on 16-bit halves of each word
(8 normals per Philox call), and the shipped Gaussian with 7 Philox rounds.
"""

import json
import sys
import time

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from zoscale import kernels

PACKED_SIGNS, GAUSSIAN_16BIT, GAUSSIAN_7_ROUNDS = 0, 1, 2
PER_CALL = {PACKED_SIGNS: 128, GAUSSIAN_16BIT: 8, GAUSSIAN_7_ROUNDS: 4}  # elements per Philox call


@triton.jit
def _interleave4(a, b, c, d):
    """(n, ...) x4 -> (n, ..., 4) flattening to a, b, c, d element by element."""
    return tl.join(tl.join(a, c), tl.join(b, d))


@triton.jit
def _normal_pair(word):
    """Box-Muller on the two 16-bit halves of a word (centred: no zero uniform)."""
    u1 = ((word >> 16).to(tl.float32) + 0.5) * (1.0 / 65536.0)
    u2 = ((word & 0xFFFF).to(tl.float32) + 0.5) * (1.0 / 65536.0)
    r = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
    theta = 6.283185307179586 * u2
    return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)


@triton.jit
def _candidate_kernel(table_ptr, owner_ptr, seed, coef, MODE: tl.constexpr, PER_CALL: tl.constexpr,
                      ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """x += coef * z over segments that start at global element 0 (the benchmark's layout)."""
    row, base, lower, upper, _, _, stream = kernels._block(table_ptr, owner_ptr, 0, BLOCK)
    call = base // PER_CALL + tl.arange(0, BLOCK // PER_CALL)
    lo, hi = (call & 0xFFFFFFFF).to(tl.uint32), (call >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, lo, hi, lo * 0 + stream.to(tl.uint32), lo * 0, n_rounds=ROUNDS)
    if MODE == PACKED_SIGNS:  # bit b of word k -> element 128 * call + 4 * b + k
        bit = tl.arange(0, 32)[None, :]
        z = _interleave4((w0[:, None] >> bit) & 1, (w1[:, None] >> bit) & 1, (w2[:, None] >> bit) & 1,
                         (w3[:, None] >> bit) & 1)
        z = 1.0 - 2.0 * z.to(tl.float32)
    elif MODE == GAUSSIAN_16BIT:  # word k -> elements 8 * call + 2k, 2k + 1
        a0, b0 = _normal_pair(w0)
        a1, b1 = _normal_pair(w1)
        a2, b2 = _normal_pair(w2)
        a3, b3 = _normal_pair(w3)
        z = tl.join(_interleave4(a0, a2, b0, b2), _interleave4(a1, a3, b1, b3))
    else:
        r0 = tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w0))))
        r2 = tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w2))))
        t1 = 6.283185307179586 * tl.uint_to_uniform_float(w1)
        t3 = 6.283185307179586 * tl.uint_to_uniform_float(w3)
        z = _interleave4(r0 * libdevice.fast_cosf(t1), r0 * libdevice.fast_sinf(t1), r2 * libdevice.fast_cosf(t3),
                         r2 * libdevice.fast_sinf(t3))
    i = tl.arange(0, BLOCK)
    mask = (i >= lower) & (i < upper)
    x = kernels._pointer(row, 0, base, tl.bfloat16, True)
    y = tl.load(x + i, mask=mask, other=0.0).to(tl.float32) + coef * tl.reshape(z, (BLOCK,))
    tl.store(x + i, y.to(tl.bfloat16), mask=mask)


def candidate_pass(segments, mode):
    for launch in kernels._launches(segments):
        _candidate_kernel[(launch.owner.numel(),)](
            launch.table, launch.owner, 12345, 1e-3, MODE=mode, PER_CALL=PER_CALL[mode],
            ROUNDS=7 if mode == GAUSSIAN_7_ROUNDS else 10, BLOCK=kernels.BLOCK, num_warps=kernels.NUM_WARPS)


def timed(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2] * 1e3


def opt_shapes(hidden, ffn, layers, vocab=50272, positions=2050):
    layer = [(hidden, hidden), (hidden,)] * 4 + [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)] + [(hidden,)] * 4
    return [(vocab, hidden), (positions, hidden)] + layer * layers + [(hidden,), (hidden,)]


def main(out):
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    fast = kernels._fast
    for model, shapes in (("opt-1.3b", opt_shapes(2048, 8192, 24)), ("opt-13b", opt_shapes(5120, 20480, 40))):
        tensors = [torch.randn(s, device="cuda", dtype=torch.bfloat16).view(-1) for s in shapes]
        segments = [kernels.Segment(t, 0, (i * 2654435761) % 2**32) for i, t in enumerate(tensors)]
        row = {"tensors": len(tensors), "elements": sum(t.numel() for t in tensors),
               "in_place": timed(lambda: [t.add_(1e-3) for t in tensors]),
               "foreach_add": timed(lambda: torch._foreach_add_(tensors, 1e-3))}
        for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8)):
            kernels.BLOCK, kernels.NUM_WARPS = block, warps
            for name, dist, precise, terms in (("gaussian", "gaussian", False, [(1, 1e-3)]),
                                               ("gaussian_precise", "gaussian", True, [(1, 1e-3)]),
                                               ("gaussian_2terms", "gaussian", False, [(1, 1e-3), (2, -1e-3)]),
                                               ("rademacher", "rademacher", False, [(1, 1e-3)])):
                kernels._fast = (lambda: False) if precise else fast
                staged = kernels.Terms(terms, "cuda")
                row[f"{name}_b{block}_w{warps}"] = timed(
                    lambda: kernels.affine_noise_(segments, distribution=dist, terms=staged))
            kernels._fast = fast
            row[f"dot_gaussian_b{block}_w{warps}"] = timed(
                lambda: kernels.dot_noise(segments, distribution="gaussian", seed=3).item())
        kernels.BLOCK, kernels.NUM_WARPS = 1024, 4
        for name, mode in (("candidate_packed_signs", PACKED_SIGNS), ("candidate_gaussian_16bit", GAUSSIAN_16BIT),
                           ("candidate_gaussian_7_rounds", GAUSSIAN_7_ROUNDS)):
            try:
                row[name] = timed(lambda: candidate_pass(segments, mode))
            except Exception as e:  # a prototype that fails to compile is a result, not the end of the run
                row[name] = f"failed: {str(e).splitlines()[0][:200]}"
        results[model] = row
        print(model, json.dumps(row, indent=1), flush=True)
        tensors = segments = None  # free before the next model
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
