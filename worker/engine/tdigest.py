"""A port of the Rust `tdigest` crate, version 0.2.3 (github.com/MnO2/t-digest).

Why a port and not a library: the NeMo Relay runtime stores its percentiles as
this crate's digest, and the stored centroids, sums and estimates are compared
bit for bit with what the runtime wrote.  Any other t-digest (different scale
function, different merge order, different interpolation) drifts from those
bits, so every float operation below is done in the crate's order.  Python
floats are IEEE-754 doubles like Rust's `f64` and neither side fuses
multiply-adds, so the same expression order gives the same bits.

Facts about the crate that matter (all easy to get wrong):

* The scale function is `k_to_q` (a two-sided quadratic), evaluated as
  `k_to_q(k, max_size) * count`; limits are recomputed after every emitted
  centroid.
* `merge_sorted` starts its limit counter at k = 2 after computing the first
  limit, while `merge_digests` computes the first limit twice (k stays 1 for
  the second centroid).  Both are ported as they are.
* Every emitted centroid goes through `Centroid::add(sum, weight)` even when
  nothing is merged into it, which recomputes `mean = (w * mean) / w`; for
  w > 1 that can move the mean by one ulp.  The digest's `sum` is rebuilt
  from these per-centroid sums on every compression, never incremented.
* `estimate_quantile` interpolates between neighbouring centroid means and
  clamps; with every sample its own centroid it is not the textbook
  linear-interpolation percentile.
* An empty digest has min/max NaN.  The runtime's serde wrapper writes NaN as
  `0.0` (it replaces every JSON null by 0.0) and reads `null` back as `0.0`.

The runtime feeds one sample at a time (`merge_unsorted(vec![x])`), so the hot
path is `add`, written with parallel lists of means and weights instead of
centroid objects. When `make install` built it, a C kernel
(`_tdigest_kernel.c`, loaded by `native.py` into `_KERNEL`) does that
one-sample insert and recompression on plain doubles, operation for
operation the same as `_compress` below; it declines (returns None) on
anything unusual and this module's loop runs instead.  (`merge_digests` may
leave max_size + 1 centroids; the crate does too.)

Verified bit for bit against the crate itself (its 0.2.3 source compiled with
a small harness; see tests/engine/test_tdigest.py), including compression,
merges and the re-rounding of unmerged heavy centroids.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

DEFAULT_MAX_SIZE = 100
_NAN = float("nan")

# The C one-sample kernel, set by worker.engine.native when its build matches
# the source; None means the Python loop below.
_KERNEL: Any = None


def _k_to_q(k: float, d: float) -> float:
    """The crate's scale function (quantile limit for the k-th centroid)."""
    k_div_d = k / d
    if k_div_d >= 0.5:
        base = 1.0 - k_div_d
        return 1.0 - 2.0 * base * base
    return 2.0 * k_div_d * k_div_d


# k_to_q only depends on (k, max_size); the runtime always uses 100, so the
# values are memoised per max_size.  The multiplication by the count is done
# at use, exactly where the crate does it.
_KQ_CACHE: dict[int, list[float]] = {}


def _kq_table(max_size: int, upto: int) -> list[float]:
    """k_to_q(k, max_size) for k = 0..upto (at least).  A grown table replaces
    the old one in a single assignment, so threads never see a half-built one."""
    table = _KQ_CACHE.get(max_size)
    if table is None or len(table) <= upto:
        d = float(max_size)
        size = max(upto + 1, 2 * max_size + 8)
        table = [_k_to_q(float(k), d) for k in range(size)]
        _KQ_CACHE[max_size] = table
    return table


