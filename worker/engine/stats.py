"""RunningStats: one metric's streaming accumulator, as the runtime stores it.

Mirrors `nemo-relay-adaptive`'s `trie::accumulator::RunningStats`: Welford's
count/mean/m2 plus a t-digest (max_size 100) for percentiles.  The stored value
is compared bit for bit with the runtime's, so the Welford update and Chan's
merge below keep the source's exact operation order (reordering a single
floating-point operation changes the last bits of `mean`/`m2`).
"""

from __future__ import annotations

from typing import Any

from worker.engine.native import DEFAULT_MAX_SIZE, TDigest


class RunningStats:
    """count (int), mean, m2 (Welford) and the digest.  `__slots__` because
    the learner creates and touches thousands of these per batch."""

    __slots__ = ("count", "digest", "m2", "mean")

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: float = 0.0
        self.m2: float = 0.0
        self.digest: TDigest = TDigest(DEFAULT_MAX_SIZE)

    def has_samples(self) -> bool:
        return self.count > 0

    def add(self, value: float) -> None:
        """Welford update in the source's order, then one-value digest merge."""
        value = float(value)
        self.count += 1
        delta = value - self.mean
        self.mean += delta / float(self.count)
        delta2 = value - self.mean
        self.m2 += delta * delta2
        self.digest.add(value)

    def merge(self, other: RunningStats) -> None:
        """Chan et al. parallel combine, exactly as the runtime writes it.

        Merging an empty accumulator is a no-op (the digest is not even
        recompressed).  Merging into an empty one is NOT a plain copy: the mean
        is recomputed as `(0*0 + m*n)/n` and the digest goes through
        `merge_digests`, which can recompress it; that is what the runtime does.
        """
        if other.count == 0:
            return
        combined = self.count + other.count
        delta = other.mean - self.mean
        self.mean = (self.mean * float(self.count) + other.mean * float(other.count)) / float(
            combined
        )
        # `(self.count * other.count) as f64`: integer product, then float.
        self.m2 += other.m2 + delta * delta * float(self.count * other.count) / float(combined)
        self.count = combined
        self.digest = TDigest.merge_digests([self.digest, other.digest])

    def metrics(self) -> dict[str, Any]:
        """PredictionMetrics: all zeros when empty, percentiles from the digest."""
        if self.count == 0:
            return {"sample_count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p95": 0.0}
        d = self.digest
        return {
            # `self.count as u32` (truncating cast; unreachable in practice).
            "sample_count": self.count & 0xFFFFFFFF,
            "mean": self.mean,
            "p50": d.estimate_quantile(0.50),
            "p90": d.estimate_quantile(0.90),
            "p95": d.estimate_quantile(0.95),
        }

    def to_wire(self) -> dict[str, Any]:
        """Stored form, fields in the runtime's (struct) order."""
        return {
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "digest": self.digest.to_wire(),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> RunningStats:
        out = cls.__new__(cls)
        out.count = int(data["count"])
        out.mean = float(data["mean"])
        out.m2 = float(data["m2"])
        out.digest = TDigest.from_wire(data["digest"])
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunningStats):
            return NotImplemented
        return self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RunningStats(count={self.count}, mean={self.mean!r}, m2={self.m2!r})"
