"""TDigest and RunningStats against the real Rust crates.

The fixtures only exercise digests of a few samples (every sample its own
centroid), so the compression paths are checked against vectors produced by
the real `tdigest` 0.2.3 crate: its source (MnO2/t-digest at the 0.2.3 commit)
was compiled with a small harness that drives it exactly as the runtime's
`RunningStats` does (one `merge_unsorted(vec![x])` per sample, Welford update
copied from `crates/adaptive/src/trie/accumulator.rs`, `merge` with
`merge_digests`).  Inputs come from a 64-bit LCG reproduced below; the harness
printed count/mean/m2, the percentiles, the digest sum, the number of centroids
and an FNV-1a hash over the IEEE bits of every centroid (mean, weight) followed
by sum, count, min, max.  None of these numbers came from this project's code.
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine import native
from worker.engine import tdigest as pure_module
from worker.engine.stats import RunningStats
from worker.engine.tdigest import TDigest

_M64 = (1 << 64) - 1


class _Lcg:
    """The harness's generator (PCG multiplier/increment, plain LCG)."""

    def __init__(self, seed: int) -> None:
        self.x = seed

    def next(self) -> int:
        self.x = (self.x * 6364136223846793005 + 1442695040888963407) & _M64
        return self.x

    def unit(self) -> float:
        return (self.next() >> 11) / 9007199254740992.0


def _fnv_digest(d: TDigest) -> str:
    h = 0xCBF29CE484222325
    values: list[float] = []
    for m, w in zip(d.means, d.weights, strict=True):
        values += [m, w]
    values += [d.sum, d.count, _nan0(d.min), _nan0(d.max)]
    for v in values:
        for b in struct.pack("<d", v):
            h = ((h ^ b) * 0x100000001B3) & _M64
    return f"{h:016x}"


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _feed(seed: int, n: int, make: Callable[[_Lcg, int], float]) -> RunningStats:
    g = _Lcg(seed)
    rs = RunningStats()
    for i in range(n):
        rs.add(make(g, i))
    return rs


def _sens(g: _Lcg, i: int) -> float:
    return 0.0 if i % 3 == 0 else 1.0 if i % 3 == 1 else g.unit()


def _scenarios() -> dict[str, RunningStats]:
    out = {
        "uniform10k": _feed(42, 10000, lambda g, _: g.unit() * 1000.0),
        "tokens3k": _feed(7, 3000, lambda g, _: float(((g.next() >> 33) % 50) * 10)),
        "ttn1500": _feed(99, 1500, lambda g, _: float((g.next() >> 33) % 2000) - 500.0),
        "sens5k": _feed(5, 5000, _sens),
        "small120": _feed(11, 120, lambda g, _: g.unit() * 10.0),
    }
    g = _Lcg(2024)
    x, y = RunningStats(), RunningStats()
    for _ in range(700):
        x.add(g.unit() * 50.0 + 100.0)
    for _ in range(1300):
        y.add(g.unit() * 3.0)
    xy = RunningStats.from_wire(x.to_wire())
    xy.merge(y)
    out["merge_x_y"] = xy
    empty = RunningStats()
    empty.merge(x)
    out["merge_empty_x"] = empty
    small = RunningStats()
    for v in (1.0, 2.0, 3.0):
        small.add(v)
    ys = RunningStats.from_wire(y.to_wire())
    ys.merge(small)
    out["merge_y_small"] = ys
    return out


# name: (count, mean, m2, fnv hash, centroids, p50, p90, p95, sum), printed by the Rust harness.
RUST_VECTORS: dict[str, tuple[int, float, float, str, int, float, float, float, float]] = {
    "uniform10k": (10000, 497.0168915251357, 827669417.3541834, "801fa0e30d70622a", 100,
                   494.67184019315476, 896.4741304714945, 947.5698470905785, 4970168.915251344),
    "tokens3k": (3000, 244.34666666666624, 63106519.46666662, "ae2d0772fac1e94a", 100,
                 245.44260097201274, 448.2317073170732, 469.875, 733040.0),
    "ttn1500": (1500, 517.3906666666666, 494218389.06933343, "ce7318221529a04e", 100,
                510.876784687423, 1313.5135416666667, 1399.6612654320988, 776086.0),
    "merge_x_y": (2000, 44.56419840136557, 7034893.685471844, "1d4e3cfed98a8898", 101,
                  2.3176906095913523, 135.63655472090235, 142.6073409263934, 89128.39680273115),
    "merge_empty_x": (700, 124.51233255606826, 150540.15337064618, "6534f8c57063ce69", 98,
                      124.7864912627356, 144.16081932640364, 146.3716935382951,
                      87158.63278924779),
    "merge_y_small": (1303, 1.5163192735866216, 982.5303729866309, "b7d6d96b4cf0b501", 101,
                      1.5637582010183466, 2.696021051235075, 2.8266160996282346,
                      1975.7640134833678),
    "sens5k": (5000, 0.49773201479197066, 975.5375343944106, "5621cb32760476b8", 100,
               0.49262287918654046, 1.0, 1.0, 2488.6600739598525),
    "small120": (120, 4.54177069561654, 988.3327135548493, "9ebbda70510c329b", 90,
                 4.434468372432349, 8.703966977616034, 9.216132016488718, 545.0124834739847),
}  # fmt: skip


