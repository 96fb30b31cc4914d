"""The Triton kernels against rng.py: on CPU through Triton's interpreter, on a GPU for real."""

import pytest
import torch

from zoscale import kernels, rng
from zoscale.shards import PerturbationEngine, Shard

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RANGES = [(0, 10), (3, 2000), (2**33 + 1, 1500), (7, 1), (2**31 - 5, 11)]


def z(distribution, seed, stream, start, numel):
    return rng.generate_segments(distribution, seed, [(stream, start, numel)]).to(DEVICE)


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("start,numel", RANGES)
def test_affine_noise_matches_rng(distribution, start, numel):
    seed, stream = 2**40 + 123, 3_000_000_000
    x = torch.randn(numel, device=DEVICE)
    terms = [(seed, 0.5), (seed + 1, -0.25), (seed + 2, 2.0), (2**64 - 1, 0.125)]  # any number, one pass
    out = torch.empty_like(x)
    kernels.affine_noise_(out, x, distribution=distribution, stream=stream, start=start, terms=terms, alpha=0.9)
    expected = 0.9 * x + sum(c * z(distribution, s, stream, start, numel) for s, c in terms)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("start,numel", RANGES)
def test_in_place_noise_is_bit_exact_in_the_integer_stream(start, numel):
    """With alpha=1 and c=1 on zeros the kernel writes z itself: equal to rng.py up to the
    float32 rounding of Box-Muller's transcendental functions (and exactly for Rademacher)."""
    seed, stream = 77, 5
    for distribution, tol in (("rademacher", 0.0), ("gaussian", 2e-6)):
        out = torch.zeros(numel, device=DEVICE)
        kernels.affine_noise_(out, out, distribution=distribution, stream=stream, start=start, terms=[(seed, 1.0)])
        torch.testing.assert_close(out, z(distribution, seed, stream, start, numel), rtol=tol, atol=tol)


def test_half_precision_output_from_fp32_source():
    """The master-weights path: read fp32, write bf16, rounding once (to nearest on a GPU; the
    interpreter truncates, so allow one bf16 ulp per element)."""
    x = torch.randn(3000, device=DEVICE)
    out = torch.empty(3000, dtype=torch.bfloat16, device=DEVICE)
    kernels.affine_noise_(out, x, distribution="gaussian", stream=1, start=5, terms=[(9, 1e-3)])
    expected = x + 1e-3 * z("gaussian", 9, 1, 5, 3000)
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-7).all()


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("start,numel", RANGES)
def test_dot_matches_rng(distribution, start, numel):
    x = torch.randn(numel, device=DEVICE)
    got = kernels.dot_noise(x, distribution=distribution, stream=4, start=start, seed=99).item()
    expected = torch.dot(x.double(), z(distribution, 99, 4, start, numel).double()).item()
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)) + 1e-6 * numel**0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_dispatches_cuda_tensors_to_the_kernels_with_cpu_equal_results():
    torch.manual_seed(0)
    cpu = torch.randn(10_000)
    gpu = cpu.cuda()
    for t in (cpu, gpu):
        engine = PerturbationEngine([Shard("w", t, offset=2**32 + 1, global_numel=2**33)])
        engine.perturb({5: 0.1})
        engine.update({5: -0.01})
        engine.flush()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
