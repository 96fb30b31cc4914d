"""The Triton kernels against rng.py: on CPU through Triton's interpreter, on a GPU for real."""

import pytest
import torch

from zoscale.engine import PerturbationEngine, Shard, host, kernels, rng

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Short ranges are edge blocks only; the long ones reach unmasked interior blocks (BLOCK = 4096 elements),
# one with a block whose counters carry into the high word (element 2**34 is counter 2**32).
RANGES = [(0, 10), (3, 2000), (2**33 + 1, 1500), (7, 1), (2**31 - 5, 11), (2**34 - 6, 3000), (0, 3 * 4096),
          (5, 4 * 4096 + 9), (2**34 - 2 * 4096 - 6, 5 * 4096)]
# v2 panels: 4096 Gaussian and 16384 Rademacher elements; these reach interior panels of both, and
# single slots (512 and 128 elements) of a panel
RANGES_V2 = [(0, 10), (3, 2000), (4090, 9), (2**33 + 1, 1500), (2**34 - 6, 3000), (5, 2 * 16384 + 9),
             (16384 - 100, 16384 + 200), (600, 100), (2**40 - 4100, 3 * 4096)]
# On a GPU Box-Muller uses fast approximate log/cos/sin: a few 1e-6 from rng.py's precise ones.
GAUSS_TOL = 1e-5 if DEVICE == "cuda" else 2e-6
VERSIONED = [("v1", start, numel) for start, numel in RANGES] + [("v2", start, numel) for start, numel in RANGES_V2]


def z(distribution, seed, stream, start, numel, version="v1"):
    return host.generate_segments(distribution, seed, [(stream, start, numel)], version=version).to(DEVICE)


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("version,start,numel", VERSIONED)
def test_affine_noise_matches_rng(distribution, version, start, numel):
    seed, stream = 2**40 + 123, 3_000_000_000
    x = torch.randn(numel, device=DEVICE)
    terms = [(seed, 0.5), (seed + 1, -0.25), (seed + 2, 2.0), (2**64 - 1, 0.125)]  # any number, one pass
    out = torch.empty_like(x)
    kernels.affine_noise_([kernels.Segment(out, start, stream, x)], distribution=distribution, terms=terms,
                          alpha=0.9, version=version)
    expected = 0.9 * x + sum(c * z(distribution, s, stream, start, numel, version) for s, c in terms)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=4 * GAUSS_TOL)


@pytest.mark.parametrize("version,start,numel", VERSIONED)
def test_in_place_noise_is_bit_exact_in_the_integer_stream(version, start, numel):
    """With alpha=1 and c=1 on zeros the kernel writes z itself: equal to rng.py up to the
    float32 rounding of Box-Muller's transcendental functions (and exactly for Rademacher)."""
    seed, stream = 77, 5
    for distribution, tol in (("rademacher", 0.0), ("gaussian", GAUSS_TOL)):
        out = torch.zeros(numel, device=DEVICE)
        kernels.affine_noise_([kernels.Segment(out, start, stream)], distribution=distribution, terms=[(seed, 1.0)],
                              version=version)
        torch.testing.assert_close(out, z(distribution, seed, stream, start, numel, version), rtol=tol, atol=tol)


def test_half_precision_output_from_fp32_source():
    """The master-weights path: read fp32, write bf16, rounding once (to nearest on a GPU; the
    interpreter truncates, so allow one bf16 ulp per element)."""
    x = torch.randn(3000, device=DEVICE)
    out = torch.empty(3000, dtype=torch.bfloat16, device=DEVICE)
    kernels.affine_noise_([kernels.Segment(out, 5, 1, x)], distribution="gaussian", terms=[(9, 1e-3)])
    expected = x + 1e-3 * z("gaussian", 9, 1, 5, 3000)
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-7).all()


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("version,start,numel", VERSIONED)
def test_dot_matches_rng(distribution, version, start, numel):
    x = torch.randn(numel, device=DEVICE)
    got = kernels.dot_noise([kernels.Segment(x, start, 4)], distribution=distribution, seed=99, version=version).item()
    expected = torch.dot(x.double(), z(distribution, 99, 4, start, numel, version).double()).item()
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)) + 1e-6 * numel**0.5
    squares = kernels.dot_noise([kernels.Segment(x, start, 4)], distribution=distribution, seed=99, square=True,
                                version=version).item()
    expected = (z(distribution, 99, 4, start, numel, version).double() ** 2).sum().item()
    assert abs(squares - expected) <= 1e-5 * max(1.0, expected)