@pytest.fixture(scope="module", params=["c-kernel", "loop"])
def scenarios(request: pytest.FixtureRequest) -> Iterator[dict[str, RunningStats]]:
    """The crate's scenarios through the C one-sample kernel and through the loop."""
    if request.param == "c-kernel" and native.KERNEL is None:
        pytest.skip("no C kernel built for this source (make install builds it)")
    native.use_kernel(native.KERNEL if request.param == "c-kernel" else None)
    try:
        yield _scenarios()
    finally:
        native.use_kernel(native.KERNEL)


@pytest.mark.parametrize("name", sorted(RUST_VECTORS))
def test_bit_exact_against_rust_crate(scenarios: dict[str, RunningStats], name: str) -> None:
    count, mean, m2, digest_hash, ncent, p50, p90, p95, total = RUST_VECTORS[name]
    rs = scenarios[name]
    assert rs.count == count
    assert rs.mean == mean
    assert rs.m2 == m2
    assert len(rs.digest.means) == ncent
    assert rs.digest.sum == total
    assert _fnv_digest(rs.digest) == digest_hash
    m = rs.metrics()
    assert (m["p50"], m["p90"], m["p95"]) == (p50, p90, p95)


def test_wire_round_trip_keeps_every_bit(scenarios: dict[str, RunningStats]) -> None:
    """JSON text (shortest repr, correctly rounded reader) loses nothing, and a
    reloaded digest keeps evolving exactly like the original."""
    for rs in scenarios.values():
        again = RunningStats.from_wire(json.loads(json.dumps(rs.to_wire())))
        assert again.to_wire() == rs.to_wire()
        original = RunningStats.from_wire(rs.to_wire())
        for v in (0.5, 123.25, -7.0):
            original.add(v)
            again.add(v)
            assert again.to_wire() == original.to_wire()


def test_unmerged_heavy_centroid_is_re_rounded() -> None:
    """Every emitted centroid goes through `Centroid::add`, which recomputes
    `(w * mean) / w` even when nothing merged: 0.1 with weight 3 becomes
    0.10000000000000002.  Output of the real crate (TDigest::new with these
    centroids, then merge_unsorted(vec![7.0]), then merge_digests)."""
    t = TDigest.from_wire(
        {"centroids": [{"mean": 0.1, "weight": 3.0}, {"mean": 5.0, "weight": 1.0}],
         "count": 4.0, "max": 5.0, "max_size": 100, "min": 0.1, "sum": 5.3}
    )  # fmt: skip
    t.add(7.0)
    assert list(zip(t.means, t.weights, strict=True)) == [
        (0.10000000000000002, 3.0), (5.0, 1.0), (7.0, 1.0)
    ]  # fmt: skip
    assert (t.sum, t.count, t.min, t.max) == (12.3, 5.0, 0.1, 7.0)
    other = TDigest.from_wire(
        {"centroids": [{"mean": 0.7, "weight": 3.0}],
         "count": 3.0, "max": 0.7, "max_size": 100, "min": 0.7, "sum": 2.1}
    )  # fmt: skip
    u = TDigest.merge_digests([t, other])
    assert list(zip(u.means, u.weights, strict=True)) == [
        (0.10000000000000002, 3.0), (0.6999999999999998, 3.0), (5.0, 1.0), (7.0, 1.0)
    ]  # fmt: skip
    assert (u.sum, u.count, u.min, u.max) == (14.399999999999999, 8.0, 0.1, 7.0)


def test_crate_regression_case() -> None:
    """The crate's own `test_centroid_addition_regression` (max_size 10)."""
    t = TDigest(10)
    for v in (1.0, 1.0, 1.0, 2.0, 1.0, 1.0):
        t.add(v)
    assert abs(t.estimate_quantile(0.5) - 1.0) < 0.01
    assert abs(t.estimate_quantile(0.95) - 2.0) / 2.0 < 0.01


