"""Rate-limited log lines, for what a peer can make us log: a token bucket per
key. Pure (the caller passes the time)."""

from __future__ import annotations

__all__ = ["LogBudget"]


class LogBudget:
    """Rate-limits log lines per key (a refusal reason): ``burst`` lines at once,
    then ``per_second``. ``take`` returns None to stay quiet, else how many lines
    of that key were left out since the last one. Pure (time is passed in)."""

    def __init__(self, per_second: float = 1.0, burst: float = 10.0) -> None:
        self.per_second = per_second
        self.burst = burst
        self._buckets: dict[str, tuple[float, float, int]] = {}  # tokens, last, skipped

    def take(self, key: str, now: float) -> int | None:
        tokens, last, skipped = self._buckets.get(key, (self.burst, now, 0))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now, skipped + 1)
            return None
        self._buckets[key] = (tokens - 1.0, now, 0)
        return skipped