@pytest.mark.parametrize("version", rng.STREAMS)
@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_one_launch_over_mixed_segments(distribution, version):
    """Segments of several dtypes, starts (mod 4) and alignments, with a buffer read in the same
    pass, in one call: each gets exactly its own slice of its own stream."""
    torch.manual_seed(0)
    storage = torch.randn(5000, device=DEVICE)
    specs = [(storage[:700], 0, 11), (storage[1:1200], 2**32 + 2, 12), (torch.randn(33, device=DEVICE), 5, 13),
             (torch.randn(2500, device=DEVICE, dtype=torch.bfloat16), 4096, 14), (storage[1300:1301], 3, 15)]
    terms = [(2**63 + 5, 0.5), (17, -1.5)]
    buffers = [torch.randn(t.numel(), device=DEVICE, dtype=torch.float64 if i == 2 else torch.float32)
               for i, (t, _, _) in enumerate(specs)]
    outs = [torch.empty_like(t) for t, _, _ in specs]
    expected = [0.25 * t.float() - 2.0 * b.float() + sum(c * z(distribution, s, stream, start, t.numel(), version)
                                                         for s, c in terms)
                for (t, start, stream), b in zip(specs, buffers)]
    segments = [kernels.Segment(o, start, stream, t, b) for o, (t, start, stream), b in zip(outs, specs, buffers)]
    kernels.affine_noise_(segments, distribution=distribution, terms=terms, alpha=0.25, beta=-2.0, version=version)
    for out, want in zip(outs, expected):
        bf16 = out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, rtol=2**-7 if bf16 else 2e-6, atol=4 * GAUSS_TOL)
    plain = [kernels.Segment(t, start, stream) for t, start, stream in specs]
    got = kernels.dot_noise(plain, distribution=distribution, seed=17, version=version).item()
    want = sum(torch.dot(t.double(), z(distribution, 17, stream, start, t.numel(), version).double()).item()
               for t, start, stream in specs)
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want))
    squares = kernels.dot_noise(plain, distribution=distribution, seed=17, square=True, version=version).item()
    want = sum((z(distribution, 17, stream, start, t.numel(), version).double() ** 2).sum().item()
               for t, start, stream in specs)
    assert abs(squares - want) <= 1e-4 * want


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