def test_small_sets_are_not_linear_interpolation() -> None:
    """SPEC 3: with every sample its own centroid the crate's estimate differs
    from the textbook percentile.  Values from the captured trie
    (relay-openai, root any-index output_tokens after the 4 runs, whose calls
    reported 61, 213 | 61, 200, 213 | 61, 200 | 61, 187, 200 tokens: p50
    196.75, p90 213.0; linear interpolation would give 193.5 for p50)."""
    t = TDigest()
    for v in (61.0, 213.0, 61.0, 200.0, 213.0, 61.0, 200.0, 61.0, 187.0, 200.0):
        t.add(v)
    assert t.estimate_quantile(0.5) == 196.75
    assert t.estimate_quantile(0.9) == 213.0


def test_empty_digest_wire_form() -> None:
    """SPEC 3 / the runtime's serde wrapper: NaN min/max are written as 0.0,
    keys sorted, floats as floats, max_size an integer."""
    assert TDigest().to_wire() == {
        "centroids": [],
        "count": 0.0,
        "max": 0.0,
        "max_size": 100,
        "min": 0.0,
        "sum": 0.0,
    }
    assert list(TDigest().to_wire()) == ["centroids", "count", "max", "max_size", "min", "sum"]
    assert json.dumps(TDigest().to_wire()["count"]) == "0.0"
    # The runtime reads `null` (what serde_json makes of NaN) back as 0.0.
    loaded = TDigest.from_wire(
        {"centroids": [], "count": 0.0, "max": None, "max_size": 100, "min": None, "sum": 0.0}
    )
    assert loaded.min == 0.0 and loaded.max == 0.0
    assert loaded.estimate_quantile(0.5) == 0.0


def test_empty_running_stats_metrics_are_zero() -> None:
    assert RunningStats().metrics() == {
        "sample_count": 0,
        "mean": 0.0,
        "p50": 0.0,
        "p90": 0.0,
        "p95": 0.0,
    }


def _exact_percentile(sorted_xs: list[float], pct: float) -> float:
    k = (len(sorted_xs) - 1) * pct
    f = math.floor(k)
    c = math.ceil(k)
    if f == c:
        return sorted_xs[f]
    return sorted_xs[f] + (sorted_xs[c] - sorted_xs[f]) * (k - f)


@pytest.mark.parametrize("dist", ["normal", "uniform", "lognormal"])
def test_percentiles_within_one_percent_on_10k_smooth_samples(dist: str) -> None:
    rng = random.Random(20260401)
    draw: dict[str, Callable[[], float]] = {
        "normal": lambda: rng.gauss(1000.0, 100.0),
        "uniform": lambda: rng.uniform(100.0, 1100.0),
        "lognormal": lambda: rng.lognormvariate(5.0, 0.3),
    }
    xs = [draw[dist]() for _ in range(10_000)]
    rs = RunningStats()
    for x in xs:
        rs.add(x)
    m = rs.metrics()
    xs.sort()
    for key, pct in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95)):
        exact = _exact_percentile(xs, pct)
        assert abs(m[key] - exact) / abs(exact) < 0.01, (key, m[key], exact)
    assert len(rs.digest.means) <= 101  # stays compressed: O(1) per metric