def _compress(
    means: Sequence[float],
    weights: Sequence[float],
    count: float,
    max_size: int,
    second_k: int,
) -> tuple[list[float], list[float], float]:
    """The greedy compression loop shared by `merge_sorted` and `merge_digests`.

    `means`/`weights` is the merged, sorted stream of centroids.  The first
    limit uses k = 1; `second_k` is the k used after the first emitted
    centroid (2 in merge_sorted, 1 in merge_digests: see the module docstring).
    Returns the compressed (sorted) centroids and the rebuilt digest sum.
    This is the hot loop of the whole learner, hence the local bindings.
    """
    n = len(means)
    # Each emitted centroid raises k by one, so n + second_k + 1 entries suffice.
    kq = _kq_table(max_size, n + second_k + 1)
    out_m: list[float] = []
    out_w: list[float] = []
    push_m = out_m.append
    push_w = out_w.append
    total = 0.0  # result.sum, rebuilt from each emitted centroid's new_sum
    q_limit_times_count = kq[1] * count
    k_limit = second_k

    pairs = zip(means, weights, strict=True)
    cur_m, cur_w = next(pairs)
    weight_so_far = cur_w
    sums_to_merge = 0.0
    weights_to_merge = 0.0
    for nm, nw in pairs:
        weight_so_far += nw
        if weight_so_far <= q_limit_times_count:
            sums_to_merge += nm * nw
            weights_to_merge += nw
        else:
            # Centroid::add(sums_to_merge, weights_to_merge), applied even
            # when nothing was merged (it re-rounds the mean of heavy centroids).
            new_sum = sums_to_merge + cur_w * cur_m
            new_w = cur_w + weights_to_merge
            total += new_sum
            push_m(new_sum / new_w)
            push_w(new_w)
            sums_to_merge = 0.0
            weights_to_merge = 0.0
            q_limit_times_count = kq[k_limit] * count
            k_limit += 1
            cur_m = nm
            cur_w = nw
    new_sum = sums_to_merge + cur_w * cur_m
    new_w = cur_w + weights_to_merge
    total += new_sum
    push_m(new_sum / new_w)
    push_w(new_w)

    # `compressed.sort()`: a stable sort by mean.  Re-rounding can push a mean
    # past its neighbour, so it is not always a no-op; usually it is.
    prev = out_m[0]
    for m in out_m:
        if m < prev:
            return _sorted_by_mean(out_m, out_w, total)
        prev = m
    return out_m, out_w, total


def _sorted_by_mean(
    means: list[float], weights: list[float], total: float
) -> tuple[list[float], list[float], float]:
    order = sorted(range(len(means)), key=means.__getitem__)
    return [means[i] for i in order], [weights[i] for i in order], total


