import json
import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from zoscale.engine import host, rng

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "data" / "triton_philox_vectors_h100.json"


@pytest.fixture(scope="module")
def h100_vectors():
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} not present (it ships in ../shared beside the project)")
    return json.loads(VECTORS.read_text())


def test_philox_words_equal_triton_on_h100(h100_vectors):
    offsets = h100_vectors["offsets"]
    lo = torch.tensor([o & 0xFFFFFFFF for o in offsets])
    hi = torch.tensor([o >> 32 for o in offsets])
    for case in h100_vectors["cases"]:
        words = rng.philox4x32(case["seed"], lo, hi)
        for k in range(4):
            assert words[k].tolist() == case["randint4x"][k], f"seed {case['seed']} word {k}"


def test_gaussian_matches_triton_randn4x_layout(h100_vectors):
    """Element 4j+k of stream 0 is randn4x(seed, offset=j)[k], to float32 rounding of the transform."""
    for case in h100_vectors["cases"]:
        for i, offset in enumerate(h100_vectors["offsets"]):
            if 4 * offset + 4 > 2**63:  # beyond the 63-bit element index space
                continue
            ours = rng.gaussian(case["seed"], 0, 4 * offset, 4)
            theirs = torch.tensor([case["randn4x"][k][i] for k in range(4)])
            torch.testing.assert_close(ours, theirs, rtol=5e-7, atol=5e-7)
            # randn (one normal per offset) is the first lane.
            assert abs(ours[0].item() - case["randn"][i]) <= 5e-7 * max(1.0, abs(case["randn"][i]))


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_slices_equal_the_same_range_of_a_longer_run(distribution):
    seed, stream = 2**40 + 17, 3_000_000_001
    full = host.generate_segments(distribution, seed, [(stream, 5, 1000)])
    for a, b in [(5, 6), (5, 9), (7, 300), (299, 1005), (1004, 1005), (6, 6)]:
        part = host.generate_segments(distribution, seed, [(stream, a, b - a)])
        assert torch.equal(part, full[a - 5 : b - 5]), (a, b)


def test_multi_segment_call_equals_separate_calls():
    segments = [(1, 0, 7), (2, 13, 1), (1, 2**33 + 3, 50), (9, 4, 4)]
    joined = host.generate_segments("gaussian", 11, segments)
    separate = torch.cat([rng.gaussian(11, s, a, n) for s, a, n in segments])
    assert torch.equal(joined, separate)


def test_64_bit_element_indices():
    """Starts past 2**31 and 2**32 address distinct, well-defined elements (no wrap-around)."""
    low = rng.gaussian(3, 1, 8, 64)
    for start in (2**31 + 8, 2**32 + 8, 2**62 + 8):
        high = rng.gaussian(3, 1, start, 64)
        assert not torch.equal(high, low)
        assert torch.equal(high[4:], rng.gaussian(3, 1, start + 4, 60))
    with pytest.raises(ValueError):
        rng.gaussian(3, 1, 2**63 - 2, 4)


def test_gaussian_distribution():
    z = rng.gaussian(123, 7, 0, 200_000).double()
    assert abs(z.mean().item()) < 4 / 200_000**0.5
    assert abs(z.var().item() - 1.0) < 0.015
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(z.numpy())) < 0.1  # excess kurtosis of a normal is 0


def test_rademacher_distribution():
    z = rng.rademacher(123, 7, 0, 200_000)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 4 / 200_000**0.5


@pytest.mark.parametrize("other", [(124, 7), (123, 8)], ids=["other-seed", "other-stream"])
def test_no_correlation_across_streams_and_seeds(other):
    n = 200_000
    z = rng.gaussian(123, 7, 0, n).double()
    w = rng.gaussian(*other, 0, n).double()
    assert abs(torch.corrcoef(torch.stack([z, w]))[0, 1].item()) < 4 / n**0.5
    # neighbouring elements within one stream are uncorrelated too
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 4 / n**0.5