_values = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_values, _values)
def test_merge_agrees_with_adding_everything(left: list[float], right: list[float]) -> None:
    """Chan's combine gives the same count/mean/m2 as one Welford pass (up to
    rounding: the two formulas are different float programs)."""
    a, b, whole = RunningStats(), RunningStats(), RunningStats()
    for x in left:
        a.add(x)
        whole.add(x)
    for x in right:
        b.add(x)
        whole.add(x)
    a.merge(b)
    assert a.count == whole.count == len(left) + len(right)
    scale = max([1.0, *(abs(x) for x in left + right)])
    assert math.isclose(a.mean, whole.mean, rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert math.isclose(a.m2, whole.m2, rel_tol=1e-7, abs_tol=1e-7 * scale * scale)
    assert a.digest.count == float(a.count)
    if a.count:
        assert a.digest.min == min(left + right)
        assert a.digest.max == max(left + right)


def test_merging_empty_is_a_no_op() -> None:
    rs = RunningStats()
    for v in (3.0, 1.0, 2.0):
        rs.add(v)
    before = rs.to_wire()
    rs.merge(RunningStats())
    assert rs.to_wire() == before


def test_compiled_digest_gives_the_same_bits_as_the_python_one() -> None:
    """`make install` compiles tdigest.py with mypyc; the learner must not notice."""
    from worker.engine import native

    if not native.IMPLEMENTATION.startswith("mypyc"):
        pytest.skip("no compiled t-digest for this source (make install builds it)")
    rng = random.Random(11)
    samples = [rng.lognormvariate(3, 1.2) for _ in range(5000)]
    compiled, pure = native.TDigest(100), TDigest(100)
    other_c, other_p = native.TDigest(100), TDigest(100)
    for i, x in enumerate(samples):
        compiled.add(x)
        pure.add(x)
        if i % 3 == 0:
            other_c.add(-x)
            other_p.add(-x)
    assert compiled.to_wire() == pure.to_wire()
    merged_c = native.TDigest.merge_digests([compiled, other_c])
    merged_p = TDigest.merge_digests([pure, other_p])
    assert merged_c.to_wire() == merged_p.to_wire()
    for q in (0.5, 0.9, 0.95, 0.999):
        assert merged_c.estimate_quantile(q) == merged_p.estimate_quantile(q)


def _bits(d: TDigest) -> list[bytes]:
    """Every float of the digest as IEEE bits (NaN equals NaN; -0.0 differs from 0.0)."""
    floats = [*d.means, *d.weights, d.sum, d.count, d.min, d.max]
    return [struct.pack("<d", x) for x in floats]


_samples = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 1.0, 1e-300, 5e-324, 1e300, 2.5]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_samples, min_size=1, max_size=300),
    st.integers(1, 120),
    st.lists(st.floats(allow_nan=False, width=32), max_size=12),
)
def test_c_kernel_gives_the_loops_bits(
    values: list[float], max_size: int, stored: list[float]
) -> None:
    """The C one-sample kernel against this module's loop, bit for bit: odd
    samples (NaN, infinities, -0.0, subnormals, ties), tiny and large
    max_size, and a stored digest whose means are out of order."""
    if native.KERNEL is None:
        pytest.skip("no C kernel built for this source (make install builds it)")
    start = {
        "centroids": [{"mean": m, "weight": 1.0 + (i % 3)} for i, m in enumerate(stored)],
        "count": float(sum(1.0 + (i % 3) for i in range(len(stored)))),
        "max": max(stored, default=0.0),
        "max_size": max_size,
        "min": min(stored, default=0.0),
        "sum": 0.0,
    }
    digests = []
    for kernel in (native.KERNEL, None):
        native.use_kernel(kernel)
        try:
            d = TDigest.from_wire(start)
            trail = []
            for v in values:
                d.add(v)
                trail.append(_bits(d))
        finally:
            native.use_kernel(native.KERNEL)
        digests.append(trail)
    assert digests[0] == digests[1]


def test_c_kernel_declines_what_it_does_not_know() -> None:
    """Anything but exact floats in exact lists goes back to the loop (None)."""
    kernel = native.KERNEL
    if kernel is None:
        pytest.skip("no C kernel built for this source (make install builds it)")
    assert kernel.merge_one([1.0, 2], [1.0, 1.0], 1.5, 3.0, 100, True) is None
    assert kernel.merge_one((1.0,), [1.0], 1.5, 2.0, 100, True) is None
    assert kernel.merge_one([1.0], [1.0, 2.0], 1.5, 2.0, 100, True) is None
    assert kernel.merge_one([1.0], [1.0], 1, 2.0, 100, True) is None
    means, weights, total, in_order = kernel.merge_one([1.0], [1.0], 3.0, 2.0, 100, True)
    assert (means, weights, total, in_order) == ([1.0, 3.0], [1.0, 1.0], 4.0, True)
    with pytest.raises(TypeError):
        kernel.merge_one([1.0], [1.0], 3.0)


def test_both_compiled_builds_use_the_kernel_when_selected() -> None:
    """`use_kernel` reaches the mypyc build too (its module globals are its own)."""
    compiled = sys.modules.get("_tdigest_native") or sys.modules.get(
        "worker.engine._tdigest_native"
    )
    modules = [pure_module] + ([compiled] if compiled is not None else [])
    calls: list[int] = []

    class Spy:
        @staticmethod
        def merge_one(*args: object) -> None:
            calls.append(1)  # then decline: the loop runs

    native.use_kernel(Spy)
    try:
        for cls in {native.TDigest, TDigest}:
            d = cls(100)
            d.add(1.0)
            d.add(2.0)
    finally:
        native.use_kernel(native.KERNEL)
    assert len(calls) == 2 * len({native.TDigest, TDigest})
    assert all(m._KERNEL is native.KERNEL for m in modules)
