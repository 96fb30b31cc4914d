"""The perturbation kernel's launch settings on one GPU, against the in-place floor.

    python3 profiling/kernel_variants.py OUT.json

Every parameter of OPT-1.3B and OPT-13B (bf16) in one `affine_noise_` call (one launch), for
block sizes and warp counts, Gaussian (fast and precise transcendentals) and Rademacher, with one
seed term and with two. Times are medians of 20 after a warm-up, in ms.
"""

import json
import sys
import time

import torch

from zoscale import kernels


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
        results[model] = row
        print(model, json.dumps(row, indent=1), flush=True)
        tensors = segments = None  # free before the next model
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