def test_stream_ids_and_seed_mixing_are_stable():
    # Fixed values: changing them would silently change every saved seed log.
    assert rng.stream_id("model.decoder.layers.0.fc1.weight") == rng.stream_id("model.decoder.layers.0.fc1.weight")
    assert rng.stream_id("a") != rng.stream_id("b")
    assert rng.stream_id("model.decoder.embed_tokens.weight") == 270094208  # blake2b-32, little endian
    assert rng.mix_seed(0, 0) == rng.mix_seed(0, 0) != rng.mix_seed(0, 1)
    assert rng.mix_seed(1, 2, 3) != rng.mix_seed(1, 3, 2)
    assert rng.mix_seed(42, 7, 0) == 6424825876015065953


def test_a_small_z_served_again_is_a_copy_of_the_same_values():
    """generate_segments keeps the last few small z (a MeZO step reads each three times): a caller
    that writes into what it got changes nothing for the next caller."""
    segments = [(7, 3, 1000), (8, 0, 77)]
    first = host.generate_segments("gaussian", 41, segments)
    expected = first.clone()
    first.mul_(0.0)
    again = host.generate_segments("gaussian", 41, segments)
    assert torch.equal(again, expected)
    assert torch.equal(host.generate_segments("gaussian", 41, segments, dtype=torch.float64), expected.double())