class TDigest:
    """A t-digest with the crate's exact arithmetic (see the module docstring).

    Mutable for speed: `add` replaces the state in place where the crate
    returns a new digest; the result is the same.
    """

    __slots__ = ("_sorted", "count", "max", "max_size", "means", "min", "sum", "weights")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.means: list[float] = []
        self.weights: list[float] = []
        self.max_size = max_size
        self.sum = 0.0
        self.count = 0.0
        self.max = _NAN
        self.min = _NAN
        self._sorted = True  # means ascending (compression output always is)

    # -- construction / copying -------------------------------------------------

    def copy(self) -> TDigest:
        out = TDigest(self.max_size)
        out.means = list(self.means)
        out.weights = list(self.weights)
        out.sum = self.sum
        out.count = self.count
        out.max = self.max
        out.min = self.min
        out._sorted = self._sorted
        return out

    def is_empty(self) -> bool:
        return not self.means

    # -- updates ----------------------------------------------------------------

    def add(self, value: float) -> None:
        """`merge_unsorted(vec![value])`: the runtime's per-sample update."""
        self.merge_sorted((float(value),))

    def merge_unsorted(self, values: Iterable[float]) -> None:
        """Sort (total order, like `OrderedFloat`) and merge; NaN sorts last."""
        vals = sorted((float(v) for v in values), key=lambda v: (v != v, v))
        self.merge_sorted(vals)

    def merge_sorted(self, values: Sequence[float]) -> None:
        """The crate's `merge_sorted`, done in place."""
        if not values:
            return
        old_count = self.count
        count = old_count + float(len(values))
        first = values[0]
        last = values[-1]
        if old_count > 0.0:
            # std::cmp::min/max over OrderedFloat: NaN is the largest value.
            new_min = _ord_min(self.min, first)
            new_max = _ord_max(self.max, last)
        else:
            new_min = first
            new_max = last

        self.means, self.weights, self.sum = self._insert_and_compress(values, count)
        self._sorted = True
        self.count = count
        self.min = new_min
        self.max = new_max

    def _insert_and_compress(
        self, values: Sequence[float], count: float
    ) -> tuple[list[float], list[float], float]:
        """Interleave stored centroids and new values (a centroid goes first only
        when its mean is strictly below the next value), then compress."""
        means = self.means
        weights = self.weights
        if len(values) == 1:
            v = values[0]
            if _KERNEL is not None:
                done = _KERNEL.merge_one(means, weights, v, count, self.max_size, self._sorted)
                if done is not None:
                    out_m, out_w, total, in_order = done
                    if not in_order:
                        return _sorted_by_mean(out_m, out_w, total)
                    return out_m, out_w, total
            # Centroids taken before v: the leading run with mean < v.  On
            # sorted means (always, unless a stored value was not) that is
            # bisect_left, done in C.
            if self._sorted:
                i = bisect_left(means, v)
            else:
                i = next((k for k, m in enumerate(means) if not m < v), len(means))
            m_in = means[:i]
            m_in.append(v)
            m_in += means[i:]
            w_in = weights[:i]
            w_in.append(1.0)
            w_in += weights[i:]
        else:
            m_in = []
            w_in = []
            i = j = 0
            n, nv = len(means), len(values)
            while i < n or j < nv:
                if i < n and (j >= nv or means[i] < values[j]):
                    m_in.append(means[i])
                    w_in.append(weights[i])
                    i += 1
                else:
                    m_in.append(values[j])
                    w_in.append(1.0)
                    j += 1
        return _compress(m_in, w_in, count, self.max_size, 2)

    @staticmethod
    def merge_digests(digests: Sequence[TDigest]) -> TDigest:
        """The crate's `merge_digests`: concatenate, stable-merge, compress.

        Digests with count 0 contribute nothing (not even min/max).  The crate
        merges the per-digest runs pairwise with ties going to the earlier
        digest; on sorted runs (every digest the crate or this class makes) a
        stable sort of the concatenation is the same thing.
        """
        m_all: list[float] = []
        w_all: list[float] = []
        count = 0.0
        lo = math.inf
        hi = -math.inf
        for d in digests:
            if d.count > 0.0:
                lo = _ord_min(lo, d.min)
                hi = _ord_max(hi, d.max)
                count += d.count
                m_all.extend(d.means)
                w_all.extend(d.weights)
        if not m_all:
            return TDigest(DEFAULT_MAX_SIZE)  # TDigest::default()
        max_size = digests[0].max_size
        order = sorted(range(len(m_all)), key=m_all.__getitem__)
        m_sorted = [m_all[i] for i in order]
        w_sorted = [w_all[i] for i in order]
        out = TDigest(max_size)
        out.means, out.weights, out.sum = _compress(m_sorted, w_sorted, count, max_size, 1)
        out.count = count
        out.min = lo
        out.max = hi
        return out

    # -- queries ----------------------------------------------------------------

    def estimate_quantile(self, q: float) -> float:
        """The crate's `estimate_quantile` (0.0 for an empty digest)."""
        means = self.means
        weights = self.weights
        n = len(means)
        if n == 0:
            return 0.0
        count = self.count
        rank = q * count
        if q > 0.5:
            if q >= 1.0:
                return self.max
            pos = 0
            t = count
            for k in range(n - 1, -1, -1):
                t -= weights[k]
                if rank >= t:
                    pos = k
                    break
        else:
            if q <= 0.0:
                return self.min
            pos = n - 1
            t = 0.0
            for k in range(n):
                if rank < t + weights[k]:
                    pos = k
                    break
                t += weights[k]

        delta = 0.0
        lo = self.min
        hi = self.max
        if n > 1:
            if pos == 0:
                delta = means[1] - means[0]
                hi = means[1]
            elif pos == n - 1:
                delta = means[pos] - means[pos - 1]
                lo = means[pos - 1]
            else:
                delta = (means[pos + 1] - means[pos - 1]) / 2.0
                lo = means[pos - 1]
                hi = means[pos + 1]
        value = means[pos] + ((rank - t) / weights[pos] - 0.5) * delta
        # The crate's clamp: compare with hi first, then lo (NaN passes through).
        if value > hi:
            return hi
        if value < lo:
            return lo
        return value

    # -- wire form --------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The runtime's stored form: keys sorted (it goes through a
        `serde_json::Value` map), floats as floats, NaN written as 0.0."""
        return {
            "centroids": [
                {"mean": _nan0(m), "weight": _nan0(w)}
                for m, w in zip(self.means, self.weights, strict=True)
            ],
            "count": _nan0(self.count),
            "max": _nan0(self.max),
            "max_size": self.max_size,
            "min": _nan0(self.min),
            "sum": _nan0(self.sum),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> TDigest:
        """Read the stored form; `null` floats read as 0.0 like the runtime."""
        out = cls(int(data["max_size"]))
        cents = data["centroids"]
        out.means = [_f(c["mean"]) for c in cents]
        out.weights = [_f(c["weight"]) for c in cents]
        means = out.means
        out._sorted = all(means[i] <= means[i + 1] for i in range(len(means) - 1))
        out.sum = _f(data["sum"])
        out.count = _f(data["count"])
        out.max = _f(data["max"])
        out.min = _f(data["min"])
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TDigest):
            return NotImplemented
        return self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TDigest(count={self.count}, centroids={len(self.means)})"


def _ord_min(a: float, b: float) -> float:
    """`std::cmp::min` on OrderedFloat (NaN greater than everything; ties -> a)."""
    if a != a:
        return b
    if b != b:
        return a
    return b if b < a else a


def _ord_max(a: float, b: float) -> float:
    """`std::cmp::max` on OrderedFloat (NaN greatest; ties -> b)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a > b else b


def _nan0(x: float) -> float:
    return x if x == x else 0.0


def _f(x: Any) -> float:
    return 0.0 if x is None else float(x)