@pytest.mark.parametrize("version", rng.STREAMS)
@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_engine_kernel_paths_equal_its_rng_path(distribution, version, monkeypatch):
    """The engine's batched kernel calls (one launch over all shards, a buffer fused into the pass,
    a second one added after, dot products summed on the device), and host shards staged through
    the kernels a chunk at a time (offload), give what its rng.py path gives. On CPU the kernels
    run under the interpreter, on a GPU for real."""
    torch.manual_seed(0)
    shapes, offsets = [(40, 7), (1001,), (3,), (64, 64)], [0, 2**32 + 3, 6, 2**34 - 2]
    values = [torch.randn(s, dtype=torch.float64) for s in shapes]
    results = []
    for mode in ("rng", "kernels", "staged"):
        device = DEVICE if mode == "kernels" else "cpu"
        monkeypatch.setattr(PerturbationEngine, "_on_kernels", staticmethod(lambda t, m=mode: m == "kernels"))
        tensors = [v.to(device, torch.float32) for v in values]
        compute = torch.device(DEVICE) if mode == "staged" else None  # an offloaded shard's compute device
        shards = [Shard(f"p{i}", t, offset=o, global_numel=o + t.numel(), compute_device=compute)
                  for i, (t, o) in enumerate(zip(tensors, offsets))]
        # chunks split shards and merge others
        engine = PerturbationEngine(shards, distribution, chunk_numel=1500, version=version)
        first, second = engine.new_buffer(), engine.new_buffer()
        engine.apply(shards, first.tensors, first.tensors, 0.0, {3: 1.0})
        engine.apply(shards, second.tensors, first.tensors, -1.0, {4: 0.5})
        engine.perturb({5: 0.1, first: 0.3, second: -0.2})
        perturbed = [t.cpu().clone() for t in tensors]
        engine.update({5: -0.01, first: 0.02})
        squares = engine.flush(advance=(first, 0.7, {5: 0.2, 6: -0.5}))  # the momentum rides on the pass
        results.append(([*perturbed, *(t.cpu().clone() for t in tensors), *(b.cpu().clone() for b in first.tensors)],
                        engine.dot(7), engine.dot(7, first.tensors), engine.noise_norm2(8), squares))
    (expected, *scalars), *others = results
    assert scalars[-1] == pytest.approx(sum(float((b.double() ** 2).sum()) for b in expected[-len(shapes):]), rel=1e-6)
    for got, *got_scalars in others:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=4 * GAUSS_TOL)
        for a, b in zip(got_scalars, scalars):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (a, b)


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_unaligned_views_and_split_interior_runs(distribution):
    """Views that start off a 4-element boundary (no vector hint), and an interior run cut around a
    carrying block, give the same slices of the stream."""
    storage = torch.randn(6 * 4096 + 11, device=DEVICE)
    for view, start in ((storage[1:], 0), (storage[3:3 * 4096], 2**34 - 4096 - 3), (storage[4:], 9)):
        out = torch.empty_like(view)
        kernels.affine_noise_([kernels.Segment(out, start, 21, view)], distribution=distribution, terms=[(3, 0.5)])
        torch.testing.assert_close(out, view + 0.5 * z(distribution, 3, 21, start, view.numel()), rtol=2e-6,
                                   atol=4 * GAUSS_TOL)
    masked = [launch.masked for launch in kernels.launch._plan([kernels.Segment(storage, 2**34 - 4096 - 3, 21)])]
    assert masked == [False, True]


def test_launch_tables_are_built_once_per_layout():
    x, y = torch.zeros(3 * 4096 + 1, device=DEVICE), torch.zeros(100, device=DEVICE)
    segments = [kernels.Segment(x, 0, 1), kernels.Segment(y, 7, 2)]
    first = kernels.launch._plan(segments)
    assert kernels.launch._plan([kernels.Segment(x, 0, 1), kernels.Segment(y, 7, 2)]) is first
    assert kernels.launch._plan([kernels.Segment(x, 4, 1), kernels.Segment(y, 7, 2)]) is not first  # another start


def test_sass_counts_meet_the_targets():
    """profiling/sass_count.py compiles the engine's kernels for sm_90 on this CPU (no GPU needed):
    instructions per element of the bf16 interior blocks, pinned with a margin (a regression guard;
    profiling/reports/ holds the full table)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pins = {"affine-gaussian-bfloat16-1": (24.81, 32), "affine-rademacher-bfloat16-1": (17.31, 22),
            "dot-gaussian-bfloat16": (25.62, 26), "affine-gaussian-bfloat16-1-buffer": (26.72, 30),
            "affine-gaussian-bfloat16-1-v2": (18.47, 24), "affine-rademacher-bfloat16-1-v2": (6.02, 8)}
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"sass-{os.getpid()}.json"
    done = subprocess.run([sys.executable, str(repo / "profiling" / "sass_count.py"), "--json", str(out), "--only",
                           *pins], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["name"]: r for r in json.loads(out.read_text())["records"]}
    out.unlink()
    for name, (measured, target) in pins.items():
        count = records[name]["instructions_per_element"]
        assert count <= target and abs(count - measured) <= 1.0, (name, count, measured, target)
        assert records[name]["per_element_by_pipe"].get("shared_memory", 0) < 0.1, name