# -- stream v2 ---------------------------------------------------------------------------------------
def philox_python(seed: int, counter: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Philox4x32-10 on Python integers: an independent statement of the generator."""
    mask = 0xFFFFFFFF
    k0, k1 = seed & mask, seed >> 32
    c0, c1, c2, c3 = counter
    for _ in range(10):
        a, b = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = (b >> 32) ^ c1 ^ k0, b & mask, (a >> 32) ^ c3 ^ k1, a & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def v2_element(distribution: str, seed: int, stream: int, i: int) -> float:
    """Element i of a v2 stream, spelled out from rng.py's docstring."""
    slots, q = rng.V2_SLOTS[distribution], rng.V2_CALLS[distribution]
    panel, within = divmod(i, slots * q)
    slot, j = divmod(within, q)
    call = panel * q + j
    words = philox_python(seed, (call & 0xFFFFFFFF, call >> 32, stream, 2))
    if distribution == "rademacher":
        return -1.0 if (words[slot // 32] >> (slot % 32)) & 1 else 1.0
    word = words[slot // 2]
    u1, u2 = ((word >> 16) + 0.5) / 65536, ((word & 0xFFFF) + 0.5) / 65536
    radius = math.sqrt(-2 * math.log(u1))
    return radius * (math.cos(2 * math.pi * u2) if slot % 2 == 0 else math.sin(2 * math.pi * u2))


V2_INDICES = (0, 1, 511, 512, 4095, 4096, 16383, 16384, 2**33 + 17, 2**40 + 5)


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_v2_elements_are_the_documented_function_of_seed_stream_and_index(distribution):
    seed, stream = 2**40 + 7, 123
    for i in V2_INDICES:
        ours = host.generate_segments(distribution, seed, [(stream, i, 1)], version="v2").item()
        assert ours == pytest.approx(v2_element(distribution, seed, stream, i), abs=2e-6), i


def test_v2_known_answers():
    """Pinned values: a change here changes what every v2 seed log means."""
    seed, stream = 2**40 + 7, 123
    known = {"gaussian": [0.543035, 0.286974, 1.196792, 1.377589, 0.021917, 1.146443, -1.762465, 0.494121,
                          -0.280924, 0.802415],
             "rademacher": [-1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0]}
    for distribution, values in known.items():
        got = [host.generate_segments(distribution, seed, [(stream, i, 1)], version="v2").item() for i in V2_INDICES]
        assert got == pytest.approx(values, abs=1e-6), distribution


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_v2_slices_equal_the_same_range_of_a_longer_run(distribution):
    seed, stream = 2**40 + 17, 3_000_000_001
    full = host.generate_segments(distribution, seed, [(stream, 5, 40_000)], version="v2")
    for a, b in [(5, 6), (7, 300), (500, 530), (4090, 4100), (16380, 16390), (299, 40_005), (20_000, 36_000)]:
        part = host.generate_segments(distribution, seed, [(stream, a, b - a)], version="v2")
        assert torch.equal(part, full[a - 5 : b - 5]), (a, b)
    joined = host.generate_segments(distribution, seed, [(1, 3, 700), (2, 2**33, 5000)], version="v2")
    separate = torch.cat([host.generate_segments(distribution, seed, [s], version="v2")
                          for s in [(1, 3, 700), (2, 2**33, 5000)]])
    assert torch.equal(joined, separate)


def test_v2_distributions_and_separation_from_v1():
    n = 200_000
    z = rng.gaussian(123, 7, 0, n, version="v2").double()
    assert abs(z.mean().item()) < 4 / n**0.5 and abs(z.var().item() - 1.0) < 0.015
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3 and abs(stats.kurtosis(z.numpy())) < 0.1
    assert z.abs().max().item() <= 4.8546  # sqrt(-2 ln(0.5 / 2**16)): the 16-bit uniform's cap
    signs = rng.rademacher(123, 7, 0, n, version="v2")
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(signs.mean().item()) < 4 / n**0.5
    for distribution, v2 in (("gaussian", z), ("rademacher", signs.double())):
        v1 = host.generate_segments(distribution, 123, [(7, 0, n)]).double()
        assert abs(torch.corrcoef(torch.stack([v1, v2]))[0, 1].item()) < 4 / n**0.5
        # neighbours (consecutive calls) and a panel's slots (the same call) are uncorrelated
        for lag in (1, rng.V2_CALLS[distribution]):
            assert abs(torch.corrcoef(torch.stack([v2[:-lag], v2[lag:]]))[0, 1].item()) < 4 / n**0.5
    # the domain word differs: v1's counter (j, 0, stream, 0) and v2's (j, 0, stream, 2) give other words
    assert rng.philox4x32(9, torch.tensor([5]), torch.tensor([0]), 7, 2)[0].item() != \
        rng.philox4x32(9, torch.tensor([5]), torch.tensor([0]), 7, 0)[0].item()


def test_v2_gaussian_moments_are_those_of_16_bit_uniforms():
    """Exactly, over all 2**16 values of each half (they are independent): E z^2 = E r^2 E cos^2,
    the numbers docs/numerics.md states."""
    u = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    r2, c2 = -2 * torch.log(u), torch.cos(2 * math.pi * u) ** 2
    second, fourth = r2.mean() * c2.mean(), (r2**2).mean() * (c2**2).mean()
    assert second.item() == pytest.approx(0.99999471, abs=1e-8)
    assert (fourth / second**2).item() == pytest.approx(2.99982, abs=1e-5)
    assert r2.max().sqrt().item() == pytest.approx(4.85459, abs=1e-5)


def test_the_compiled_cpu_philox_gives_the_same_words(monkeypatch):
    """Passes over 4M+ elements take a compiled Philox on the CPU (torch.compile); the words, and so
    every value, are the eager ones. ZOSCALE_COMPILE=0 keeps it off."""
    block = torch.arange(2**32 - 1000, 2**32 - 1000 + host._CHUNK_COUNTERS, dtype=torch.int64)
    stream = torch.full_like(block, 3_000_000_001)
    eager = rng.philox4x32(2**63 + 9, block & 0xFFFFFFFF, block >> 32, stream)
    monkeypatch.setattr(host, "_compiled_philox", None)
    compiled = host._philox_words(2**63 + 9, block, stream, compiled=True)
    assert host._compiled_philox  # it compiled here (a C++ compiler is present)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    monkeypatch.setattr(host, "_compiled_philox", None)
    monkeypatch.setenv("ZOSCALE_COMPILE", "0")
    host._philox_words(5, block, stream, compiled=True)
    assert host._compiled_philox is False
